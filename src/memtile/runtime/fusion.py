"""Batch norm and residual add fused into the planned convolution before them: one call.

A planned convolution writes its arena slot (`convolution`); an eval-mode batch norm and a
residual add after it would each pass over the same bytes once more. Instead:

- the batch norm is folded into the convolution's weight and bias (inference only: `w * s`,
  `(b - mean) * s + beta` per output channel, `s = gamma / sqrt(var + eps)`, computed in float64
  from the constants at construction and packed once), and
- a residual add `conv(x) + identity` is oneDNN's own add: the convolution accumulates into the
  identity's slot instead of a zeroed one (no zeroing, no add pass), where the identity dies at
  the add and nothing else reads it after the convolution (else the call first copies it into
  its destination),

- a SiLU after the convolution or its batch norm (core ATen's `x * sigmoid(x)`; not after an
  add: oneDNN has no swish after its add post-op) is oneDNN's swish post-op, applied as the call
  writes its result,

so the chain becomes one step writing one slot (the identity's, or else the convolution's),
which the outputs of the ops it absorbs share, as in-place ops would. All of them propagate NaN
and Inf as eager does: products and sums, and the swish post-op gives eager's inf, NaN, NaN for
inf, -inf, NaN (measured, torch 2.14; so does hardswish's, but core ATen decomposes hardswish;
the construction check compares finite values, `tests/test_runtime_fusion.py` the non-finite
ones). The ReLU or ReLU6 after the chain
is not fused: oneDNN's relu and hardtanh post-ops are `max`/`min` instructions that turn NaN into
0 (or 6), where eager keeps NaN. It runs as its own step, in place in the chain's slot (2.5%
slower on mobilenet_v2 and resnet50 at batch 1, one thread, measured on a loaded machine,
2026-12-06).

Only where each op of the chain is the previous one's sole reader (nothing else needs the value
in between), the batch norm's parameters and statistics and the convolution's weight are
constants, and all the chain's tensors are channels_last (the layout in which oneDNN writes
without a temporary). The executor runs each fused call on the example inputs beside the chain
it replaces and keeps it only when it allocates no more than the convolution's workspace and
matches within the convolution's tolerance (a folded batch norm's weights are rounded once);
otherwise the ops run as separate steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from operator import getitem

import torch
from torch import fx

from memtile.capture import MemGraph, positions
from memtile.runtime import convolution
from memtile.runtime.outvariants import OutVariant
from memtile.runtime.packing import Packing

BATCH_NORM = "aten._native_batch_norm_legit_no_training.default"
ADD = "aten.add.Tensor"
# activations whose oneDNN post-op keeps eager's NaN and Inf: ATen op -> oneDNN unary attribute
# (core ATen writes hardswish as add, clamps, mul and div: not matched, it runs as those steps)
ACTIVATIONS = {"aten.silu.default": "swish"}
SIGMOID, MUL = "aten.sigmoid.default", "aten.mul.Tensor"  # core ATen's SiLU: x * sigmoid(x)


@dataclass(frozen=True)
class Chain:
    """A planned convolution and the ops its oneDNN call computes too."""

    convolution: fx.Node
    batch_norm: fx.Node | None = None  # eval-mode batch norm, folded into the weight and bias
    add: fx.Node | None = None  # residual add: the convolution accumulates into `identity`
    identity: fx.Node | None = None  # the add's other operand
    activation: tuple[fx.Node, ...] = ()  # SiLU: its sigmoid and mul, or one silu op

    @property
    def absorbed(self) -> tuple[fx.Node, ...]:
        """The ops that no longer run as steps of their own, in order."""
        return (*(n for n in (self.batch_norm, self.add) if n is not None), *self.activation)

    @property
    def unary(self) -> str | None:
        """The oneDNN post-op of the activation, if one is fused."""
        if not self.activation:
            return None
        return ACTIVATIONS["aten.silu.default"]  # the one fused activation, in either form

    @property
    def result(self) -> fx.Node:
        """The node whose value the fused call writes (what later ops read)."""
        return self.carried_into(None)

    def carried_into(self, node: fx.Node | None) -> fx.Node:
        """The node holding the chain's value where `node` reads it (None: after the last op
        before `node`, which is the batch norm's first output rather than the batch norm)."""
        value = self.convolution
        for op in self.absorbed:
            if op is node:
                break
            value = _sole_user(op) if op is self.batch_norm else op
        return value


def chains(graph: MemGraph, order: list[int], candidates: dict[str, OutVariant],
           channels_last: set[str], constants: dict[str, torch.Tensor],
           fold_batch_norm: bool) -> dict[str, Chain]:
    """Convolution node name -> the chain its call may compute (batch norm, add, activation).

    Every op of a chain must be an out= candidate (the convolution computed into the arena by
    oneDNN), each the sole reader of the one before (a graph output or a view read is another
    reader), every output channels_last; a folded batch norm needs constant parameters and the
    convolution a constant weight (`fold_batch_norm` False folds none); an add needs an identity
    of its own shape that `order` lets the convolution overwrite (see `_overwritable`)."""
    position = positions(order, len(graph.ops))
    viewed = {t.base for t in graph.tensors.values() if t.is_view}
    found = {}
    for op in graph.ops:
        conv = op.node
        variant = candidates.get(conv.name)
        if variant is None or not convolution.is_into(variant):
            continue
        chain = Chain(conv)
        value = conv
        batch_norm = _sole_user(value)
        if fold_batch_norm and batch_norm is not None and str(batch_norm.target) == BATCH_NORM \
                and _foldable(conv, batch_norm, constants):
            chain = dataclasses.replace(chain, batch_norm=batch_norm)
            value = _sole_user(batch_norm)
        add = _sole_user(value) if value is not None else None
        if add is not None and str(add.target) == ADD and not add.kwargs \
                and (identity := _other_operand(add, value)) is not None \
                and _overwritable(graph, identity, add, op.index, position, viewed):
            chain = dataclasses.replace(chain, add=add, identity=identity)
            value = add
        if value is not None and chain.add is None:  # oneDNN: no swish after its add post-op
            chain = dataclasses.replace(chain, activation=_activation(value))
        for candidate in (chain, dataclasses.replace(chain, activation=())):  # else without it
            if candidate.absorbed and value is not None and all(
                    n.name in candidates and first_value(graph, n) in channels_last
                    for n in (conv, *candidate.absorbed)):
                found[conv.name] = candidate
                break
    return found


def fused(chain: Chain, variant: OutVariant, constants: dict[str, torch.Tensor]) -> OutVariant:
    """The variant that computes the whole chain: the convolution's, with the batch norm folded
    into a new packed weight and bias, the activation as its post-op; with an add, it takes the
    identity as its last argument."""
    if chain.batch_norm is None:
        if chain.unary is None:
            return variant
        return dataclasses.replace(variant, overload=variant.overload.with_unary(chain.unary))
    conv, bn = chain.convolution, chain.batch_norm

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = folded(chain, constants)
        return convolution.packed_weight(conv, weight), bias

    sources = tuple(_constant(a, constants) for a in (*conv.args[1:3], *bn.args[1:5]))
    return convolution.variant(conv, None, pack=True, packing=Packing.of(sources, compute),
                               unary=chain.unary)


def folded(chain: Chain, constants: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with the batch norm folded in (float64, then rounded
    once to the weight's dtype)."""
    conv, bn = chain.convolution, chain.batch_norm
    weight = constants[conv.args[1].name]
    bias = _constant(conv.args[2], constants)
    gamma, beta, mean, var = (_constant(a, constants) for a in bn.args[1:5])
    eps = bn.args[6]
    scale = (var.double() + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.double()
    shift = -mean.double() * scale if bias is None else (bias.double() - mean.double()) * scale
    if beta is not None:
        shift = shift + beta.double()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.double() * scale.reshape(shape)).to(weight.dtype), shift.to(weight.dtype)


def _activation(value: fx.Node) -> tuple[fx.Node, ...]:
    """The activation reading `value` that a post-op can compute: one ACTIVATIONS op, or SiLU
    as core ATen writes it, `mul(value, sigmoid(value))` with nothing else reading either."""
    users = list(value.users)
    if len(users) == 1 and str(users[0].target) in ACTIVATIONS:
        return (users[0],)
    sigmoid = next((u for u in users if str(u.target) == SIGMOID), None)
    mul = _sole_user(sigmoid) if sigmoid is not None else None
    if len(users) == 2 and mul in users and str(mul.target) == MUL and not mul.kwargs \
            and set(mul.args) == {value, sigmoid} and len(mul.args) == 2:
        return (sigmoid, mul)
    return ()


def _other_operand(add: fx.Node, value: fx.Node) -> fx.Node | None:
    """The add's operand that is not the chain's value (None if both are, or one is a scalar)."""
    operands = add.args
    if len(operands) != 2 or not all(isinstance(a, fx.Node) for a in operands) \
            or operands[0] is operands[1]:
        return None
    return operands[1] if operands[0] is value else operands[0]


def _overwritable(graph: MemGraph, identity: fx.Node, add: fx.Node, conv_index: int,
                  position: list[int], viewed: set[str]) -> bool:
    """The convolution may accumulate into the identity's storage: same shape and dtype as the
    add's result (no broadcast), a storage of its own (no views read it), produced before the
    convolution runs and read by nothing but the add after it."""
    name = graph.value_of.get(identity)
    if not isinstance(name, str):
        return False
    tensor, result = graph.tensors[name], add.meta.get("val")
    add_index = next(op.index for op in graph.ops if op.node is add)
    return (isinstance(result, torch.Tensor) and tensor.shape == tuple(result.shape)
            and tensor.dtype == result.dtype and not tensor.is_view
            and name not in viewed and tensor.producer is not None
            and position[tensor.producer] < position[conv_index]
            and all(position[c] < position[conv_index] for c in tensor.consumers if c != add_index))


def _foldable(conv: fx.Node, bn: fx.Node, constants: dict[str, torch.Tensor]) -> bool:
    """The weight, running statistics and (when present) parameters are constants, and only the
    batch norm's first output is read."""
    needed = [conv.args[1], *bn.args[3:5]]
    optional = [conv.args[2], *bn.args[1:3]]
    return (all(isinstance(a, fx.Node) and a.name in constants for a in needed)
            and all(a is None or (isinstance(a, fx.Node) and a.name in constants) for a in optional)
            and all(u.target is getitem and u.args[1] == 0 for u in bn.users))


def _constant(arg, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return None if arg is None else constants[arg.name]


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def slots(graph: MemGraph, fused_chains: Iterable[Chain], storages: Collection[str]) -> dict[str, str]:
    """Tensor -> the tensor whose arena slot it takes, for fused chains (`planner.prepare`'s
    `extra_shared`): the ops a chain absorbs write its slot, which is the identity's when the
    convolution accumulates into an identity in the arena (`storages`; the convolution's own
    slot is then never written), else the convolution's."""
    shared: dict[str, str] = {}
    for chain in fused_chains:
        slot = graph.value_of[chain.convolution]
        if chain.identity is not None and graph.value_of[chain.identity] in storages:
            shared[slot] = graph.value_of[chain.identity]
            slot = graph.value_of[chain.identity]
        shared.update({first_value(graph, node): slot for node in chain.absorbed})
    return shared


def first_value(graph: MemGraph, node: fx.Node) -> str:
    """The tensor name of a node's (first) output."""
    value = graph.value_of[node]
    return value[0] if isinstance(value, tuple) else value
