"""memtile's planner as ExecuTorch's memory-planning algorithm.

ExecuTorch's `MemoryPlanningPass` hands its algorithm the TensorSpecs of the lowered program
(after `to_edge`/`to_executorch` inserted out-variant allocations, copies and views), each with
an inclusive lifetime `[first, last]` in node indices of ExecuTorch's own graph. `MemtilePlanner`
turns exactly those specs into a memtile `Problem` (half-open `[first, last + 1)`), pairs an
elementwise out-variant op's output with an input that dies there (in-place sharing, as
`memtile.inplace` does on the ATen graph), solves it with `memtile.planning.solve`, checks the
result from the specs' side, and writes the offsets back. ExecuTorch's greedy never places
anything: it is run on the same specs beside memtile's planner only to report its arena
(`PlanningRecord.greedy_bytes`), which is what lowering the program again with ExecuTorch's
default planning gives, without a second `to_executorch` (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from executorch.exir.memory_planning import MemoryAlgoResult, SpecAllocResult, greedy
from executorch.exir.tensor import TensorSpec

from memtile.errors import PlanVerificationError, UnsupportedOpError
from memtile.inplace import ELEMENTWISE
from memtile.planning import Buffer, Plan, Problem, lower_bound, solve

# Out-variant ops whose output element i reads only input element i (memtile.inplace's table,
# by schema name), and slice_scatter, whose portable kernel memcpy's `self` to `out` (the same
# pointer when in place: exactly overlapping, as compilers themselves emit for struct
# self-assignment) and then writes `src` (never `self`'s storage: see `_overwritten`) into the
# slice. Each may write over an input that dies at it. Not addmm: its kernel's pointers are
# `restrict`, so accumulating into `self` would be undefined.
ELEMENTWISE_NAMES = frozenset(name.split(".")[1] for name in ELEMENTWISE) | {"slice_scatter"}
ARENA_ID = 1  # ExecuTorch's mem_id of the planned activation arena (0 holds constants)


@dataclass
class PlanningRecord:
    """What the hook planned: the Problem built from ExecuTorch's specs and its verified Plan."""

    problem: Problem
    plan: Plan
    specs: int
    inplace_pairs: int
    alignment: int
    greedy_bytes: int  # ExecuTorch's default greedy on the same specs (not used for the .pte)
    groups: list[list[TensorSpec]] = field(repr=False, default_factory=list)

    @property
    def load_bytes(self) -> int:
        """LOAD of the planned problem: no arena for these specs in this order is smaller."""
        return lower_bound(self.problem)


class MemtilePlanner:
    """A `MemoryPlanningAlgorithmSuite` algorithm: `(alignment, specs, graph_module,
    graph_signature, extra_padding) -> MemoryAlgoResult`. The last call's result is `record`."""

    __name__ = "memtile"

    def __init__(self, strategy: str = "optimal", time_limit: float = 10.0, inplace: bool = True):
        self.strategy, self.time_limit, self.inplace = strategy, time_limit, inplace
        self.record: PlanningRecord | None = None

    def __call__(self, alignment: int, specs, graph_module: torch.fx.GraphModule,
                 graph_signature, extra_padding: int = 0) -> MemoryAlgoResult:
        if getattr(graph_module, "input_mem_buffer_sizes", None):
            raise UnsupportedOpError(
                "the program has control-flow submodules (cond/while/map); memtile export plans "
                "straight-line programs only")
        roots = _roots(specs, alignment)
        groups = _inplace_groups(roots, graph_module) if self.inplace else [[s] for s in roots]
        problem = Problem([_buffer(i, g) for i, g in enumerate(groups)], alignment=alignment)
        plan = solve(problem, self.strategy, self.time_limit) if problem.buffers else Plan({}, 0, "none", True)
        result = MemoryAlgoResult({}, [0, plan.arena_bytes + extra_padding])
        for index, group in enumerate(groups):
            for spec in group:
                result.spec_dict[spec] = SpecAllocResult(ARENA_ID, index, plan.offsets[index])
        _attach_views(specs, result)
        check_offsets(groups, plan.offsets)
        greedy_bytes = sum(greedy(alignment, specs, graph_module, graph_signature,
                                  extra_padding).bufsizes)
        self.record = PlanningRecord(problem, plan, len(roots), sum(len(g) - 1 for g in groups),
                                     alignment, greedy_bytes, groups)
        return result


def _base(spec: TensorSpec) -> TensorSpec:
    """The spec that owns the storage: a view spec forwards its memory fields to its base."""
    try:
        return object.__getattribute__(spec, "_base")
    except AttributeError:
        return spec


def _roots(specs, alignment: int) -> list[TensorSpec]:
    """Distinct storages to plan, in ExecuTorch's order; refuses what memtile cannot place."""
    roots: dict[int, TensorSpec] = {}
    for spec in specs:
        base = _base(spec)
        if base.storage_base is not None:
            raise UnsupportedOpError(
                "a TensorSpec shares storage with another (storage_base); memtile export "
                "does not plan such programs")
        if base.mem_id not in (None, ARENA_ID):
            raise UnsupportedOpError(f"a TensorSpec asks for memory pool {base.mem_id}; "
                                     "memtile export plans the default pool only")
        base.realign(alignment)
        roots.setdefault(id(base), base)
    return list(roots.values())


def _attach_views(specs, result: MemoryAlgoResult) -> None:
    """View specs the algorithm was handed get their base's placement."""
    for spec in specs:
        base = _base(spec)
        if base is not spec and base in result.spec_dict:
            result.spec_dict[spec] = result.spec_dict[base]


def _buffer(index: int, group: list[TensorSpec]) -> Buffer:
    start = min(s.lifetime[0] for s in group)
    end = max(s.lifetime[1] for s in group) + 1  # inclusive node index -> half-open step
    return Buffer(index, max(s.allocated_memory for s in group), start, end)


def _inplace_groups(roots: list[TensorSpec], graph_module: torch.fx.GraphModule) -> list[list[TensorSpec]]:
    """Storages that become one buffer: an elementwise out-variant op writes its output over
    an input of the same shape, dtype and layout that dies at that op (no other input of the
    op reads it, it is not a graph input), as a chain when the input was itself shared."""
    index = {id(s): i for i, s in enumerate(roots)}
    group_of = list(range(len(roots)))
    inputs = _graph_input_specs(graph_module)
    for position, node in enumerate(graph_module.graph.nodes):
        pair = _overwritten(node, position, inputs)
        if pair and id(pair[0]) in index and id(pair[1]) in index:
            out, source = index[id(pair[0])], index[id(pair[1])]
            if group_of[out] == out:
                group_of[out] = group_of[source]
    groups: dict[int, list[TensorSpec]] = {}
    for i, spec in enumerate(roots):
        groups.setdefault(group_of[i], []).append(spec)
    return list(groups.values())


def _graph_input_specs(graph_module: torch.fx.GraphModule) -> set[int]:
    return {id(_base(n.meta["spec"])) for n in graph_module.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("spec"), TensorSpec)}


def _overwritten(node: torch.fx.Node, position: int, graph_inputs: set[int]):
    """(output spec, input spec) when `node` may write its first output over that input."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or schema.overload_name.split("_")[-1] != "out":
        return None
    if schema.name.split("::")[-1] not in ELEMENTWISE_NAMES:
        return None
    specs = node.meta.get("spec")
    out = _base(specs[0] if isinstance(specs, (list, tuple)) else specs)
    if not isinstance(out, TensorSpec):
        return None
    readers = [a for a in node.args if isinstance(a, torch.fx.Node)]
    storages = [_base(a.meta["spec"]) for a in readers if isinstance(a.meta.get("spec"), TensorSpec)]
    for spec in storages:
        if (not spec.const and id(spec) not in graph_inputs and spec.lifetime[1] == position
                and storages.count(spec) == 1 and _same_layout(spec, out)):
            return out, spec
    return None


def _same_layout(a: TensorSpec, b: TensorSpec) -> bool:
    return (a.dtype == b.dtype and list(a.shape) == list(b.shape)
            and tuple(a.dim_order) == tuple(b.dim_order) and a.allocated_memory == b.allocated_memory)


def check_offsets(groups: list[list[TensorSpec]], offsets: dict) -> None:
    """Re-check the plan from ExecuTorch's side: two storages of different groups whose
    inclusive lifetimes meet never share a byte. Raises PlanVerificationError."""
    spans = sorted(
        (s.lifetime[0], s.lifetime[1], offsets[g], offsets[g] + s.allocated_memory, g)
        for g, group in enumerate(groups) for s in group if s.allocated_memory
    )
    live: list[tuple] = []
    for span in spans:
        live = [other for other in live if other[1] >= span[0]]
        for other in live:
            if other[4] != span[4] and span[2] < other[3] and other[2] < span[3]:
                raise PlanVerificationError(
                    f"ExecuTorch specs alive at node {span[0]} overlap in bytes "
                    f"[{span[2]}, {span[3]}) and [{other[2]}, {other[3]})")
        live.append(span)
