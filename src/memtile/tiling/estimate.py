"""Fast peak estimate on the fx graph, to rank tiling candidates before the exact re-plan.

Discovery weighs hundreds of (path, method, N) candidates; exporting and planning each costs
seconds, so candidates are ranked by this liveness estimate (execution order, views share their
base's storage) with the candidate's path collapsed into one step that needs `extra` working
bytes. Only the best few are applied and re-planned through capture and the planner.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from memtile.tiling.ffmt import FFMTTiles
from memtile.tiling.rewrite import module_of, nbytes

_VIEW_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                 "t", "expand", "narrow", "contiguous"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                   torch.transpose, torch.narrow, operator.getitem}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)


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

    @property
    def objective(self) -> tuple[int, int]:
        return (self.peak_bytes, self.peak_without_input_bytes)


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return isinstance(module_of(gm, node), _VIEW_MODULES)


def estimate_peak(gm: fx.GraphModule, collapse: Collapse | None = None) -> Estimate:
    """Estimated peak bytes of running `gm` in graph order (shapes must be propagated)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    hidden = collapse.nodes if collapse else frozenset()
    last_hidden = max((i for i, n in enumerate(nodes) if n.name in hidden), default=-1)
    step_of: dict[fx.Node, int] = {}
    extra: dict[int, int] = {}
    step = 0
    for index, node in enumerate(nodes):
        if node.name in hidden and index != last_hidden:
            continue
        step_of[node] = step
        module = module_of(gm, node)
        if index == last_hidden:
            extra[step] = collapse.extra
        elif isinstance(module, FFMTTiles):
            extra[step] = module.tile_bytes()
        step += 1
    macro = step_of[nodes[last_hidden]] if hidden else None

    def where(node: fx.Node) -> int:
        return macro if node.name in hidden else step_of[node]

    base: dict[fx.Node, fx.Node] = {}
    span: dict[fx.Node, list[int]] = {}
    for node in nodes:
        if node.op != "placeholder" and node.all_input_nodes and _is_view(gm, node):
            base[node] = base.get(node.all_input_nodes[0], node.all_input_nodes[0])
        else:
            base[node] = node
            span[node] = [0 if node.op == "placeholder" else where(node)] * 2
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in base:
                owner = span[base[arg]]
                owner[1] = max(owner[1], where(node))
    outputs = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    for node in outputs:
        span[base[node]][1] = step
    internal = {n for n in nodes if n.name in hidden and n not in outputs
                and all(u.name in hidden for u in n.users)}
    live = [extra.get(s, 0) for s in range(step + 1)]
    no_input = list(live)
    sizes = {}
    for node, (start, end) in span.items():
        if node in internal:
            continue
        sizes[node] = nbytes(node)
        for s in range(start, end + 1):
            live[s] += sizes[node]
            if node.op != "placeholder":
                no_input[s] += sizes[node]

    def at(step: int) -> tuple[tuple[str, int], ...]:
        found = [(n.name, sizes[n]) for n, (a, b) in span.items() if n in sizes and a <= step <= b]
        return tuple(sorted(found, key=lambda item: -item[1]))

    peak = max(range(len(live)), key=live.__getitem__)
    peak_no_input = max(range(len(no_input)), key=no_input.__getitem__)
    return Estimate(live[peak], no_input[peak_no_input], at(peak), at(peak_no_input))
