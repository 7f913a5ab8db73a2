"""Arguments, output and model loading shared by the commands."""

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from memtile.errors import InputShapeError, MemtileError
from memtile.units import parse_bytes, parse_seconds

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
    """"3,224,224" or "3x224x224": every dimension a positive integer, none left out."""
    parts = [part.strip() for part in re.split(r"[,x]", text)]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a shape; write positive integers, e.g. 3,224,224"
        )
    return tuple(int(part) for part in parts)


def _argument_type(parse: Callable, name: str) -> Callable:
    """An argparse `type=` that reports a MemtileError as argparse's one-line usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except MemtileError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = name
    return convert


byte_size = _argument_type(parse_bytes, "byte size")
seconds = _argument_type(parse_seconds, "seconds")


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


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Write an output file: a file system error becomes a one-line MemtileError naming it."""
    try:
        yield Path(path)
    except OSError as error:
        raise MemtileError(
            f"cannot write {error.filename or path}: {error.strerror or error}; "
            "choose another --out folder"
        ) from error


def max_abs_difference(expected, got) -> float:
    """The largest absolute difference over every tensor of two model outputs of the same
    structure (a tensor, or tuples, lists and dicts of them); inf when the structures differ."""
    from torch.utils._pytree import tree_flatten

    want, want_spec = tree_flatten(expected)
    have, have_spec = tree_flatten(got)
    if want_spec != have_spec:
        return float("inf")
    pairs = [(w, h) for w, h in zip(want, have, strict=True) if hasattr(w, "shape") and w.numel()]
    return max((float((w - h).abs().max()) for w, h in pairs), default=0.0)


def print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def check_batch(batch: int) -> None:
    if batch < 1:
        raise InputShapeError(f"--batch must be at least 1, got {batch}")
