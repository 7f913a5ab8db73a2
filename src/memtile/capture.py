"""Capture: a model becomes a `MemGraph`, every ATen op in execution order and every tensor it makes.

The graph comes from `torch.export` lowered to core ATen, so what we plan is what kernels run.
A *buffer* is a storage: views (reshape, slice, transpose, getitem of a tuple, ...) are not
buffers, they extend their base's lifetime. Op `i` runs at step `i`; a buffer made at step `i`
and last read (through any alias) at step `j` is live on the half-open interval `[i, j + 1)`.
Inputs are live from step 0; graph outputs until the end.
"""

import contextlib
import contextvars
import copy
import functools
import io
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx.config
from torch import fx, nn

from memtile import callable_module
from memtile.errors import ExportError

INPUT, PARAMETER, ACTIVATION, OUTPUT = "input", "parameter", "activation", "output"


@dataclass
class TensorInfo:
    """One tensor value of the graph; `base` names the tensor whose storage it uses."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    category: str
    base: str
    producer: int | None = None  # op index; None for inputs and parameters
    consumers: list[int] = field(default_factory=list)

    @property
    def is_view(self) -> bool:
        return self.base != self.name


@dataclass
class OpNode:
    """One ATen op, at step `index` of the execution order."""

    index: int
    name: str
    target: str
    module_path: str
    inputs: list[str]
    outputs: list[str]
    node: fx.Node

    @property
    def is_view(self) -> bool:
        """True when the op only makes views (no new storage)."""
        return bool(self.outputs) and all(o.endswith(".view") for o in self.outputs)


class MemGraph:
    """The memory picture of one model call: ops, tensors and the storages they use
    (`memtile.lifetimes` turns these into buffers with live intervals).

    Built from an ExportedProgram (kept as `program`: the runtime and export read it), or from a
    bare core-ATen `graph` and the names of its user inputs (`fast_capture`; `program` is None).
    """

    def __init__(self, program: torch.export.ExportedProgram | None,
                 graph: fx.Graph | None = None, user_inputs: Sequence[str] = ()):
        self.program = program
        self.ops: list[OpNode] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.value_of: dict[fx.Node, object] = {}  # fx node -> its tensor name (a tuple if several)
        if program is not None:
            graph, user_inputs = program.graph, program.graph_signature.user_inputs
        self._build(graph, set(user_inputs))

    # ---- construction -------------------------------------------------------------------

    def _build(self, graph: fx.Graph, user_inputs: set[str]) -> None:
        outputs = set()
        for node in graph.nodes:
            if node.op == "placeholder":
                category = INPUT if node.name in user_inputs else PARAMETER
                self.value_of[node] = self._add_tensor(node.name, node.meta["val"], category)
            elif node.op == "call_function" and node.target is operator.getitem:
                parent, index = node.args
                self.value_of[node] = self.value_of[parent][index]
            elif node.op == "call_function":
                self._add_op(node)
            elif node.op == "output":
                outputs = {name for name in self._tensor_names(node.args) if name}
        for name in outputs:
            base = self.tensors[self.tensors[name].base]
            if base.category == ACTIVATION:
                base.category = OUTPUT
        self.output_names = sorted(outputs)

    def _add_tensor(self, name: str, value, category: str, base: str | None = None) -> str | None:
        if not isinstance(value, torch.Tensor):
            return None
        nbytes = value.numel() * value.element_size()
        base_category = self.tensors[base].category if base else category
        self.tensors[name] = TensorInfo(
            name, value.dtype, tuple(value.shape), nbytes, base_category, base or name
        )
        return name

    def _add_op(self, node: fx.Node) -> None:
        index = len(self.ops)
        inputs = [n for n in self._tensor_names((node.args, node.kwargs)) if n]
        view_of = self._aliased_input(node)
        values = node.meta.get("val")
        multiple = isinstance(values, (tuple, list))
        names = []
        for i, value in enumerate(values if multiple else [values]):
            name = f"{node.name}.{i}" if multiple else node.name
            base = self.tensors[view_of].base if view_of else None
            if base:
                name += ".view"
            names.append(self._add_tensor(name, value, ACTIVATION, base))
        for name in names:
            if name and not self.tensors[name].is_view:
                self.tensors[name].producer = index
        for name in set(inputs):
            self.tensors[name].consumers.append(index)
        self.value_of[node] = tuple(names) if multiple else names[0]
        self.ops.append(
            OpNode(index, node.name, _target_name(node), _module_path(node), inputs,
                   [n for n in names if n], node)
        )

    def _aliased_input(self, node: fx.Node) -> str | None:
        """The input tensor whose storage the op's first output views, if the schema says so."""
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return None
        first = node.args[0] if node.args else None
        name = self.value_of.get(first) if isinstance(first, fx.Node) else None
        return name if isinstance(name, str) else None

    def _tensor_names(self, args) -> list[str]:
        found: list[str] = []
        fx.node.map_arg(args, lambda n: found.extend(_flatten(self.value_of.get(n))))
        return found

    # ---- the memory picture -------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    def storage_users(self) -> dict[str, list[str]]:
        """Base tensor name -> every tensor (itself and its views) using that storage."""
        users: dict[str, list[str]] = {}
        for tensor in self.tensors.values():
            users.setdefault(tensor.base, []).append(tensor.name)
        return users

    @property
    def parameter_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.category == PARAMETER and not t.is_view)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.category == INPUT and not t.is_view)

    def macs(self) -> int:
        """Multiply-accumulates of convolution and matrix-multiply ops (the compute that tiling adds)."""
        return sum(_op_macs(op, self.tensors) for op in self.ops)


def capture(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> MemGraph:
    """Export `model` on `inputs` (a tuple) to core ATen and return its `MemGraph`."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return MemGraph(export(model, inputs))


def export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export + core ATen decompositions; a failure is an ExportError naming the cause.

    Inside `reusing_exports`, a model exported before on inputs of the same shapes is not
    traced again: the caller gets a copy of that program."""
    reused = _REUSED.get()
    key = None if reused is None else (
        id(model), getattr(model, "training", None),
        tuple((t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t)
              for t in inputs))
    if reused is not None and key in reused:
        return _own_copy(reused[key][1])
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        try:
            with torch.no_grad(), tracing():
                program = torch.export.export(model, tuple(inputs), strict=False)
        except Exception as error:  # export raises many unrelated types
            raise ExportError(_export_failure(error)) from error
    with tracing():
        program = program.run_decompositions()
    if reused is not None:  # the model is kept so that its id names it while the scope lasts
        reused[key] = (model, _own_copy(program))
    return program


_REUSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reused", default=None)


@contextlib.contextmanager
def reusing_exports():
    """A scope in which `export` (so `capture`, `PlannedModule`) traces each model once per
    input shape. `memtile report` captures one model in four sections, at seconds each; the
    model must not change structure or mode inside the scope (weights may: they are shared)."""
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


def _own_copy(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy of `program` whose graph the caller may edit (the executor and export reorder
    and annotate nodes), sharing its weights and constants with the model, as export does."""
    shared = [*program.state_dict.values(), *program.constants.values()]
    return copy.deepcopy(program, memo={id(value): value for value in shared})


def apply_order(graph: MemGraph, order: list[int]) -> None:
    """Move the op nodes of `graph`'s program into `order` (each getitem right after its op),
    so that what lowers the program (ExecuTorch's specs, a saved .pt2) sees memtile's schedule;
    fx's lint checks that every node still follows its inputs."""
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


def fast_capture(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> MemGraph:
    """The MemGraph `capture` gives, from one functional trace to core ATen
    (`trace_functional`) instead of torch.export's two (export, then `run_decompositions`).
    Tiling re-captures every candidate rewrite of a model that `capture`
    has already exported once; the ops, tensors and lifetimes are the same
    (tests/test_capture.py), the node names are not, and there is no ExportedProgram
    (`program` is None), so the runtime and export use `capture`.
    """
    try:
        traced = trace_functional(_FlatOutputs(model), tuple(inputs))
    except Exception as error:  # tracing raises many unrelated types
        raise ExportError(_export_failure(error, "make_fx")) from error
    return MemGraph(None, traced.graph, traced.user_inputs)


@dataclass(frozen=True)
class FunctionalTrace:
    """A module's core-ATen graph with no mutation left. Placeholders: its parameters, then
    its buffers (named in `constants`, each tensor once), then its inputs (`user_inputs`).
    Outputs: the new value of each placeholder the module writes in place (`mutated`, in
    placeholder order), then the module's outputs."""

    graph: fx.Graph
    constants: tuple[str, ...]
    user_inputs: tuple[str, ...]
    mutated: tuple[str, ...]


def trace_functional(module: nn.Module, inputs: Sequence[torch.Tensor]) -> FunctionalTrace:
    """Trace `module` (returning a flat tuple of tensors) on fake copies of `inputs` to core
    ATen, functionalized, in one `make_fx` pass: `aot_export_module` makes the same graph
    (tests/test_capture.py) with two passes (one to collect metadata about mutations and
    aliases, one to trace), and tiling traces pieces of dozens of rewrites. The python dispatcher
    is on, as in AOT autograd, so that eval BatchNorm is `_native_batch_norm_legit_no_training`.
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.experimental.proxy_tensor import make_fx

    constants = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    names = list(constants)

    def call(*args: torch.Tensor):
        state = dict(zip(names, args[:len(names)], strict=True))
        return torch.func.functional_call(module, state, args[len(names):])

    with torch.no_grad(), tracing(), enable_python_dispatcher():
        traced = make_fx(torch.func.functionalize(call, remove="mutations"),
                         decomposition_table=core_aten_decompositions(),
                         tracing_mode="fake")(*constants.values(), *inputs)
    graph = traced.graph
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    written: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default \
                and node.args[0] in holders:
            held, new = node.args[0], node.args[1]
            old_value, new_value = held.meta["val"], new.meta["val"]
            if (old_value.shape, old_value.dtype) != (new_value.shape, new_value.dtype):
                raise ExportError(f"the model changes the shape or dtype of {held.name} in "
                                  "place; memtile cannot plan that")
            written[held] = new
            graph.erase_node(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    mutated = [held for held in holders if held in written]
    output.args = ((*(written[held] for held in mutated), *output.args[0]),)
    graph.eliminate_dead_code()
    return FunctionalTrace(graph, tuple(names), tuple(h.name for h in holders[len(names):]),
                           tuple(h.name for h in mutated))


@functools.cache
def core_aten_decompositions() -> dict:
    """torch.export's default decomposition table, materialized once: building it costs about
    50 ms, and tiling traces dozens of rewrites."""
    return dict(torch.export.default_decompositions().materialize())


class _FlatOutputs(nn.Module):
    """`model` returning its output tensors as one flat tuple, as `aot_export_module` needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.utils._pytree.tree_leaves(self.model(*inputs)))


@contextlib.contextmanager
def tracing():
    """The settings memtile traces under: export's output on failure quieted (the ExportError
    says what matters), and no stack trace recorded per traced node
    (`torch.fx.config.do_not_emit_stack_traces`): memtile never reads them, and extracting them
    costs about a tenth of a trace (mobilenet_v2's export, a tiled span's pieces)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, emitting = logger.level, torch.fx.config.do_not_emit_stack_traces
    logger.setLevel(logging.ERROR)
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = emitting
        logger.setLevel(level)


def _export_failure(error: Exception, tracer: str = "torch.export") -> str:
    """The first line of export's message, and the user's source line that triggered it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    where = ""
    for i, line in enumerate(lines):
        if line.startswith('File "') and "site-packages" not in line:
            code = lines[i + 1] if i + 1 < len(lines) else ""
            where = f" at {line.removeprefix('File ')}: {code}"
    return f"{tracer} cannot trace the model: {message}{where}"


def _flatten(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, tuple):
        return [v for v in value if v]
    return [value]


def positions(order: list[int] | None, count: int) -> list[int]:
    """Op index -> its step in `order` (the exported order when None); checks the permutation."""
    if order is None:
        return list(range(count))
    if sorted(order) != list(range(count)):
        raise ValueError(f"order is not a permutation of the {count} op indices")
    position = [0] * count
    for step, op in enumerate(order):
        position[op] = step
    return position


def _target_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__name__", str(target)
    )


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.")


def _op_macs(op: OpNode, tensors: dict[str, TensorInfo]) -> int:
    if not op.outputs:
        return 0
    out = tensors[op.outputs[0]]
    numel = 1
    for d in out.shape:
        numel *= d
    if op.target == "aten.convolution.default":
        weight = tensors[op.inputs[1]].shape
        per_output = 1
        for d in weight[1:]:
            per_output *= d
        return numel * per_output
    if op.target in ("aten.addmm.default", "aten.mm.default", "aten.bmm.default"):
        a = tensors[op.inputs[-2]].shape
        return numel * a[-1]
    return 0


callable_module(__name__, capture)  # `memtile.capture(...)` works after `import memtile.capture`
