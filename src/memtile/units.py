"""Human byte units: the CLI accepts and prints "256KiB", "1.5MB"; code keeps ints."""

import math
import re

from memtile.errors import MemtileError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse "1.5MB", "256KiB" or "4096" into a number of bytes."""
    if isinstance(text, int):
        return text
    match = _PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise MemtileError(
            f"cannot read {text!r} as a byte size; write e.g. 4096, 256KiB, 1.5MB or 4GiB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value >= 2**63:
        raise MemtileError(f"byte size {text!r} is too large; the most is 8 EiB (2**63 - 1 bytes)")
    return round(value)


def format_bytes(n: float) -> str:
    """Print bytes in binary units with three significant digits: 6.42 MiB."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds ("10", "0.5"): a limit that can be met and is not 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise MemtileError(f"cannot use {text!r} as a time limit; write a positive number of seconds")
    return value
