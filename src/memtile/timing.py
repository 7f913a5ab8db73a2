"""Latency measured the way a shared machine allows: runners interleaved call by call.

A round calls every runner once, so a load change on the machine hits all of them alike; the
medians and p95 of the rounds are then comparable within one process, not across processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

WARMUP_ROUNDS = 2


def interleaved(fns: Sequence[Callable], inputs: tuple, threads: int, iters: int) -> list[list[float]]:
    """Milliseconds per call of each fn, from `threads` threads each making `iters` rounds after
    WARMUP_ROUNDS untimed ones; a round calls every fn once. Each thread runs with the caller's
    intra-op thread count: a new thread's OpenMP starts from the machine's default, which oneDNN
    kernels read directly (ATen's own loops would adopt torch's setting lazily)."""
    times: list[list[list[float]]] = [[[] for _ in fns] for _ in range(threads)]
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
                    began = time.perf_counter()
                    fn(*inputs)
                    times[slot][k].append((time.perf_counter() - began) * 1e3)

    workers = [threading.Thread(target=serve, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [[t for slot in times for t in slot[k]] for k in range(len(fns))]


def p95(values: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (the largest value for fewer than 20 samples)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
