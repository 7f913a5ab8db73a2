"""FFMT, fused feature-map tiling: run a spatially local span of the graph tile by tile.

A span is the part of the graph between two *cuts* (points of the execution order where exactly
one tensor is live): one image tensor in, one out, any mix of conv, pooling, eval BN, elementwise
ops, residual adds, channel concats and channel norms between permutes (timm's LayerNorm2d)
inside. The span is split over its output's H (strips) or H x W (grids); each tile's input
window comes from `memtile.spatial` (stride, padding, dilation; zero padding only at the true
border), tiles recompute their overlap, and every tile's result is written into its place of one
preallocated output buffer (slice assignment, no concat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from memtile import spatial
from memtile.errors import UnsupportedOpError
from memtile.tiling.rewrite import copy_graph_module, erase_chain, finish, fresh_name, node_named


@dataclass(frozen=True)
class FFMTPath:
    """A span: `source` is the node whose output enters; `nodes` run in order, the last one exits."""

    source: str
    nodes: tuple[str, ...]


def _steps(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def cuts(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes after which their own output is the only tensor still needed (single-tensor cuts)."""
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in order}
    found = []
    live: set[fx.Node] = set()
    for node in order:
        if node.op in ("get_attr", "output"):
            continue
        live = {n for n in live if last_use[n] > position[node]}
        if node.users:
            live.add(node)
        if live == {node}:
            found.append(node)
    return found


def span(gm: fx.GraphModule, source: str, end: str) -> FFMTPath:
    """The span from cut `source` (exclusive) to cut `end` (inclusive)."""
    order = _steps(gm)
    names = [n.name for n in order]
    start = names.index(source) + 1 if source in names else 0
    return FFMTPath(source, tuple(names[start:names.index(end) + 1]))


def extract(gm: fx.GraphModule, path: FFMTPath) -> fx.GraphModule:
    """The span as its own GraphModule (one placeholder, one output) sharing `gm`'s modules;
    its code is generated when first run (most spans are only analysed, to cost candidates)."""
    graph = fx.Graph()
    env = {node_named(gm, path.source): graph.placeholder("x")}
    inside = set(path.nodes)
    for name in path.nodes:
        node = node_named(gm, name)
        for arg in node.all_input_nodes:
            if arg not in env and arg.op != "get_attr":
                raise UnsupportedOpError(
                    f"FFMT span {path.source}..{path.nodes[-1]}: {name} reads {arg.name}, which "
                    "is made outside the span; a span must have a single input"
                )
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.node_copy(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
        outside = [u.name for u in node.users if u.name not in inside]
        if outside and name != path.nodes[-1]:
            raise UnsupportedOpError(
                f"FFMT span ends early: {name} is also read by {outside[0]} outside the span"
            )
    graph.output(env[node_named(gm, path.nodes[-1])])
    return _LazyGraphModule(gm, graph)


def tile_needs(trunk: spatial.SpatialGraph, in_hw: tuple[int, int], grid: tuple[int, int]
               ) -> list[tuple[spatial.Region, dict[fx.Node, spatial.Region]]]:
    """(output region, region of every trunk node it needs) of every tile of a `grid` =
    (rows, cols) split; the input's entry is the tile's input window.

    Windows, clipping and hulls act on H and W apart, so a tile's regions are its row strip's
    rows and its column strip's columns: rows + cols region walks instead of rows x cols."""
    sizes = trunk.sizes(in_hw)
    out_h, out_w = sizes[trunk.output]
    strips = [(rows, trunk.regions((rows, (0, out_w)), in_hw, sizes))
              for rows in spatial.split(out_h, grid[0])]
    columns = [(cols, trunk.regions(((0, out_h), cols), in_hw, sizes))
               for cols in spatial.split(out_w, grid[1])]
    return [((rows, cols), {node: (across[node][0], down[node][1]) for node in across})
            for rows, across in strips for cols, down in columns]


class FFMTTiles(nn.Module):
    """Runs one span tile by tile into a preallocated output (the replacement of the span)."""

    def __init__(self, trunk: fx.GraphModule, in_shape: torch.Size, out_shape: torch.Size,
                 grid: tuple[int, int], analysed: spatial.SpatialGraph | None = None) -> None:
        """`analysed`: the trunk's SpatialGraph, when several grids of one span are costed."""
        super().__init__()
        self.trunk = trunk
        self.spatial = analysed or spatial.SpatialGraph(trunk, layouts=True)
        self.in_hw = tuple(in_shape[-2:])
        self.out_shape = tuple(out_shape)
        self.grid = grid
        needs = tile_needs(self.spatial, self.in_hw, grid)
        self.tiles = [(out, need[self.spatial.input]) for out, need in needs]
        self.pixel_bytes = {n.name: _pixel_bytes(n, self.spatial.ops[n].dims)
                            for n in self.spatial.order}
        self.pixel_macs = {
            n.name: _pixel_bytes(n, op.dims) // _element_size(n) * op.module.weight[0].numel()
            for n, op in self.spatial.ops.items() if isinstance(op.module, nn.Conv2d)
        }
        self.costs = self._costs(needs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.assemble(x, self.run_tile)

    def assemble(self, x: torch.Tensor,
                 run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The output, with tile k's place written by `run(k, its band of x)` (`forward` runs
        the tile; the stitcher's trace of the frame alone hands back stand-ins)."""
        out = x.new_empty(self.out_shape)
        for k, ((rows, cols), ((r0, r1), (c0, c1))) in enumerate(self.tiles):
            out[..., rows[0]:rows[1], cols[0]:cols[1]] = run(k, x[..., r0:r1, c0:c1])
        return out

    def run_tile(self, k: int, band: torch.Tensor) -> torch.Tensor:
        """Tile k's output from its band of the span's input."""
        out, region = self.tiles[k]
        return self.spatial.run_band(out, band, region, self.in_hw)

    def tile_kinds(self) -> list[int]:
        """Per tile, the first tile that runs the same ops on its band (equal
        `SpatialGraph.band_signature`): a 4x4 grid's 16 tiles are 9 kinds at most."""
        first: dict[tuple, int] = {}
        return [first.setdefault(self.spatial.band_signature(out, region, self.in_hw), k)
                for k, (out, region) in enumerate(self.tiles)]

    def empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor like `forward`'s result (shape propagation uses it)."""
        return x.new_empty(self.out_shape)

    def _costs(self, needs: list[tuple[spatial.Region, dict[fx.Node, spatial.Region]]]
               ) -> tuple[int, int]:
        """(largest working set of one tile in bytes, conv MACs of all tiles), from the regions
        each tile needs (`tile_needs`).

        The working set counts the trunk values live while a tile runs (its input band is a view
        of the span's input; its result counts until copied); like the planner, an elementwise
        op may write over an input that dies there. MACs count the output positions each conv
        computes, so halo recompute shows; spatial.py may add a cropped border row.
        """
        sg = self.spatial
        last = {arg: node for node in sg.order for arg in sg.ops[node].inputs}
        dies = {node: [a for a in dict.fromkeys(sg.ops[node].inputs)
                       if last.get(a) is node and a is not sg.input] for node in sg.order}
        best, macs = 0, 0
        for _, need in needs:
            size = {n: self.pixel_bytes[n.name] * _area(r) for n, r in need.items()
                    if n is not sg.input}
            live = 0
            for node in (n for n in sg.order if n in need):  # unused ones do not run (dla34)
                macs += self.pixel_macs.get(node.name, 0) * _area(need[node])
                dying = dies[node]
                if self._overwrites(node, dying, size):
                    continue
                live += size[node]
                best = max(best, live)
                live -= sum(size[a] for a in dying)
        return best, macs

    def _overwrites(self, node: fx.Node, dying: list[fx.Node], size: dict) -> bool:
        """An elementwise node whose output can take the bytes of an input that dies there."""
        op = self.spatial.ops[node]
        elementwise = op.kind == "pointwise" and node.target is not torch.cat
        return elementwise and any(size[a] == size[node] for a in dying)

    def tile_bytes(self) -> int:
        return self.costs[0]

    def conv_macs(self) -> int:
        return self.costs[1]


def _element_size(node: fx.Node) -> int:
    return node.meta["tensor_meta"].dtype.itemsize


def _pixel_bytes(node: fx.Node, dims: spatial.Dims) -> int:
    """Bytes of one spatial position of a node's output whose H and W are `dims` (NCHW or,
    inside a permuted norm, NHWC): every other dim times the element size."""
    meta = node.meta["tensor_meta"]
    if not hasattr(meta, "shape"):  # a split's tuple of views: no storage of its own
        return 0
    ndim = len(meta.shape)
    others = [n for d, n in enumerate(meta.shape) if d - ndim not in dims]
    return math.prod(others) * _element_size(node)


def _area(region: spatial.Region) -> int:
    area = 1
    for lo, hi in region:
        area *= max(0, hi - lo)
    return area


def apply_ffmt(gm: fx.GraphModule, path: FFMTPath, grid: tuple[int, int]) -> fx.GraphModule:
    """A copy of `gm` whose span `path` runs as `grid` tiles (shapes must be propagated)."""
    source, last = node_named(gm, path.source), node_named(gm, path.nodes[-1])
    in_meta, out_meta = source.meta.get("tensor_meta"), last.meta.get("tensor_meta")
    if in_meta is None or out_meta is None or len(in_meta.shape) != 4 or len(out_meta.shape) != 4:
        raise UnsupportedOpError(
            f"FFMT span {path.source}..{path.nodes[-1]} must map an NCHW tensor to an NCHW tensor"
        )
    gm = copy_graph_module(gm)
    tiles = FFMTTiles(extract(gm, path), in_meta.shape, out_meta.shape, grid)
    name = fresh_name(gm, "ffmt")
    gm.add_module(name, tiles)
    nodes = [node_named(gm, n) for n in path.nodes]
    with gm.graph.inserting_before(nodes[0]):
        replacement = gm.graph.call_module(name, (node_named(gm, path.source),))
    nodes[-1].replace_all_uses_with(replacement)
    erase_chain(gm, nodes)
    return finish(gm)
