"""`memtile report MODEL`: one page that shows what each memtile capability does to a model."""

import argparse
import importlib
import shutil
import tempfile
import time
from pathlib import Path

from memtile.commands import COMMANDS
from memtile.commands.common import add_model_arguments, console, load_model, output_dir, writing

HELP = "write a report (index.md and pictures) of a model's memory and what memtile does to it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", default="report", help="folder for the report (default: report)")


def sections() -> list[tuple[str, object]]:
    """The command modules that contribute a section, in CLI order."""
    found = []
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"memtile.commands.{name}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "report_section"):
            found.append((name, module))
    return found


def run(args: argparse.Namespace) -> int:
    from memtile.capture import reusing_exports

    out = output_dir(args.out)
    model, inputs = load_model(args)
    header = (
        f"# memtile report: {args.model}\n\nInputs {tuple(inputs[0].shape)}, float32, "
        f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every number below is "
        "either measured at the allocator or a planned arena size, and says which.\n"
    )
    # Sections write into a staging folder that replaces the report's files only once every
    # section is done: a failing section leaves no half report behind.
    stage = Path(tempfile.mkdtemp(prefix=".memtile-report-", dir=out))
    try:
        parts = [header]
        with reusing_exports():  # the sections capture one model: it is exported once
            for name, module in sections():
                started = time.perf_counter()
                with console.status(f"report: {name} section"):
                    parts.append(module.report_section(args.model, model, inputs, stage))
                console.print(f"[green]✓[/] {name} section "
                              f"({time.perf_counter() - started:.1f} s)")
        (stage / "index.md").write_text("\n".join(parts))
        for made in sorted(stage.iterdir()):
            with writing(out / made.name) as target:
                made.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    console.print(f"report written to {out / 'index.md'}")
    return 0
