"""The one module-level fx trace that tiling and row-centric training share.

Spatial analysis reads a graph of modules and functions. Real models (timm) check their input
with `torch._assert(x.ndim == 4, ...)`, which fx records as `getattr` / `eq` / `_assert` nodes.
Those nodes compute nothing the model returns, and every shape they read is static: memtile runs a
traced graph only at the shape it was analysed for. Left in, they look like unknown ops and end
every band and tile at the first norm layer, so they are removed here, once, for both users.

Given example inputs, the trace is specialised to their shapes: every tensor carries a fake value
(shape, dtype, no data), and reading its shape, dimension count or size gives the number, not a
proxy. Python control flow on shapes then runs as in eager (segmentation-models-pytorch checks
`if h % output_stride != 0` before every forward, which plain fx cannot trace). Only metadata is
concrete: a branch on tensor data still fails to trace. Tiling runs its graph only at the traced
shape and checks every rewrite against the model, so a shape baked into an op's arguments cannot
pass silently.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memtile.errors import UnsupportedOpError
from memtile.freeze import FrozenBatchNorm2d

_SHAPE_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_SHAPE_METHODS = frozenset({"dim", "size", "numel"})
_COMPARISONS = frozenset({operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                          operator.ge, operator.and_, operator.or_, operator.not_,
                          operator.getitem})


def trace(module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None
          ) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with shape checks removed; a clear error when fx cannot trace.

    With `example_inputs` the graph is specialised to their shapes (see the module doc).
    Frozen norms stay leaves (a frozen timm `BatchNormAct2d` is not in torch.nn, so fx would
    trace into it). A GraphModule is returned as it is (it may be the caller's own, already
    rewritten graph).
    """
    if isinstance(module, fx.GraphModule):
        return module
    try:
        tracer = _Tracer() if example_inputs is None else _ShapedTracer(module, example_inputs)
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


class _ShapedTracer(_Tracer):
    """`_Tracer` that runs every node on fake tensors as it records it, so that shape reads give
    numbers. A node fake mode cannot run keeps no value; shape reads on it stay proxies."""

    def __init__(self, root: nn.Module, example_inputs: Sequence[torch.Tensor]):
        super().__init__()
        self._root = root
        self._mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._inputs = iter([self._mode.from_tensor(t) for t in example_inputs])
        self.values: dict[fx.Node, Any] = {}
        self._evaluating = False

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # a module called while a node's value is computed: run, record nothing
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        node = proxy.node
        self._evaluating = True
        try:
            with torch.no_grad(), self._mode:
                self.values[node] = self._run(node)
        except Exception:  # noqa: BLE001, S110 - no value: shape reads on it stay symbolic
            pass
        finally:
            self._evaluating = False
        return proxy

    def _run(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return next(self._inputs)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), self._root)
        if node.op == "call_module":
            return self._root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        raise KeyError(node.op)  # output: no value


class _ShapedProxy(fx.Proxy):
    """A proxy whose tensor's metadata reads (`x.shape`, `x.ndim`, `x.size(2)`) are numbers."""

    def __getattr__(self, attr: str) -> Any:
        value = self.tracer.values.get(self.node)
        if isinstance(value, torch.Tensor) and attr in _SHAPE_ATTRIBUTES | _SHAPE_METHODS:
            return getattr(value, attr)
        return super().__getattr__(attr)


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
