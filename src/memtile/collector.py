"""Python's cyclic garbage collector, paused where its runs would distort a result.

A full collection walks every object of the process (about 0.45 s in the test suite's), and it
runs whenever enough new objects have survived: inside a timed search it eats the time limit,
inside a memory measurement it frees earlier code's garbage and lowers the peak by chance.
"""

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off inside the block, and on again after only if it was on before.
    Reference counting still frees everything that holds no cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
