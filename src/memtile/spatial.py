"""Exact intervals through spatially local ops, and execution of one band (or tile) of a graph.

A window of a CNN trunk's output depends only on a window of every intermediate tensor. Row-centric
training (`memtile.rows`, bands of rows) and fused tiling for inference (`memtile.tiling`, H x W
tiles) both need that window exactly: stride, padding, dilation, pooling, residual adds and concats
shift and widen it, and a band must see zero padding only at the true image border. This module
owns that arithmetic for a `torch.fx` graph, per spatial axis (H, W), so both users share it.

Intervals are half-open `(lo, hi)` in the coordinates of the tensor they index; a `Region` holds one
interval per spatial axis (H, W). A `Band` is a tensor holding the region of a node it covers.

Every tensor carries the dims that hold its H and W (`Dims`, negative indices; NCHW is (-2, -1)).
With `layouts=True` a `permute` relabels them (timm's LayerNorm2d runs permute -> layer_norm over
channels -> permute back, so its interior is NHWC) and ops that do not care where H and W are
(elementwise ops, a layer_norm over trailing non-spatial dims) keep them; every other op needs
NCHW. The row engine joins rows along dim -2, so it builds its graphs without `layouts`.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from memtile import ops
from memtile.errors import InputShapeError, UnsupportedOpError
from memtile.foldnorm import FoldedConvBN
from memtile.freeze import FrozenBatchNorm2d, FrozenBatchNormAct2d
from memtile.trace import trace

Interval = tuple[int, int]
Region = tuple[Interval, ...]
Size = tuple[int, ...]
Band = tuple[torch.Tensor, Region]
Dims = tuple[int, int]  # the (negative) dims of a tensor that hold H and W

SPATIAL_DIMS = 2  # NCHW: the last two dims are spatial
NCHW: Dims = (-2, -1)


@dataclass(frozen=True)
class Window:
    """How one axis of a conv/pool maps output positions to input positions."""

    extent: int  # dilation * (kernel - 1) + 1
    stride: int
    pad_lo: int
    pad_hi: int
    ceil_mode: bool = False

    def needs(self, out: Interval) -> Interval:
        """Input positions (unclipped, may be negative or past the end) read by output `out`."""
        lo, hi = out
        if hi <= lo:
            return (0, 0)
        return (lo * self.stride - self.pad_lo, (hi - 1) * self.stride - self.pad_lo + self.extent)

    def out_size(self, n: int) -> int:
        span = n + self.pad_lo + self.pad_hi - self.extent
        if span < 0:
            raise InputShapeError(f"input of {n} positions is smaller than a window of {self.extent}")
        if not self.ceil_mode:
            return span // self.stride + 1
        out = math.ceil(span / self.stride) + 1
        if (out - 1) * self.stride >= n + self.pad_lo:  # last window must start inside the input
            out -= 1
        return out

    def phase(self, lo: int) -> int:
        """Every output position starts a window alike."""
        return 0


@dataclass(frozen=True)
class Nearest:
    """One axis of nearest upsampling by a whole factor: output position o reads input o // factor.

    Only powers of two: PyTorch picks the source as floor(o * (1 / factor)) in floating point,
    which equals o // factor for every o only when 1 / factor is exact."""

    factor: int

    def needs(self, out: Interval) -> Interval:
        lo, hi = out
        if hi <= lo:
            return (0, 0)
        return (lo // self.factor, -(-hi // self.factor))

    def out_size(self, n: int) -> int:
        return n * self.factor

    def phase(self, lo: int) -> int:
        """Where output position `lo` falls within its source position."""
        return lo % self.factor


@dataclass(frozen=True)
class Bilinear(Nearest):
    """One axis of bilinear upsampling (align_corners=False) by a power of two: output o reads
    the two inputs around (o + 1/2) / factor - 1/2, clamped to the tensor. A band that holds
    both for every output it makes computes them as the whole tensor does: the source position
    and weights are exact in floating point (a power-of-two factor), and clamping happens only
    at the tensor's true edges."""

    def needs(self, out: Interval) -> Interval:
        lo, hi = out
        if hi <= lo:
            return (0, 0)
        return ((2 * lo + 1 - self.factor) // (2 * self.factor),
                (2 * hi - 1 - self.factor) // (2 * self.factor) + 2)


@dataclass(frozen=True)
class Transposed:
    """One axis of a transposed convolution: input i adds into outputs i * stride - pad + j *
    dilation, j < kernel (`extent` = dilation * (kernel - 1) + 1); `output_padding` positions
    at the end that no input reaches hold the bias alone."""

    extent: int
    stride: int
    pad: int
    output_padding: int

    def needs(self, out: Interval) -> Interval:
        """Input positions (unclipped) that add into outputs `out`."""
        lo, hi = out
        if hi <= lo:
            return (0, 0)
        return (-((self.extent - 1 - lo - self.pad) // self.stride),  # ceil
                (hi - 1 + self.pad) // self.stride + 1)

    def out_size(self, n: int) -> int:
        return (n - 1) * self.stride - 2 * self.pad + self.extent + self.output_padding

    def phase(self, lo: int) -> int:
        """Where output position `lo` falls between the outputs of two inputs."""
        return lo % self.stride


IDENTITY = Window(1, 1, 0, 0)
_ACCEPTED = ("bands and tiles take Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d, nearest and "
             "bilinear upsampling by 2, 4, 8..., eval batch norm, elementwise ops, add/mul of "
             "same-size maps and channel cat")

_OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul}


@dataclass
class _Op:
    """One graph node as the interval engine sees it."""

    kind: str  # "input", "local" (conv/pool: windows, padding), "pointwise" (incl. cat, bn),
    # "constant" (a parameter or a value computed from parameters alone)
    inputs: list[fx.Node]
    windows: tuple[Window | Nearest | Bilinear | Transposed, ...] = (IDENTITY, IDENTITY)
    module: nn.Module | FoldedConvBN | None = None
    dims: Dims = NCHW


class SpatialGraph:
    """A traced trunk of spatially local ops with one image input and one image output.

    Build once per module; sizes and regions are computed per input size. `frozen_bn=True`
    accepts BatchNorm layers in training mode and runs them with their running statistics;
    otherwise such a layer is refused (its statistics span the whole feature map).
    `layouts=True` accepts permutes (see the module doc); the output must still be NCHW.
    """

    def __init__(self, module: nn.Module, *, frozen_bn: bool = False,
                 layouts: bool = False) -> None:
        self.module = module
        self.gm = trace(module)
        self.frozen_bn = frozen_bn
        self.ops: dict[fx.Node, _Op] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"a spatial trunk takes exactly one image input, this one takes {len(placeholders)}"
            )
        self.input = placeholders[0]
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                continue  # read when run (module.double() and .to() replace buffers)
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise UnsupportedOpError("a spatial trunk must return one tensor")
                self.output = out
            else:
                self.ops[node] = classify(self.gm, node, self.ops, frozen_bn, layouts)
        out_op = self.ops[self.output]
        if out_op.kind == "constant" or out_op.dims != NCHW:
            raise UnsupportedOpError(f"{self.output.name}: a spatial trunk must return an NCHW "
                                     "image tensor")
        self.order = [n for n, op in self.ops.items() if op.kind not in ("input", "constant")]
        for node in self.order:
            if ops.kind(self.gm, node) in (ops.BINARY, ops.POINTWISE):
                self._check_uniform_in_space(node)
        self.consumers: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.ops}
        for node in self.order:
            for arg in self.ops[node].inputs:
                if node not in self.consumers[arg]:
                    self.consumers[arg].append(node)

    def _check_uniform_in_space(self, node: fx.Node) -> None:
        """A parameter that an elementwise op broadcasts must not vary over H or W (a layer
        scale of shape (C, 1, 1) is fine, a positional map is not): a band would need its slice."""
        dims = self.ops[node].dims
        for arg in node.all_input_nodes:
            if ops.is_constant(self.gm, arg):
                shape = self._value(arg, {}).shape
                if any(len(shape) >= -d and shape[d] != 1 for d in dims):
                    raise UnsupportedOpError(
                        f"{ops.describe(self.gm, node)}: its operand {arg.name} of shape "
                        f"{tuple(shape)} varies over H or W; bands take per-channel constants")

    def sizes(self, in_size: Size) -> dict[fx.Node, Size]:
        """Spatial size (H, W) of every node for an input of spatial size `in_size`."""
        sizes: dict[fx.Node, Size] = {self.input: tuple(in_size)}
        for node in self.order:
            op = self.ops[node]
            first = sizes[op.inputs[0]]
            if op.kind == "local":
                _check_partial_average(node, op, first)
                sizes[node] = tuple(w.out_size(n) for w, n in zip(op.windows, first, strict=True))
            else:
                for arg in op.inputs[1:]:
                    if sizes[arg] != first:
                        raise UnsupportedOpError(
                            f"{node.name}: inputs of spatial sizes {first} and {sizes[arg]} "
                            "(broadcasting across space is not spatially local)"
                        )
                sizes[node] = first
        return sizes

    def output_size(self, in_size: Size) -> Size:
        return self.sizes(in_size)[self.output]

    def conv_bn_pairs(self) -> dict[fx.Node, fx.Node]:
        """Convolution -> the batch norm that alone reads it (running statistics: foldable)."""
        pairs = {}
        for node in self.order:
            op = self.ops[node]
            if (isinstance(op.module, nn.BatchNorm2d)
                    and not isinstance(op.module, FrozenBatchNormAct2d)):
                conv = op.inputs[0]
                if (isinstance(self.ops[conv].module, nn.Conv2d)
                        and self.consumers[conv] == [node]):
                    pairs[conv] = node
        return pairs

    def folded(self, convs: Container[fx.Node]) -> SpatialGraph:
        """The same graph (same nodes) with the batch norm after each of `convs` folded into it
        (`FoldedConvBN`) and itself run as an identity that returns the convolution's output."""
        out = copy.copy(self)
        out.ops = dict(self.ops)
        for conv, bn in self.conv_bn_pairs().items():
            if conv in convs:
                op = self.ops[conv]
                out.ops[conv] = _Op("local", op.inputs, op.windows,
                                    FoldedConvBN(op.module, self.ops[bn].module))
                out.ops[bn] = _Op("pointwise", self.ops[bn].inputs, module=nn.Identity())
        return out

    def is_sum(self, node: fx.Node) -> bool:
        """Whether `node` is an out-of-place a + b of two image tensors (a residual add)."""
        op = self.ops[node]
        if len(op.inputs) != 2 or node.kwargs or len(node.args) != 2:
            return False
        return ((node.op == "call_function" and node.target in (operator.add, torch.add))
                or (node.op == "call_method" and node.target == "add"))

    def aliases(self, node: fx.Node) -> bool:
        """Whether `node` returns its input tensor itself (identity, folded batch norm)."""
        return isinstance(self.ops[node].module, nn.Identity)

    def may_alias(self, node: fx.Node) -> bool:
        """Whether `node` may return its input's storage (`aliases`, or `contiguous`)."""
        return self.aliases(node) or (node.op == "call_method" and node.target == "contiguous")

    def needs(self, node: fx.Node, out: Region) -> Region:
        """Unclipped region of each input that `node` reads to produce `out` (same for all)."""
        return tuple(w.needs(iv) for w, iv in zip(self.ops[node].windows, out, strict=True))

    def regions(self, out: Region, in_size: Size,
                sizes: dict[fx.Node, Size] | None = None) -> dict[fx.Node, Region]:
        """Exact region of every node (clipped to its size) needed to produce `out` of the output.

        Through branches the region is the hull over consumers. The input's entry is what a band
        must be given; `run_band` computes exactly these regions.
        """
        sizes = sizes or self.sizes(in_size)
        need: dict[fx.Node, Region] = {self.output: _clip(out, sizes[self.output])}
        for node in reversed(self.order):
            if node not in need:
                continue
            req = self.needs(node, need[node])
            for arg in self.ops[node].inputs:
                clipped = _clip(req, sizes[arg])
                need[arg] = _hull(need[arg], clipped) if arg in need else clipped
        return need

    def input_region(self, out: Region, in_size: Size) -> Region:
        """Region of the input image that output region `out` depends on."""
        return self.regions(out, in_size)[self.input]

    def band_signature(self, out: Region, x_region: Region, in_size: Size) -> tuple:
        """What `run_band(out, x, x_region, in_size)` runs, wherever its band lies: equal
        signatures run the same ops with the same arguments (crops, paddings, narrows at the
        same offsets into each band) on bands of the same shape, so one trace serves both
        (FFMT's interior tiles). `compute` reads regions only through what this keeps: per node,
        its region's length, and per input and axis where its read window starts and ends
        relative to that input's band, how far the window reaches past either edge of the
        tensor, the band's length, and for upsampling (nearest, transposed convolution)
        where the region starts between source positions (`phase`)."""
        sizes = self.sizes(in_size)
        need = self.regions(out, in_size, sizes)
        signature: list[tuple | None] = [tuple(hi - lo for lo, hi in x_region)]
        for node in self.order:
            if node not in need:
                signature.append(None)
                continue
            op, region = self.ops[node], need[node]
            reads = self.needs(node, region)
            entry: list[tuple] = [tuple(hi - lo for lo, hi in region), tuple(
                w.phase(lo) for w, (lo, _) in zip(op.windows, region, strict=True))]
            for arg in op.inputs:
                have = x_region if arg is self.input else need[arg]
                entry.append(tuple((rlo - hlo, rhi - hlo, max(0, -rlo), max(0, rhi - n), hhi - hlo)
                                   for (rlo, rhi), (hlo, hhi), n
                                   in zip(reads, have, sizes[arg], strict=True)))
            signature.append(tuple(entry))
        return tuple(signature)

    # ---- execution ------------------------------------------------------------------------

    def compute(self, node: fx.Node, out: Region, inputs: list[Band],
                sizes: dict[fx.Node, Size], out_of_place: bool = False) -> torch.Tensor:
        """Run `node` for output region `out`, given bands of its inputs that cover what it reads.

        Zero (or -inf for max pooling) padding is added only where the read window leaves the
        true extent of the input tensor. `out_of_place` runs in-place ops (ReLU(inplace=True),
        +=, relu_) without writing into their input, e.g. when that input must stay intact for
        a checkpoint's recompute.
        """
        op = self.ops[node]
        if op.kind == "local" and isinstance(op.windows[0], Nearest):
            x, reg = inputs[0]
            return _upsample(op.windows, x, reg, out, sizes[op.inputs[0]])
        if op.kind == "local" and isinstance(op.windows[0], Transposed):
            x, reg = inputs[0]
            return _apply_transposed(op.module, op.windows, x, reg, out, sizes[op.inputs[0]])
        if op.kind == "local":
            x, reg = inputs[0]
            return _apply_local(op.module, op.windows, x, reg, out, sizes[op.inputs[0]])
        cropped = {arg: _crop(x, reg, out, self.ops[arg].dims)
                   for arg, (x, reg) in zip(op.inputs, inputs, strict=True)}
        if isinstance(op.module, FrozenBatchNorm2d):
            return op.module(cropped[op.inputs[0]])
        if isinstance(op.module, _BatchNorm):
            return _frozen_bn(op.module, cropped[op.inputs[0]])
        args = fx.node.map_arg(node.args, lambda n: self._value(n, cropped))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._value(n, cropped))
        if node.target is F.batch_norm:  # in eval mode only (_classify_functional_bn)
            return _functional_bn(*args, **kwargs)
        if node.op == "call_module":
            module = op.module
            if out_of_place and getattr(module, "inplace", False):
                module = copy.copy(module)
                module.inplace = False
            return module(*args, **kwargs)
        if node.op == "call_method":
            name = node.target.rstrip("_") if out_of_place else node.target
            return getattr(args[0], name)(*args[1:], **kwargs)
        target = _OUT_OF_PLACE.get(node.target, node.target) if out_of_place else node.target
        return target(*args, **kwargs)

    def _value(self, node: fx.Node, bands: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """An argument of an op being run: a band of an image tensor, or a parameter (or a
        value computed from parameters, recomputed here: `.double()` replaces parameters)."""
        if node.op == "get_attr":
            return ops.constant(self.gm, node)
        if self.ops[node].kind != "constant":
            return bands[node]
        args = fx.node.map_arg(node.args, lambda n: self._value(n, bands))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._value(n, bands))
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def run_band(self, out: Region, x: torch.Tensor, x_region: Region,
                 in_size: Size | None = None) -> torch.Tensor:
        """Output region `out` computed from a band `x` of the input covering `x_region`.

        `in_size` is the full input's spatial size (default: `x` is the whole input). The band
        must cover `input_region(out, in_size)`. Intermediates are freed after their last use.
        """
        in_size = tuple(in_size or x.shape[-SPATIAL_DIMS:])
        sizes = self.sizes(in_size)
        need = self.regions(out, in_size, sizes)
        if not _contains(x_region, need[self.input]):
            raise InputShapeError(f"band {x_region} does not cover the rows it needs, "
                                  f"{need[self.input]}")
        values: dict[fx.Node, Band] = {self.input: (x, x_region)}
        last_use = {arg: node for node in self.order for arg in self.ops[node].inputs}
        for node in self.order:
            if node not in need:
                continue
            inputs = [values[a] for a in self.ops[node].inputs]
            values[node] = (self.compute(node, need[node], inputs, sizes), need[node])
            for arg in self.ops[node].inputs:
                if last_use.get(arg) is node and arg is not self.output:
                    values.pop(arg, None)
        return values[self.output][0]


def classify(gm: fx.GraphModule, node: fx.Node, known: Mapping[fx.Node, Any],
             frozen_bn: bool, layouts: bool = False) -> _Op:
    """How the interval engine treats `node`; UnsupportedOpError names it if it cannot.

    `known` holds the nodes already accepted (the inputs must be image tensors among them; a
    value with a `dims` attribute says where its H and W are, else NCHW). `layouts` accepts
    permutes (see the module doc).
    """
    if node.op == "placeholder":
        return _Op("input", [])
    if ops.is_constant(gm, node):  # a parameter: per-channel constants of the op reading it
        return _Op("constant", [])
    inputs = [arg for arg in ops.tensor_inputs(node) if not ops.is_constant(gm, arg)]
    for arg in inputs:
        if arg not in known:
            raise UnsupportedOpError(f"{node.name}: input {arg.name} is not an image tensor")
    dims = {getattr(known[arg], "dims", NCHW) for arg in inputs}
    if len(dims) > 1:
        raise UnsupportedOpError(f"{node.name}: its inputs hold H and W in different dims "
                                 f"{sorted(dims)}")
    where = dims.pop() if dims else NCHW
    kind = ops.kind(gm, node)
    if layouts and kind == ops.VIEW and _is_permute(node):
        return _Op("pointwise", inputs, dims=_permuted(node, where))
    if kind == ops.LAST_DIMS:
        return _Op("pointwise", inputs, dims=_check_last_dims(gm, node, inputs, where))
    if where != NCHW and kind not in (ops.IDENTITY, ops.POINTWISE, ops.BINARY):
        raise UnsupportedOpError(f"{ops.describe(gm, node)} needs H and W as the last two dims "
                                 f"(NCHW); after a permute they are dims {where}")
    op = _classify_nchw(gm, node, inputs, kind, frozen_bn)
    op.dims = where
    return op


def _classify_nchw(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node], kind: str | None,
                   frozen_bn: bool) -> _Op:
    """`classify` for an op whose inputs are NCHW (or that does not care where H and W are)."""
    if kind == ops.UPSAMPLE:
        return _Op("local", inputs, _upsample_windows(ops.describe(gm, node), node,
                                                     ops.upsample_arguments(gm, node)))
    if node.op == "call_module":
        return _classify_module(gm, node, inputs, frozen_bn)
    if kind == ops.CONCAT:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise UnsupportedOpError(f"{node.name}: torch.cat along dim {dim}; only channel "
                                     "concatenation (dim=1) is spatially local")
        return _Op("pointwise", inputs)
    if ops.is_batch_norm(gm, node):
        return _classify_functional_bn(node, inputs)
    if kind == ops.SPLIT and ops.split_dim(node) in (1, -3):  # a tuple of channel groups
        return _Op("pointwise", inputs)
    picks = node.target is operator.getitem and (
        _slices_channels_only(node.args[1])
        or (isinstance(node.args[1], int) and ops.kind(gm, node.args[0]) == ops.SPLIT))
    if kind in ops.ELEMENTWISE_KINDS or picks:
        return _Op("pointwise", inputs)
    raise _refused(ops.describe(gm, node), kind)


def _is_permute(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "permute")
            or (node.op == "call_function" and node.target is torch.permute))


def _permuted(node: fx.Node, dims: Dims) -> Dims:
    """Where H and W are after `x.permute(*order)` / `torch.permute(x, order)`: output dim i is
    input dim order[i], so a relabelling of dims (the data a band holds does not change)."""
    order = node.args[1] if len(node.args) == 2 else node.args[1:]
    order = node.kwargs.get("dims", order)
    if isinstance(order, int):
        order = (order,)
    ndim = len(order)
    order = [d % ndim for d in order]
    if sorted(order) != list(range(ndim)) or ndim < SPATIAL_DIMS:
        raise UnsupportedOpError(f"{node.name}: permute {order} is not a permutation of dims")
    return tuple(order.index(d % ndim) - ndim for d in dims)


def _check_last_dims(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node],
                     dims: Dims) -> Dims:
    """`F.layer_norm(x, normalized_shape, ...)` is pointwise in space when it normalizes only
    dims that hold neither H nor W (LayerNorm2d over channels after a permute)."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    count = 1 if isinstance(shape, int) else len(shape)
    if len(inputs) != 1 or max(dims) >= -count:
        raise UnsupportedOpError(
            f"{ops.describe(gm, node)}: normalizes the last {count} dims, which include H or W "
            f"(dims {dims}), or its weight is not a parameter; a norm over channels alone "
            "is spatially local")
    return dims


def _slices_channels_only(index: Any) -> bool:
    """`x[:, a:b]` or `x[:, a:b, :, :]` (ghostnet, rexnet, dpn): every position keeps all of
    its rows and columns, so a band of the slice is the slice of the band."""
    whole = slice(None)
    if not isinstance(index, tuple) or not 2 <= len(index) <= 4:
        return False
    rest = list(index[2:])
    if rest and rest[-1] is Ellipsis:
        rest.pop()
    return index[0] == whole and isinstance(index[1], slice) and all(i == whole for i in rest)


def _refused(what: str, kind: str | None) -> UnsupportedOpError:
    """The error naming an op that bands and tiles cannot run, and why."""
    why = "is an op memtile does not know" if kind is None else f"is not spatially local ({kind})"
    return UnsupportedOpError(f"{what} {why}; {_ACCEPTED}")


def _classify_module(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node],
                     frozen_bn: bool) -> _Op:
    mod = gm.get_submodule(node.target)
    where = f"layer {node.target!r} ({type(mod).__name__})"
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise UnsupportedOpError(f"{where}: padding_mode={mod.padding_mode!r}; only zeros")
        return _Op("local", inputs, _conv_windows(mod), mod)
    if isinstance(mod, nn.ConvTranspose2d):
        return _Op("local", inputs, _transposed_windows(mod, node, where), mod)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        return _Op("local", inputs, _pool_windows(mod, where), mod)
    if isinstance(mod, FrozenBatchNormAct2d):
        for part in (mod.drop, mod.act):
            _check_elementwise_part(where, part)
        return _Op("pointwise", inputs, module=mod)
    if isinstance(mod, FrozenBatchNorm2d):
        return _Op("pointwise", inputs, module=mod)
    if isinstance(mod, _BatchNorm):
        if mod.training and not frozen_bn:
            raise UnsupportedOpError(
                f"{where} is in training mode: its batch statistics span the whole feature map, "
                "so it cannot be split into bands; use bn='frozen' (running statistics) or "
                "put the layer in eval mode"
            )
        if mod.running_mean is None:
            raise UnsupportedOpError(f"{where} has no running statistics to freeze")
        return _Op("pointwise", inputs, module=mod)
    if isinstance(mod, nn.Dropout | nn.Dropout2d | nn.AlphaDropout):
        if mod.training and mod.p > 0:
            raise UnsupportedOpError(
                f"{where} draws random numbers in training mode, which bands cannot replay "
                "exactly; put it in eval mode or move it out of the trunk"
            )
        return _Op("pointwise", inputs, module=nn.Identity())
    kind = ops.kind(gm, node)
    if kind in ops.ELEMENTWISE_KINDS:
        return _Op("pointwise", inputs, module=mod)
    raise _refused(where, kind)


def _check_elementwise_part(where: str, part: nn.Module) -> None:
    """A frozen timm norm's own dropout or activation must be elementwise and deterministic."""
    kind = ops.module_kind(part)
    if kind not in ops.ELEMENTWISE_KINDS:
        raise _refused(f"{where}, its {type(part).__name__}", kind)
    if isinstance(part, nn.Dropout | nn.Dropout2d | nn.AlphaDropout) and part.training and part.p > 0:
        raise UnsupportedOpError(f"{where}: its dropout draws random numbers in training mode, "
                                 "which bands cannot replay exactly; put it in eval mode")


def _classify_functional_bn(node: fx.Node, inputs: list[fx.Node]) -> _Op:
    """`F.batch_norm(x, running_mean, running_var, weight, bias, training, ...)`, as timm's
    BatchNormAct2d traces: pointwise per channel when it uses its running statistics.

    One traced in training mode is refused even with `frozen_bn`: running it with running
    statistics would compute another function than the traced model (the silent wrong gradients
    of timm models); `bn='frozen'` freezes norms before tracing (`memtile.freeze`) instead.
    """
    bound = ops.batch_norm_arguments(node)
    if bound["training"]:
        raise UnsupportedOpError(
            f"{node.name}: batch_norm in training mode: its batch statistics span the whole "
            "feature map; put the model in eval mode (or use bn='frozen')"
        )
    if len(inputs) != 1 or any(isinstance(bound[k], fx.Node) and bound[k].op != "get_attr"
                               for k in ("running_mean", "running_var", "weight", "bias")):
        raise UnsupportedOpError(f"{node.name}: batch_norm whose statistics or affine terms are "
                                 "computed, not parameters")
    return _Op("pointwise", inputs)


def _functional_bn(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5
                   ) -> torch.Tensor:
    """Batch norm with its running statistics, whatever `training` the graph recorded."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)


# ---- helpers ------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_windows(mod: nn.Conv2d) -> tuple[Window, ...]:
    k, s, d = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
    ext = [di * (ki - 1) + 1 for ki, di in zip(k, d, strict=True)]
    if mod.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif mod.padding == "same":
        pads = [((e - 1) // 2, e - 1 - (e - 1) // 2) for e in ext]
    else:
        pads = [(p, p) for p in _pair(mod.padding)]
    return tuple(Window(e, st, lo, hi) for e, st, (lo, hi) in zip(ext, s, pads, strict=True))


def _transposed_windows(mod: nn.ConvTranspose2d, node: fx.Node, where: str
                        ) -> tuple[Transposed, ...]:
    """The axes of a transposed convolution, or UnsupportedOpError: one given an `output_size`
    when called, padded otherwise than with zeros, or with a kernel smaller than its stride
    (output rows that no input row reaches)."""
    if len(node.args) > 1 or node.kwargs or mod.padding_mode != "zeros":
        raise UnsupportedOpError(f"{where}: output_size or a padding mode other than zeros")
    axes = tuple(Transposed(d * (k - 1) + 1, s, p, op) for k, s, p, op, d in
                 zip(mod.kernel_size, mod.stride, mod.padding, mod.output_padding,
                     mod.dilation, strict=True))
    if any(a.extent < a.stride for a in axes):
        raise UnsupportedOpError(f"{where}: kernel smaller than its stride leaves output "
                                 "rows that no input row reaches")
    return axes


def _pool_windows(mod: nn.MaxPool2d | nn.AvgPool2d, where: str) -> tuple[Window, ...]:
    k = _pair(mod.kernel_size)
    s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    p = _pair(mod.padding)
    d = _pair(getattr(mod, "dilation", 1))
    if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
        raise UnsupportedOpError(f"{where}: return_indices=True")
    if isinstance(mod, nn.AvgPool2d):
        if mod.ceil_mode and any(p):
            raise UnsupportedOpError(f"{where}: ceil_mode=True with padding changes the divisor "
                                     "at the border")
        if not mod.count_include_pad and any(p):
            raise UnsupportedOpError(f"{where}: count_include_pad=False with padding")
    return tuple(Window(di * (ki - 1) + 1, si, pi, pi, mod.ceil_mode)
                 for ki, si, pi, di in zip(k, s, p, d, strict=True))


def _upsample_windows(where: str, node: fx.Node, arguments: Mapping[str, Any]
                      ) -> tuple[Nearest, ...]:
    """The per-axis factors of a nearest or bilinear (align_corners=False) upsampling, or
    UnsupportedOpError saying why not.

    A `size` (smp's decoders upsample to the skip's size) gives the factor only where the input's
    shape is known: a graph traced at example inputs and shape-propagated, where it is fixed."""
    mode = arguments["mode"]
    if mode not in ("nearest", "bilinear") or arguments["antialias"]:
        raise UnsupportedOpError(f"{where}: mode={mode!r}; bands and tiles take only nearest "
                                 "and bilinear upsampling")
    if mode == "bilinear" and arguments["align_corners"]:
        raise UnsupportedOpError(f"{where}: align_corners=True samples at positions that "
                                 "depend on the whole image's size")
    size, scale = arguments["size"], arguments["scale_factor"]
    if size is not None:
        source = node.all_input_nodes[0].meta.get("tensor_meta")
        sizes = tuple(size) if isinstance(size, tuple | list) else (size, size)
        if source is None or not all(isinstance(n, int) for n in sizes):
            raise UnsupportedOpError(f"{where}: upsampling to a size that is not a fixed number "
                                     "of another known size")
        factors = [n / m for n, m in zip(sizes, source.shape[-SPATIAL_DIMS:], strict=True)]
    else:
        factors = list(scale) if isinstance(scale, tuple | list) else [scale, scale]
    if not all(f >= 1 and float(f).is_integer() and int(f) & (int(f) - 1) == 0 for f in factors):
        raise UnsupportedOpError(f"{where}: factor {factors} is not a power of two")
    axis = Bilinear if mode == "bilinear" else Nearest
    return tuple(axis(int(f)) for f in factors)


def _upsample(axes: tuple[Nearest, ...], x: torch.Tensor, have: Region, out: Region,
              size: Size) -> torch.Tensor:
    """Nearest or bilinear upsampling of the input rows that `out` reads, cropped to `out`."""
    if any(hi <= lo for lo, hi in out):
        return x.new_zeros(*x.shape[:-SPATIAL_DIMS], *(max(hi - lo, 0) for lo, hi in out))
    need = _clip(tuple(a.needs(iv) for a, iv in zip(axes, out, strict=True)), size)
    bilinear = isinstance(axes[0], Bilinear)
    y = F.interpolate(_crop(x, have, need), scale_factor=tuple(float(a.factor) for a in axes),
                      mode="bilinear" if bilinear else "nearest",
                      align_corners=False if bilinear else None)
    for axis, (a, (nlo, _), (lo, hi)) in enumerate(zip(axes, need, out, strict=True)):
        y = y.narrow(axis - SPATIAL_DIMS, lo - nlo * a.factor, max(hi - lo, 0))
    return y


def _apply_transposed(mod: nn.ConvTranspose2d, axes: tuple[Transposed, ...], x: torch.Tensor,
                      have: Region, out: Region, size: Size) -> torch.Tensor:
    """A transposed convolution of every input position that adds into `out` (so each output
    position gets all its terms), unpadded: its first position is output `lo * stride - pad`
    of the input's first row `lo`; cropped to `out`, zeros where no input reaches (the end's
    output_padding), then the bias."""
    need = _clip(tuple(a.needs(iv) for a, iv in zip(axes, out, strict=True)), size)
    if any(hi <= lo for lo, hi in (*out, *need)):
        y = x.new_zeros(x.shape[0], mod.out_channels, *(max(hi - lo, 0) for lo, hi in out))
    else:
        y = F.conv_transpose2d(_crop(x, have, need), mod.weight, None, mod.stride, 0, 0,
                               mod.groups, mod.dilation)
        for axis, (a, (nlo, _), (lo, hi)) in enumerate(zip(axes, need, out, strict=True)):
            dim = axis - SPATIAL_DIMS
            start = lo - (nlo * a.stride - a.pad)
            short = max(0, start + hi - lo - y.shape[dim])
            if short:  # output_padding positions past every input's reach
                y = F.pad(y, [0, short] if dim == -1 else [0, 0, 0, short])
            y = y.narrow(dim, start, hi - lo)
    return y if mod.bias is None else y + mod.bias.view(-1, 1, 1)


def _check_partial_average(node: fx.Node, op: _Op, size: Size) -> None:
    """An AvgPool2d with ceil_mode (timm's resnet-D shortcuts) is exact on tiles only where its
    last window is whole: a partial one would divide by the positions it covers."""
    if not (isinstance(op.module, nn.AvgPool2d) and op.module.ceil_mode):
        return
    for w, n in zip(op.windows, size, strict=True):
        if (n - w.extent) % w.stride:
            raise UnsupportedOpError(
                f"{node.name} (AvgPool2d): ceil_mode=True on {n} positions ends in a partial "
                "window, whose divisor bands and tiles do not reproduce"
            )


def _clip(region: Region, size: Size) -> Region:
    return tuple((max(lo, 0), min(hi, n)) for (lo, hi), n in zip(region, size, strict=True))


def _hull(a: Region, b: Region) -> Region:
    out = []
    for (alo, ahi), (blo, bhi) in zip(a, b, strict=True):
        if ahi <= alo:
            out.append((blo, bhi))
        elif bhi <= blo:
            out.append((alo, ahi))
        else:
            out.append((min(alo, blo), max(ahi, bhi)))
    return tuple(out)


def _contains(outer: Region, inner: Region) -> bool:
    return all(hi <= lo or (olo <= lo and hi <= ohi)
               for (olo, ohi), (lo, hi) in zip(outer, inner, strict=True))


def _crop(x: torch.Tensor, have: Region, want: Region, dims: Dims = NCHW) -> torch.Tensor:
    """View of band `x` (covering `have`, H and W in `dims`) restricted to `want` (each of a
    split's tensors)."""
    if have == want:
        return x
    if isinstance(x, tuple | list):
        return tuple(_crop(t, have, want, dims) for t in x)
    for dim, (hlo, hhi), (wlo, whi) in zip(dims, have, want, strict=True):
        if wlo < hlo or whi > hhi:
            raise InputShapeError(f"band covers {have} but {want} is needed")
        if (hlo, hhi) != (wlo, whi):
            x = x.narrow(dim, wlo - hlo, whi - wlo)
    return x


def _apply_local(mod: nn.Module | FoldedConvBN, windows: tuple[Window, ...], x: torch.Tensor,
                 have: Region, out: Region, size: Size) -> torch.Tensor:
    """Conv/pool on a band: read window clipped to the tensor, border padding added here.

    Where possible the op's own symmetric padding supplies the border (no copy of the input) and
    the extra outputs it produces are cropped; otherwise the band is padded explicitly.
    """
    if any(hi <= lo for lo, hi in out):  # e.g. a 1x1 conv reading only its zero padding
        conv = mod.conv if isinstance(mod, FoldedConvBN) else mod
        channels = conv.out_channels if isinstance(conv, nn.Conv2d) else x.shape[1]
        return x.new_zeros(x.shape[0], channels, *(max(hi - lo, 0) for lo, hi in out))
    need = tuple(w.needs(iv) for w, iv in zip(windows, out, strict=True))
    x = _crop(x, have, _clip(need, size))
    is_max = isinstance(mod, nn.MaxPool2d)
    is_pool = not isinstance(mod, nn.Conv2d | FoldedConvBN)
    native, explicit, skip = [], [], []
    for w, (nlo, nhi), n in zip(windows, need, size, strict=True):
        top, bottom = max(0, -nlo), max(0, nhi - n)
        pad = max(top, bottom)
        fits = (x.numel() > 0 and (pad - top) % w.stride == 0
                and (not is_pool or pad <= w.pad_lo))
        if fits:
            native.append(pad), explicit.append((0, 0)), skip.append((pad - top) // w.stride)
        else:
            native.append(0), explicit.append((top, bottom)), skip.append(0)
    if any(any(e) for e in explicit):
        flat = [v for lohi in reversed(explicit) for v in lohi]  # F.pad: last dim first
        x = F.pad(x, flat, value=-math.inf if is_max else 0.0)
    y = _call_local(mod, x, tuple(native))
    for axis, (start, (lo, hi)) in enumerate(zip(skip, out, strict=True)):
        if start != 0 or y.shape[axis - SPATIAL_DIMS] != hi - lo:
            y = y.narrow(axis - SPATIAL_DIMS, start, hi - lo)
    return y


def _call_local(mod: nn.Module | FoldedConvBN, x: torch.Tensor,
                padding: tuple[int, ...]) -> torch.Tensor:
    if isinstance(mod, FoldedConvBN):
        return mod(x, padding)
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, mod.weight, mod.bias, mod.stride, padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.MaxPool2d):
        return F.max_pool2d(x, mod.kernel_size, mod.stride, padding, mod.dilation)
    return F.avg_pool2d(x, mod.kernel_size, mod.stride, padding, False, True,
                        mod.divisor_override)


def _frozen_bn(mod: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Batch norm with `mod`'s running statistics, as the ATen op export records for it: traced
    directly, not through `batch_norm`'s decompositions (several times the trace cost of a
    tile), with the same kernel and gradients."""
    return torch.ops.aten._native_batch_norm_legit_no_training.default(
        x, mod.weight, mod.bias, mod.running_mean, mod.running_var, 0.0, mod.eps)[0]


def split(n: int, parts: int) -> list[Interval]:
    """`n` positions in `parts` contiguous intervals whose lengths differ by at most one."""
    if not 1 <= parts <= n:
        raise InputShapeError(f"cannot split {n} rows into {parts} bands (1 to {n} allowed)")
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def full(size: Size) -> Region:
    return tuple((0, n) for n in size)


def band_region(axis: int, interval: Interval, size: Size) -> Region:
    """The region that is `interval` along `axis` (0 = H, 1 = W) and full along the others."""
    return tuple(interval if a == axis else (0, n) for a, n in enumerate(size))

