"""A convolution and the frozen batch norm after it, computed as one convolution.

A batch norm with running statistics is a per-channel affine map, so it folds into the
convolution before it: weight * scale, (bias - mean) * scale + beta. That removes the norm's
pass over the output, and in training the tensor it saves (the convolution's output): a band of
row-centric training then holds one tensor for the pair instead of two.

Gradients stay those of the two ops. Autograd through the fold would give the norm's weight its
gradient out of the convolution's weight gradient (sum of gradient x convolution, less the mean
times the gradient sum), which loses float32 digits that the norm's own backward keeps
(mobilenet_v2 at 224², stem norm weight: 1.1e-5 from float64 against 3.7e-6 unfolded). So a
trained norm runs through `_ConvThenNorm`, whose backward sums gradient x normalized output per
channel, as the norm's backward does, reading the normalized output back from the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FoldedConvBN:
    """`bn(conv(x))` for a norm using running statistics, as one convolution.

    With a trained norm weight or bias and grad enabled, the result must stay intact until
    backward wherever its gradient is not zero (see `_ConvThenNorm`): its consumers may not
    write into it, except a ReLU or clamp, which leaves it intact where its gradient passes.
    """

    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded weight and bias, differentiable in the convolution's and norm's parameters."""
        weight, bias, _ = _fold(self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias,
                                self.bn)
        return weight, bias

    def trained(self) -> bool:
        return any(p is not None and p.requires_grad for p in (self.bn.weight, self.bn.bias))

    def __call__(self, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if torch.is_grad_enabled() and self.trained():
            if bn.weight is not None and bool((bn.weight == 0).any()):
                # the normalized output cannot be read back through a zero scale: unfolded
                y = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                             conv.groups)
                return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                    False, 0.0, bn.eps)
            return _ConvThenNorm.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, self,
                                       padding)
        weight, bias = self.weights()
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def read_back_from(result: torch.Tensor, copy: torch.Tensor) -> None:
    """Let a trained fold's backward read its result from `copy`, so that the result itself
    can be freed. `result` is the fold's output or a band of its rows; `copy` has its shape
    and equals it wherever a gradient will flow back (outside, the gradient is zero).

    For 2PS, which copies a band's new rows next to the kept ones and runs ReLU over the copy:
    without this, the result would be held until backward beside the copy.
    """
    node = _fold_node(result, copy)
    if node is not None:
        node.y, node.other = copy.detach(), None


def read_back_through_sum(result: torch.Tensor, total: torch.Tensor,
                          other: torch.Tensor) -> Any | None:
    """Like `read_back_from`, for a result added to `other` (total = result + other, same
    shape, kept as computed where the gradient flows): backward reads total - other. Returns
    the fold's backward node (to move `total` along, `move_total`), or None if `result` is no
    trained fold's."""
    node = _fold_node(result, total)
    if node is not None:
        node.y, node.other = total.detach(), other.detach()
    return node


def move_total(node: Any, copy: torch.Tensor) -> None:
    """The total a fold reads back through (`read_back_through_sum`) now lives in `copy`."""
    if node.y.shape == copy.shape:
        node.y = copy.detach()


def reads_back(t: torch.Tensor) -> bool:
    """Whether `t` is (rows of) a trained fold's result."""
    return isinstance(_base(t).grad_fn, _ConvThenNorm._backward_cls)


def _base(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _fold_node(result: torch.Tensor, like: torch.Tensor) -> Any | None:
    """The fold's backward node if `result` is a band of rows of its output shaped like
    `like`; records where the band starts."""
    base = _base(result)
    node = base.grad_fn
    if (not isinstance(node, _ConvThenNorm._backward_cls) or like.shape != result.shape
            or result.shape[:-2] != base.shape[:-2] or result.shape[-1] != base.shape[-1]):
        return None
    node.y_start = (result.storage_offset() - base.storage_offset()) // base.stride(-2)
    return node


def _fold(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
          bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None, bn: nn.BatchNorm2d
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(folded weight, folded bias, per-channel scale)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    bias = -bn.running_mean if conv_bias is None else conv_bias - bn.running_mean
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + bn_bias
    return conv_weight * scale.reshape(-1, *[1] * (conv_weight.dim() - 1)), bias, scale


def _per_channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


class _ConvThenNorm(torch.autograd.Function):
    """Folded forward; backward gives each parameter the gradient of conv then norm.

    The norm weight's gradient is sum(grad * x_hat) per channel, x_hat = (y - beta) / gamma
    read from the result y (or a copy, `read_back_from`, or a sum it went into less the other
    term, `read_back_through_sum`). An in-place ReLU or clamp after it may have overwritten
    y, but only where it passes no gradient, so those positions add nothing.
    """

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, bn_weight, bn_bias, fold: FoldedConvBN,
                padding):
        weight, bias, scale = _fold(conv_weight, conv_bias, bn_weight, bn_bias, fold.bn)
        conv = fold.conv
        y = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, weight, scale, bn_weight, bn_bias)
        # rows of y (less `other`, if set) from y_start on; see the class docstring
        ctx.y, ctx.other, ctx.y_start = y.detach(), None, 0
        ctx.conv, ctx.padding = conv, padding
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale, bn_weight, bn_bias = ctx.saved_tensors
        conv, need = ctx.conv, ctx.needs_input_grad
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, conv.stride, ctx.padding, conv.dilation, False,
            [0] * len(ctx.padding), conv.groups, [need[0], need[1], False])
        channel = (-1, *[1] * (weight.dim() - 1))
        grad_sum = _per_channel_sum(grad)
        grad_bn_weight = None
        if need[3]:
            view = (1, -1, *[1] * (grad.dim() - 2))
            y = ctx.y if ctx.other is None else ctx.y - ctx.other
            x_hat = y - bn_bias.reshape(view) if bn_bias is not None else y.clone()
            rows = grad.narrow(-2, ctx.y_start, y.shape[-2])  # zero outside
            grad_bn_weight = _per_channel_sum(x_hat.div_(bn_weight.reshape(view)).mul_(rows))
        ctx.y = ctx.other = None
        return (grad_x, grad_weight * scale.reshape(channel) if need[1] else None,
                grad_sum * scale if need[2] else None, grad_bn_weight,
                grad_sum if need[4] else None, None, None)
