"""Recompute a whole network's stem for its late readers instead of keeping it between bands.

In output bands (`memtile.rows.engine.demand_plan`) the decoder lags the encoder by the network's
reach. A skip from the stem (smp Unet: resnet's first, 64-channel half-resolution map) is read by
the encoder at the front of the bands and by the decoder at their back, so 2PS keeps every row in
between from forward to backward: at 1024² with resnet18, 59.5 of the 146 MiB it keeps. The stem
is a chain from the image, which every band can read whole, so a copy of the chain can feed the
decoder at the decoder's pace: each of its rows is computed once more, and few are kept.
"""

from __future__ import annotations

import copy

from torch import fx

from memtile.rows.engine import in_place


def stem(gm: fx.GraphModule) -> list[fx.Node]:
    """The chain from the image input to the first node with several consumers, each node reading
    only the one before it (and parameters); [] where the input itself branches, where a node of
    the chain reads another tensor or the chain reaches the output, and where the first node
    writes into the image in place (each copy of the chain reads the image as it was)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return []
    chain: list[fx.Node] = []
    node = placeholders[0]
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or [a for a in user.all_input_nodes if a.op != "get_attr"] != [node]:
            return []
        chain.append(user)
        node = user
    if chain and in_place(gm, chain[0]):
        return []
    return chain


def recompute_stem(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]] | None:
    """A copy of `gm` (sharing its modules and parameters) in which every consumer of the stem's
    output but the first reads its own copy of the stem, and the names of the stem's nodes; None
    where `gm` has no such stem."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    chain = stem(copied)
    if not chain:
        return None
    graph, end = copied.graph, chain[-1]
    for user in list(end.users)[1:]:
        copies: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(user):
            for node in chain:
                copies[node] = graph.node_copy(node, lambda a, made=copies: made.get(a, a))
        user.replace_input_with(end, copies[end])
    graph.lint()
    copied.recompile()
    return copied, [n.name for n in chain]
