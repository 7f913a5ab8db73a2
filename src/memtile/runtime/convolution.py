"""Convolutions computed straight into a given buffer, through oneDNN (mkldnn).

`aten.convolution.out` on CPU is a generated wrapper: it computes into a temporary and copies.
Two oneDNN bindings write into arena memory instead:

- `mkldnn._convolution_pointwise(x, packed_w, ...)` allocates its output, channels_last with a
  packed weight, and writes it once; with the destination armed as a slot (`slots`) that
  allocation *is* the destination. The default, where the slot allocator could be installed.
- `mkldnn._convolution_pointwise_.binary(other, x, w, ...)` with the post-op "add" computes
  `conv(x) + other` into `other` itself; with `other` zeroed first it is the convolution. It
  costs the zeroing pass (5-8% of a large layer, measured on vgg16's 224² and 112² layers at
  batch 8) and an extra read; it is the residual add's own kernel (`fusion`) and the fallback.

Both are bit-identical to `aten.convolution` on channels_last tensors (measured). A small 1x1
stride-1 convolution runs instead as one GEMM over the channels_last rows (`MatmulInto`,
`runs_as_matmul`): oneDNN's fixed cost per call (about 25 us) is more than such a layer's work; its
sums are in another order (within `TOLERANCE`, checked at construction). oneDNN's kernels avoid
temporaries only when the destination is channels_last (an NCHW destination costs an input
reorder and a blocked output, 2x the output), which is why `layout` plans 4-D activations in
channels_last.

The weight is reordered into oneDNN's blocked format once, here, instead of at every call (eager
reorders it each call): the module keeps that packed copy (`packed_bytes`) beside the model's
own weights. What a call still allocates is a few KB of oneDNN scratch per convolution, and an
input reorder where the input is not channels_last (the model input of the first convolution);
with `pack=False` also two weight-sized reorder buffers per convolution (measured), freed within
the call: no copy held, a higher transient peak and a slower call.
"""

from __future__ import annotations

import torch
from torch import fx

from memtile.runtime import slots
from memtile.runtime.outvariants import OutVariant
from memtile.runtime.packing import Packing

TARGET = "aten.convolution.default"
POINTWISE = torch.ops.mkldnn._convolution_pointwise_.binary
DIRECT = torch.ops.mkldnn._convolution_pointwise.default
TOLERANCE = 1e-5  # relative to the output's magnitude; measured up to 2.4e-6 (vgg11, resnet18)
SCRATCH_BYTES = 16 * 1024
REORDER_COPIES = 2  # an unpacked weight is reordered per call into 2 weight-sized buffers (measured)
MATMUL_MIN_CHANNELS = 32  # `runs_as_matmul`: fewer, over many rows, GEMM was the slower
MATMUL_FEW_ROWS = 64
MATMUL_MAX_MACS = 16_000_000


class ConvolutionInto:
    """`conv(x, ...)` written into `out`, with `unary` (None or "swish") as oneDNN's post-op:
    only one that keeps NaN and Inf as eager does (see `fusion`).

    `direct` (a packed weight, slot allocator installed): the functional kernel allocates its
    output in `out` (`slots.call_into`), a channels_last tensor of the same shape, so the bytes
    are laid out alike. Otherwise `out` is zeroed and oneDNN adds the convolution into it, or,
    with a `unary` post-op (which oneDNN's add post-op does not take), the functional kernel's
    output is copied in: the construction check sees that allocation and leaves it unfused. With
    an `addend` (a residual add, see `fusion`) `out` starts from it instead of zero: the
    executor plans the two in one slot, so it is already there (else it is copied in)."""

    def __init__(self, direct: bool = False, unary: str | None = None):
        self.direct, self.unary = direct, unary

    def with_unary(self, unary: str) -> ConvolutionInto:
        return ConvolutionInto(self.direct, unary)

    def __call__(self, x, weight, bias, padding, stride, dilation, groups, *addend, out):
        if addend:
            if (addend[0].data_ptr(), addend[0].stride()) != (out.data_ptr(), out.stride()):
                out.copy_(addend[0])
        elif self.direct and out.is_contiguous(memory_format=torch.channels_last):
            return slots.call_into(out, DIRECT, x, weight, bias, padding, stride, dilation,
                                   groups, self.unary or "none", [], None)
        elif self.unary:  # oneDNN's add post-op takes no swish after it: computed apart, copied
            return out.copy_(DIRECT(x, weight, bias, padding, stride, dilation, groups,
                                    self.unary, [], None))
        else:
            out.zero_()
        return POINTWISE(out, x, weight, bias, padding, stride, dilation, groups,
                         "add", 1.0, self.unary, [], None)

    def __repr__(self) -> str:
        post = f", {self.unary} post-op" if self.unary else ""
        if self.direct:
            return ("mkldnn._convolution_pointwise (its output allocated in out=); "
                    f"mkldnn._convolution_pointwise_.binary onto an addend{post}")
        return f"mkldnn._convolution_pointwise_.binary (into a zeroed out= or onto an addend{post})"


class MatmulInto:
    """A 1x1 stride-1 convolution on channels_last tensors as one GEMM over their rows:
    `out[n,h,w,:] = x[n,h,w,:] @ weight (+ bias)` with `weight` packed as (C_in, C_out) (or the
    model's own weight read transposed), through ATen's `addmm`/`mm` (MKL) into `out`'s rows.
    For small layers oneDNN's fixed cost per call (about 25 us, measured on a 16x16 map)
    outweighs its kernel; see `runs_as_matmul` for the rule. With an `addend` (a fused residual add),
    `out` starts from it and the GEMM accumulates into it; a `unary` ("swish") runs after, in
    place (`silu_`, which keeps eager's NaN and Inf)."""

    def __init__(self, unary: str | None = None):
        self.unary = unary

    def with_unary(self, unary: str) -> MatmulInto:
        return MatmulInto(unary)

    def __call__(self, x, weight, bias, padding, stride, dilation, groups, *addend, out):
        if weight.dim() == 4:  # unpacked: the model's weight, read transposed (a view if it can)
            weight = as_matrix(weight)
        rows = _rows(x.contiguous(memory_format=torch.channels_last))
        if not out.is_contiguous(memory_format=torch.channels_last):  # computed apart, copied
            target = torch.empty_like(out, memory_format=torch.channels_last)
            self(x, weight, bias, padding, stride, dilation, groups, *addend, out=target)
            return out.copy_(target)
        result = _rows(out)
        if addend:
            if (addend[0].data_ptr(), addend[0].stride()) != (out.data_ptr(), out.stride()):
                out.copy_(addend[0])
            if bias is not None:
                result.add_(bias)
            torch.addmm(result, rows, weight, out=result)
        elif bias is None:
            torch.mm(rows, weight, out=result)
        else:
            torch.addmm(bias, rows, weight, out=result)
        if self.unary:
            torch.ops.aten.silu_(out)
        return out

    def __repr__(self) -> str:
        post = f", then {self.unary} in place" if self.unary else ""
        return f"addmm over a 1x1 convolution's channels_last rows (into out=){post}"


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's (C_out, C_in, 1, 1) weight as the (C_in, C_out) matrix its rows are
    multiplied by: a transposed view where the weight's strides allow one."""
    return weight.reshape(weight.shape[0], -1).t()


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A channels_last 4-D tensor as its (N*H*W, C) matrix: a view of the same memory."""
    return tensor.permute(0, 2, 3, 1).view(-1, tensor.shape[1])


def is_matmul(node: fx.Node) -> bool:
    """Whether this convolution runs as a GEMM (`MatmulInto`, see `runs_as_matmul`)."""
    _, _, _, stride, padding, _, _, _, groups = node.args
    return runs_as_matmul(tuple(node.args[0].meta["val"].shape),
                          tuple(node.args[1].meta["val"].shape), stride, padding, groups)


def runs_as_matmul(input_shape: tuple, weight_shape: tuple, stride, padding, groups: int) -> bool:
    """1x1, stride 1, no padding, one group, at most MATMUL_MAX_MACS multiply-adds, and at least
    MATMUL_MIN_CHANNELS input channels or at most MATMUL_FEW_ROWS rows (pixels times batch: a
    squeeze-excite convolution on a pooled map). A fixed rule, measured once (BENCHMARKS "1x1
    convolutions as GEMMs", `benchmarks/conv_kernels.py`), so that numerics do not depend on
    timing noise at construction: within it MKL's GEMM took 0.31-1.04 of oneDNN's time on the
    46 such layer shapes of mobilenet_v2, efficientnet_b0 and resnet50 at batch 1 and one
    thread (faster on 44); outside it, it was slower on 14 of 18 (few input channels over many
    rows, or large layers where oneDNN's setup is paid off)."""
    batch, channels, height, width = input_shape
    rows = batch * height * width
    return (is_one_by_one(weight_shape, stride, padding, groups)
            and (channels >= MATMUL_MIN_CHANNELS or rows <= MATMUL_FEW_ROWS)
            and rows * channels * weight_shape[0] <= MATMUL_MAX_MACS)


def is_one_by_one(weight_shape: tuple, stride, padding, groups: int) -> bool:
    """1x1, stride 1, no padding, one group: a convolution that is a GEMM over its rows."""
    return (tuple(weight_shape[2:]) == (1, 1) and list(stride) == [1, 1]
            and list(padding) == [0, 0] and groups == 1)


def is_convolution(node: fx.Node) -> bool:
    return str(node.target) == TARGET


def unsupported(node: fx.Node, device: torch.device) -> str | None:
    """Why this convolution cannot be computed into the arena, or None when it can."""
    x = node.args[0].meta.get("val")
    transposed = node.args[6]
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this torch build: convolutions run unplanned"
    if device.type != "cpu":
        return f"convolutions are planned on CPU only (oneDNN), not on {device.type}"
    if transposed:
        return "transposed convolutions have no oneDNN kernel that writes into a given buffer"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "only 2-D convolutions (4-D input) are planned"
    if x.dtype != torch.float32:
        return f"only float32 convolutions are planned, not {x.dtype}"
    return None


def is_into(variant: OutVariant) -> bool:
    return isinstance(variant.overload, (ConvolutionInto, MatmulInto))


def variant(node: fx.Node, weight: torch.Tensor | None, pack: bool,
            packing: Packing | None = None, unary: str | None = None) -> OutVariant:
    """The out= variant of one convolution node; `weight` is its constant weight (None when the
    weight is computed in the graph), packed once when `pack` (`packing` keeps the copy up to
    date). Unpacked, oneDNN reorders the weight at every call: that scratch is allowed too
    (freed within the call). A given `packing`'s copies (packed weight, bias) replace the
    node's own (a batch norm folded in, see `fusion`)."""
    if packing is None and pack and weight is not None:
        packing = Packing.of((weight,), lambda: (packed_weight(node, weight),))
    packed, bias = (*packing.copies, None)[:2] if packing else (None, None)
    matmul = is_matmul(node)
    # a packed weight makes the functional kernel's output channels_last (measured), like `out`
    into = (MatmulInto(unary) if matmul
            else ConvolutionInto(packed is not None and slots.load() is None, unary))

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, w, own_bias, stride, padding, dilation, _, _, groups, *addend = args
        return (x, w if packed is None else packed, own_bias if bias is None else bias,
                list(padding), list(stride), list(dilation), groups, *addend), {}

    per_call = 0 if packed is not None or matmul else \
        REORDER_COPIES * _nbytes(node.args[1].meta["val"])
    return OutVariant(into, ("out",), rewrite, packed_bytes=_nbytes(packed) + _nbytes(bias),
                      tolerance=TOLERANCE, scratch_bytes=SCRATCH_BYTES + per_call,
                      packing=packing)


def packed_weight(node: fx.Node, weight: torch.Tensor) -> torch.Tensor:
    """`weight` as this convolution's kernel reads it: a (C_in, C_out) matrix for a GEMM
    (`is_matmul`), else the blocked format oneDNN picks for the input's shape."""
    if is_matmul(node):
        return as_matrix(weight).contiguous()
    _, _, _, stride, padding, dilation, _, _, groups = node.args
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups,
        list(node.args[0].meta["val"].shape))


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
