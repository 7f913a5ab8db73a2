"""memtile: make CNNs fit in less memory without changing what they compute.

Public API (imported lazily so that `memtile.planning` stays free of torch):
`capture`, `measure`, `plan`, `PlannedModule`, `tile`, `RowCentric`, `export`, `MemtileError`.
"""

from importlib import import_module

from memtile.errors import MemtileError

__version__ = "0.1.0"

_LAZY = {
    "capture": "memtile.capture",
    "MemGraph": "memtile.capture",
    "measure": "memtile.measure",
    "Measurement": "memtile.measure",
    "plan": "memtile.planner",
    "PlannedModule": "memtile.runtime",
    "tile": "memtile.tiling",
    "RowCentric": "memtile.rows",
    "export": "memtile.export",
    "zoo": "memtile.zoo",
}

__all__ = [
    "Measurement",
    "MemGraph",
    "MemtileError",
    "PlannedModule",
    "RowCentric",
    "capture",
    "export",
    "measure",
    "plan",
    "tile",
    "zoo",
]


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if name == "zoo" else getattr(module, name)
    raise AttributeError(f"module 'memtile' has no attribute {name!r}")
