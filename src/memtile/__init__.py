"""memtile: make CNNs fit in less memory without changing what they compute.

Public API (imported lazily so that `memtile.planning` stays free of torch):
`capture`, `measure`, `plan`, `PlannedModule`, `tile`, `RowCentric`, `export`, `MemtileError`.
"""

import sys
from collections.abc import Callable
from importlib import import_module
from types import ModuleType

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


def callable_module(module_name: str, function: Callable) -> None:
    """Make the submodule `module_name` callable as `function`.

    `memtile.capture` and `memtile.measure` are both a function of the public API and a
    submodule. Importing a submodule sets the package attribute of that name to the module,
    so without this `memtile.capture(model, x)` fails once anything has imported
    `memtile.capture`; with it, the module itself can be called.
    """

    class _Callable(ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    _Callable.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = _Callable
