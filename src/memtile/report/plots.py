"""Pictures: the measured memory timeline of a run, and the memory map of a plan."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import PatchCollection
from matplotlib.patches import Rectangle

from memtile.planning import live_bytes

MIB = 1024 * 1024


def timeline(measurement, path: str | Path, title: str, labels: int = 4) -> Path:
    """Live bytes over the run (allocator events), the peak marked, the largest allocations named."""
    times = [t / 1e6 for t in measurement.timeline_ns]
    live = [b / MIB for b in measurement.timeline_bytes]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(times, live, where="post", color="tab:blue", linewidth=1)
    ax.fill_between(times, live, step="post", alpha=0.2, color="tab:blue")
    if live:
        step = measurement.peak_step
        ax.axhline(live[step], color="tab:red", linestyle="--", linewidth=0.8)
        ax.annotate(
            f"peak {live[step]:.2f} MiB\n{measurement.peak_op} {measurement.peak_module}",
            (times[step], live[step]), textcoords="offset points", xytext=(8, -28),
            color="tab:red", fontsize=8,
        )
    placed: list[float] = []
    span = (times[-1] - times[0]) if times else 1.0
    for allocation in sorted(measurement.allocations, key=lambda a: -a.size):
        x, y = times[allocation.start], live[allocation.start]
        if len(placed) == labels or any(abs(x - p) < 0.06 * span for p in placed):
            continue  # labels of allocations made close together would print over each other
        placed.append(x)
        ax.annotate(
            f"{allocation.size / MIB:.2f} MiB {allocation.module or allocation.op}",
            (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7, color="0.3",
        )
    ax.set_xlabel("time in the call (ms)")
    ax.set_ylabel("live bytes above start (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def memory_map(problem, plan, path: str | Path, title: str) -> Path:
    """Buffers as rectangles (steps on x, offset on y); the LOAD step and the arena top marked."""
    fig, ax = plt.subplots(figsize=(10, 5))
    rectangles = [
        Rectangle((b.start, plan.offsets[b.id] / MIB), b.end - b.start, b.size / MIB)
        for b in problem.buffers
    ]
    ax.add_collection(
        PatchCollection(rectangles, facecolor="tab:blue", edgecolor="white", linewidth=0.3, alpha=0.8)
    )
    steps = max((b.end for b in problem.buffers), default=1)
    live = live_bytes(problem.buffers)
    peak_step = live.index(max(live))
    ax.axvline(peak_step + 0.5, color="tab:red", linestyle="--", linewidth=0.8)
    ax.axhline(plan.arena_bytes / MIB, color="black", linewidth=0.8)
    ax.annotate(
        f"arena {plan.arena_bytes / MIB:.2f} MiB ({plan.strategy})\nLOAD {max(live) / MIB:.2f} MiB "
        f"at step {peak_step}", (peak_step + 0.5, plan.arena_bytes / MIB),
        textcoords="offset points", xytext=(6, -24), fontsize=8, color="tab:red",
    )
    ax.set_xlim(0, steps)
    ax.set_ylim(0, max(plan.arena_bytes / MIB * 1.08, 1e-6))
    ax.set_xlabel("execution step")
    ax.set_ylabel("offset in the arena (MiB)")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
