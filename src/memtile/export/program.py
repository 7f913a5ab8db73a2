"""The program that becomes the .pte: captured once, put in memtile's op order, lowered.

`scheduled_program` captures the model (`memtile.capture`), finds memtile's schedule and
in-place pairs on that ATen graph (`memtile.planner.prepare`) and moves the graph's nodes into
that order, so ExecuTorch's specs are made in the order memtile planned for. `lower` then runs
`to_edge` / `to_executorch` with a given memory-planning algorithm (memtile's, or None for
ExecuTorch's default greedy) on a copy, so one edge program can be lowered both ways.
"""

from __future__ import annotations

import copy
import operator

import torch
from executorch.exir import EdgeProgramManager, ExecutorchBackendConfig, to_edge
from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.constant_prop_pass import constant_prop_pass

from memtile.capture import MemGraph, capture
from memtile.errors import ExportError, MemtileError, first_line
from memtile.planner import PreparedGraph, prepare
from memtile.tiling.planned import inplace_writes

SCHEDULE_SECONDS = 5.0


def scheduled_program(model: torch.nn.Module, inputs: tuple, time_limit: float = SCHEDULE_SECONDS
                      ) -> tuple[torch.export.ExportedProgram, PreparedGraph]:
    """The model's core-ATen program with its nodes in memtile's schedule."""
    graph = capture(model, inputs)
    ready = prepare(graph, time_limit=time_limit, extra_shared=inplace_writes(graph))
    apply_order(graph, ready.order)
    return graph.program, ready


def apply_order(graph: MemGraph, order: list[int]) -> None:
    """Move the program's op nodes into `order` (each getitem right after its op); fx's lint
    checks that every node still follows its inputs."""
    fx_graph = graph.program.graph_module.graph
    cursor = next(n for n in reversed(fx_graph.nodes) if n.op == "placeholder")
    for index in order:
        node = graph.ops[index].node
        cursor.append(node)
        cursor = node
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                cursor.append(user)
                cursor = user
    fx_graph.lint()
    graph.program.graph_module.recompile()


def to_edge_program(program: torch.export.ExportedProgram) -> EdgeProgramManager:
    """Edge dialect, with constants folded (weight transposes of linear layers are otherwise
    computed into planned memory at every call)."""
    try:
        edge = to_edge(program)
        return EdgeProgramManager(constant_prop_pass(edge.exported_program()))
    except Exception as error:
        raise ExportError(f"ExecuTorch cannot lower the program: {first_line(error)}") from error


def lower(edge: EdgeProgramManager, algorithm=None):
    """`to_executorch` on a copy of `edge`, planned by `algorithm` (None: ExecuTorch's greedy),
    both at ExecuTorch's default alignment (16 bytes)."""
    suite = MemoryPlanningAlgorithmSuite([algorithm]) if algorithm is not None else None
    config = ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(memory_planning_algo=suite))
    try:
        return copy.deepcopy(edge).to_executorch(config)
    except Exception as error:
        if isinstance(error, MemtileError):
            raise
        raise ExportError(f"ExecuTorch cannot lower the program: {first_line(error)}") from error
