"""`memtile export MODEL`: an ExecuTorch program (.pte) whose planned memory is memtile's plan.

Optionally tiled first (`--tile`, `--budget`). The .pte is run by ExecuTorch's runtime on fresh
inputs against the eager model, and its planned arena is read back from the file.
"""

import argparse
from pathlib import Path

from rich.table import Table

from memtile.commands.common import (
    add_model_arguments,
    byte_size,
    check_batch,
    console,
    load_model,
    print_json,
    seconds,
)
from memtile.errors import MemtileError
from memtile.numerics import TOLERANCE
from memtile.units import format_bytes

HELP = ("write an ExecuTorch program (.pte) planned by memtile (optionally tiled), run it "
        "through ExecuTorch's runtime and compare with eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tile", action="store_true",
                        help="tile the model first with memtile.tile (FDT/FFMT)")
    parser.add_argument("--budget", type=byte_size, default=None, metavar="BYTES",
                        help="arena limit, e.g. 1.3MiB: with --tile, tiling stops once met; "
                             "exit 1 if the .pte's planned arena is above it")
    parser.add_argument("--time-limit", type=seconds, default=10.0, metavar="S",
                        help="seconds for the exact planner (CP-SAT) on ExecuTorch's specs "
                             "(default 10)")
    parser.add_argument("--out", default="model.pte", help="the .pte to write (default model.pte)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in README)")


def run(args: argparse.Namespace) -> int:
    from memtile.export import export, require_executorch

    require_executorch()
    check_batch(args.batch)
    if Path(args.out).is_dir():
        raise MemtileError(f"--out {args.out} is a folder; give the path of the .pte to write")
    model, inputs = load_model(args)
    if args.json or not console.is_terminal:
        result = export(model, inputs, args.out, args.tile, args.budget, args.time_limit)
    else:
        with console.status("exporting") as status:
            result = export(model, inputs, args.out, args.tile, args.budget, args.time_limit,
                            progress=lambda text: status.update(f"export: {text}"))
    summary = {"model": args.model, "batch": args.batch,
               "input_shape": list(inputs[0].shape[1:]), **result.as_dict()}
    if args.json:
        print_json(summary)
    else:
        console.print(table(summary))
        console.print(_verdicts(summary, args.tile), highlight=False, soft_wrap=True)
    return 0 if result.equivalent and result.budget_met else 1


def table(summary: dict) -> Table:
    grid = Table(title=f"memtile export: {summary['model']} -> {summary['pte']}"
                       f"{' (tiled)' if summary['tiled'] else ''}")
    grid.add_column("what")
    grid.add_column("value", justify="right")
    greedy, arena = summary["executorch_greedy_bytes"], summary["planned_arena_bytes"]
    rows = (
        ("planned arena in the .pte (read back)", format_bytes(arena)),
        ("memtile's plan of ExecuTorch's specs",
         (f"{format_bytes(summary['memtile_arena_bytes'])} ({summary['strategy']}"
         f"{', proven optimal' if summary['optimal'] else ''})")),
        ("LOAD of those specs (lower bound)", format_bytes(summary["load_bytes"])),
        ("ExecuTorch greedy, same program", f"{format_bytes(greedy)} ({arena / max(greedy, 1):.3f}x)"),
        ("specs planned / in-place pairs", f"{summary['specs']} / {summary['inplace_pairs']}"),
        ("tiling steps found / kept",
         f"{len(summary['steps'])} / {'yes' if summary['tiled'] else 'no'}"),
        ("memtile's arena of the untiled program", format_bytes(summary["untiled_arena_bytes"])),
        (".pte size", format_bytes(summary["bytes"])),
        ("max relative difference vs eager", f"{summary['max_rel_diff']:.2e}"),
        ("seconds (tiling)", f"{summary['seconds']:.1f} ({summary['tile_seconds']:.1f})"),
    )
    for row in rows:
        grid.add_row(*row)
    return grid


def _verdicts(summary: dict, tile_requested: bool) -> str:
    lines = [
        (f"memtile planned ExecuTorch's own {summary['specs']} tensor specs (after to_edge/"
        f"to_executorch inserted its copies and out-variants) at alignment {summary['alignment']}; "
        "ExecuTorch's greedy was not used for the .pte.")]
    if tile_requested and not summary["tiled"]:
        lines.append("tiling did not lower the .pte's planned arena, so the untiled program "
                     f"({format_bytes(summary['untiled_arena_bytes'])}) was written")
    if not summary["equivalent"] and summary["float64_rel_diff"] is None:
        lines.append(f"NOT equivalent: max relative difference {summary['max_rel_diff']:.3g} "
                     "(the outputs differ in structure, shape, or where NaN/Inf are)")
    elif not summary["equivalent"]:
        lines.append(f"NOT equivalent: max relative difference {summary['max_rel_diff']:.3g} "
                     f"is above 1e-5, and the .pte is {summary['float64_rel_diff']:.3g} from "
                     f"float64 arithmetic where eager float32 is "
                     f"{summary['eager_float64_rel_diff']:.3g}")
    elif summary["max_rel_diff"] > TOLERANCE:
        lines.append(f"outputs differ from eager by {summary['max_rel_diff']:.2e} (above 1e-5), as "
                     "rounding: the .pte is "
                     f"{summary['float64_rel_diff']:.2e} from float64 arithmetic, eager float32 "
                     f"{summary['eager_float64_rel_diff']:.2e}")
    if not summary["budget_met"]:
        lines.append(f"budget NOT met: {format_bytes(summary['planned_arena_bytes'])} > "
                     f"{format_bytes(summary['budget'])}")
    return "\n".join(lines)
