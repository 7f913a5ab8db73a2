"""FDT, fused depthwise tiling: split a widening path along channels into N partitions.

A path is `head -> channel-local ops -> tail`: the head (conv with groups=1, or linear) is split
by output channels, each channel-local op (BN in eval, activation, depthwise conv, pooling,
flatten of a 1x1 map) keeps its slice, and the tail (conv or linear) reads only its
input-channel slice and yields a partial sum of the full output. The first partition's output,
which alone carries the tail's bias, is the accumulator. When the tail is a matrix product
(linear, or 1x1 conv with stride 1 and no padding) each later partition multiplies straight into
it (`PartialSum`, a GEMM with beta=1 and `out=` the accumulator), so no partial-sum buffer the
size of the output exists; other tails compute the partial and add it in place (`Accumulate`).
Every weight is used exactly once, so the rewrite adds no conv/linear MACs; the wide
intermediates exist one partition at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from memtile import ops
from memtile.errors import UnsupportedOpError
from memtile.tiling.rewrite import (
    copy_graph_module,
    erase_chain,
    finish,
    fresh_name,
    module_of,
    node_named,
    shape,
    split_ranges,
)

_FLATTEN = {torch.flatten, "flatten"}


ACCUMULATE = "accumulate"


class Accumulate(nn.Module):
    """`total += partial` in place: the partial sums share one output buffer. A named module so
    that the accumulation shows as `fdtN.accumulate` in captures and profiles."""

    def forward(self, total: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        return total.add_(partial)


class PartialSum(nn.Module):
    """`total += weight @ x` in place for a matrix-product tail (linear, 1x1 conv): a GEMM with
    beta=1 writing into the accumulator, so the partial sum never has a buffer of its own
    (`addmm` with `out=`, which exports as `addmm` over a view of `total`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().reshape(weight.shape[0], -1).clone(),
                                   requires_grad=weight.requires_grad)

    def forward(self, total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if total.dim() == 4:  # (1, C, H, W) output of a 1x1 conv: (out, in) @ (in, H*W)
            out = total.view(total.shape[1], -1)
            torch.addmm(out, self.weight, x.reshape(x.shape[1], -1), out=out)
        else:  # linear: (rows, in) @ (in, out)
            out = total.view(-1, total.shape[-1])
            torch.addmm(out, x.reshape(-1, x.shape[-1]), self.weight.t(), out=out)
        return total

    def empty_output(self, total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`forward`'s result without the GEMM: `total` itself (shape propagation runs FDT
        rewrites hundreds of times; a fake out= GEMM costs milliseconds)."""
        return total


def multiplies_into(gm: fx.GraphModule, tail: fx.Node) -> bool:
    """A tail whose partial sums `PartialSum` can write straight into the accumulator: linear,
    or a 1x1 conv at batch 1 (one GEMM, which capture counts as `addmm`)."""
    module = module_of(gm, tail)
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and shape(tail)[0] == 1 and module.groups == 1
            and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and module.padding in ((0, 0), "valid") and module.padding_mode == "zeros")


@dataclass(frozen=True)
class FDTPath:
    """A valid FDT path: node names head, channel-local mids, tail; `width` = head out channels."""

    head: str
    mids: tuple[str, ...]
    tail: str
    width: int

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.head, *self.mids, self.tail)


def _is_conv(module: nn.Module | None) -> bool:
    """A convolution whose weight is (out, in / groups, ...): not a transposed one, whose weight
    is (in, out / groups, ...) and whose slices `_conv_copy` would build wrong."""
    return isinstance(module, _ConvNd) and not module.transposed


def _is_mixer(module: nn.Module | None) -> bool:
    """Conv with groups=1 or linear: reads all input channels, so it can head or end a path."""
    return isinstance(module, nn.Linear) or (_is_conv(module) and module.groups == 1)


def _is_depthwise(module: nn.Module | None) -> bool:
    return (
        _is_conv(module)
        and module.groups > 1
        and module.groups == module.in_channels
        and module.out_channels % module.in_channels == 0
    )


def _channel_step(gm: fx.GraphModule, node: fx.Node, cdim: int) -> tuple[str, int]:
    """Classify `node` as a path step given the channel dim of its input.

    Returns (kind, channel dim of its output); kind is "mixer", "depthwise", "bn" or "shared"
    (an op that runs unchanged on a channel slice). Raises UnsupportedOpError naming the op when
    it mixes channels or cannot be sliced.
    """
    module = module_of(gm, node)
    out = shape(node)
    ndim = len(out) if out is not None else 0
    if module is not None and module.training and isinstance(
        module, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d)
    ):
        raise UnsupportedOpError(f"{ops.describe(gm, node)} is in training mode; call model.eval()")
    if _is_mixer(module):
        if isinstance(module, nn.Linear) and cdim != ndim - 1:
            raise UnsupportedOpError(f"{ops.describe(gm, node)} reads features on another axis")
        if isinstance(module, _ConvNd) and cdim != 1:
            raise UnsupportedOpError(f"{ops.describe(gm, node)} reads channels on another axis")
        return "mixer", (1 if isinstance(module, _ConvNd) else ndim - 1)
    if _is_depthwise(module) and cdim == 1:
        return "depthwise", 1
    if ops.is_batch_norm(gm, node) and cdim == 1:
        if module is None and ops.batch_norm_arguments(node)["training"]:
            raise UnsupportedOpError(f"{ops.describe(gm, node)} is in training mode; "
                                     "call model.eval()")
        return "bn", 1
    kind = ops.kind(gm, node)
    if kind in (ops.IDENTITY, ops.POINTWISE) or (
        kind == ops.BINARY and len(ops.tensor_inputs(node)) == 1  # with a scalar
    ) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
        return "shared", cdim
    pooling = kind in (ops.WINDOW, ops.GLOBAL_POOL) and not isinstance(module, _ConvNd)
    if (pooling or kind == ops.UPSAMPLE) and cdim == 1:  # upsampling: every mode
        return "shared", 1
    flatten = isinstance(module, nn.Flatten) or node.target in _FLATTEN
    if flatten and cdim == 1 and ndim == 2 and _flattens_unit_map(node):
        return "shared", 1
    raise UnsupportedOpError(f"{ops.describe(gm, node)} mixes channels or is not channel-local"
                             + ("" if kind else " (an op memtile does not know)"))


def _flattens_unit_map(node: fx.Node) -> bool:
    """flatten(x, 1) of an (N, C, 1, 1) map keeps channel c at feature c."""
    source = shape(node.all_input_nodes[0])
    return source is not None and len(source) >= 2 and int(torch.Size(source[2:]).numel()) == 1


def fdt_path(gm: fx.GraphModule, head: str) -> FDTPath:
    """The FDT path starting at node `head` (shapes must be propagated).

    Raises UnsupportedOpError naming the op that ended the path when no valid tail is reached.
    """
    node = node_named(gm, head)
    module = module_of(gm, node)
    if not _is_mixer(module):
        raise UnsupportedOpError(f"{ops.describe(gm, node)} cannot head an FDT path (needs conv/linear)")
    width = module.out_channels if isinstance(module, _ConvNd) else module.out_features
    cdim = 1 if isinstance(module, _ConvNd) else len(shape(node)) - 1
    mids: list[str] = []
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            raise UnsupportedOpError(
                f"FDT path from {head} ended at {current.name}: its output has {len(users)} "
                "consumers (branch or residual), so its channels cannot be split"
            )
        user = users[0]
        if ops.tensor_inputs(user) != [current]:
            raise UnsupportedOpError(
                f"FDT path from {head} ended at {ops.describe(gm, user)}: it combines "
                f"{current.name} with another tensor (e.g. a residual add)"
            )
        try:
            kind, cdim = _channel_step(gm, user, cdim)
        except UnsupportedOpError as exc:
            raise UnsupportedOpError(f"FDT path from {head} ended: {exc}") from exc
        if kind == "mixer":
            return FDTPath(head, tuple(mids), user.name, width)
        mids.append(user.name)
        current = user


def fdt_paths_through(gm: fx.GraphModule, name: str,
                      reasons: list[str] | None = None) -> list[FDTPath]:
    """FDT paths in which node `name`'s output is an inner (split) buffer: it is the head or a mid.

    Why a path through it cannot be built is appended to `reasons` ("fdt through NAME: ...")."""
    node = node_named(gm, name)
    while not _is_mixer(module_of(gm, node)):
        producers = ops.tensor_inputs(node)
        if len(producers) != 1 or len(producers[0].users) != 1:
            return []
        node = producers[0]
    try:
        path = fdt_path(gm, node.name)
    except UnsupportedOpError as error:
        if reasons is not None:
            reasons.append(f"fdt through {name}: {error}")
        return []
    return [path] if name in path.nodes[:-1] else []


def _conv_copy(conv: _ConvNd, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> _ConvNd:
    new = type(conv)(
        weight.shape[1] * groups, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, groups, bias is not None, conv.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return new


def _linear_copy(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _slice_mixer(module: nn.Module, lo: int, hi: int, *, output: bool, bias: bool) -> nn.Module:
    """Head: output channels [lo, hi). Tail: input channels [lo, hi), bias only if `bias`."""
    weight = module.weight[lo:hi] if output else module.weight[:, lo:hi]
    keep = module.bias is not None and (output or bias)
    b = (module.bias[lo:hi] if output else module.bias) if keep else None
    if isinstance(module, nn.Linear):
        return _linear_copy(module, weight, b)
    return _conv_copy(module, weight, b, groups=1)


def _slice_depthwise(conv: _ConvNd, lo: int, hi: int) -> tuple[_ConvNd, int, int]:
    mult = conv.out_channels // conv.in_channels
    bias = conv.bias[lo * mult:hi * mult] if conv.bias is not None else None
    return _conv_copy(conv, conv.weight[lo * mult:hi * mult], bias, groups=hi - lo), lo * mult, hi * mult


def _slice_bn(bn: nn.modules.batchnorm._BatchNorm, lo: int, hi: int) -> nn.Module:
    new = type(bn)(hi - lo, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device=bn.weight.device if bn.affine else None)
    state = {k: (v[lo:hi] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
    new.load_state_dict(state)
    return new.eval()


def _slice_functional_bn(gm: fx.GraphModule, node: fx.Node, lo: int, hi: int) -> nn.BatchNorm2d:
    """Channels [lo, hi) of an eval `F.batch_norm` call (timm's BatchNormAct2d) as a module."""
    bound = ops.batch_norm_arguments(node)
    tensors = {k: ops.constant(gm, v)[lo:hi] if isinstance(v, fx.Node) else v
               for k, v in bound.items() if k in ("running_mean", "running_var", "weight", "bias")}
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        raise UnsupportedOpError(f"{ops.describe(gm, node)} has no running statistics")
    affine = tensors["weight"] is not None and tensors["bias"] is not None
    new = nn.BatchNorm2d(hi - lo, bound["eps"], affine=affine,
                         device=tensors["running_mean"].device,
                         dtype=tensors["running_mean"].dtype)
    with torch.no_grad():
        new.running_mean.copy_(tensors["running_mean"])
        new.running_var.copy_(tensors["running_var"])
        if affine:
            new.weight.copy_(tensors["weight"])
            new.bias.copy_(tensors["bias"])
    return new.eval()


def apply_fdt(gm: fx.GraphModule, path: FDTPath, partitions: int) -> fx.GraphModule:
    """A copy of `gm` with `path` computed in `partitions` channel partitions (see module doc)."""
    gm = copy_graph_module(gm)
    graph = gm.graph
    head, tail = node_named(gm, path.head), node_named(gm, path.tail)
    mids = [node_named(gm, name) for name in path.mids]
    prefix = fresh_name(gm, "fdt")
    container = nn.Module()
    container.add_module(ACCUMULATE, Accumulate())
    gm.add_module(prefix, container)

    def call(name: str, module: nn.Module, arg: fx.Node) -> fx.Node:
        container.add_module(name, module)
        return graph.call_module(f"{prefix}.{name}", (arg,))

    head_module, tail_module = module_of(gm, head), module_of(gm, tail)
    source = head.args[0]
    accumulated: fx.Node | None = None
    with graph.inserting_before(tail):
        for part, (lo, hi) in enumerate(split_ranges(path.width, partitions)):
            value = call(f"p{part}_head", _slice_mixer(head_module, lo, hi, output=True, bias=True),
                         source)
            for index, mid in enumerate(mids):
                module = module_of(gm, mid)
                if _is_depthwise(module):
                    sliced, lo, hi = _slice_depthwise(module, lo, hi)
                    value = call(f"p{part}_mid{index}", sliced, value)
                elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                    value = call(f"p{part}_mid{index}", _slice_bn(module, lo, hi), value)
                elif ops.is_batch_norm(gm, mid):
                    value = call(f"p{part}_mid{index}", _slice_functional_bn(gm, mid, lo, hi),
                                 value)
                else:
                    previous = ops.tensor_inputs(mid)[0]
                    args = fx.map_arg(mid.args, lambda n, p=previous, v=value: v if n is p else n)
                    value = graph.create_node(mid.op, mid.target, args, dict(mid.kwargs))
            tail_part = _slice_mixer(tail_module, lo, hi, output=False, bias=part == 0)
            if accumulated is None:
                accumulated = call(f"p{part}_tail", tail_part, value)
            elif multiplies_into(gm, tail):
                container.add_module(f"p{part}_tail", PartialSum(tail_part.weight))
                accumulated = graph.call_module(f"{prefix}.p{part}_tail", (accumulated, value))
            else:
                partial = call(f"p{part}_tail", tail_part, value)
                accumulated = graph.call_module(f"{prefix}.{ACCUMULATE}", (accumulated, partial))
    tail.replace_all_uses_with(accumulated)
    erase_chain(gm, [head, *mids, tail])
    return finish(gm)
