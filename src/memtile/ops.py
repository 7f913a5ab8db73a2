"""The one op table: what each fx node computes, as spatial analysis, tiling and rows see it.

Bands and tiles (`memtile.spatial`), FFMT and FDT (`memtile.tiling`) and the peak estimate all
ask `kind(gm, node)`; before, each kept its own tables and they disagreed (PReLU and Softplus
were pointwise for bands but not for tiling, Dropout the reverse, timm's functional batch_norm
for none). A node that is in no table has kind None, and `describe` names it for the error.

Kinds:
- IDENTITY: returns its input (nn.Identity, eval-mode dropout, `contiguous`): an alias.
- POINTWISE: output element i from input element i alone (activations, clamp).
- PER_CHANNEL: pointwise with per-channel parameters (eval batch norm, PReLU): a channel
  slice needs the slice of its parameters.
- BINARY: elementwise arithmetic of tensors (and scalars), broadcast allowed (add, mul, ...).
- CONCAT: torch.cat (spatially local only along channels).
- VIEW: a reshaped view of its input (flatten, reshape, permute, ...).
- SPLIT: a tuple of views of its input (torch.split, chunk), picked by getitem.
- WINDOW: a sliding window over H and W (Conv2d, MaxPool2d, AvgPool2d).
- GLOBAL_POOL: one value per channel (adaptive pooling).
- UPSAMPLE: resamples H and W of each channel by a factor or to a size (nn.Upsample,
  F.interpolate); which modes bands and tiles take is theirs to say (`upsample_arguments`).
- LAST_DIMS: mixes only its trailing dims (`F.layer_norm` over `normalized_shape`), pointwise
  in all others: timm's LayerNorm2d normalizes channels after permuting them last.

ATen-level facts used by the planner (which ops may overwrite an input) live in
`memtile.inplace.ELEMENTWISE`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

IDENTITY = "identity"
POINTWISE = "pointwise"
PER_CHANNEL = "per_channel"
BINARY = "binary"
CONCAT = "concat"
VIEW = "view"
SPLIT = "split"
WINDOW = "window"
GLOBAL_POOL = "global_pool"
UPSAMPLE = "upsample"
LAST_DIMS = "last_dims"

ELEMENTWISE_KINDS = frozenset({IDENTITY, POINTWISE, PER_CHANNEL, BINARY})

_MODULES: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout), IDENTITY),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
      nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus), POINTWISE),
    ((_BatchNorm, nn.PReLU), PER_CHANNEL),
    ((nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d), WINDOW),
    ((nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), GLOBAL_POOL),
    ((nn.Upsample,), UPSAMPLE),
    ((nn.Flatten, nn.Unflatten), VIEW),
)
_FUNCTIONS: dict[object, str] = {
    **dict.fromkeys((torch.relu, torch.sigmoid, torch.tanh, torch.clamp, F.relu, F.relu6,
                     F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                     F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh), POINTWISE),
    **dict.fromkeys((F.batch_norm, F.prelu), PER_CHANNEL),
    **dict.fromkeys((operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     operator.imul, torch.add, torch.sub, torch.mul, torch.div), BINARY),
    torch.cat: CONCAT,
    **dict.fromkeys((torch.split, torch.chunk), SPLIT),
    **dict.fromkeys((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                     torch.permute, torch.transpose, torch.narrow, operator.getitem), VIEW),
    **dict.fromkeys((F.max_pool2d, F.avg_pool2d), WINDOW),
    **dict.fromkeys((F.adaptive_avg_pool2d, F.adaptive_max_pool2d), GLOBAL_POOL),
    **dict.fromkeys((F.interpolate, F.upsample), UPSAMPLE),
    F.layer_norm: LAST_DIMS,
}
_METHODS: dict[str, str] = {
    "contiguous": IDENTITY,
    **dict.fromkeys(("split", "chunk"), SPLIT),
    **dict.fromkeys(("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp",
                     "clamp_"), POINTWISE),
    **dict.fromkeys(("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"), BINARY),
    **dict.fromkeys(("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute",
                     "transpose", "t", "expand", "narrow"), VIEW),
}


def submodule(gm: nn.Module, target: str) -> nn.Module:
    """`gm.get_submodule(target)`, found through each level's registered modules (the same
    module: a submodule lives only there). get_submodule's `getattr` at each level costs more:
    discovery looks modules up over a million times for mobilenet_v2."""
    module: nn.Module | None = gm
    for name in target.split("."):
        module = getattr(module, "_modules", {}).get(name)
        if module is None:
            return gm.get_submodule(target)  # its error
    return module


def kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The node's kind (see the module doc), or None for an op in no table."""
    if node.op == "call_module":
        return module_kind(submodule(gm, node.target))
    if node.op == "call_function":
        if node.target is F.dropout:  # identity only in eval mode
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            return None if training else IDENTITY
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def module_kind(module: nn.Module) -> str | None:
    """The kind of a module (see the module doc), or None for a module in no table."""
    return next((k for types, k in _MODULES if isinstance(module, types)), None)


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Output element i depends on input element i only: the output may take the bytes of an
    input of its size that dies there."""
    return kind(gm, node) in ELEMENTWISE_KINDS


def split_dim(node: fx.Node) -> int:
    """The dim a torch.split / chunk call (function or method) splits along."""
    return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)


def is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A BatchNorm module or timm's functional `F.batch_norm` (running statistics as get_attr)."""
    if node.op == "call_module":
        return isinstance(submodule(gm, node.target), _BatchNorm)
    return node.op == "call_function" and node.target is F.batch_norm


_INTERPOLATE_PARAMETERS = ("input", "size", "scale_factor", "mode", "align_corners",
                           "recompute_scale_factor", "antialias")


def upsample_arguments(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    """`F.interpolate`'s arguments by name, defaults filled in, of an UPSAMPLE node: a function
    call's own, or those an nn.Upsample module passes (`UpsamplingBilinear2d` sets
    align_corners)."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        bound = {name: getattr(module, name) for name in _INTERPOLATE_PARAMETERS[1:-1]}
        return {**bound, "input": node.args[0] if node.args else node.kwargs["input"],
                "antialias": False}
    defaults = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                "recompute_scale_factor": None, "antialias": False}
    return {**defaults, **dict(zip(_INTERPOLATE_PARAMETERS, node.args, strict=False)),
            **node.kwargs}


_BN_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                  "momentum", "eps")


def batch_norm_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an `F.batch_norm` call by name, defaults filled in."""
    bound = dict(zip(_BN_PARAMETERS, node.args, strict=False))
    bound.update(node.kwargs)
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    return {**defaults, **bound}


def constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads (a parameter or buffer of `gm`)."""
    value: Any = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, without get_attr (parameters are not values that flow)."""
    return [arg for arg in node.all_input_nodes if arg.op != "get_attr"]


def is_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A parameter, or a view or elementwise result of parameters alone (timm's layer scale
    `gamma.reshape(1, -1, 1, 1)`): the same whole tensor for every band and tile."""
    if node.op == "get_attr":
        return True
    return (node.op in ("call_function", "call_method") and bool(node.all_input_nodes)
            and kind(gm, node) in (VIEW, *ELEMENTWISE_KINDS)
            and all(is_constant(gm, arg) for arg in node.all_input_nodes))


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """`name (Type)` for a module call, `name (function)` otherwise: how errors name an op."""
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                      str(node.target))
    return f"{node.name} ({target})"
