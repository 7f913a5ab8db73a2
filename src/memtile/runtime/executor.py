"""`PlannedModule`: a model run from one arena, every planned intermediate at a fixed offset.

Construction captures the model (core ATen), orders its ops (`memtile.schedule` when present),
finds which outputs may overwrite an input in place (`memtile.inplace` when present), decides
each tensor's memory format (`layout`: channels_last where convolutions can then write into the
arena, see `convolution`), runs the graph once on the example inputs to check each op's `out=`
kernel (see `outvariants`) and each convolution with the batch norm and residual add after it
fused into its call (see `fusion`), builds the arena's problem with `planner.prepare` (the
in-place pairs its kernels keep, the fused chains' slots, the tensors planned ops write), plans
it (`memtile.planning.solve`) and compiles the straight-line program (`codegen`). A call then runs each planned op into its view
of the arena; unplanned ops (no out= kernel, or one that allocates) run as ordinary calls, and
their results are freed as soon as their last reader ran.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from operator import getitem

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from memtile.capture import INPUT, OUTPUT, OpNode, capture
from memtile.errors import BudgetError, InputShapeError, MemtileError
from memtile.lifetimes import shared_root
from memtile.planner import op_order, prepare
from memtile.planning import Plan, solve
from memtile.runtime import convolution, fusion
from memtile.runtime.codegen import ArenaView, Fresh, Program, Step, Var, compile_program, rebind
from memtile.runtime.kernels import check_kernels, names_of, select_kernels
from memtile.runtime.layout import LAYOUTS, Restride, channels_last_tensors
from memtile.runtime.packing import Packings
from memtile.runtime.refusals import refuse_side_effects
from memtile.units import format_bytes

ON_NEW_SHAPE = ("error", "replan")


@dataclass(frozen=True)
class ViewSpec:
    """Where a planned tensor lives in the arena."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class ArenaProgram:
    """One input signature's plan: the graph, the arena layout and the compiled program."""

    def __init__(self, model: nn.Module, inputs: tuple, strategy: str, copy_outputs: bool,
                 schedule_seconds: float, layout: str = "auto", pack_weights: bool = True,
                 fuse: bool = True):
        self.graph = capture(model, inputs)
        refuse_side_effects(self.graph.program, model)
        self.device = inputs[0].device if inputs else torch.device("cpu")
        self.order, _ = op_order(self.graph, time_limit=schedule_seconds)
        self.copy_outputs = copy_outputs
        self.layout = layout
        self._constants = _constants(self.graph.program)
        variants, self.unplanned = select_kernels(self.graph, self._constants, layout,
                                                  self.device, pack_weights)
        self.channels_last = channels_last_tensors(
            self.graph, layout, any(convolution.is_into(v) for v in variants.values()))
        chains = fusion.chains(self.graph, self.order, variants, self.channels_last,
                               self._constants, fold_batch_norm=pack_weights) if fuse else {}
        report = check_kernels(self.graph, self.order, variants, chains, self._constants,
                               self.channels_last, inputs)
        self.unplanned.update(report.unplanned)  # node name -> why it runs unplanned
        self.planned = report.planned
        self.fused, self.unfused = report.fused, report.unfused
        self.kernel_bytes = report.kernel_bytes  # node name -> scratch its out= call allocated
        self._strides = report.strides  # produced tensor -> strides in a call
        self._restride = report.restride  # tensors whose functional op returns other strides
        self.packings = Packings([v.packing for v in self.planned.values() if v.packing],
                                 torch.get_num_threads())
        self.arena_storages = self._arena_storages()
        self.prepared = prepare(
            self.graph, order=self.order, keep_pair=self.keeps_pair, storages=self.arena_storages,
            extra_shared=fusion.slots(self.graph, self.fused_chains(), self.arena_storages))
        self.shared, self.problem = self.prepared.shared, self.prepared.problem
        self.plan: Plan = solve(self.problem, strategy)
        self.views: list[ViewSpec] = []
        self.program = self._program()
        self.run = compile_program(self.program)
        # the exported program rebuilds its call spec (a namedtuple class) at every read: 48 us
        self.out_spec = self.graph.program.call_spec.out_spec
        self._runs = {self.packings.threads: self.run}  # intra-op threads -> program (`runner`)
        self._lock = threading.Lock()

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed convolution weights this program keeps (see `convolution`),
        with the copies packed for other thread counts (`runner`)."""
        return sum(v.packed_bytes for v in self.planned.values()) + self.packings.repacked_bytes()

    def runner(self):
        """The compiled program for the calling thread's intra-op thread count, its packed
        weights up to date (`packing`: recomputed after in-place updates of their sources) and
        packed for that count (another count's cost a oneDNN reorder at every call; made on the
        first call at a new count)."""
        if self.packings.stale():
            with self._lock:
                self.packings.refresh()
        threads = torch.get_num_threads()
        run = self._runs.get(threads)
        if run is None:
            with self._lock:
                if threads not in self._runs:
                    self._runs[threads] = rebind(self.run, self.packings.repack(threads))
                run = self._runs[threads]
        return run

    def fused_counts(self) -> dict[str, int]:
        """How many batch norms, adds and activations (SiLU, hardswish) run inside a
        convolution's call."""
        chains = self.fused_chains()
        return {"batch_norm": sum(c.batch_norm is not None for c in chains),
                "add": sum(c.add is not None for c in chains),
                "activation": sum(bool(c.activation) for c in chains)}

    def ops_in_order(self):
        return [self.graph.ops[i] for i in self.order]

    def fused_chains(self) -> list[fusion.Chain]:
        return [fused.chain for fused in self.fused.values()]

    def keeps_pair(self, output: str, source: str) -> bool:
        """Whether an in-place pair (`planner.prepare`'s `keep_pair`) shares a slot here: both
        tensors are in the arena and of one layout."""
        return (output in self.arena_storages and source in self.arena_storages
                and (output in self.channels_last) == (source in self.channels_last))

    def _arena_storages(self) -> set[str]:
        """Storages written by planned ops, less graph outputs that are returned fresh."""
        storages = set()
        for op in self.graph.ops:
            if op.node.name not in self.planned:
                continue
            for name in op.outputs:
                tensor = self.graph.tensors[name]
                if tensor.nbytes and not (self.copy_outputs and tensor.category == OUTPUT):
                    storages.add(name)
        return storages

    # ---- the program ---------------------------------------------------------------------

    def _program(self) -> Program:
        """Lower the graph, in the planned order, to the straight-line program (`codegen`);
        `views` gets each arena tensor's place as the steps first write it."""
        view_index: dict[str, int] = {}  # arena tensor -> its position in `views`
        absorbed = {node for chain in self.fused_chains() for node in chain.absorbed}
        steps: list[Step] = []
        for op in self.ops_in_order():
            if op.node not in absorbed:  # absorbed ops are computed by their convolution's call
                steps += self._lower(op, view_index)
        inputs = tuple(n.name for n in self.graph.program.graph.nodes
                       if n.op == "placeholder" and n.name not in self._constants)
        return Program(inputs, steps, *self._outputs())

    def _lower(self, op: OpNode, view_index: dict[str, int]) -> list[Step]:
        """The steps of one op: its planned out= call writing arena views (a fused chain's call
        for a chain's convolution), or its functional call with a restride to the planned
        strides where that call returns others."""
        node, value_of = op.node, self.graph.value_of
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._reference)
        fn, label = node.target, str(node.target)
        variant = self.planned.get(node.name)
        restride = {}  # variable -> tensor, for an unplanned op's results in other strides
        if node.name in self.fused:  # the chain's result, written into the chain's slot
            chain = self.fused[node.name].chain
            if chain.identity is not None:
                args = (*args, self._reference(chain.identity))
            node = chain.result
            label += "".join(f" + {n.target}" for n in chain.absorbed)
        if variant is not None:
            args, kwargs = variant.arguments(args, kwargs)
            kwargs.update({out: self._destination(name, view_index) for out, name
                           in zip(variant.out_names, names_of(value_of[node]), strict=True)})
            fn = variant.overload
        elif not op.is_view:
            restride = {var: name for var, name in _output_variables(node, value_of)
                        if name in self._restride}
        natural = {var: f"{var}__natural" for var in restride}
        items = tuple((natural.get(u.name, u.name), u.args[1])
                      for u in node.users if u.target is getitem)
        return [Step(fn, args, kwargs, natural.get(node.name, node.name), items, label),
                *(Step(Restride(self._strides[name]), (Var(natural[var]),), {}, var,
                       label="restride to the planned layout")
                  for var, name in restride.items())]

    def _destination(self, name: str, view_index: dict[str, int]) -> ArenaView | Fresh:
        """Where a planned op writes tensor `name`: its arena view, or a fresh tensor."""
        tensor = self.graph.tensors[name]
        if name not in self.arena_storages:
            return Fresh(tensor.shape, self._strides[name], tensor.dtype, self.device)
        if name not in view_index:
            view_index[name] = len(self.views)
            offset = self.plan.offsets[shared_root(name, self.shared)]
            self.views.append(ViewSpec(offset, tensor.nbytes, tensor.shape, self._strides[name],
                                       tensor.dtype))
        return ArenaView(view_index[name])

    def _reference(self, node: fx.Node):
        return self._constants[node.name] if node.name in self._constants else Var(node.name)

    def _outputs(self) -> tuple[tuple, frozenset]:
        """The program's output references, and those to clone: outputs that are a graph
        input or a view of one, when outputs are returned fresh."""
        graph, value_of = self.graph, self.graph.value_of
        output = next(n for n in graph.program.graph.nodes if n.op == "output")
        flat = pytree.tree_leaves(fx.node.map_arg(output.args[0], self._reference))
        nodes = {n.name: n for n in graph.program.graph.nodes}
        clone = frozenset(
            v.name for v in flat if isinstance(v, Var) and self.copy_outputs
            and isinstance(name := value_of.get(nodes[v.name]), str)
            and graph.tensors[graph.tensors[name].base].category == INPUT
        )
        return tuple(flat), clone

    def allocate_views(self) -> tuple[torch.Tensor, ...]:
        """A new arena on the graph's device and the planned tensors' views of it."""
        arena = allocate_arena(self.arena_bytes, self.device)
        return tuple(
            arena[v.offset:v.offset + v.nbytes].view(v.dtype).as_strided(v.shape, v.stride)
            for v in self.views
        )


class PlannedModule(nn.Module):
    """Runs `model` with every planned intermediate in one preallocated arena per thread.

    `copy_outputs=True` returns outputs in fresh tensors (the out= kernel writes straight into
    them); with `False` outputs are views of the arena, overwritten by this thread's next call.
    `on_new_shape="error"` raises InputShapeError for inputs shaped unlike the example;
    `"replan"` captures and plans the new shape once and caches it beside the first.
    Inference only: calls run under no_grad. Build it on the device it will run on (the arena
    and the captured weights live there); the graph and plan are fixed at construction.

    `layout` picks the memory format of planned 4-D activations. "auto" (default): channels_last
    when some convolution can be computed into the arena (CPU with oneDNN, float32, not
    transposed), so convolutions run from the arena too; outputs then differ from eager by float
    rounding (convolutions sum in another order: each is checked within 1e-5 of its output's
    magnitude; end to end we measured 4e-7 on resnet50, 1.7e-6 on vgg11). "channels_last"
    forces it; "eager"
    keeps eager's layout: bit-exact outputs, convolutions unplanned. `pack_weights` reorders
    each planned convolution's weight into oneDNN's format once (`packed_bytes` more memory
    held) instead of at every call. `fuse` computes, in a planned convolution's call, the
    eval-mode batch norm after it (folded into a packed copy of its weight and bias; only with
    `pack_weights`) and a residual add after that (the convolution accumulates into the
    identity's slot): one step, one pass over its slot, checked against the separate steps at
    construction (see `fusion`); a SiLU after a convolution or its batch norm becomes oneDNN's
    swish post-op (it keeps NaN and Inf where eager does), ReLU and ReLU6 stay steps of their
    own (oneDNN's turn NaN into numbers). Packed and folded weights are recomputed before a call when their
    sources were updated in place (`packing`; not through `.data`); parameters replaced by new
    tensors are not seen: build a new module. oneDNN packs for the intra-op thread count that
    runs the call: a call at another count than construction's packs the weights again for it
    once, and keeps them (`packed_bytes` counts them).
    """

    def __init__(self, model: nn.Module, example_inputs, strategy: str = "best",
                 copy_outputs: bool = True, on_new_shape: str = "error",
                 schedule_seconds: float = 5.0, layout: str = "auto", pack_weights: bool = True,
                 fuse: bool = True):
        super().__init__()
        if on_new_shape not in ON_NEW_SHAPE:
            raise MemtileError(f"on_new_shape must be one of {ON_NEW_SHAPE}, got {on_new_shape!r}")
        if layout not in LAYOUTS:
            raise MemtileError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
            else tuple(example_inputs)
        self.model = model
        self.strategy, self.copy_outputs, self.on_new_shape = strategy, copy_outputs, on_new_shape
        self.schedule_seconds = schedule_seconds
        self.layout, self.pack_weights, self.fuse = layout, pack_weights, fuse
        self._example = _signature(inputs)
        self._programs = {self._example: self._build(inputs)}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _build(self, inputs: tuple) -> ArenaProgram:
        with torch.no_grad():
            return ArenaProgram(self.model, inputs, self.strategy, self.copy_outputs,
                                self.schedule_seconds, self.layout, self.pack_weights,
                                self.fuse)

    @property
    def main(self) -> ArenaProgram:
        """The program planned for the example inputs."""
        return self._programs[self._example]

    @property
    def arena_bytes(self) -> int:
        return self.main.arena_bytes

    @property
    def packed_bytes(self) -> int:
        """Packed convolution weights held beside the model's own (example-shape program)."""
        return self.main.packed_bytes

    @property
    def unplanned_ops(self) -> list[tuple[str, str]]:
        """(ATen op, reason) for every op that runs outside the arena, each pair once."""
        ops = {op.node.name: str(op.node.target) for op in self.main.graph.ops}
        return list(dict.fromkeys((ops[name], why) for name, why in self.main.unplanned.items()))

    @property
    def source(self) -> str:
        """The generated Python of the example-shape program."""
        return self.main.run.source

    def forward(self, *inputs: torch.Tensor):
        program = self._program_for(inputs)
        run = program.runner()
        arenas = self._local.__dict__.setdefault("arenas", {})
        views = arenas.get(id(program))
        if views is None:
            views = arenas[id(program)] = program.allocate_views()
        with torch.no_grad():
            flat = run(inputs, views)
        return pytree.tree_unflatten(flat, program.out_spec)

    def _program_for(self, inputs: tuple) -> ArenaProgram:
        signature = _signature(inputs)
        program = self._programs.get(signature)
        if program is not None:
            return program
        _check_like(inputs, self._example)
        if self.on_new_shape == "error":
            raise InputShapeError(
                f"inputs of shape {_shapes(signature)} differ from the planned "
                f"{_shapes(self._example)}; pass on_new_shape='replan' to plan each new shape"
            )
        with self._lock:
            if signature not in self._programs:
                self._programs[signature] = self._build(inputs)
            return self._programs[signature]


def allocate_arena(nbytes: int, device: torch.device) -> torch.Tensor:
    """One uint8 tensor of `nbytes`; a clear BudgetError when the device cannot hold it."""
    available = available_memory(device)
    if available is not None and nbytes > available:
        raise BudgetError(
            f"the planned arena needs {format_bytes(nbytes)} but {device} has only "
            f"{format_bytes(available)} available; use a smaller batch or input"
        )
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError) as error:
        raise BudgetError(
            f"cannot allocate the {format_bytes(nbytes)} arena on {device}: "
            f"{str(error).splitlines()[0]}; use a smaller batch or input"
        ) from error


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give (CPU: MemAvailable; CUDA: free device memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _constants(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor, for parameters, buffers and lifted constants."""
    found = {}
    for spec in program.graph_signature.input_specs:
        if spec.target is None:
            continue
        source = program.state_dict if spec.target in program.state_dict else program.constants
        found[spec.arg.name] = source[spec.target]
    return found


def _signature(inputs: tuple) -> tuple:
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputShapeError("PlannedModule takes tensors as positional inputs")
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


def _check_like(inputs: tuple, example: tuple) -> None:
    """Dtype, device and count must match the example; only shapes may be replanned."""
    if len(inputs) != len(example):
        raise InputShapeError(f"expected {len(example)} input tensors, got {len(inputs)}")
    for i, (tensor, (_, dtype, device)) in enumerate(zip(inputs, example, strict=True)):
        if tensor.dtype != dtype or tensor.device != device:
            raise InputShapeError(
                f"input {i} is {tensor.dtype} on {tensor.device}, but the model was planned "
                f"for {dtype} on {device}; convert it with .to({dtype}, {str(device)!r})"
            )


def _shapes(signature: tuple) -> str:
    return ", ".join(str(shape) for shape, _, _ in signature)


def _output_variables(node: fx.Node, value_of: dict) -> list[tuple[str, str]]:
    """(program variable, tensor name) of each tensor output of a node."""
    if not isinstance(value_of[node], tuple):
        return [(node.name, value_of[node])] if value_of[node] else []
    return [(u.name, value_of[u]) for u in node.users if u.target is getitem and value_of[u]]
