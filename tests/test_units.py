import pytest

from memtile.errors import MemtileError
from memtile.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [("4096", 4096), ("256KiB", 262144), ("1.5MB", 1_500_000), ("4 GiB", 4 * 1024**3), (7, 7)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "12XB", "-5", "MiB", "1.2.3"])
def test_parse_bytes_rejects_what_it_cannot_read(text):
    with pytest.raises(MemtileError, match="byte size"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(6021120) == "5.74 MiB"
    assert format_bytes(3 * 1024**3) == "3 GiB"
