"""The planning problem: buffers with sizes and lifetimes, and a plan that gives each an offset.

Pure Python (no torch) so that any allocation problem can be planned: a captured model, a
recorded allocation trace, or a MiniMalloc CSV.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtile.errors import ProblemFormatError

BufferId = str | int


@dataclass(frozen=True)
class Buffer:
    """A block of `size` bytes live on the half-open step interval [start, end)."""

    id: BufferId
    size: int
    start: int
    end: int

    def __post_init__(self) -> None:
        for name in ("size", "start", "end"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProblemFormatError(
                    f"buffer {self.id!r}: {name} must be an integer, got {value!r}"
                )
        if self.start < 0:
            raise ProblemFormatError(
                f"buffer {self.id!r} starts at step {self.start}; steps count from 0"
            )
        if self.size < 0:
            raise ProblemFormatError(
                f"buffer {self.id!r} has negative size {self.size}; sizes are bytes >= 0"
            )
        if self.end <= self.start:
            raise ProblemFormatError(
                f"buffer {self.id!r} lives on [{self.start}, {self.end}), which is empty; "
                "a buffer needs end > start (the interval is half-open)"
            )

    def overlaps(self, other: Buffer) -> bool:
        """True when the two lifetimes share a step."""
        return self.start < other.end and other.start < self.end


@dataclass
class Problem:
    """Buffers to place in one arena; sizes are rounded up to `alignment` for placement."""

    buffers: list[Buffer]
    alignment: int = 64
    capacity: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.alignment, int) or self.alignment < 1:
            raise ProblemFormatError(f"alignment must be a positive integer, got {self.alignment!r}")
        if self.capacity is not None and self.capacity < 0:
            raise ProblemFormatError(f"capacity must be >= 0 bytes, got {self.capacity}")
        seen: set[BufferId] = set()
        for buffer in self.buffers:
            if buffer.id in seen:
                raise ProblemFormatError(f"buffer id {buffer.id!r} appears twice; ids must be unique")
            seen.add(buffer.id)

    def aligned_size(self, buffer: Buffer) -> int:
        """The bytes a buffer takes in the arena: its size rounded up to the alignment."""
        return -(-buffer.size // self.alignment) * self.alignment

    @classmethod
    def from_csv(
        cls, path: str | Path, alignment: int = 1, capacity: int | None = None
    ) -> Problem:
        """Read MiniMalloc's CSV (`id,lower,upper,size[,offset]`); sizes are used as given."""
        from memtile.planning.io import read_csv

        return read_csv(path, alignment=alignment, capacity=capacity)

    def to_csv(self, path: str | Path, plan: Plan | None = None) -> None:
        """Write MiniMalloc's CSV, with the `offset` column when a plan is given."""
        from memtile.planning.io import write_csv

        write_csv(self, path, plan)

    @classmethod
    def from_measurement(cls, measurement: Any, alignment: int = 64) -> Problem:
        """Turn a recorded allocation trace (`measurement.allocations`: objects with `.id`,
        `.size`, `.start`, `.end` in steps, half-open) into a planning problem, as MemoMalloc
        does: every allocation, kernel temporaries included, becomes a buffer."""
        buffers = [
            Buffer(a.id, int(a.size), int(a.start), int(a.end)) for a in measurement.allocations
        ]
        return cls(buffers, alignment=alignment)


@dataclass
class Plan:
    """An offset (bytes) for every buffer, the arena size it needs, and how it was found."""

    offsets: dict[BufferId, int]
    arena_bytes: int
    strategy: str
    optimal: bool = False
    seconds: float = 0.0

    def to_json(self, problem: Problem) -> dict[str, Any]:
        """The plan as plain JSON data: arena, alignment, and every buffer with its offset."""
        return {
            "arena_bytes": self.arena_bytes,
            "alignment": problem.alignment,
            "strategy": self.strategy,
            "optimal": self.optimal,
            "buffers": [
                {"id": b.id, "size": b.size, "start": b.start, "end": b.end,
                 "offset": self.offsets[b.id]}
                for b in problem.buffers
            ],
        }


def arena_of(problem: Problem, offsets: dict[BufferId, int]) -> int:
    """The arena a set of offsets needs: the highest aligned end of any buffer."""
    return max(
        (offsets[b.id] + problem.aligned_size(b) for b in problem.buffers), default=0
    )


def live_bytes(buffers: Iterable[Buffer]) -> list[int]:
    """Unaligned bytes live at each step, from step 0 to the last buffer's end: the memory
    profile that LOAD is the maximum of and that pictures and peak searches read."""
    buffers = list(buffers)
    live = [0] * (max((b.end for b in buffers), default=0) + 1)
    for buffer in buffers:
        for step in range(buffer.start, buffer.end):
            live[step] += buffer.size
    return live


def lower_bound(problem: Problem) -> int:
    """LOAD: the largest total aligned size live at one step; no plan can be smaller."""
    events: list[tuple[int, int]] = []
    for b in problem.buffers:
        size = problem.aligned_size(b)
        events.append((b.start, size))
        events.append((b.end, -size))
    events.sort()  # at equal steps the frees (negative) come first: intervals are half-open
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def size_unit(problem: Problem) -> int:
    """The gcd of the aligned sizes. A plan can always be packed so that each buffer sits at 0
    or on top of another, so offsets may be searched in these units without losing anything."""
    return math.gcd(*(problem.aligned_size(b) for b in problem.buffers)) or problem.alignment


def naive_bytes(problem: Problem) -> int:
    """The arena with no reuse at all: every buffer gets its own bytes."""
    return sum(problem.aligned_size(b) for b in problem.buffers)
