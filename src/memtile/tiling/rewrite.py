"""fx graph-rewrite helpers shared by FDT and FFMT.

Both rewrites take a `torch.fx.GraphModule`, replace a chain of nodes ("path") by per-partition
copies, and hand back a new GraphModule; these helpers keep that bookkeeping in one place.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from memtile.errors import UnsupportedOpError


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Give every node `meta['tensor_meta']` (shape, dtype) from one run of `gm` on fake tensors:
    shapes without the compute (tiling propagates every candidate rewrite of a model; a real
    run of mobilenet_v2 with FFMT tiles costs seconds). The parameters stay real; fake mode reads
    only their metadata. A graph that fake tensors cannot run (an op without a fake kernel,
    data-dependent code) is run for real."""
    prop = ShapeProp(gm)  # made outside the mode, so that it keeps no fake copy of `gm`
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.no_grad(), mode:
            prop.propagate(*(mode.from_tensor(t) for t in inputs))
    except Exception:  # noqa: BLE001 - fake mode raises many types; the real run says why
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    return gm


def shape(node: fx.Node) -> torch.Size | None:
    """Output shape of a node after `propagate_shapes`, or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def nbytes(node: fx.Node) -> int:
    """Output size in bytes of a node after `propagate_shapes` (0 for non-tensor outputs)."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return int(torch.Size(meta.shape).numel()) * torch.empty((), dtype=meta.dtype).element_size()


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the graph")


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The leaf module a call_module node runs, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def fresh_name(gm: fx.GraphModule, stem: str) -> str:
    """A top-level attribute name not yet used in `gm` (tilings of one model get fdt0, fdt1, ...)."""
    index = 0
    while hasattr(gm, f"{stem}{index}"):
        index += 1
    return f"{stem}{index}"


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy (parameters included) so a rewrite never mutates the caller's model."""
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
