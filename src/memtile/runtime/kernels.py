"""Which ops run into the arena: kernel selection, then the check pass (two of the executor's
passes, each a function over the captured graph that returns what it found).

`select_kernels` picks each op's candidate out= variant from the graph alone: oneDNN for
convolutions (`convolution`) and large linear layers (`linear`) unless `layout="eager"`, else
ATen's out= overload (`outvariants`). `check_kernels` runs the graph once on the example inputs,
each candidate's kernel beside its functional op and each fusable chain's call beside the
functional ops of the chain (`fusion`), under one profiler session, and returns a
`KernelReport`: the variants kept, the chains fused, why the others were refused, the scratch
each call allocated, and the strides each produced tensor has in a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import getitem

import torch
from torch import fx
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_dense

from memtile.capture import MemGraph
from memtile.runtime import convolution, fusion, linear, outvariants
from memtile.runtime.layout import Restride, channels_last_strides
from memtile.runtime.outvariants import OutVariant


@dataclass(frozen=True)
class Fused:
    """Ops computed by their convolution's call (`fusion`), with the variant that does it."""

    chain: fusion.Chain
    variant: OutVariant


@dataclass
class KernelReport:
    """What the check pass found; node and tensor names as in the captured graph."""

    planned: dict[str, OutVariant] = field(default_factory=dict)  # node -> variant it runs
    fused: dict[str, Fused] = field(default_factory=dict)  # convolution -> the ops run with it
    unfused: dict[str, str] = field(default_factory=dict)  # convolution -> why its chain runs apart
    unplanned: dict[str, str] = field(default_factory=dict)  # candidate node -> why it was refused
    kernel_bytes: dict[str, int] = field(default_factory=dict)  # node -> scratch its call allocated
    strides: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor -> strides in a call
    restride: set[str] = field(default_factory=set)  # tensors whose functional op gives others


def names_of(value) -> tuple:
    """The tensor names of an op's outputs, in order (capture keeps a tuple for several)."""
    return value if isinstance(value, tuple) else (value,)


def select_kernels(graph: MemGraph, constants: dict[str, torch.Tensor], layout: str,
                   device: torch.device, pack_weights: bool,
                   ) -> tuple[dict[str, OutVariant], dict[str, str]]:
    """(node -> candidate out= variant, node -> why it has none) for the ops that make new
    storage; views and ops that return nothing are neither. Linear layers go through oneDNN
    where it is faster than `addmm` (`linear`); with `layout="eager"` neither they nor
    convolutions do (it keeps bit-exact outputs)."""
    variants, unplanned = {}, {}
    for op in graph.ops:
        if op.is_view or not op.outputs:
            continue
        if any(graph.tensors[t].is_view for t in op.outputs):
            unplanned[op.node.name] = "returns a view of an input"
            continue
        found = _variant(op.node, constants, layout, device, pack_weights)
        if isinstance(found, str):
            unplanned[op.node.name] = found
        else:
            variants[op.node.name] = found
    return variants, unplanned


def _variant(node: fx.Node, constants: dict[str, torch.Tensor], layout: str,
             device: torch.device, pack_weights: bool) -> OutVariant | str:
    """One op's candidate variant, or why it has none."""
    if convolution.is_convolution(node) and layout != "eager":
        weight = constants.get(node.args[1].name)
        return (convolution.unsupported(node, device)
                or convolution.variant(node, weight, pack_weights))
    parameters = linear.weight_and_bias(node, constants)
    if parameters is not None and layout != "eager":
        variant = linear.variant(node, *parameters)
        if variant is not None:
            return variant
    variant = (outvariants.find_out_variant(node.target)
               if isinstance(node.target, torch._ops.OpOverload) else None)
    return variant or f"{node.target} has no out= overload"


def check_kernels(graph: MemGraph, order: list[int], variants: dict[str, OutVariant],
                  chains: dict[str, fusion.Chain], constants: dict[str, torch.Tensor],
                  channels_last: set[str], inputs: tuple) -> KernelReport:
    """Run the graph once on `inputs` with every candidate and chain checked beside it; keep
    those that allocate less than their output and match the functional ops."""
    check = _CheckPass(graph, order, variants, chains, constants, channels_last)
    with torch.no_grad():
        kernels = outvariants.profile_candidates(lambda: check.run(inputs))
    check.keep_kernels(kernels)
    check.keep_chains(kernels)
    return check.report


class _CheckPass:
    """The example run: the graph's values (freed as eager frees them), each candidate's
    relative error and output bytes by profiler key, and the chains being followed."""

    def __init__(self, graph: MemGraph, order: list[int], variants: dict[str, OutVariant],
                 chains: dict[str, fusion.Chain], constants: dict[str, torch.Tensor],
                 channels_last: set[str]):
        self.graph, self.variants, self.chains = graph, variants, chains
        self.constants, self.channels_last = constants, channels_last
        self.ops = [graph.ops[i] for i in order]
        self.keys = {name: k for k, name in enumerate(variants)}
        self.fused_variants = {
            conv: (fusion.fused(chain, variants[conv], constants), len(self.keys) + k)
            for k, (conv, chain) in enumerate(chains.items())}
        self.absorbed_by = {node: chain for chain in chains.values() for node in chain.absorbed}
        self.running: dict[str, tuple] = {}  # convolution -> (args, kwargs, chain's value so far)
        self.errors: dict[int, float] = {}
        self.output_bytes: dict[int, int] = {}
        self.report = KernelReport()

    def run(self, inputs: tuple) -> None:
        last_read = {n: position for position, op in enumerate(self.ops)
                     for n in op.node.all_input_nodes}
        values = self._example_values(inputs)
        for position, op in enumerate(self.ops):
            node = op.node
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            result = self._reference(op, args, kwargs)
            for user in node.users:
                if user.target is getitem:
                    values[user] = result[user.args[1]]
                else:
                    values[node] = result
            for n in node.all_input_nodes:
                if last_read[n] == position:
                    del values[n]  # free as eager would: the pass holds no more than it
            if node.name in self.variants:
                self._check(node, args, kwargs, result)

    def _example_values(self, inputs: tuple) -> dict:
        user = iter(inputs)
        return {
            node: self.constants[node.name] if node.name in self.constants else next(user)
            for node in self.graph.program.graph.nodes if node.op == "placeholder"
        }

    def _reference(self, op, args: tuple, kwargs: dict):
        """The functional op's result, in the strides a planned call gives it."""
        node = op.node
        variant = self.variants.get(node.name)
        reference = args
        if variant is not None and convolution.is_into(variant) \
                and self.graph.value_of[node] in self.channels_last:
            # oneDNN reorders an NCHW input itself; compare with eager on the same layout
            reference = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
            if reference[0] is not args[0]:  # if it runs unplanned, it returns NCHW
                self.report.restride.add(self.graph.value_of[node])
        result = node.target(*reference, **kwargs)
        if op.outputs and not op.is_view:  # not views, nor checks that return nothing
            result = self._to_call_layout(node, result)
        return result

    def _to_call_layout(self, node: fx.Node, result):
        """The op's result in the strides a planned call gives it: channels_last for the tensors
        `layout` chose, eager's (the captured ones) for the others (the kernel's own when nothing
        is channels_last). A tensor whose functional op returns other strides is noted in
        `restride`: if that op runs unplanned, its result is converted."""
        several = isinstance(result, (tuple, list))
        eager = node.meta["val"] if several else (node.meta["val"],)
        converted = []
        for name, value, fake in zip(names_of(self.graph.value_of[node]), result if several
                                     else (result,), eager, strict=True):
            if name is None or not isinstance(value, torch.Tensor) or not is_dense(value):
                converted.append(value)
                continue
            stride = (channels_last_strides(value.shape) if name in self.channels_last
                      else fake.stride() if self.channels_last else value.stride())
            if value.stride() != stride:
                self.report.restride.add(name)
                value = Restride(stride)(value)
            self.report.strides[name] = stride
            converted.append(value)
        return type(result)(converted) if several else converted[0]

    def _check(self, node: fx.Node, args: tuple, kwargs: dict, result) -> None:
        """Run the node's candidate into fresh tensors of the result's strides; follow the
        chain it starts or belongs to."""
        refs = result if isinstance(result, (tuple, list)) else (result,)
        if not all(is_dense(r) for r in refs):
            self.report.unplanned[node.name] = "its output is not dense"
            return
        outs = tuple(torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=r.device)
                     for r in refs)
        key = self.keys[node.name]
        outvariants.run_candidate(key, self.variants[node.name], args, kwargs, outs)
        self.errors[key] = max(outvariants.relative_error(r, o)
                               for r, o in zip(refs, outs, strict=True))
        self.output_bytes[key] = sum(r.numel() * r.element_size() for r in refs)
        if node.name in self.chains:
            self.running[node.name] = (args, kwargs, outs[0])
        chain = self.absorbed_by.get(node)
        if chain is not None and chain.convolution.name in self.running:
            self._follow(chain, node, args, kwargs)

    def _follow(self, chain: fusion.Chain, node: fx.Node, args: tuple, kwargs: dict) -> None:
        """Apply `node` to the chain's value computed so far; at the chain's last op, run the
        fused call and compare."""
        conv_args, conv_kwargs, expected = self.running.pop(chain.convolution.name)
        carried = chain.carried_into(node)
        if node is chain.add:  # the fused call takes the identity last
            conv_args = (*conv_args, args[node.args.index(chain.identity)])
        expected = node.target(*(expected if a is carried else v
                                 for a, v in zip(node.args, args, strict=True)), **kwargs)
        if node is chain.batch_norm:
            expected = expected[0]
        if node is not chain.absorbed[-1]:
            self.running[chain.convolution.name] = (conv_args, conv_kwargs, expected)
            return
        variant, key = self.fused_variants[chain.convolution.name]
        got = torch.empty_strided(expected.shape,
                                  self.report.strides[self.graph.value_of[chain.result]],
                                  dtype=expected.dtype, device=expected.device)
        outvariants.run_candidate(key, variant, conv_args, conv_kwargs, (got,))
        self.errors[key] = outvariants.relative_error(expected, got)
        self.output_bytes[key] = got.numel() * got.element_size()

    def keep_kernels(self, kernels: dict[int, int]) -> None:
        """Plan each checked candidate unless it allocates its output or differs."""
        report = self.report
        for name, variant in self.variants.items():
            key = self.keys[name]
            if key not in self.errors:
                continue
            report.kernel_bytes[name] = kernels[key]
            reason = outvariants.rejection(variant, kernels[key], self.output_bytes[key],
                                           self.errors[key])
            if reason:
                report.unplanned[name] = reason
            else:
                report.planned[name] = variant

    def keep_chains(self, kernels: dict[int, int]) -> None:
        """Fuse each checked chain whose ops are all planned, unless its call is refused."""
        report = self.report
        for conv, (variant, key) in self.fused_variants.items():
            chain = self.chains[conv]
            if key not in self.errors or not all(
                    n.name in report.planned for n in (chain.convolution, *chain.absorbed)):
                continue
            reason = outvariants.rejection(variant, kernels[key], self.output_bytes[key],
                                           self.errors[key])
            if reason:
                report.unfused[conv] = reason
            else:  # the chain's call replaces the convolution's (and its packed weight)
                report.fused[conv] = Fused(chain, variant)
                report.planned[conv] = variant
                report.kernel_bytes[conv] = kernels[key]
                report.kernel_bytes.update({n.name: 0 for n in chain.absorbed})  # no call
