"""Latency measured the way a shared machine allows: runners interleaved call by call.

A round calls every runner once, so a load change on the machine hits all of them alike; the
medians and p95 of the rounds are then comparable within one process, not across processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

WARMUP_ROUNDS = 2


@dataclass(frozen=True)
class Timings:
    """Milliseconds per call, one list per runner: `wall` (elapsed) and `cpu` (the calling
    thread's CPU time, `time.thread_time`). With one intra-op thread every kernel runs in the
    calling thread (OpenMP, oneDNN, MKL, ONNX Runtime with `intra_op_num_threads=1`), so `cpu` is
    the work itself, without the waits for a core that a loaded machine adds to `wall`; with
    more, work on other threads is not in it."""

    wall: list[list[float]]
    cpu: list[list[float]]


def interleaved(fns: Sequence[Callable], inputs: tuple, threads: int, iters: int) -> Timings:
    """Each fn's times per call, from `threads` threads each making `iters` rounds after
    WARMUP_ROUNDS untimed ones; a round calls every fn once. Each thread runs with the caller's
    intra-op thread count: a new thread's OpenMP starts from the machine's default, which oneDNN
    kernels read directly (ATen's own loops would adopt torch's setting lazily)."""
    wall: list[list[list[float]]] = [[[] for _ in fns] for _ in range(threads)]
    cpu: list[list[list[float]]] = [[[] for _ in fns] for _ in range(threads)]
    barrier = threading.Barrier(threads)
    intra_op = torch.get_num_threads()

    def serve(slot: int) -> None:
        torch.set_num_threads(intra_op)  # this thread's OpenMP setting, before any kernel runs
        with torch.no_grad():
            for _ in range(WARMUP_ROUNDS):
                for fn in fns:
                    fn(*inputs)
            barrier.wait()
            for _ in range(iters):
                for k, fn in enumerate(fns):
                    began, began_cpu = time.perf_counter(), time.thread_time()
                    fn(*inputs)
                    cpu[slot][k].append((time.thread_time() - began_cpu) * 1e3)
                    wall[slot][k].append((time.perf_counter() - began) * 1e3)

    workers = [threading.Thread(target=serve, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return Timings(*([[t for slot in times for t in slot[k]] for k in range(len(fns))]
                     for times in (wall, cpu)))


def p95(values: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (the largest value for fewer than 20 samples)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
