"""`memtile profile MODEL`: measured peak vs LOAD, who holds memory at the peak, timeline.png."""

import argparse
from pathlib import Path

import torch
from rich.table import Table

from memtile.commands.common import (
    add_model_arguments,
    add_output_arguments,
    console,
    load_model,
    output_dir,
    print_json,
    writing,
)
from memtile.errors import MemtileError
from memtile.units import format_bytes

HELP = "measure a model's real memory peak and compare it with LOAD from its captured graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    next(a for a in parser._actions if a.dest == "model").nargs = "?"  # not with --list
    parser.add_argument("--train", action="store_true", help="measure one SGD training step")
    parser.add_argument("--list", action="store_true",
                        help="print every model name the zoo builds by name, and exit")
    add_output_arguments(parser, default_out="memtile-out")


def profile(model: torch.nn.Module, inputs: tuple, train: bool = False) -> tuple[dict, object]:
    """Capture and measure one call (or one SGD step with `train`); returns (summary, Measurement)."""
    from memtile.capture import capture
    from memtile.lifetimes import load
    from memtile.measure import measure

    graph = capture(model, inputs)
    if train:
        measurement = _measure_training_step(model, inputs)
    else:
        with torch.no_grad():
            measurement = measure(model, *inputs, model=model)
    summary = {
        "mode": "training" if train else "inference",
        "measured_peak_bytes": measurement.peak_bytes,
        "trace_plan_bytes": _trace_plan_bytes(measurement),
        "load_bytes": load(graph),
        "input_bytes": graph.input_bytes,
        "parameter_bytes": graph.parameter_bytes,
        "peak_op": measurement.peak_op,
        "peak_module": measurement.peak_module,
        "measured_seconds": measurement.seconds,
        "top": measurement.top(8),
    }
    if train:
        summary["breakdown"] = measurement.breakdown
    return summary, measurement


def _trace_plan_bytes(measurement) -> int:
    """MemoMalloc's offline step: plan the recorded allocations (temporaries included) in one arena."""
    from memtile.planning import Problem, solve

    return solve(Problem.from_measurement(measurement), "best").arena_bytes


def _measure_training_step(model: torch.nn.Module, inputs: tuple):
    """One SGD (momentum 0.9) step on a mean-square loss over every floating-point output:
    forward, backward and optimizer step."""
    from torch.utils._pytree import tree_leaves

    from memtile.measure import measure

    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise MemtileError("--train needs a model with trainable parameters; this one has none")
    model.train()
    optimizer = torch.optim.SGD(trained, lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        outputs = [t for t in tree_leaves(model(*inputs))
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        if not outputs:
            raise MemtileError("--train: no floating-point output of the model needs a gradient")
        sum(t.float().square().mean() for t in outputs).backward()  # every output, any structure
        optimizer.step()

    try:
        return measure(step, model=model, optimizer=optimizer)
    except (RuntimeError, ValueError) as error:  # e.g. a BatchNorm in training mode at batch 1
        raise MemtileError(f"the training step failed: {str(error).splitlines()[0]}") from error
    finally:
        model.eval()


def _print_names() -> int:
    from memtile import zoo

    print("\n".join(zoo.names()))
    print("also: timm:NAME (any timm model), smp:ARCH:ENCODER (e.g. smp:Unet:resnet18), "
          "pkg.module:attr, FILE.pt2")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_names()
    if args.model is None:
        raise MemtileError("name a MODEL to profile, or pass --list to see the zoo's names")
    out = output_dir(args.out)
    model, inputs = load_model(args)
    summary, measurement = profile(model, inputs, args.train)
    summary = {"model": args.model, "batch": args.batch,
               "input_shape": list(inputs[0].shape[1:]), **summary}
    if out is not None:
        picture = out / "timeline.png"
        _timeline(measurement, picture, args.model, summary["mode"])
        summary["timeline_png"] = str(picture)
    if args.json:
        print_json(summary)
    else:
        console.print(table(summary))
    return 0


def _timeline(measurement, path: Path, name: str, mode: str) -> None:
    from memtile.report.plots import timeline

    with writing(path) as target:
        timeline(measurement, target, f"{name}: {mode}, measured allocator timeline")


def table(summary: dict) -> Table:
    """The profile as a rich table: headline numbers, then what holds memory at the peak."""
    grid = Table(title=f"memtile profile: {summary['model']} ({summary['mode']})", show_header=False)
    grid.add_row("measured peak (allocator, above start)", format_bytes(summary["measured_peak_bytes"]))
    grid.add_row("planned arena for the recorded trace", format_bytes(summary["trace_plan_bytes"]))
    grid.add_row("LOAD (captured inference graph)", format_bytes(summary["load_bytes"]))
    grid.add_row("parameters and buffers", format_bytes(summary["parameter_bytes"]))
    grid.add_row("at the peak", f"{summary['peak_op']} in {summary['peak_module'] or '-'}")
    for key, value in summary.get("breakdown", {}).items():
        grid.add_row(f"  {key.replace('_', ' ')}", format_bytes(value))
    for entry in summary["top"]:
        grid.add_row(f"  held: {entry['op']} {entry['module']}", format_bytes(entry["bytes"]))
    return grid


def report_section(name: str, model, inputs, out: Path) -> str:
    """Markdown for `memtile report`: inference profile and its timeline."""
    summary, measurement = profile(model, inputs)
    _timeline(measurement, out / "timeline.png", name, "inference")
    rows = "\n".join(
        f"| {e['op']} | {e['module'] or '-'} | {format_bytes(e['bytes'])} |" for e in summary["top"]
    )
    ratio = summary["measured_peak_bytes"] / max(summary["load_bytes"], 1)
    return f"""## Profile: where the memory goes

One inference call of `{name}` on inputs {tuple(inputs[0].shape)}, measured at the allocator
(every allocation and free, kernel temporaries included).

| what | bytes |
|---|---|
| measured peak (allocator, above what was held before) | {format_bytes(summary['measured_peak_bytes'])} |
| planned arena for the recorded allocations (MemoMalloc: temporaries included) | {format_bytes(summary['trace_plan_bytes'])} |
| LOAD (largest total of live activations in the captured graph) | {format_bytes(summary['load_bytes'])} |
| parameters and buffers | {format_bytes(summary['parameter_bytes'])} |

The measured peak is {ratio:.2f}× LOAD; at the peak `{summary['peak_op']}` was running in
`{summary['peak_module'] or '-'}`. What is live at the peak, by the op and module that allocated it:

| op | module | bytes |
|---|---|---|
{rows}

![timeline](timeline.png)
"""
