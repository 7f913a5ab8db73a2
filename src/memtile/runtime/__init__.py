"""The planned executor: a captured model run with every planned intermediate in one arena."""

from memtile.runtime.executor import PlannedModule, allocate_arena

__all__ = ["PlannedModule", "allocate_arena"]
