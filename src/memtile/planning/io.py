"""MiniMalloc's CSV format (`id,lower,upper,size[,offset]`) and plan JSON files.

MiniMalloc buffers live on the half-open interval [lower, upper), like ours on [start, end).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from memtile.errors import ProblemFormatError
from memtile.planning.problem import Buffer, BufferId, Plan, Problem

_COLUMNS = ("id", "lower", "upper", "size")


def _parse_id(text: str) -> BufferId:
    """Numeric ids stay ints (MiniMalloc's are), anything else is kept as text."""
    try:
        return int(text)
    except ValueError:
        return text


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is no column
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except OSError as e:
        raise ProblemFormatError(f"cannot read planning problem {path}: {e.strerror}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise ProblemFormatError(f"{path} is not a readable CSV file: {e}") from e
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise ProblemFormatError(
            f"{path}: header {','.join(header) or '(empty)'} lacks column(s) {', '.join(missing)}; "
            "expected MiniMalloc's id,lower,upper,size[,offset]"
        )
    return header, rows


def _int(path: Path, line: int, row: dict[str, str | None], column: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        return int(text)
    except ValueError:
        raise ProblemFormatError(
            f"{path}, line {line}: column {column!r} must be an integer, got {text!r}"
        ) from None


def read_csv(path: str | Path, alignment: int = 1, capacity: int | None = None) -> Problem:
    """Read a MiniMalloc CSV into a Problem (an `offset` column, if any, is ignored here)."""
    path = Path(path)
    _, rows = _rows(path)
    if not rows:
        raise ProblemFormatError(f"{path} has a header but no buffers")
    buffers = []
    for line, row in rows:
        if None in row:
            raise ProblemFormatError(f"{path}, line {line}: more fields than the header names")
        lower, upper = _int(path, line, row, "lower"), _int(path, line, row, "upper")
        size = _int(path, line, row, "size")
        try:
            buffers.append(Buffer(_parse_id(row["id"].strip()), size, lower, upper))
        except ProblemFormatError as e:
            raise ProblemFormatError(f"{path}, line {line}: {e}") from None
    try:
        return Problem(buffers, alignment=alignment, capacity=capacity)
    except ProblemFormatError as e:
        raise ProblemFormatError(f"{path}: {e}") from None


def read_csv_offsets(path: str | Path) -> dict[BufferId, int] | None:
    """The `offset` column of a MiniMalloc solution CSV, or None when it has none."""
    path = Path(path)
    header, rows = _rows(path)
    if "offset" not in header:
        return None
    return {_parse_id(row["id"].strip()): _int(path, line, row, "offset") for line, row in rows}


def write_csv(problem: Problem, path: str | Path, plan: Plan | None = None) -> None:
    """Write the problem in MiniMalloc's format, with offsets when a plan is given."""
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*_COLUMNS, "offset"] if plan else _COLUMNS)
        for b in problem.buffers:
            row = [b.id, b.start, b.end, b.size]
            writer.writerow([*row, plan.offsets[b.id]] if plan else row)


def write_plan_json(problem: Problem, plan: Plan, path: str | Path) -> None:
    """Write `plan.json`: arena, alignment, strategy and every buffer with its offset."""
    Path(path).write_text(json.dumps(plan.to_json(problem), indent=1) + "\n")
