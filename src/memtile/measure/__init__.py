"""Allocator-level measurement: what a call really held, when, and who allocated it.

`measure(fn, *args)` runs `fn` once and returns a `Measurement`: the peak above the bytes held
before the call, the live-bytes timeline, every allocation with its lifetime in event steps
(so `memtile.planning.Problem.from_measurement` can plan it), and the op and module running at
the peak. With `model=` allocations are attributed to module paths; with `optimizer=` a training
step's peak is split into gradients, optimizer state and activations.
"""

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from memtile import callable_module
from memtile.measure.record import AllocatorEvent, record


@dataclass(frozen=True)
class Allocation:
    """One allocation, live on event steps `[start, end)`; `end` is the event count if never freed."""

    id: int
    size: int
    start: int
    end: int
    op: str
    module: str
    ptr: int


@dataclass
class Measurement:
    """The allocator's view of one call: the bytes it allocated (and had not yet freed) over
    time; frees of blocks from before the call are not counted (see `_own`)."""

    peak_bytes: int
    peak_step: int
    seconds: float
    device: str
    allocations: list[Allocation]
    timeline_ns: list[int]
    timeline_bytes: list[int]
    result: object = None
    breakdown: dict[str, int] = field(default_factory=dict)
    parameter_bytes: int = 0

    @property
    def steps(self) -> int:
        return len(self.timeline_bytes)

    def live_at(self, step: int) -> list[Allocation]:
        """Allocations live at one event step, largest first."""
        return sorted((a for a in self.allocations if a.start <= step < a.end), key=lambda a: -a.size)

    def live_at_peak(self) -> list[Allocation]:
        return self.live_at(self.peak_step)

    @property
    def peak_op(self) -> str:
        """The op that made the allocation which reached the peak."""
        return self._at_peak().op

    @property
    def peak_module(self) -> str:
        return self._at_peak().module

    def _at_peak(self) -> Allocation:
        made_at_peak = [a for a in self.allocations if a.start == self.peak_step]
        return made_at_peak[0] if made_at_peak else Allocation(-1, 0, 0, 0, "", "", 0)

    def top(self, n: int = 10) -> list[dict]:
        """Bytes live at the peak, grouped by the (op, module) that allocated them, largest first."""
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for allocation in self.live_at_peak():
            totals[(allocation.op, allocation.module)] += allocation.size
        ranked = sorted(totals.items(), key=lambda item: -item[1])[:n]
        return [{"op": op, "module": module, "bytes": size} for (op, module), size in ranked]


def measure(
    fn: Callable,
    *args,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs,
) -> Measurement:
    """Run `fn(*args, **kwargs)` once and measure every allocation the allocator sees.

    `model` attributes allocations to its module paths (and reports its parameter bytes);
    `optimizer` (with `model`) splits a training step's peak into gradients, optimizer state
    and activations (everything else the step allocated).
    """
    start = time.perf_counter()
    result, events = record(fn, args, kwargs, model)
    seconds = time.perf_counter() - start
    device = "cuda" if any(e.device == "cuda" for e in events) else "cpu"
    events = _own([e for e in events if e.device == device])
    allocations, timeline = _lifetimes(events)
    peak = max(timeline, default=0)
    peak_step = timeline.index(peak) if timeline else 0
    measurement = Measurement(
        peak_bytes=max(peak, 0),
        peak_step=peak_step,
        seconds=seconds,
        device=device,
        allocations=allocations,
        timeline_ns=[e.time_ns - events[0].time_ns for e in events] if events else [],
        timeline_bytes=timeline,
        result=result,
    )
    if model is not None:
        measurement.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model is not None and optimizer is not None:
        measurement.breakdown = _training_breakdown(measurement, model, optimizer)
    return measurement


callable_module(__name__, measure)  # `memtile.measure(...)` works after `import memtile.measure`


def _own(events: list[AllocatorEvent]) -> list[AllocatorEvent]:
    """The allocations made during the call and their frees, without frees of older blocks.

    The profiler reports the free of an older block only if it saw that block allocated in an
    earlier session (and then with the size it had then, even if the address was freed and
    reused since): such frees depend on what ran before, so they are left out, and the peak is
    that of the bytes the call itself allocated.
    """
    live: set[int] = set()
    own = []
    for event in events:
        if event.delta > 0:
            live.add(event.ptr)
        elif event.ptr in live:
            live.discard(event.ptr)
        else:
            continue
        own.append(event)
    return own


def _lifetimes(events: list[AllocatorEvent]) -> tuple[list[Allocation], list[int]]:
    """Pair allocations with their frees; the running sum of deltas is the live-bytes timeline."""
    open_by_ptr: dict[int, tuple[int, AllocatorEvent]] = {}
    allocations: list[Allocation] = []
    timeline: list[int] = []
    live = 0
    for step, event in enumerate(events):
        live += event.delta
        timeline.append(live)
        if event.delta > 0:
            open_by_ptr[event.ptr] = (step, event)
        elif event.ptr in open_by_ptr:
            born, made = open_by_ptr.pop(event.ptr)
            allocations.append(Allocation(born, made.delta, born, step, made.op, made.module, made.ptr))
    for born, made in open_by_ptr.values():
        allocations.append(
            Allocation(born, made.delta, born, len(events), made.op, made.module, made.ptr)
        )
    allocations.sort(key=lambda a: a.start)
    return allocations, timeline


def _training_breakdown(m: Measurement, model: nn.Module, optimizer) -> dict[str, int]:
    """Split the bytes live at the peak by what survives the step: gradients, optimizer state."""
    grads = {p.grad.data_ptr() for p in model.parameters() if p.grad is not None}
    states = {
        t.data_ptr()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.numel() > 0
    }
    split = {"parameters": m.parameter_bytes, "gradients": 0, "optimizer_state": 0}
    for allocation in m.live_at_peak():
        survives = allocation.end == m.steps
        if survives and allocation.ptr in grads:
            split["gradients"] += allocation.size
        elif survives and allocation.ptr in states:
            split["optimizer_state"] += allocation.size
    split["activations"] = m.peak_bytes - split["gradients"] - split["optimizer_state"]
    return split
