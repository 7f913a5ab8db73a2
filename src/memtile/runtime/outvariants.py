"""Which ATen ops can write into a given buffer: the functional op -> `out=` overload table.

An op is *planned* when it has an `out=` overload that computes straight into the tensor it is
given. The overload is found from the schema (same arguments, plus kwarg-only mutable `out`
tensors), or from `SUBSTITUTES` where another op computes the same values with the same kernel
(`relu` is `clamp_min(x, 0)` on CPU). Many `out=` overloads are generated wrappers that run the
functional op and copy the result (convolution, batch norm): those would allocate a temporary at
every call, so the executor runs every candidate once under the profiler and rejects any that
allocates as much as its output, or whose result is not bit-identical to the functional op's
(within a stated tolerance for oneDNN convolutions, which may pick another algorithm). Convolutions have no direct out= kernel in ATen; they are
computed into the arena through oneDNN instead (`convolution`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from memtile.measure.record import quiet_stderr
from memtile.runtime.packing import Packing

aten = torch.ops.aten
CHECK_MARK = "memtile.outcheck::"


@dataclass(frozen=True)
class OutVariant:
    """How to run one functional op into given tensors: `overload(*args, **kwargs, **outs)`."""

    overload: Callable  # an ATen out= overload, or a `convolution.ConvolutionInto`
    out_names: tuple[str, ...]  # the overload's out= keyword names, one per output
    rewrite: Callable[[tuple, dict], tuple[tuple, dict]] | None = None  # functional args -> its args
    packed_bytes: int = 0  # constants it keeps in another format (packed convolution weights)
    tolerance: float = 0.0  # largest difference from the functional op, relative to its magnitude
    scratch_bytes: int = 0  # a fixed workspace it may allocate per call however small its output
    packing: Packing | None = None  # the copies of constants it reads, kept up to date

    def arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.rewrite(args, kwargs) if self.rewrite else (args, dict(kwargs))


# functional op -> (out overload, rewrite of the functional op's arguments); each is checked
# bit-exact against the functional op on the example inputs before it is used.
SUBSTITUTES: dict[str, tuple[torch._ops.OpOverload, Callable]] = {
    "aten.relu.default": (aten.clamp_min.out, lambda args, kwargs: ((args[0], 0), {})),
    # the eval-mode batch norm of core ATen; native_batch_norm has a direct CPU out= kernel.
    # That kernel ignores `out`'s strides when they differ from its input's memory format (a
    # channels_last input and an NCHW `out` get NHWC-ordered data: a PyTorch bug, seen on timm's
    # rexnet_100), which the bit-exact check refuses; such a norm then runs unplanned.
    "aten._native_batch_norm_legit_no_training.default": (
        aten.native_batch_norm.out, lambda args, kwargs: ((*args[:5], False, *args[5:]), {})),
}


def out_names(overload: torch._ops.OpOverload) -> tuple[str, ...]:
    """The kwarg-only arguments an overload writes into (its `out=` tensors), in order."""
    return tuple(
        a.name for a in overload._schema.arguments
        if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
    )


def find_out_variant(overload: torch._ops.OpOverload) -> OutVariant | None:
    """The out= overload of a functional op, or None when ATen has none."""
    name = str(overload)
    if name in SUBSTITUTES:
        target, rewrite = SUBSTITUTES[name]
        return OutVariant(target, out_names(target), rewrite)
    schema = overload._schema
    if any(a.alias_info is not None for a in schema.arguments):
        return None  # in-place or view op: nothing to plan
    signature = [(a.name, str(a.type)) for a in schema.arguments]
    packet = overload.overloadpacket
    for overload_name in packet.overloads():
        candidate = getattr(packet, overload_name)
        outs = out_names(candidate)
        if len(outs) != len(schema.returns):
            continue
        inputs = [(a.name, str(a.type)) for a in candidate._schema.arguments if a.name not in outs]
        if inputs == signature:
            return OutVariant(candidate, outs)
    return None


def run_candidate(key: int, variant: OutVariant, args: tuple, kwargs: dict, outs: tuple) -> None:
    """Run one candidate into `outs` under its own profiler range (see `profile_candidates`)."""
    args, kwargs = variant.arguments(args, kwargs)
    kwargs.update(zip(variant.out_names, outs, strict=True))
    with torch.profiler.record_function(f"{CHECK_MARK}{key}"):
        variant.overload(*args, **kwargs)


def profile_candidates(fn: Callable[[], None]) -> dict[int, int]:
    """Run `fn` (which calls `run_candidate`) under one profiler session; key -> bytes that
    candidate's out= call allocated. One session for all: one per op would cost seconds."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with quiet_stderr():
            prof.stop()
    allocated: dict[int, int] = {}
    pending = [(root, None) for root in prof.profiler.kineto_results.experimental_event_tree()]
    while pending:
        event, key = pending.pop()
        if event.name.startswith(CHECK_MARK):
            key = int(event.name.removeprefix(CHECK_MARK))
            allocated.setdefault(key, 0)
        elif key is not None and event.tag == _EventType.Allocation:
            allocated[key] += max(event.extra_fields.alloc_size, 0)
        pending.extend((child, key) for child in event.children)
    return allocated


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    """max |expected - got| / max |expected| over the finite values of `expected`: 0 when
    equal, inf when NaN or ±Inf differ in position (a kernel that writes NaN where the
    functional op does not must fail a check, not pass it as a NaN error would)."""
    if torch.equal(expected, got):
        return 0.0
    if not expected.is_floating_point():
        return float("inf")
    finite, nan = expected.isfinite(), expected.isnan()
    infinite = ~finite & ~nan
    if not (torch.equal(finite, got.isfinite()) and torch.equal(nan, got.isnan())
            and torch.equal(expected[infinite], got[infinite])):
        return float("inf")
    expected, got = expected[finite], got[finite]
    if expected.numel() == 0 or torch.equal(expected, got):
        return 0.0
    scale = float(expected.abs().max())
    return float((expected - got).abs().max()) / scale if scale > 0 else float("inf")


def rejection(variant: OutVariant, allocated: int, output_bytes: int,
              error: float) -> str | None:
    """Why a candidate cannot be planned, or None when it computes straight into its outs.

    A generated out= wrapper allocates the whole result and copies it: at least the output's
    bytes. Smaller scratch (batch norm's per-channel scale and shift, a reduction's scalar) is
    allowed and kept in `ArenaProgram.kernel_bytes`, and so is a variant's fixed workspace
    (oneDNN's, 8 KB here) even where the output is smaller than it. `error` is
    `relative_error` against the functional op: 0 (bit-exact) unless the variant states a
    tolerance.
    """
    name = str(variant.overload)
    if allocated >= output_bytes and allocated > variant.scratch_bytes:
        return (f"{name} allocates as much as its output at every call (it computes into a "
                "temporary and copies it into out=)")
    if error > variant.tolerance:
        return (f"{name} differs from the functional op by {error:.3g} of its magnitude "
                f"(allowed: {variant.tolerance:g})")
    return None
