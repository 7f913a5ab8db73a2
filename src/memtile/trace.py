"""The one module-level fx trace that tiling and row-centric training share.

Spatial analysis reads a graph of modules and functions. Real models (timm) check their input
with `torch._assert(x.ndim == 4, ...)`, which fx records as `getattr` / `eq` / `_assert` nodes.
Those nodes compute nothing the model returns, and every shape they read is static: memtile runs a
traced graph only at the shape it was analysed for. Left in, they look like unknown ops and end
every band and tile at the first norm layer, so they are removed here, once, for both users.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from memtile.errors import UnsupportedOpError
from memtile.freeze import FrozenBatchNorm2d

_SHAPE_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_SHAPE_METHODS = frozenset({"dim", "size", "numel"})
_COMPARISONS = frozenset({operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                          operator.ge, operator.and_, operator.or_, operator.not_,
                          operator.getitem})


def trace(module: nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with shape checks removed; a clear error when fx cannot trace.

    Frozen norms stay leaves (a frozen timm `BatchNormAct2d` is not in torch.nn, so fx would
    trace into it). A GraphModule is returned as it is (it may be the caller's own, already
    rewritten graph).
    """
    if isinstance(module, fx.GraphModule):
        return module
    try:
        tracer = _Tracer()
        graph = tracer.trace(module)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(module).__name__} ({exc}); memtile needs a forward "
            "free of data-dependent control flow"
        ) from exc
    return drop_shape_checks(gm)


class _Tracer(fx.Tracer):
    """fx's tracer, with frozen norms (`memtile.freeze`) kept as one module call each."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FrozenBatchNorm2d) or super().is_leaf_module(m, module_qualified_name)


def drop_shape_checks(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase `_assert` nodes and the shape reads that only fed them (in place; returns `gm`)."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch._assert, torch._assert_async):
            graph.erase_node(node)
            changed = True
    while True:
        dead = [n for n in graph.nodes if not n.users and _is_shape_read(n)]
        if not dead:
            break
        for node in dead:
            graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


def _is_shape_read(node: fx.Node) -> bool:
    """A node that only reads static tensor metadata or compares such reads."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target in _COMPARISONS
