"""Fast peak estimate on the fx graph, to rank tiling candidates before the exact re-plan.

Discovery weighs hundreds of (path, method, N) candidates; exporting and planning each costs
seconds, so candidates are ranked by this liveness estimate (execution order, views share their
base's storage) with the candidate's path collapsed into one step that needs `extra` working
bytes. Like the planner (`memtile.inplace`), an elementwise op may write over an input that
dies there. Only the best few are applied and re-planned through capture and the planner.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from memtile import ops
from memtile.tiling.fdt import Accumulate, PartialSum
from memtile.tiling.ffmt import FFMTTiles
from memtile.tiling.rewrite import module_of, nbytes


@dataclass(frozen=True)
class Collapse:
    """A candidate: the nodes of its path run as one step that needs `extra` bytes beyond its
    inputs and outputs."""

    nodes: frozenset[str]
    extra: int


@dataclass(frozen=True)
class Estimate:
    """Peak with and without the model inputs' buffers, and the storages live at each peak
    (node name, bytes), largest first."""

    peak_bytes: int
    peak_without_input_bytes: int
    live: tuple[tuple[str, int], ...]
    live_without_input: tuple[tuple[str, int], ...]
    crowding: int  # steps at the peak without inputs: blocks that tie must all be tiled
    at_peaks: frozenset[str]  # storages live at any step that reaches either peak

    @property
    def objective(self) -> tuple[int, int, int]:
        return (self.peak_bytes, self.peak_without_input_bytes, self.crowding)


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Returns (a view of) its input: shares its storage."""
    return ops.kind(gm, node) in (ops.VIEW, ops.IDENTITY, ops.SPLIT)


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """May write its output over an input that dies there (as `memtile.inplace` plans it)."""
    return ops.is_elementwise(gm, node) or isinstance(module_of(gm, node),
                                                      (Accumulate, PartialSum))


class _Facts:
    """What `estimate_peak` reads of each node of a graph, worked out once per graph: discovery
    estimates thousands of candidates on a few dozen graphs (mobilenet_v2: 2,500 on 26)."""

    def __init__(self, gm: fx.GraphModule):
        self.nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
        self.nbytes = {n: nbytes(n) for n in self.nodes}
        self.viewed = {n: ops.tensor_inputs(n)[0] for n in self.nodes  # its view's base; a
                       if n.op != "placeholder" and ops.tensor_inputs(n)  # view of a parameter
                       and _is_view(gm, n)}  # (get_attr) is its own
        self.elementwise = {n for n in self.nodes if is_elementwise(gm, n)}
        self.users = {n: [u for u in n.users if u.op != "output"] for n in self.nodes}
        self.outputs = set(next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes)
        self.tile_bytes = {n: module.tile_bytes() for n in self.nodes
                           if isinstance(module := module_of(gm, n), FFMTTiles)}


_facts: weakref.WeakKeyDictionary[fx.GraphModule, tuple[tuple, _Facts]] = (
    weakref.WeakKeyDictionary())


def _facts_of(gm: fx.GraphModule) -> _Facts:
    """`gm`'s facts, again when a node or its shape metadata has changed since."""
    stamp = tuple((id(n), id(n.meta.get("tensor_meta"))) for n in gm.graph.nodes)
    known = _facts.get(gm)
    if known is None or known[0] != stamp:
        known = _facts[gm] = stamp, _Facts(gm)
    return known[1]


def _storages(facts: _Facts, group: dict[str, Collapse], where: Callable[[fx.Node], int],
              last_use: Callable[[fx.Node], int]) -> dict[fx.Node, list[fx.Node]]:
    """Storage root -> the nodes whose values live in it: views share their base's storage; an
    elementwise op may take the storage of an input of its size that dies there."""
    base: dict[fx.Node, fx.Node] = {}
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in facts.nodes:
        root = node
        if node.name not in group and node in facts.viewed:  # a collapsed step makes its
            root = base[facts.viewed[node]]  # outputs anew
        elif node.name not in group and node in facts.elementwise:
            for arg in node.all_input_nodes:
                owner = base.get(arg)
                if (owner is not None and owner.op != "placeholder"
                        and facts.nbytes[owner] == facts.nbytes[node]
                        and max(last_use(m) for m in members[owner]) == where(node)):
                    root = owner
                    break
        base[node] = root
        members.setdefault(root, []).append(node)
    return members


def estimate_peak(gm: fx.GraphModule, *collapses: Collapse) -> Estimate:
    """Estimated peak bytes of running `gm` in graph order (shapes must be propagated), with
    each of the (disjoint) `collapses` run as one step."""
    live, no_input, spans, _ = _profile(gm, collapses)

    def at(step: int) -> tuple[tuple[str, int], ...]:
        found = [(n.name, nbytes) for n, (a, b, nbytes) in spans.items() if a <= step <= b]
        return tuple(sorted(found, key=lambda item: -item[1]))

    peak = max(range(len(live)), key=live.__getitem__)
    peak_no_input = max(range(len(no_input)), key=no_input.__getitem__)
    tied = [s for s in range(len(live))
            if live[s] == live[peak] or no_input[s] == no_input[peak_no_input]]
    return Estimate(live[peak], no_input[peak_no_input], at(peak), at(peak_no_input),
                    no_input.count(no_input[peak_no_input]),
                    frozenset(name for s in tied for name, _ in at(s)))


def collapsed_objectives(gm: fx.GraphModule, nodes: frozenset[str], extras: Sequence[int]
                         ) -> list[tuple[int, int, int]]:
    """`estimate_peak(gm, Collapse(nodes, extra)).objective` for each extra, from one liveness
    pass: the working bytes only add to the collapsed step (an FFMT span is weighed for nine
    grids; mobilenet_v2: 1,566 estimates become 174)."""
    live, no_input, _, steps = _profile(gm, (Collapse(nodes, 0),))
    step = next(iter(steps.values()))
    found = []
    for extra in extras:
        with_live, with_no_input = list(live), list(no_input)
        with_live[step] += extra
        with_no_input[step] += extra
        top = max(with_no_input)
        found.append((max(with_live), top, with_no_input.count(top)))
    return found


def _profile(gm: fx.GraphModule, collapses: Sequence[Collapse]
             ) -> tuple[list[int], list[int], dict[fx.Node, tuple[int, int, int]],
                        dict[Collapse, int]]:
    """Live bytes per step, with and without the inputs' buffers; each storage's (first step,
    last step, bytes); the step each collapse runs at."""
    facts = _facts_of(gm)
    nodes, size = facts.nodes, facts.nbytes
    group = {name: c for c in collapses for name in c.nodes}
    last_of = {group[n.name]: i for i, n in enumerate(nodes) if n.name in group}
    step_of: dict[fx.Node, int] = {}
    macro: dict[Collapse, int] = {}
    extra: dict[int, int] = {}
    step = 0
    for index, node in enumerate(nodes):
        collapse = group.get(node.name)
        if collapse is not None and index != last_of[collapse]:
            continue
        step_of[node] = step
        if collapse is not None:
            macro[collapse] = step
            extra[step] = collapse.extra
        elif node in facts.tile_bytes:
            extra[step] = facts.tile_bytes[node]
        step += 1
    outputs = facts.outputs

    def where(node: fx.Node) -> int:
        return macro[group[node.name]] if node.name in group else step_of[node]

    def last_use(node: fx.Node) -> int:
        if node in outputs:
            return step
        return max((where(u) for u in facts.users[node]), default=where(node))

    members = _storages(facts, group, where, last_use)
    internal = {n for n in nodes if n.name in group and n not in outputs
                and all(group.get(u.name) is group[n.name] for u in n.users)}
    inputs_change = [0] * (step + 2)  # live bytes change at each step: starts and ends
    others_change = [0] * (step + 2)
    spans: dict[fx.Node, tuple[int, int, int]] = {}
    for root, members_of_root in members.items():
        if root in internal:
            continue
        start = 0 if root.op == "placeholder" else where(root)
        spans[root] = (start, max(last_use(m) for m in members_of_root), size[root])
        change = inputs_change if root.op == "placeholder" else others_change
        change[start] += size[root]
        change[spans[root][1] + 1] -= size[root]
    no_input = [extra.get(s, 0) + bytes_ for s, bytes_
                in enumerate(itertools.accumulate(others_change[:-1]))]
    live = [a + b for a, b in zip(no_input, itertools.accumulate(inputs_change[:-1]),
                                  strict=True)]
    return live, no_input, spans, macro
