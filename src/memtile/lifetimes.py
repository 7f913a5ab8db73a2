"""Buffers of a captured graph: each storage's live step interval under an op order, with the
storages that one writes over another in place merged into one buffer.

The bridge from `capture` (torch: tensors, producers, consumers) to `planning` (no torch:
buffers and intervals). The schedule checks its orders' LOAD here and `planner.prepare` builds
its Problem from these buffers; capture itself knows nothing of planning.
"""

from memtile.capture import OUTPUT, PARAMETER, MemGraph, positions
from memtile.planning import Buffer, live_bytes


def buffers(graph: MemGraph, order: list[int] | None = None,
            shared: dict[str, str] | None = None) -> list[Buffer]:
    """Non-parameter storages with their live step interval `[start, end)`.

    `order` is an execution order (a permutation of op indices; default: exported order).
    `shared` maps a storage to the storage it overwrites in place; the pair becomes one buffer.
    """
    position = positions(order, graph.num_steps)
    shared = shared or {}
    intervals: dict[str, list[int]] = {}
    for base, users in graph.storage_users().items():
        tensor = graph.tensors[base]
        if tensor.category == PARAMETER or tensor.nbytes == 0:
            continue
        root = shared_root(base, shared)
        start = 0 if tensor.producer is None else position[tensor.producer]
        steps = [position[c] for name in users for c in graph.tensors[name].consumers]
        end = graph.num_steps if tensor.category == OUTPUT else max([start, *steps]) + 1
        size = max(tensor.nbytes, graph.tensors[root].nbytes)
        span = intervals.setdefault(root, [start, end, size])
        span[0], span[1], span[2] = min(span[0], start), max(span[1], end), max(span[2], size)
    return [Buffer(name, size, start, end) for name, (start, end, size) in intervals.items()]


def load(graph: MemGraph, order: list[int] | None = None,
         shared: dict[str, str] | None = None) -> int:
    """LOAD: the largest total bytes of buffers live at one step (unaligned; see `buffers`)."""
    return max(live_bytes(buffers(graph, order, shared)))


def shared_root(name: str, shared: dict[str, str]) -> str:
    """The storage `name` ends up in after following in-place sharing (`shared`: name -> base)."""
    while name in shared:
        name = shared[name]
    return name
