"""The program that becomes the .pte: captured once, put in memtile's op order, lowered.

`scheduled_program` captures the model (`memtile.capture`), finds memtile's schedule and
in-place pairs on that ATen graph (`memtile.planner.prepare`) and moves the graph's nodes into
that order, so ExecuTorch's specs are made in the order memtile planned for. `lower` then runs
`to_edge` / `to_executorch` with a given memory-planning algorithm (memtile's, or None for
ExecuTorch's default greedy) on a copy, so one edge program can be lowered both ways.
"""

from __future__ import annotations

import copy
import itertools
import operator

import torch
from executorch.exir import EdgeCompileConfig, EdgeProgramManager, ExecutorchBackendConfig, to_edge
from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.constant_prop_pass import constant_prop_pass
from executorch.exir.passes.remove_graph_asserts_pass import RemoveNonCoreAtenOpGraphAssertsPass
from executorch.exir.program._program import _generate_edge_program  # pinned executorch 1.5.1
from executorch.exir.tracer import _default_decomposition_table
from executorch.exir.verification.verifier import EXIRATenDialectVerifier

from memtile.capture import apply_order, capture
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


def to_edge_program(program: torch.export.ExportedProgram) -> EdgeProgramManager:
    """Edge dialect, with constants folded (weight transposes of linear layers are otherwise
    computed into planned memory at every call) and split pieces taken as slices
    (`pieces_as_slices`) made right before their first readers like every view
    (`views_before_readers`; all three edit `program`)."""
    pieces_as_slices(program)
    views_before_readers(program)
    try:
        edge = _edge(program) if _decomposed(program) else to_edge(program).exported_program()
        return EdgeProgramManager(constant_prop_pass(edge))  # verifies the edge dialect
    except Exception as error:
        raise ExportError(f"ExecuTorch cannot lower the program: {first_line(error)}") from error


def pieces_as_slices(program: torch.export.ExportedProgram) -> int:
    """Each piece read from a `split_with_sizes` becomes a `slice` of the split's input; returns
    how many splits went. A view in ATen either way, but the edge dialect copies:
    `split_with_sizes_copy` every piece at once where `slice_copy` copies the one read. timm's
    Res2Net reads each split once per piece (8 splits of one tensor per block, each read for
    one piece): its program copied every block's input 8 times, all 8 pieces live at once."""
    graph = program.graph_module.graph
    replaced = 0
    for split in [n for n in graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]:
        pieces = list(split.users)
        if not pieces or any(p.target is not operator.getitem for p in pieces) or any(
                user.op == "output" for p in pieces for user in p.users):
            continue  # an output keeps its name: the program's signature refers to it
        source, sizes = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        starts = list(itertools.accumulate(sizes, initial=0))
        for piece in pieces:
            k = piece.args[1]
            if not piece.users:
                graph.erase_node(piece)
                continue
            with graph.inserting_before(piece):
                sliced = graph.call_function(torch.ops.aten.slice.Tensor,
                                             (source, dim, starts[k], starts[k + 1]))
            sliced.meta = dict(piece.meta)
            piece.replace_all_uses_with(sliced)
            graph.erase_node(piece)
        graph.erase_node(split)
        replaced += 1
    if replaced:
        program.graph_module.recompile()
    return replaced


def views_before_readers(program: torch.export.ExportedProgram) -> int:
    """Move view ops (their schema's output aliases their input) to right before their first
    readers; returns how many moved. memtile's schedule runs views as soon as they are ready
    (they hold no bytes in ATen), but the edge dialect makes them copies (`slice_copy`,
    `permute_copy`, ...), each held from where it is made: FFMT's band slices, all made before
    the first tile ran, were 2.9 of the 3.7 MB at tiled timm:dla34's .pte peak. Moving a view
    can keep its input alive longer, so a tensor's views move when it is read that late anyway,
    or when its views' copies together are at least its size (bands: all of them at once cost
    more than the input does)."""
    graph = program.graph_module.graph
    moved = 0
    for node in reversed(list(graph.nodes)):
        source = node.args[0] if node.args else None
        if not (_is_view(node) and node.users and isinstance(source, torch.fx.Node)):
            continue
        nodes = list(graph.nodes)
        position = {other: index for index, other in enumerate(nodes)}
        first = min(position[user] for user in node.users)
        kept_until = max((position[r] for r in source.users if r is not node), default=-1)
        copies = sum(_bytes(view) for view in source.users if _is_view(view))
        if first > position[node] + 1 and (kept_until >= first or copies >= _bytes(source)):
            nodes[first].prepend(node)
            moved += 1
    if moved:
        program.graph_module.recompile()
    return moved


def _is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "is_view", False)


def _bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _decomposed(program: torch.export.ExportedProgram) -> bool:
    """Whether no op of the program is one ExecuTorch's decomposition table would rewrite: then
    `to_edge`'s first step, `run_decompositions` with that table, re-traces the whole program
    to the same ops (7 s of a tiled mobilenet_v2's 20 s in `to_edge`). memtile's programs are
    core ATen already (`capture.export`, stitched tiling graphs)."""
    table = _default_decomposition_table()
    return not any(node.target in table for node in program.graph.nodes
                   if node.op == "call_function")


def _edge(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`to_edge`'s edge program of a program `_decomposed` says is final, without the re-trace
    (tests/test_export.py compares the two graphs op by op). The ATen dialect is checked here;
    the edge dialect once, by the `EdgeProgramManager` made of the result (`to_edge` checks it
    twice more, a few seconds on a tiled mobilenet_v2)."""
    config = EdgeCompileConfig()
    aten = RemoveNonCoreAtenOpGraphAssertsPass()(program.graph_module).graph_module
    EXIRATenDialectVerifier(edge_compile_config=config, class_only=False)(aten)
    return _generate_edge_program(config, program, preserve_ops=[])


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
