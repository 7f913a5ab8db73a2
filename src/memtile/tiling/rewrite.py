"""fx graph-rewrite helpers shared by FDT and FFMT.

Both rewrites take a `torch.fx.GraphModule`, replace a chain of nodes ("path") by per-partition
copies, and hand back a new GraphModule; these helpers keep that bookkeeping in one place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from memtile import ops
from memtile.errors import UnsupportedOpError
from memtile.freeze import FrozenBatchNorm2d


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor],
                     before: fx.GraphModule | None = None) -> fx.GraphModule:
    """Give every node `meta['tensor_meta']` (shape, dtype) from one run of `gm` on fake tensors:
    shapes without the compute (tiling propagates every candidate rewrite of a model; a real
    run of mobilenet_v2 with FFMT tiles costs seconds). The parameters stay real; fake mode reads
    only their metadata. A graph that fake tensors cannot run (an op without a fake kernel,
    data-dependent code) is run for real.

    `before`: the graph (shapes propagated) that `gm` was rewritten from. A node of `gm` that is
    in `before` under its name with the same op, target and arguments (by name), and whose
    inputs' metadata is unchanged, keeps its metadata from `before` and is not run: a rewrite
    runs only the nodes it made, their consumers, and any node whose inputs' shapes changed."""
    prop = (_FakeShapeProp(gm) if before is None  # made outside the mode: no fake copy of `gm`
            else _Incremental(gm, before))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.no_grad(), mode:
            prop.propagate(*(mode.from_tensor(t) for t in inputs))
    except Exception:  # noqa: BLE001 - fake mode raises many types; the real run says why
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    return gm


def _signature(gm: fx.GraphModule, node: fx.Node) -> tuple:
    module = type(module_of(gm, node)) if node.op == "call_module" else None
    return (node.op, node.target, module, fx.map_arg(node.args, lambda n: n.name),
            fx.map_arg(node.kwargs, lambda n: n.name))


class _FakeShapeProp(ShapeProp):
    """ShapeProp on fake tensors that skips modules whose output shape is known without running
    them: those with an `empty_output` (FFMT's tiles: the shape they were made for, where a run
    tile by tile on fake tensors costs seconds; FDT's `PartialSum`: the accumulator it writes
    into) and batch norm in eval (the input's shape and layout; fake mode
    runs its decomposition, about 10 ms a call, and discovery propagates hundreds)."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        empty = getattr(module, "empty_output", None)
        if empty is not None:
            return empty(*args, **kwargs)
        if _is_eval_batch_norm(module) and len(args) == 1 and not kwargs:
            return torch.empty_like(args[0], memory_format=_suggested_format(args[0]))
        return super().call_module(target, args, kwargs)


def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    """The layout batch norm gives its output: channels-last only for a channels-last input."""
    channels_last = (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous())
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_eval_batch_norm(module: nn.Module) -> bool:
    """A torch.nn (or frozen) batch norm normalizing with its running statistics."""
    return (type(module).forward in (nn.modules.batchnorm._BatchNorm.forward,
                                     FrozenBatchNorm2d.forward)
            and (isinstance(module, FrozenBatchNorm2d)
                 or (not module.training and module.track_running_stats)))


class _Incremental(_FakeShapeProp):
    """ShapeProp that reuses the metadata of nodes a rewrite left alone (see propagate_shapes)."""

    def __init__(self, gm: fx.GraphModule, before: fx.GraphModule):
        super().__init__(gm)
        self.old = {n.name: (_signature(before, n), n.meta["tensor_meta"]) for n in before.graph.nodes
                    if n.op not in ("placeholder", "output") and "tensor_meta" in n.meta}
        self.changed: set[str] = set()

    def run_node(self, n: fx.Node):
        old = self.old.get(n.name)
        if (old is not None and old[0] == _signature(self.module, n)
                and self.changed.isdisjoint(a.name for a in n.all_input_nodes)
                and _rebuildable(old[1])):
            n.meta["tensor_meta"] = old[1]
            return _Later(old[1])
        result = super().run_node(n)
        if old is None or n.meta.get("tensor_meta") != old[1]:
            self.changed.add(n.name)
        return result

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return fx.node.map_aggregate((args, kwargs), _made)


class _Later:
    """A reused node's value (an empty fake tensor), made only when a node that is run reads
    it: most are never read (a rewrite runs a few nodes and their consumers), and making them
    all cost a second per `tile` on mobilenet_v2."""

    def __init__(self, meta):
        self.meta = meta
        self._value = None

    def value(self):
        if self._value is None:
            self._value = _value_of(self.meta)
        return self._value


def _made(value):
    return value.value() if isinstance(value, _Later) else value


def _rebuildable(meta) -> bool:
    """Whether `_value_of` can make a value from `meta`."""
    if isinstance(meta, TensorMetadata):
        return not meta.is_quantized
    if isinstance(meta, tuple | list):
        return all(_rebuildable(m) for m in meta)
    return meta is None or isinstance(meta, int | float | bool | str | torch.dtype)


def _value_of(meta):
    """An empty tensor (fake, inside the mode) for each TensorMetadata in `meta` (which must be
    `_rebuildable`)."""
    if isinstance(meta, TensorMetadata):
        return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype,
                                   requires_grad=meta.requires_grad)
    if isinstance(meta, tuple | list):
        return type(meta)(_value_of(m) for m in meta)
    return meta


def shape(node: fx.Node) -> torch.Size | None:
    """Output shape of a node after `propagate_shapes`, or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def nbytes(node: fx.Node) -> int:
    """Output size in bytes of a node after `propagate_shapes` (0 for non-tensor outputs)."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return math.prod(meta.shape) * meta.dtype.itemsize


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the graph")


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The leaf module a call_module node runs, else None."""
    return ops.submodule(gm, node.target) if node.op == "call_module" else None


def fresh_name(gm: fx.GraphModule, stem: str) -> str:
    """A top-level attribute name not yet used in `gm` (tilings of one model get fdt0, fdt1, ...)."""
    index = 0
    while hasattr(gm, f"{stem}{index}"):
        index += 1
    return f"{stem}{index}"


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` that a rewrite may edit without touching `gm`: its own graph (node metadata
    copied) and module tree, sharing the modules the graph calls and the tensors it reads. No
    rewrite edits a module in place (they make new ones), and discovery copies a model per
    candidate: copying mobilenet_v2's parameters each time cost seconds per `tile`. The model
    `tile` returns is copied deeply once (`independent_copy`). The copy generates its Python
    code when first run (`_LazyGraphModule`): most candidates are only re-captured, never run,
    and code generation cost milliseconds per copy, twice (here and in `finish`)."""
    copied = _LazyGraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    copied.meta = dict(gm.meta)
    return copied


def independent_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy sharing nothing with `gm` (parameters included): the caller's model and the
    model `tile` returns must not change each other."""
    return copy.deepcopy(gm)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes' modules, check and regenerate code after a rewrite."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def erase_chain(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> None:
    """Erase a path's old nodes, consumers first (each must have no users left)."""
    for node in reversed(list(nodes)):
        gm.graph.erase_node(node)


def split_ranges(size: int, parts: int) -> list[tuple[int, int]]:
    """Split range(size) into `parts` contiguous, near-equal, non-empty pieces."""
    if not 1 <= parts <= size:
        raise UnsupportedOpError(f"cannot split {size} into {parts} non-empty partitions")
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
