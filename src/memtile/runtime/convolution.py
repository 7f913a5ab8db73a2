"""Convolutions computed straight into a given buffer, through oneDNN (mkldnn).

`aten.convolution.out` on CPU is a generated wrapper: it computes into a temporary and copies.
`mkldnn._convolution_pointwise_.binary(other, x, w, ...)` with the post-op "add" computes
`conv(x) + other` into `other` itself; with `other` zeroed first it is the convolution, and on
channels_last tensors bit-identical to `aten.convolution` (measured). It avoids temporaries only
when its destination is channels_last (an NCHW destination costs an input reorder and a blocked
output, 2x the output), which is why `layout` plans 4-D activations in channels_last.

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

from memtile.runtime.outvariants import OutVariant

TARGET = "aten.convolution.default"
POINTWISE = torch.ops.mkldnn._convolution_pointwise_.binary
TOLERANCE = 1e-5  # relative to the output's magnitude; measured up to 2.4e-6 (vgg11, resnet18)
SCRATCH_BYTES = 16 * 1024
REORDER_COPIES = 2  # an unpacked weight is reordered per call into 2 weight-sized buffers (measured)


class ConvolutionInto:
    """`conv(x, ...)` written into `out`: zero it, then oneDNN adds the convolution into it.

    With an `addend` (a residual add, see `fusion`) `out` starts from it instead of zero: the
    executor plans the two in one slot, so it is already there (else it is copied in). `unary`
    ("relu") is a oneDNN post-op applied after the add, in the same pass over `out`."""

    def __init__(self, unary: str | None = None):
        self.unary = unary

    def __call__(self, x, weight, bias, padding, stride, dilation, groups, *addend, out):
        if not addend:
            out.zero_()
        elif (addend[0].data_ptr(), addend[0].stride()) != (out.data_ptr(), out.stride()):
            out.copy_(addend[0])
        return POINTWISE(out, x, weight, bias, padding, stride, dilation, groups,
                         "add", 1.0, self.unary, [], None)

    def __repr__(self) -> str:
        then = f", then {self.unary}" if self.unary else ""
        return f"mkldnn._convolution_pointwise_.binary (into a zeroed out= or onto an addend{then})"


INTO = ConvolutionInto()
INTO_RELU = ConvolutionInto("relu")


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


def variant(node: fx.Node, weight: torch.Tensor | None, pack: bool,
            into: ConvolutionInto = INTO, bias: torch.Tensor | None = None) -> OutVariant:
    """The out= variant of one convolution node; `weight` is its constant weight (None when the
    weight is computed in the graph), packed once when `pack`. Unpacked, oneDNN reorders the
    weight at every call: that scratch is allowed too (freed within the call). `bias` replaces
    the node's own (a batch norm folded in, see `fusion`)."""
    _, _, _, stride, padding, dilation, _, _, groups = node.args
    packed = None
    if pack and weight is not None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), list(stride), list(dilation), groups,
            list(node.args[0].meta["val"].shape))

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, w, own_bias, stride, padding, dilation, _, _, groups, *addend = args
        return (x, w if packed is None else packed, own_bias if bias is None else bias,
                list(padding), list(stride), list(dilation), groups, *addend), {}

    reorder = 0 if packed is not None else REORDER_COPIES * _nbytes(node.args[1].meta["val"])
    return OutVariant(into, ("out",), rewrite, packed_bytes=_nbytes(packed) + _nbytes(bias),
                      tolerance=TOLERANCE, scratch_bytes=SCRATCH_BYTES + reorder)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
