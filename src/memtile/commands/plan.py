"""`memtile plan MODEL|FILE.csv`: every intermediate tensor at an offset in one arena.

A model is captured, reordered (`memtile.schedule`) and given in-place pairs
(`memtile.inplace`) before planning; a MiniMalloc CSV is planned as it is. Each strategy's
arena is shown against LOAD (no plan can be smaller) and naive (no reuse).
"""

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from memtile.commands.common import (
    add_model_arguments,
    add_output_arguments,
    byte_size,
    console,
    load_model,
    output_dir,
    print_json,
    seconds,
    writing,
)
from memtile.errors import BudgetError, MemtileError
from memtile.planning import (
    STRATEGIES,
    Plan,
    Problem,
    check_capacity,
    fit,
    fits,
    lower_bound,
    naive_bytes,
    solve,
    solve_all,
)
from memtile.planning.io import write_plan_json
from memtile.units import format_bytes

HELP = (
    "plan every intermediate tensor of a model (or a MiniMalloc FILE.csv) at an offset in one "
    "arena; compare strategies with LOAD and naive"
)
CHOICES = (*STRATEGIES, "best", "all", "optimal", "search")
TIME_LIMIT = 10.0
# MiniMalloc's challenging instances take our search up to 13 s on an idle 2-core machine
# (BENCHMARKS.md) and up to 7x that on a loaded one; it stops at the first plan that fits.
SEARCH_TIME_LIMIT = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    model = next(a for a in parser._actions if a.dest == "model")
    model.help = f"{model.help}, or a MiniMalloc FILE.csv (id,lower,upper,size)"
    parser.add_argument(
        "--strategy", default="all", metavar="NAME",
        help=f"one of {', '.join(CHOICES)} (default all: every heuristic, then CP-SAT, then "
             "with --capacity the search if nothing fits yet)",
    )
    parser.add_argument("--time-limit", type=seconds, default=None, metavar="S",
                        help=f"seconds for CP-SAT and for the search (default {TIME_LIMIT:g}; "
                             f"{SEARCH_TIME_LIMIT:g} for the search that --strategy all runs "
                             "under a --capacity nothing else meets)")
    parser.add_argument("--no-schedule", action="store_true",
                        help="keep the exported op order instead of searching for a better one")
    parser.add_argument("--no-inplace", action="store_true",
                        help="no elementwise op writes over its input")
    parser.add_argument("--capacity", type=byte_size, default=None, metavar="BYTES",
                        help="arena limit, e.g. 6MiB; exit 1 if no plan fits")
    add_output_arguments(parser, default_out="memtile-out")


@dataclass
class Prepared:
    """A planning problem and how it was made from its source."""

    name: str
    problem: Problem
    csv: Path | None = None
    facts: dict = field(default_factory=dict)  # model only: exported LOAD, schedule, in-place


def prepare_graph(
    graph, name: str, reorder: bool = True, inplace: bool = True, time_limit: float = 5.0,
    capacity: int | None = None,
) -> Prepared:
    """The problem of a captured graph after the best schedule and in-place pairs."""
    from memtile.planner import prepare

    ready = prepare(graph, reorder, inplace, time_limit, capacity=capacity)
    exported = prepare(graph, reorder=False, inplace=False).problem
    facts = {"exported_load_bytes": lower_bound(exported), "ops": graph.num_steps}
    if ready.schedule is not None:
        facts["schedule"] = {
            "reordered": ready.order != list(range(graph.num_steps)),
            "exact": ready.schedule.exact, "seconds": round(ready.schedule.seconds, 3),
        }
    facts["inplace_pairs"] = ready.inplace_count
    return Prepared(name, ready.problem, facts=facts)


def _prepare(args: argparse.Namespace, capacity: int | None) -> Prepared:
    if args.model.lower().endswith(".csv"):
        path = Path(args.model)
        return Prepared(path.name, Problem.from_csv(path, capacity=capacity), csv=path)
    from memtile.capture import capture

    model, inputs = load_model(args)
    with console.status(f"capturing {args.model}"):
        graph = capture(model, inputs)
    with console.status("scheduling"):
        return prepare_graph(graph, args.model, not args.no_schedule, not args.no_inplace,
                             min(args.time_limit or TIME_LIMIT, 5.0), capacity)


def plans(problem: Problem, strategy: str, time_limit: float | None = None) -> list[Plan]:
    """The plans `--strategy` asks for (each verified by `memtile.planning`). With a capacity
    that no heuristic or CP-SAT plan meets, "all" also runs the search, which is built to fit
    a capacity (it fits MiniMalloc's challenging instances where CP-SAT does not)."""
    if strategy != "all":
        return [solve(problem, strategy, time_limit or TIME_LIMIT)]
    results = solve_all(problem, time_limit or TIME_LIMIT)
    if problem.capacity is not None and not any(fits(problem, p) for p in results):
        found = fit(problem, time_limit or SEARCH_TIME_LIMIT)
        results.extend([found] if found is not None else [])
    return results


def summarize(prepared: Prepared, results: list[Plan]) -> dict:
    """The `--json` object (keys documented in README)."""
    problem = prepared.problem
    best = min(results, key=lambda p: p.arena_bytes)
    return {
        "source": prepared.name,
        "buffers": len(problem.buffers),
        "alignment": problem.alignment,
        "capacity_bytes": problem.capacity,
        "load_bytes": lower_bound(problem),
        "naive_bytes": naive_bytes(problem),
        **prepared.facts,
        "results": [_entry(p) for p in results],
        "best": _entry(best),
        "fits": fits(problem, best),
    }


def _entry(plan: Plan) -> dict:
    return {"strategy": plan.strategy, "arena_bytes": plan.arena_bytes,
            "seconds": round(plan.seconds, 4), "optimal": plan.optimal}


def table(summary: dict) -> Table:
    load, naive = summary["load_bytes"], summary["naive_bytes"]
    title = (f"memtile plan: {summary['source']}, {summary['buffers']} buffers, "
             f"LOAD {format_bytes(load)}, naive {format_bytes(naive)}")
    grid = Table(title=title)
    for column in ("strategy", "arena", "vs LOAD", "vs naive", "seconds", "optimal"):
        grid.add_column(column, justify="left" if column == "strategy" else "right")
    for r in summary["results"]:
        arena = r["arena_bytes"]
        grid.add_row(
            r["strategy"], format_bytes(arena), f"+{(arena / max(load, 1) - 1) * 100:.1f}%",
            f"{(arena / max(naive, 1) - 1) * 100:.1f}%", f"{r['seconds']:.3f}",
            "proven" if r["optimal"] else "-",
        )
    return grid


def _note(summary: dict) -> str | None:
    """For a model: LOAD before and after scheduling and in-place ops."""
    if "exported_load_bytes" not in summary:
        return None
    schedule = summary.get("schedule")
    how = "exported order kept (--no-schedule)" if schedule is None else (
        f"{'reordered' if schedule['reordered'] else 'exported order was best'}"
        f"{', proven' if schedule['exact'] else ''}")
    return (
        f"LOAD {format_bytes(summary['exported_load_bytes'])} in the exported order without "
        f"in-place ops; {format_bytes(summary['load_bytes'])} with {summary['inplace_pairs']} "
        f"in-place ops, schedule: {how}"
    )


def write_outputs(prepared: Prepared, best: Plan, out: Path) -> dict[str, str]:
    """plan.json, memory_map.png and, for CSV input, the solution CSV; returns their paths."""
    from memtile.report.plots import memory_map

    files = {"plan_json": out / "plan.json", "memory_map_png": out / "memory_map.png"}
    with writing(files["plan_json"]) as path:
        write_plan_json(prepared.problem, best, path)
    with writing(files["memory_map_png"]) as path:
        memory_map(prepared.problem, best, path, f"{prepared.name}: memory map")
    if prepared.csv is not None:
        files["solution_csv"] = out / f"{prepared.csv.stem}.solution.csv"
        with writing(files["solution_csv"]) as path:
            prepared.problem.to_csv(path, best)
    return {key: str(path) for key, path in files.items()}


def run(args: argparse.Namespace) -> int:
    out = output_dir(args.out)
    capacity = args.capacity
    if args.strategy not in CHOICES:
        raise MemtileError(f"unknown --strategy {args.strategy!r}; choose one of {', '.join(CHOICES)}")
    prepared = _prepare(args, capacity)
    try:
        check_capacity(prepared.problem)
    except BudgetError as error:
        console.print(f"memtile plan: {error}", highlight=False, soft_wrap=True)
        return 1
    with console.status(f"planning {len(prepared.problem.buffers)} buffers"):
        results = plans(prepared.problem, args.strategy, args.time_limit)
    summary = summarize(prepared, results)
    best = min(results, key=lambda p: p.arena_bytes)
    if out is not None:
        summary.update(write_outputs(prepared, best, out))
    if args.json:
        print_json(summary)
    else:
        console.print(table(summary))
        if _note(summary):
            console.print(_note(summary), highlight=False)
    if not summary["fits"]:
        console.print(
            f"memtile plan: no plan fits the capacity {format_bytes(capacity)}: the best arena is "
            f"{format_bytes(best.arena_bytes)} ({best.strategy}); try a longer --time-limit",
            highlight=False, soft_wrap=True,
        )
        return 1
    return 0


def report_section(name: str, model, inputs, out: Path) -> str:
    """Markdown for `memtile report`: planned arena per strategy and memory_map.png."""
    from memtile.capture import capture

    began = time.perf_counter()
    graph = capture(model, inputs)
    prepared = prepare_graph(graph, name, time_limit=2.0)
    results = solve_all(prepared.problem, time_limit=5.0)
    summary = summarize(prepared, results)
    best = min(results, key=lambda p: p.arena_bytes)
    write_outputs(prepared, best, out)
    rows = "\n".join(
        f"| {r['strategy']} | {format_bytes(r['arena_bytes'])} | "
        f"{'proven' if r['optimal'] else '-'} | {r['seconds']:.3f} |"
        for r in summary["results"]
    )
    schedule = summary["schedule"]
    return f"""## Plan: one arena for every intermediate tensor

Static memory planning (MemoMalloc): each of the {summary['buffers']} activation buffers of
`{name}` gets a fixed offset in one arena, so inference allocates nothing at run time. LOAD,
the most bytes live at one step, is the floor no plan can go below.

| what | bytes |
|---|---|
| naive (every buffer its own bytes) | {format_bytes(summary['naive_bytes'])} |
| LOAD, exported order | {format_bytes(summary['exported_load_bytes'])} |
| LOAD, best schedule ({'proven' if schedule['exact'] else 'heuristic'}) + {summary['inplace_pairs']} in-place ops | {format_bytes(summary['load_bytes'])} |
| planned arena ({summary['best']['strategy']}) | {format_bytes(summary['best']['arena_bytes'])} |

| strategy | arena | optimal | seconds |
|---|---|---|---|
{rows}

Planning took {time.perf_counter() - began:.1f} s. The memory map shows every buffer as a
rectangle: execution steps on x, its offset on y; the dashed line marks the LOAD step.

![memory map](memory_map.png)
"""
