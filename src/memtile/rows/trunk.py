"""Find the longest spatially local prefix of a CNN and wrap it in `RowCentric`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from memtile.errors import MemtileError, UnsupportedOpError
from memtile.freeze import freeze
from memtile.rows.module import RowCentric
from memtile.spatial import classify
from memtile.trace import trace


class RowWrapped(nn.Module):
    """A model split at the end of its spatial trunk: `head(trunk(x))`, parameters shared.

    `stopped_at` says where and why the bands end ({node, op, reason, last_banded}), or is
    None when the whole model is banded.
    """

    def __init__(self, trunk: RowCentric, head: fx.GraphModule,
                 stopped_at: dict[str, str] | None = None) -> None:
        super().__init__()
        self.trunk, self.head, self.stopped_at = trunk, head, stopped_at

    def forward(self, x):
        return self.head(self.trunk(x))


@dataclass
class Split:
    """A model's spatially local prefix, the rest, and where and why the prefix ends."""

    trunk: fx.GraphModule
    head: fx.GraphModule
    stopped_at: dict[str, str] | None


def split_trunk(model: nn.Module, stop_before: str | None = None
                ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(trunk, head) of `find_split`."""
    split = find_split(model, stop_before)
    return split.trunk, split.head


def find_split(model: nn.Module, stop_before: str | None = None) -> Split:
    """The longest prefix of spatially local ops that hands one tensor on, and the rest.

    BatchNorm counts as local here (whether it may run is RowCentric's `bn` choice). Both parts
    share the model's submodules, so its parameters and optimizer state stay valid.
    `stop_before` (a submodule name, e.g. "layer4") ends the prefix before that submodule's
    first op: the deep layers of a tail hold little activation memory, but their few output rows
    make every band thin there, so running them ordinarily is faster for about the same peak.
    """
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise UnsupportedOpError("wrap() needs a model with exactly one image input")
    accepted: dict[fx.Node, object] = {}
    stop: tuple[fx.Node, str] | None = None
    for node in nodes:
        if node.op == "output":
            break
        if node.op == "get_attr":  # a parameter read: its consumer says whether it is local
            continue
        if _inside(node, stop_before):
            stop = (node, f"stop_before={stop_before!r}: it and the rest run ordinarily")
            break
        try:
            accepted[node] = classify(gm, node, accepted, frozen_bn=True)
        except UnsupportedOpError as exc:
            stop = (node, f"{kind_of_stop(gm, node)}{exc}")
            break
    if stop_before is not None and not any(_inside(n, stop_before) for n in nodes):
        raise UnsupportedOpError(f"stop_before={stop_before!r}: {type(model).__name__} calls no "
                                 "submodule of that name")
    prefix = list(accepted)
    cut = None
    for k in range(len(prefix) - 1, 0, -1):
        inside = set(prefix[: k + 1])
        live = {n for n in inside if any(u not in inside for u in n.users)}
        if live == {prefix[k]}:
            cut = k
            break
    if cut is None:
        raise UnsupportedOpError(f"{type(model).__name__} has no spatially local prefix to wrap"
                                 f"{f' ({stop[0].name}: {stop[1]})' if stop else ''}")
    trunk, last = prefix[: cut + 1], prefix[cut]
    stopped_at = None
    if stop is not None:
        node, reason = stop
        if cut + 1 < len(prefix):
            reason += (f"; the bands end before it, at {last.name}, the last node where the "
                       "banded part hands on one tensor (later ones still feed skips)")
        stopped_at = {"node": node.name, "op": op_name(gm, node), "reason": reason,
                      "last_banded": last.name}
    return Split(_subgraph(gm, trunk, last), _head(gm, trunk, last), stopped_at)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What `node` runs: a module's type, a function's or a method's name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


_GLOBAL = {"mean", "sum", "amax", "adaptive_avg_pool2d", "adaptive_max_pool2d",
           "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "SelectAdaptivePool2d"}
_ATTENTION = {"softmax", "matmul", "bmm", "baddbmm", "scaled_dot_product_attention",
              "MultiheadAttention", "Softmax"}
_LAYOUT = {"flatten", "view", "reshape", "permute", "transpose", "Flatten", "Linear", "linear"}


def kind_of_stop(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short why for a non-local op: global pooling, attention, leaving the image layout."""
    name = op_name(gm, node)
    if name == "batch_norm":
        return "BatchNorm traced in training mode (its statistics span the whole image): "
    if name in _GLOBAL:
        return "global pooling (reads every row of the image): "
    if name in _ATTENTION:
        return "attention (mixes all positions): "
    if name in _LAYOUT:
        return "leaves the image layout (e.g. the classifier head): "
    return ""


def _inside(node: fx.Node, module: str | None) -> bool:
    """Whether `node` calls `module` or one of its submodules."""
    return (module is not None and node.op == "call_module"
            and (node.target == module or node.target.startswith(module + ".")))


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], out: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def value(n: fx.Node) -> fx.Node:
        if n not in env and n.op == "get_attr":  # parameters read by the trunk's ops
            env[n] = graph.node_copy(n)
        return env[n]

    for node in nodes:
        env[node] = graph.node_copy(node, value)
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


def _head(gm: fx.GraphModule, trunk: list[fx.Node], cut: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env = {cut: graph.placeholder("features")}
    inside = set(trunk)
    for node in gm.graph.nodes:
        if node not in inside:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)


def wrap(model: nn.Module, stop_before: str | None = None, loss=None, **kwargs):
    """`model` with its longest spatially local prefix run by `RowCentric(prefix, **kwargs)`.

    Finds vgg/mobilenet `features`, resnet stem + layer1-4 and the like; the head runs unchanged.
    With `bn="frozen"` the whole model's BatchNorm layers are frozen in place first
    (`memtile.freeze`). `stop_before` ends the prefix before a submodule (see `split_trunk`): resnet50 at 2x512²
    with "layer4" measured 16% of ordinary activations at 1.39-1.44x the step time, against 17%
    at 1.60x with layer4 banded too (BENCHMARKS.md).

    With `loss` ("ce", "bce", "mse" or a per-pixel callable returning a sum), the whole model is
    banded up to its per-pixel output and trained with a per-band loss instead:
    `memtile.rows.whole.WholeBands(model, loss, rows=..., strategy=..., bn=..., verify=...)`,
    called as `wrapped(x, target)`; `NotLocal` (with `stopped_at`) where the model is not local
    throughout.
    """
    if loss is not None:
        from memtile.rows.whole import WholeBands

        extra = sorted(set(kwargs) - {"rows", "bn", "verify", "strategy"}
                       | ({"stop_before"} if stop_before else set()))
        if extra:
            raise MemtileError(f"wrap(loss=...) bands the whole model; {', '.join(extra)} do "
                               "not apply")
        return WholeBands(model, loss, **kwargs)
    if kwargs.get("bn") == "frozen":
        freeze(model)  # before tracing, so that no trace keeps a norm in training mode
    split = find_split(model, stop_before)
    return RowWrapped(RowCentric(split.trunk, **kwargs), split.head, split.stopped_at)
