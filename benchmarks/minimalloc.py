"""MiniMalloc's 11 "challenging" instances: best heuristic, CP-SAT and our search, per instance.

    .venv/bin/python benchmarks/minimalloc.py [--cpsat-limit 60] [--search-limit 120] [A B ...]

Prints the markdown table for BENCHMARKS.md with the command, date and machine. Percentages
are over the capacity (1 MiB), which is also LOAD in most instances.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from memtile.planning import Problem, best_heuristic, lower_bound, verify
from memtile.planning.exact import solve_exact
from memtile.planning.problem import Plan, arena_of
from memtile.planning.search import find_within

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "minimalloc-challenging"
CAPACITY = 1048576


def _machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _over(arena: int) -> str:
    return f"{100 * (arena - CAPACITY) / CAPACITY:+.1f}%"


def run_instance(name: str, cpsat_limit: float, search_limit: float) -> dict:
    problem = Problem.from_csv(DATA / f"{name}.{CAPACITY}.csv", capacity=CAPACITY)
    heuristic = best_heuristic(problem)
    began = time.perf_counter()
    offsets, proven = solve_exact(problem, heuristic.offsets, cpsat_limit)
    cpsat_seconds = time.perf_counter() - began
    cpsat = Plan(offsets, arena_of(problem, offsets), "optimal", proven, cpsat_seconds)
    verify(problem, cpsat, capacity=False)
    began = time.perf_counter()
    found = find_within(problem, CAPACITY, search_limit)
    search_seconds = time.perf_counter() - began
    search_arena = None
    if found is not None:
        plan = Plan(found, arena_of(problem, found), "search", False, search_seconds)
        verify(problem, plan)  # within the capacity, or this raises
        search_arena = plan.arena_bytes
    return {
        "name": name, "buffers": len(problem.buffers), "load": lower_bound(problem),
        "heuristic": heuristic, "cpsat": cpsat, "search_arena": search_arena,
        "search_seconds": search_seconds,
    }


def table(rows: list[dict], cpsat_limit: float, search_limit: float) -> str:
    lines = [
        (f"| instance | buffers | LOAD | best heuristic (vs capacity) | CP-SAT {cpsat_limit:g} s "
         f"(vs capacity, proven?) | our search: arena | search time | within capacity |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, c = r["heuristic"], r["cpsat"]
        found = r["search_arena"] is not None
        lines.append(
            f"| {r['name']} | {r['buffers']} | {r['load']} ({_over(r['load'])}) | "
            f"{h.arena_bytes} ({_over(h.arena_bytes)}, {h.strategy}) | "
            f"{c.arena_bytes} ({_over(c.arena_bytes)}, {'proven' if c.optimal else 'not proven'}) | "
            f"{r['search_arena'] if found else '-'} | "
            f"{r['search_seconds']:.1f} s{'' if found else f' (limit {search_limit:g} s)'} | "
            f"{'yes' if found else 'no'} |"
        )
    solved = [r for r in rows if r["search_arena"] is not None]
    lines.append("")
    lines.append(
        f"Our search fits {len(solved)} of {len(rows)} within the capacity; "
        f"total search time {sum(r['search_seconds'] for r in rows):.1f} s."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list("ABCDEFGHIJK"))
    parser.add_argument("--cpsat-limit", type=float, default=60.0)
    parser.add_argument("--search-limit", type=float, default=120.0)
    args = parser.parse_args()
    rows = []
    for name in args.names:
        rows.append(run_instance(name, args.cpsat_limit, args.search_limit))
        r = rows[-1]
        print(f"{name}: heuristic {r['heuristic'].arena_bytes}, CP-SAT {r['cpsat'].arena_bytes}, "
              f"search {r['search_arena']} in {r['search_seconds']:.1f} s", file=sys.stderr,
              flush=True)
    command = "python benchmarks/minimalloc.py " + " ".join(sys.argv[1:])
    print(f"Command: `{command.strip()}`  ")
    print(f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ")
    print(f"Machine: {_machine()}\n")
    print(table(rows, args.cpsat_limit, args.search_limit))


if __name__ == "__main__":
    main()
