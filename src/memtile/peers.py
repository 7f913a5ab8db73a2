"""memtile's planned executor beside what a serving engineer would pick instead, in one process.

Four runners of one model on the same inputs: eager PyTorch, memtile's `PlannedModule`, ONNX
Runtime (CPU execution provider, the model exported to ONNX in memory) and `torch.compile`
(inductor). Calls are interleaved round by round (`memtile.timing`), with the same number of
intra-op threads for all (`torch.set_num_threads`, ORT's `intra_op_num_threads`), and every
output is compared with eager's by relative difference (`memtile.numerics`). At one thread each
runner's median CPU time per call is reported too (`cpu_ms`, see `memtile.timing.Timings`): on a
loaded machine it is the steadier measure of the work, where wall times add the waits for a core.

Peaks are each runner's own measurement, labelled by `peak_source`:
- "allocator" (eager, torch.compile): the bytes one warm call allocated (`memtile.measure`,
  allocator events);
- "arena+allocator" (planned): its arena plus what a warm call allocated besides (unplanned
  ops, oneDNN scratch);
- "ort-arena-profile" (ONNX Runtime): its CPU arena's statistics from session profiling
  (`mem_in_use_peak` and friends, recorded per node by ORT 1.32; None where an older ORT records
  none): the peak bytes in use during PROFILED_CALLS calls above what the
  session held before the first (initializers, prepacked weights), in a session of its own so
  that profiling does not slow the timed one. `arena_held_bytes` is what the arena grew by (kept
  from the system after the calls, as memtile's arena is).
A runner that cannot be built (onnxruntime not installed, an export or compile error) is
reported in `skipped` with the reason and left out of the timing.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from memtile.errors import MemtileError, first_line
from memtile.numerics import relative_difference
from memtile.timing import interleaved, p95

RUNNERS = ("eager", "planned", "onnxruntime", "compile")
ANCHOR = "onnxruntime"  # ratios are each runner's median over this one's
INSTALL = "pip install 'memtile[bench]'"
PROFILED_CALLS = 3
PEAK_SOURCES = {  # what `peak_bytes` is, per runner (see the module docstring)
    "eager": "allocator",
    "planned": "arena+allocator",
    "compile": "allocator",
    "onnxruntime": "ort-arena-profile",
}


class MissingPeerError(MemtileError):
    """onnxruntime (the `bench` extra) is not installed."""


def import_onnxruntime():
    """The onnxruntime module, or a MissingPeerError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingPeerError(f"onnxruntime is not installed ({error}); install it with: "
                               f"{INSTALL}") from error
    return onnxruntime


@dataclass
class Runner:
    """One way of running the model: a callable on torch tensors and what its build cost."""

    name: str
    call: Callable
    build_seconds: float
    details: dict = field(default_factory=dict)


class Peers:
    """The runners of one model, built once; `compare(threads, iters)` times and measures them.
    `planned_options` are `PlannedModule`'s keyword arguments (layout, pack_weights, fuse, ...).

    ONNX Runtime sessions are made per thread count (their pool is fixed at creation); the
    exported model and the compiled and planned modules are shared by all counts."""

    def __init__(self, model: torch.nn.Module, inputs: tuple, runners: tuple[str, ...] = RUNNERS,
                 **planned_options):
        unknown = set(runners) - set(RUNNERS)
        if unknown or "eager" not in runners:
            raise MemtileError(f"runners must include eager and be among {RUNNERS}, got {runners}")
        self.model, self.inputs, self.planned_options = model, tuple(inputs), planned_options
        self.skipped: dict[str, str] = {}
        self.onnx: bytes | None = None
        self.details: dict[str, dict] = {}
        self.runners: dict[str, Runner] = {"eager": Runner("eager", model, 0.0)}
        builders = {"planned": self._planned, "onnxruntime": self._export, "compile": self._compile}
        for name in (r for r in runners if r != "eager"):
            began = time.perf_counter()
            try:
                built = builders[name]()
            except MissingPeerError as error:
                self.skipped[name] = str(error)
                continue
            except Exception as error:  # noqa: BLE001 - a peer that fails to build is a row note
                self.skipped[name] = first_line(error)
                continue
            seconds = time.perf_counter() - began
            if built is None:  # exported: its sessions are made per thread count
                self.details[name]["export_seconds"] = seconds
            else:
                self.runners[name] = Runner(name, built, seconds)

    def _planned(self):
        from memtile.runtime import PlannedModule

        return PlannedModule(self.model, self.inputs, **self.planned_options)

    def _export(self) -> None:
        """The ONNX model in memory (sessions are made per thread count in `compare`)."""
        version = import_onnxruntime().__version__
        self.onnx, exporter = export_onnx(self.model, self.inputs)
        self.details["onnxruntime"] = {"exporter": exporter, "version": version}

    def _compile(self):
        compiled = torch.compile(self.model, backend="inductor", dynamic=False)  # this shape
        with torch.no_grad():
            compiled(*self.inputs)  # compiles now, not in the first timed round
        return compiled

    def compare(self, threads: int = 1, iters: int = 5) -> dict:
        """Median/p95 ms per call of every runner (interleaved), its peak and its output's
        relative difference from eager's, at `threads` intra-op threads for all."""
        if threads < 1 or iters < 1:
            raise MemtileError("threads and iters must be at least 1")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runners = dict(self.runners)
            if self.onnx is not None:
                began = time.perf_counter()
                session = OrtModule(self.onnx, threads, self.model, self.inputs)
                seconds = time.perf_counter() - began + self.details[ANCHOR]["export_seconds"]
                runners[ANCHOR] = Runner(ANCHOR, session, seconds, self.details[ANCHOR])
            with torch.no_grad():
                expected = self.model(*self.inputs)
                results = {name: self._measure(runner, expected, threads)
                           for name, runner in runners.items()}
            times = interleaved([r.call for r in runners.values()], self.inputs, 1, iters)
        finally:
            torch.set_num_threads(previous)
        for result, wall, cpu in zip(results.values(), times.wall, times.cpu, strict=True):
            result.update(median_ms=statistics.median(wall), p95_ms=p95(wall),
                          cpu_ms=statistics.median(cpu) if threads == 1 else None)
        anchor = results.get(ANCHOR)
        for result in results.values():
            result[f"vs_{ANCHOR}"] = result["median_ms"] / anchor["median_ms"] if anchor else None
            result[f"cpu_vs_{ANCHOR}"] = (result["cpu_ms"] / anchor["cpu_ms"]
                                          if anchor and threads == 1 else None)
        return {"threads": threads, "iters": iters, "anchor": ANCHOR, "runners": results,
                "skipped": dict(self.skipped)}

    def _measure(self, runner: Runner, expected, threads: int) -> dict:
        from memtile.measure import measure

        got = runner.call(*self.inputs)  # warm: the planned module's arena for this thread
        if runner.name == ANCHOR:
            peak = ort_peak(self.onnx, threads, self.inputs)
        else:
            held = runner.call.arena_bytes if runner.name == "planned" else 0
            peak = {"peak_bytes": held + measure(runner.call, *self.inputs).peak_bytes}
        return {"build_seconds": runner.build_seconds, **peak, "peak_source": PEAK_SOURCES[runner.name],
                "max_rel_diff": relative_difference(got, expected), **runner.details}


class OrtModule:
    """An ONNX Runtime CPU session called like the model: torch tensors in, eager's output
    structure out (the exporter flattens outputs in pytree order)."""

    def __init__(self, onnx: bytes, threads: int, model: torch.nn.Module, inputs: tuple):
        self.session = ort_session(onnx, threads)
        self.names = [i.name for i in self.session.get_inputs()]
        with torch.no_grad():
            self.spec = pytree.tree_flatten(model(*inputs))[1]

    def __call__(self, *inputs: torch.Tensor):
        outputs = [torch.from_numpy(o) for o in self.session.run(None, ort_feeds(self.names, inputs))]
        return pytree.tree_unflatten(outputs, self.spec)


def ort_feeds(names: list[str], inputs: tuple) -> dict:
    """ONNX Runtime's feed dict: each named input as a contiguous numpy array."""
    return {name: x.detach().contiguous().numpy() for name, x in zip(names, inputs, strict=True)}


def ort_session(onnx: bytes, threads: int, profile_prefix: str | None = None):
    """A CPU-EP session with `threads` intra-op threads, one inter-op thread, all graph
    optimizations (ORT's defaults otherwise: memory pattern and CPU arena on)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-session warnings on stderr
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def ort_peak(onnx: bytes, threads: int, inputs: tuple) -> dict:
    """ORT's own arena statistics over PROFILED_CALLS calls of a profiled session (see the
    module docstring); None values where this ORT's profile has no memory statistics."""
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(onnx, threads, str(Path(folder) / "ort"))
        feeds = ort_feeds([i.name for i in session.get_inputs()], inputs)
        for _ in range(PROFILED_CALLS):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return arena_statistics(events)


def arena_statistics(events: list[dict]) -> dict:
    """From ORT profile events: the peak arena bytes in use during the runs above the bytes in
    use before the first, and how much the arena grew. A lifetime peak already reached before
    the first node (at session creation) is not the runs' and is not counted."""
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and "mem_in_use_peak" in e.get("args", {})), key=lambda e: e["ts"])
    if not nodes:
        return {"peak_bytes": None, "arena_held_bytes": None}
    stats = [{k: int(v) for k, v in e["args"].items() if k.startswith("mem_")} for e in nodes]
    first = stats[0]
    in_use_before = first["mem_bytes_in_use"] - first["mem_in_use_delta"]
    held_before = first["mem_arena_held"] - first["mem_arena_held_delta"]
    peak, lifetime = max(s["mem_bytes_in_use"] for s in stats), None
    for s in stats:
        reached_here = s["mem_in_use_peak"] == s["mem_bytes_in_use"]
        if reached_here or (lifetime is not None and s["mem_in_use_peak"] > lifetime):
            peak = max(peak, s["mem_in_use_peak"])
        lifetime = s["mem_in_use_peak"]
    return {"peak_bytes": peak - in_use_before,
            "arena_held_bytes": max(s["mem_arena_held"] for s in stats) - held_before}


def export_onnx(model: torch.nn.Module, inputs: tuple) -> tuple[bytes, str]:
    """The model as ONNX bytes and the exporter that made them: torch.onnx's dynamo exporter,
    else the TorchScript one. Their progress lines go to stderr (stdout may be JSON)."""
    failures = []
    for exporter, dynamo in (("dynamo", True), ("torchscript", False)):
        try:
            with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
                if dynamo:
                    return torch.onnx.export(model, inputs, dynamo=True).model_proto \
                        .SerializeToString(), exporter
                buffer = io.BytesIO()
                torch.onnx.export(model, inputs, buffer, dynamo=False)
                return buffer.getvalue(), exporter
        except Exception as error:  # noqa: BLE001 - the next exporter may still work
            failures.append(f"{exporter}: {first_line(error)}")
    raise MemtileError("the model could not be exported to ONNX (" + "; ".join(failures) + ")")
