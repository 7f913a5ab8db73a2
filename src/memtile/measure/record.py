"""Record every allocation and free the allocator reports while a function runs.

On CPU and CUDA alike, `torch.profiler` with `profile_memory=True` receives one event per
allocation and per free from the c10 allocators, kernel temporaries included. Each event
carries the profiler stack it happened under; forward hooks on the model's submodules add
`memtile.module::<path>` ranges so that an allocation names the module that caused it.
"""

import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from memtile import collector

MODULE_MARK = "memtile.module::"
BACKWARD_MARK = "autograd::engine::evaluate_function: "
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's CUDA probe logs an ERROR on CPU hosts


@dataclass(frozen=True)
class AllocatorEvent:
    """One allocation (`delta > 0`) or free (`delta < 0`) of `ptr` at `time_ns`."""

    time_ns: int
    ptr: int
    delta: int
    device: str
    op: str
    module: str


class _Session:
    """One profiler run; `pause` and `resume` let a nested `record` take the profiler, which
    cannot run twice at once, and hand back what it saw."""

    def __init__(self) -> None:
        self.events: list[AllocatorEvent] = []
        self.profiler: profile | None = None

    def resume(self) -> None:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities, profile_memory=True)
        with quiet_stderr():
            self.profiler.start()

    def pause(self) -> None:
        with quiet_stderr():
            self.profiler.stop()
        tree = self.profiler.profiler.kineto_results.experimental_event_tree()
        self.events.extend(_allocations(tree))
        self.profiler = None


_SESSIONS: list[_Session] = []  # the open `record` calls, innermost last


def record(fn: Callable, args: tuple, kwargs: dict, model: nn.Module | None):
    """Run `fn(*args, **kwargs)` once under the profiler; return (result, events in time order).

    The collector runs before and is off during the call: the profiler reports the frees of
    blocks it saw allocated in an earlier session, so garbage left by earlier code (freed
    whenever the collector happens to run) would otherwise lower the peak by chance. A `record`
    inside another pauses the outer one, and the outer one also gets the inner one's events.
    """
    outer = _SESSIONS[-1] if _SESSIONS else None
    if outer is not None:
        outer.pause()
    session = _Session()
    _SESSIONS.append(session)
    gc.collect()
    try:
        with collector.paused(), _module_ranges(model):
            session.resume()
            try:
                result = fn(*args, **kwargs)
            finally:
                session.pause()
    finally:
        _SESSIONS.pop()
        if outer is not None:
            outer.events.extend(session.events)
            outer.resume()
    return result, sorted(session.events, key=lambda e: e.time_ns)


def _allocations(roots) -> Iterator[AllocatorEvent]:
    """Allocation events with the op and module they happened under.

    Backward ops run outside any module range; they carry the sequence number of the forward op
    they differentiate, so they inherit that op's module path, marked "(backward)".
    """
    found, module_of_sequence = [], {}
    pending = [(root, ()) for root in roots]
    while pending:
        event, stack = pending.pop()
        if event.tag == _EventType.Allocation:
            found.append((event, stack))
        elif event.tag == _EventType.TorchOp and event.extra_fields.sequence_number >= 0:
            module = _innermost_module(stack)
            if module and not event.name.startswith(BACKWARD_MARK):
                module_of_sequence.setdefault(event.extra_fields.sequence_number, module)
        pending.extend((child, (*stack, event)) for child in event.children)
    for event, stack in found:
        fields = event.extra_fields
        op, module = _outermost_op(stack), _innermost_module(stack)
        if not module and op.startswith(BACKWARD_MARK):
            sequence = next(e for e in stack if e.name == op).extra_fields.sequence_number
            module = f"{module_of_sequence[sequence]} (backward)" if sequence in module_of_sequence else ""
        yield AllocatorEvent(
            event.start_time_ns, fields.ptr, fields.alloc_size, str(fields.device.type), op, module
        )


def _innermost_module(stack) -> str:
    marks = [e.name for e in stack if e.name.startswith(MODULE_MARK)]
    return marks[-1].removeprefix(MODULE_MARK) if marks else ""


def _outermost_op(stack) -> str:
    """The first op opened under the innermost module range (or at top level)."""
    names = [e.name for e in stack]
    marks = [i for i, name in enumerate(names) if name.startswith(MODULE_MARK)]
    below = names[marks[-1] + 1:] if marks else names
    return below[0] if below else "(python)"


@contextmanager
def _module_ranges(model: nn.Module | None):
    """Open a profiler range around each submodule's forward so allocations know their module."""
    if model is None:
        yield
        return
    handles, open_ranges = [], []

    def enter(path: str):
        def hook(module, inputs):
            open_ranges.append(torch.ops.profiler._record_function_enter_new(MODULE_MARK + path))
        return hook

    def leave(module, inputs, output):
        if open_ranges:
            torch.ops.profiler._record_function_exit._RecordFunction(open_ranges.pop())

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path or "(model)")))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def quiet_stderr():
    """Silence the profiler's start/stop lines, which kineto writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
