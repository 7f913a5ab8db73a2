"""Arguments, output and model loading shared by the commands."""

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from memtile.errors import InputShapeError, MemtileError

console = Console(stderr=True)


def add_model_arguments(parser: argparse.ArgumentParser, batch: int = 1) -> None:
    """MODEL, --batch, --input-shape: the way every command names a model and its inputs."""
    parser.add_argument("model", help="zoo name (e.g. mobilenet_v2), pkg.module:attr, or FILE.pt2")
    parser.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    parser.add_argument(
        "--input-shape", type=parse_shape, default=None, metavar="C,H,W",
        help="input shape without batch (default: the model's own)",
    )


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in README)")
    parser.add_argument("--out", default=default_out, help="folder for pictures and files")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a shape; write e.g. 3,224,224")
    return shape


def load_model(args: argparse.Namespace):
    """The model and example inputs that MODEL, --batch and --input-shape name."""
    from memtile import zoo

    return zoo.get(args.model, batch=args.batch, input_shape=args.input_shape)


def output_dir(path: str | os.PathLike | None) -> Path | None:
    """Create `--out` and check it can be written before any long work starts."""
    if path is None:
        return None
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".memtile-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise MemtileError(f"cannot write to --out {folder}: {error.strerror or error}") from error
    return folder


def print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def check_batch(batch: int) -> None:
    if batch < 1:
        raise InputShapeError(f"--batch must be at least 1, got {batch}")
