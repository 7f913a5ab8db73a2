"""`memtile tile MODEL`: find FDT/FFMT tilings that lower the peak; show it before and after."""

import argparse
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table

from memtile.commands.common import (
    add_model_arguments,
    add_output_arguments,
    byte_size,
    check_batch,
    console,
    load_model,
    output_dir,
    print_json,
    seconds,
)
from memtile.units import format_bytes

HELP = "rewrite a model with fused tiling (FDT channel split, FFMT spatial tiles) to lower its peak"
METHODS = {"auto": ("fdt", "ffmt"), "fdt": ("fdt",), "ffmt": ("ffmt",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--budget", type=byte_size, default=None, metavar="BYTES",
                        help="stop when the planned peak is at most this (e.g. 256KiB); "
                             "exit 1 with the best found if no tiling meets it")
    parser.add_argument("--max-mac-overhead", type=float, default=0.1, metavar="F",
                        help="extra conv/linear MACs allowed, as a fraction (default 0.1)")
    parser.add_argument("--method", choices=sorted(METHODS), default="auto",
                        help="fdt, ffmt, or auto (both; default)")
    parser.add_argument("--max-seconds", type=seconds, default=None, metavar="S",
                        help="stop searching after about S seconds and keep the best found")
    add_output_arguments(parser, default_out="memtile-out")


def measured_peak(model: torch.nn.Module, inputs: tuple) -> int:
    """Allocator-measured peak of one eager inference call (above what was held before).

    Give it the fx-traced model for "before": the traced graph frees values at their last use,
    which alone can change the measured peak, and the comparison should show tiling only.
    """
    from memtile.measure import measure

    with torch.no_grad():
        return measure(model, *inputs).peak_bytes


def tile_summary(model: torch.nn.Module, inputs: tuple, budget: int | None = None,
                 max_mac_overhead: float = 0.1, method: str = "auto", progress=None,
                 max_seconds: float | None = None):
    """Run discovery and measure both models: (JSON summary, tiled GraphModule, TileReport).

    A budget that is not met still yields the best model found, with `budget_met` false.
    """
    from memtile.tiling import BudgetNotMetError, tile

    try:
        tiled, report = tile(model, inputs, budget, max_mac_overhead, METHODS[method], progress,
                             max_seconds)
    except BudgetNotMetError as error:
        tiled, report = error.model, error.report
    summary = report.as_dict()
    summary["measured_peak_before_bytes"] = measured_peak(report.original, inputs)
    summary["measured_peak_after_bytes"] = measured_peak(tiled, inputs)
    return summary, tiled, report


def run(args: argparse.Namespace) -> int:
    check_batch(args.batch)
    out = output_dir(args.out)
    model, inputs = load_model(args)
    if args.json or not console.is_terminal:
        summary, tiled, report = tile_summary(model, inputs, args.budget, args.max_mac_overhead,
                                              args.method, max_seconds=args.max_seconds)
    else:
        with console.status("tiling: searching paths") as status:
            summary, tiled, report = tile_summary(
                model, inputs, args.budget, args.max_mac_overhead, args.method,
                progress=lambda text: status.update(f"tiling: {text}"),
                max_seconds=args.max_seconds,
            )
    summary = {"model": args.model, "batch": args.batch, "input_shape": list(inputs[0].shape[1:]),
               "method": args.method, **summary}
    if out is not None:
        summary.update(_write_memory_maps(out, args.model, report))
        summary.update(_write_program(out, tiled, inputs, report))
    if args.json:
        print_json(summary)
    else:
        console.print(table(summary))
    return 0 if report.budget_met else 1


def _write_memory_maps(out: Path, name: str, report) -> dict:
    """Memory maps of the plans before and after."""
    files = {}
    try:
        from memtile.report.plots import memory_map
    except ImportError:
        memory_map = None
    if memory_map is not None:
        for when, planned in (("before", report.planned_before), ("after", report.planned_after)):
            path = out / f"memory_map_{when}.png"
            memory_map(planned.problem, planned.plan, path,
                       f"{name} {when} tiling: planned arena {format_bytes(planned.arena_bytes)}")
            files[f"memory_map_{when}_png"] = str(path)
    return files


def _write_program(out: Path, tiled, inputs: tuple, report) -> dict:
    """The tiled program for deployment, `tiled.pt2`: the core-ATen graph tiling planned, its
    ops in the planned order (`PlannedPeak.program`; torch.export of the tiled model when that
    graph was traced whole)."""
    path = out / "tiled.pt2"
    program = report.planned_after.program(inputs)
    if program is None:
        with torch.no_grad():
            program = torch.export.export(tiled, tuple(inputs))
    torch.export.save(program, path)
    return {"program_pt2": str(path)}


def _split(step: dict) -> str:
    """"4" partitions or a "2x2" grid, on how many paths; a finer re-split of an earlier step
    says which."""
    split = "x".join(map(str, step["grid"])) if step["grid"] else str(step["partitions"])
    if step.get("paths", 1) > 1:
        split += f" on {step['paths']} paths"
    return split + (f" (re-splits step {step['replaces']})" if step.get("replaces") else "")


def table(summary: dict) -> Group:
    """One row per discovery step, then the peaks before and after."""
    steps = Table(title=f"memtile tile: {summary['model']} ({summary['method']}): discovery steps")
    for column in ("step", "method", "split", "ops", "planned peak", "MACs"):
        steps.add_column(column, justify="right" if column in ("planned peak", "MACs") else "left")
    steps.add_row("before", "", "", "", format_bytes(summary["peak_before_bytes"]),
                  f"{summary['macs_before']:,}")
    for index, step in enumerate(summary["steps"], 1):
        ops = f"{step['ops'][0]} .. {step['ops'][-1]} ({len(step['ops'])} ops)"
        steps.add_row(str(index), step["method"], _split(step), ops, format_bytes(step["peak_bytes"]),
                      f"{step['macs']:,}")
    result = Table(title="result")
    for column in ("", "before", "after", "ratio"):
        result.add_column(column, justify="left" if not column else "right")
    for label, key in (("planned peak", "peak"), ("planned peak without inputs", "peak"),
                       ("measured eager peak", "measured_peak")):
        suffix = "_without_input_bytes" if "without" in label else "_bytes"
        before, after = summary[f"{key}_before{suffix}"], summary[f"{key}_after{suffix}"]
        result.add_row(label, format_bytes(before), format_bytes(after),
                       f"{before / max(after, 1):.2f}x")
    result.add_row("conv/linear MACs", f"{summary['macs_before']:,}", f"{summary['macs_after']:,}",
                   f"{summary['mac_overhead']:+.1%}")
    result.add_row("max abs error", "", f"{summary['max_abs_error']:.3g}",
                   f"scale {summary['output_scale']:.3g}")
    if summary["barriers"]:
        result.add_row("stopped by", "", "; ".join(summary["barriers"][:3]), "")
    if summary["timed_out"]:
        result.add_row("search", "", f"stopped after {summary['max_seconds']:g} s", "")
    if summary["budget"] is not None:
        verdict = "met" if summary["budget_met"] else "NOT met: best found shown"
        result.add_row("budget", format_bytes(summary["budget"]), verdict, "")
    return Group(steps, result)


def report_section(name: str, model, inputs, out: Path) -> str:
    """Markdown for `memtile report`: discovery steps, peaks before/after, memory maps."""
    summary, _, report = tile_summary(model, inputs)
    return report_text(name, summary, _write_memory_maps(out, name, report))


def report_text(name: str, summary: dict, files: dict) -> str:
    """The tile section's markdown from `tile_summary`'s JSON and the pictures written."""
    rows = "\n".join(
        f"| {i} | {s['method']} | {_split(s)} "
        f"| `{s['ops'][0]}` .. `{s['ops'][-1]}` ({len(s['ops'])} ops) | "
        f"{format_bytes(s['peak_bytes'])} | {s['macs']:,} |"
        for i, s in enumerate(summary["steps"], 1)
    ) or "| - | no tiling lowered the planned peak | | | | |"
    pictures = "".join(
        f"![memory map {when}]({Path(files[key]).name})\n"
        for when, key in (("before", "memory_map_before_png"), ("after", "memory_map_after_png"))
        if key in files
    )
    return f"""## Tile: fused tiling for inference (FDT + FFMT)

Path discovery rewrote `{name}` so that the buffers making its peak exist one partition (FDT,
channels) or one tile (FFMT, rows x columns) at a time; every step was re-captured, re-scheduled
and re-planned, and the outputs were checked against the original (max abs error
{summary['max_abs_error']:.3g} at output scale {summary['output_scale']:.3g}).

| step | method | split | ops | planned peak | MACs |
|---|---|---|---|---|---|
| before | | | | {format_bytes(summary['peak_before_bytes'])} | {summary['macs_before']:,} |
{rows}

| what | before | after |
|---|---|---|
| planned peak (arena) | {format_bytes(summary['peak_before_bytes'])} | {format_bytes(summary['peak_after_bytes'])} |
| planned peak without the input | {format_bytes(summary['peak_before_without_input_bytes'])} | {format_bytes(summary['peak_after_without_input_bytes'])} |
| measured eager peak (allocator) | {format_bytes(summary['measured_peak_before_bytes'])} | {format_bytes(summary['measured_peak_after_bytes'])} |
| conv/linear MACs | {summary['macs_before']:,} | {summary['macs_after']:,} ({summary['mac_overhead']:+.1%}) |

{pictures}To keep the tiled program: `memtile tile {name} --out DIR` saves it as `tiled.pt2`
(`torch.export.save`), and `memtile export {name} --tile` writes it as an ExecuTorch program.
"""
