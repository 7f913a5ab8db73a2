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

Both are bit-identical to `aten.convolution` on channels_last tensors (measured). They avoid
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
    return isinstance(variant.overload, ConvolutionInto)


def variant(node: fx.Node, weight: torch.Tensor | None, pack: bool,
            packing: Packing | None = None, unary: str | None = None) -> OutVariant:
    """The out= variant of one convolution node; `weight` is its constant weight (None when the
    weight is computed in the graph), packed once when `pack` (`packing` keeps the copy up to
    date). Unpacked, oneDNN reorders the weight at every call: that scratch is allowed too
    (freed within the call). A given `packing`'s copies (packed weight, bias) replace the
    node's own (a batch norm folded in, see `fusion`)."""
    if packing is None and pack and weight is not None:
        packing = Packing.of((weight,), lambda: (reorder(node, weight),))
    packed, bias = (*packing.copies, None)[:2] if packing else (None, None)
    # a packed weight makes the functional kernel's output channels_last (measured), like `out`
    into = ConvolutionInto(packed is not None and slots.load() is None, unary)

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, w, own_bias, stride, padding, dilation, _, _, groups, *addend = args
        return (x, w if packed is None else packed, own_bias if bias is None else bias,
                list(padding), list(stride), list(dilation), groups, *addend), {}

    per_call = 0 if packed is not None else REORDER_COPIES * _nbytes(node.args[1].meta["val"])
    return OutVariant(into, ("out",), rewrite, packed_bytes=_nbytes(packed) + _nbytes(bias),
                      tolerance=TOLERANCE, scratch_bytes=SCRATCH_BYTES + per_call,
                      packing=packing)


def reorder(node: fx.Node, weight: torch.Tensor) -> torch.Tensor:
    """`weight` in the blocked format oneDNN picks for this convolution's input shape."""
    _, _, _, stride, padding, dilation, _, _, groups = node.args
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups,
        list(node.args[0].meta["val"].shape))


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
