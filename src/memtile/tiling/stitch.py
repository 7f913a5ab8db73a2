"""Capture a module-level fx graph one top-level node at a time, reusing unchanged nodes' pieces.

Discovery re-plans dozens of rewrites of one model, and each differs from the graph it came from
in a few top-level nodes (an FFMT span's tiles, an FDT path's partitions). Tracing the whole
rewritten model to core ATen costs seconds each (mobilenet_v2: 800+ ATen ops); tracing only the
new nodes and splicing their ATen ops between the pieces already traced costs a graph edit.

Each top-level node is traced alone (`capture.trace_functional`) on inputs of its own with the
shapes, strides and dtypes it reads in the model (a `reshape` of a transposed tensor is a `clone`
and a `view`, of a contiguous one a `view`), and the pieces are joined in the graph's order into
one core-ATen graph, dead ops removed: the MemGraph `fast_capture` makes of the whole model (same
ops, tensors and lifetimes: tests/test_tiling_capture.py). A piece is keyed by what decides its
ATen ops: the node's op and target, its module's structure (configuration and tensor shapes, not
values), its constant arguments and its inputs' shapes, strides and dtypes.

An in-place node (ReLU6 with inplace=True, FDT's accumulation) mutates its input: its piece
returns the new value, which every later reader of that tensor gets, as functionalizing the
whole graph gives them. Functionalization also re-derives views of a storage that was mutated
(a second `split_with_sizes` where a chunk of an in-place ReLU's output is read), which pieces
cannot see; so a graph where one storage is both mutated and viewed across nodes, a mutated
model input or constant, a value that is not a tensor between nodes, or a node that cannot be
traced alone is traced whole by `fast_capture`, and the reason is kept in `fallbacks`.

An FFMT span's tiles are traced one of each kind: tiles whose bands run the same ops at other
offsets (`SpatialGraph.band_signature`) share one trace, spliced in at each tile's place.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memtile.capture import FunctionalTrace, MemGraph, fast_capture, trace_functional
from memtile.spatial import SpatialGraph
from memtile.tiling.ffmt import FFMTTiles

_SAME, _VIEW = "same", "view"  # how a piece's output aliases one of its inputs


@dataclass(frozen=True)
class _Piece:
    """One node's core-ATen graph. Placeholders: its constants (by name in the model, or in
    the module it calls when they start with "."), then its tensor inputs; outputs: the new values of the inputs it mutates (`mutated`, input indices),
    then the node's outputs, each fresh (None) or aliasing an input (`aliases`: (_SAME or _VIEW,
    input index))."""

    graph: fx.Graph
    constants: tuple[str, ...]
    mutated: tuple[int, ...]
    aliases: tuple[tuple[str, int] | None, ...]
    views: frozenset[int]  # inputs it takes views of


class _Tensor:
    """A tensor of the stitched graph: the ATen node holding its current value (an in-place
    node replaces it for every fx node that is this same tensor) and its storage."""

    def __init__(self, node: fx.Node, storage: int, view: bool = False):
        self.node, self.storage, self.view = node, storage, view


class StitchedGraph(MemGraph):
    """A stitched MemGraph, which can be lowered as it is: its placeholders are `module`'s
    parameters, then its buffers (each occurrence, as `_FlatRoot` names them), then the inputs."""

    def __init__(self, module: fx.GraphModule, graph: fx.Graph, user_inputs: list[str]):
        super().__init__(None, graph, user_inputs)
        self.module, self.graph = module, graph

    def exported_program(self, inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
        """The core-ATen ExportedProgram of `module` on `inputs`, made from (a copy of) this
        graph with no further trace: the ops `capture.export` gives with two whole-model traces
        (tens of seconds for a tiled model), under other node names."""
        from torch.export import graph_signature as sig
        from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
        from torch.utils import _pytree as pytree

        graph = fx.Graph()
        graph.output(graph.graph_copy(self.graph, {}))
        root = _FlatRoot(self.module)
        parameters = list(root.named_parameters(remove_duplicate=False))
        buffers = list(root.named_buffers(remove_duplicate=False))
        values = [*parameters, *buffers, *((None, x) for x in inputs)]
        holders = [n for n in graph.nodes if n.op == "placeholder"]
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:  # one fake mode for every value, as a program from one trace has
            for node in graph.nodes:
                if node.op != "placeholder":  # those get their tensor's, below
                    node.meta["val"] = pytree.tree_map_only(torch.Tensor, _refaked,
                                                            node.meta.get("val"))
        specs, state, constants = [], {}, {}
        for index, (holder, (name, tensor)) in enumerate(zip(holders, values, strict=True)):
            holder.meta["val"] = fake.from_tensor(tensor)
            argument = sig.TensorArgument(holder.name)
            if name is None:
                specs.append(sig.InputSpec(sig.InputKind.USER_INPUT, argument, None))
                continue
            if not holder.users:  # a tied weight's second name (the graph reads the first)
                graph.erase_node(holder)
                continue
            target = name.removeprefix("model.")
            if index < len(parameters):
                specs.append(sig.InputSpec(sig.InputKind.PARAMETER, argument, target))
                state[target] = tensor
                continue
            owner, _, attribute = name.rpartition(".")
            persistent = attribute not in root.get_submodule(owner)._non_persistent_buffers_set
            specs.append(sig.InputSpec(sig.InputKind.BUFFER, argument, target, persistent))
            (state if persistent else constants)[target] = tensor
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        results, out_spec = pytree.tree_flatten(output.args[0])
        output.args = (tuple(results),)
        outputs = [sig.OutputSpec(sig.OutputKind.USER_OUTPUT, sig.TensorArgument(n.name), None)
                   for n in results]
        call = ModuleCallSignature([], [], pytree.tree_flatten((tuple(inputs), {}))[1], out_spec)
        return torch.export.ExportedProgram(
            fx.GraphModule(torch.nn.Module(), graph), graph,
            sig.ExportGraphSignature(specs, outputs), state, {},
            [ModuleCallEntry("", call)], constants=constants)


class _NotPiecewise(Exception):
    """Why a graph cannot be stitched from pieces (it is traced whole instead)."""


class Stitcher:
    """`capture` for rewrites of one model: pieces are traced once and reused (see module doc)."""

    def __init__(self) -> None:
        self._pieces: dict[tuple, _Piece] = {}
        self.traced = 0  # pieces traced
        self.fallbacks: list[str] = []  # why graphs were traced whole

    def __call__(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> MemGraph:
        """The MemGraph of `gm` (shapes propagated) on `inputs`; `fast_capture`'s when it
        cannot be stitched (see the module doc), or when stitching fails unexpectedly: pieces
        only save time, the whole trace is the reference (the tests require no fallback on
        the models they stitch)."""
        try:
            return self._stitch(gm, tuple(inputs))
        except _NotPiecewise as why:
            self.fallbacks.append(str(why))
        except Exception as error:  # noqa: BLE001 - a stitching bug costs a trace, not a crash
            self.fallbacks.append(f"stitching failed ({type(error).__name__}: {error})")
        return fast_capture(gm, tuple(inputs))

    def _stitch(self, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> MemGraph:
        steps = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                 and not _is_tuple_pick(n)]
        keys = {n: _key(gm, n) for n in steps}
        missing = {keys[n]: n for n in reversed(steps) if keys[n] not in self._pieces}
        self._trace(gm, sorted(missing.values(), key=steps.index), keys)
        out = fx.Graph()
        constant: dict[int, fx.Node] = {}  # id(tensor) -> its placeholder
        for name, tensor in [*_FlatRoot(gm).named_parameters(remove_duplicate=False),
                             *_FlatRoot(gm).named_buffers(remove_duplicate=False)]:
            node = out.placeholder(name.replace(".", "_"))
            node.meta["val"] = _fake(tensor)
            constant.setdefault(id(tensor), node)
        value: dict[fx.Node, object] = {}
        storages = itertools.count()
        for node, tensor in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs,
                                strict=True):
            held = out.placeholder(node.name)
            held.meta["val"] = _fake(tensor)
            value[node] = _Tensor(held, next(storages))
        user = [value[n] for n in value]
        mutated: set[int] = set()
        viewed: set[int] = set()
        for node in gm.graph.nodes:
            if node.op == "output":
                out.output(fx.map_arg(node.args[0], lambda n: _current(value[n])))
            elif _is_tuple_pick(node):
                parent, index = node.args
                value[node] = value[parent][index]
            elif node in keys:
                args = [value[a] for a in _tensor_inputs(node)]
                piece = self._pieces[keys[node]]
                dirty = frozenset(i for i in piece.views if args[i].storage in mutated)
                if dirty:  # views of a storage written before: traced so (see the module doc)
                    if (keys[node], dirty) not in self._pieces:
                        self._trace(gm, [node], {node: (keys[node], dirty)}, [dirty])
                    piece = self._pieces[keys[node], dirty]
                _splice(gm, node, piece, out, value, constant, storages)
                mutated.update(args[i].storage for i in piece.mutated)
                viewed.update(args[i].storage for kind, i in filter(None, piece.aliases)
                              if kind == _VIEW)
        if mutated & {t.storage for t in user}:
            raise _NotPiecewise("a node mutates a model input")
        if mutated & viewed:
            raise _NotPiecewise("a storage is both mutated and viewed across nodes")
        out.eliminate_dead_code()
        return StitchedGraph(gm, out, [t.node.name for t in user])

    def _trace(self, gm: fx.GraphModule, nodes: list[fx.Node], keys: dict,
               dirty: list[frozenset[int]] | None = None) -> None:
        """Trace `nodes`, each on inputs of its own, in one `trace_functional` call (a trace
        has a fixed cost of tens of milliseconds), and keep each one's piece; FFMT tiles are
        traced one of each kind (`_trace_tiles`)."""
        whole = []
        for node in nodes:
            tiles = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(tiles, FFMTTiles) and dirty is None:
                try:
                    self._pieces[keys[node]] = _trace_tiles(gm, node, tiles)
                    self.traced += 1
                    continue
                except _NotPiecewise:  # traced as one node below
                    pass
            whole.append(node)
        if whole:
            pieces = _trace_pieces(gm, whole, dirty or [frozenset()] * len(whole))
            for node, piece in zip(whole, pieces, strict=True):
                self._pieces[keys[node]] = piece
            self.traced += len(whole)


def _splice(gm: fx.GraphModule, node: fx.Node, piece: _Piece, out: fx.Graph,
            value: dict[fx.Node, object], constant: dict[int, fx.Node], storages) -> None:
    """Copy `node`'s piece into `out`, reading the values its inputs have there; each input's
    current value must have the shape, strides and dtype the piece was traced with."""
    args = [value[a] for a in _tensor_inputs(node)]
    holders = [n for n in piece.graph.nodes if n.op == "placeholder"]
    count = len(piece.constants)
    env = {held: constant[id(_attribute(gm, f"{node.target}{name}" if name[0] == "." else name))]
           for held, name in zip(holders[:count], piece.constants, strict=True)}
    for held, arg in zip(holders[count:], args, strict=True):
        if _layout(arg.node.meta["val"]) != _layout(held.meta["val"]):
            raise _NotPiecewise(f"{node.name} reads a tensor laid out unlike its piece's input")
        env[held] = arg.node
    results: list[fx.Node] = []
    for inner in piece.graph.nodes:
        if inner.op == "output":
            results = [env[r] for r in inner.args[0]]
        elif inner.op != "placeholder":
            env[inner] = out.node_copy(inner, lambda n: env[n])
    for index, new in zip(piece.mutated, results, strict=False):
        args[index].node = new
    made = []
    for new, alias in zip(results[len(piece.mutated):], piece.aliases, strict=True):
        if alias is None:
            made.append(_Tensor(new, next(storages)))
        elif alias[0] == _SAME:
            made.append(args[alias[1]])
        else:
            made.append(_Tensor(new, args[alias[1]].storage, view=True))
    value[node] = tuple(made) if _returns_tuple(node) else made[0]


def _refaked(value: torch.Tensor) -> torch.Tensor:
    """A fake tensor of the current fake mode with `value`'s layout (stitched pieces come from
    traces of their own, each with its own mode)."""
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                               device=value.device)


def _current(value):
    return tuple(_current(v) for v in value) if isinstance(value, tuple) else value.node


class _FlatRoot(nn.Module):
    """Holds `gm` under the attribute name `fast_capture`'s wrapper uses, so that parameter
    placeholders come in the same order."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.model = gm


def _trace_pieces(gm: fx.GraphModule, nodes: list[fx.Node],
                  dirty: list[frozenset[int]]) -> list[_Piece]:
    """One trace of all `nodes`, each reading placeholders of its own, split into pieces: an
    ATen op belongs to the node whose placeholders it reads (directly or through other ops), or,
    reading only constants (a linear weight's transpose, an `empty`), to the node of its users.
    A `dirty` input (its storage was written before the node runs in the model) is first
    written with `add_(0)`, so that functionalization re-derives its views where they are read
    as it does in the whole graph; that `add` is then taken out of the trace."""
    graph = fx.Graph()
    examples, counts, arity, marked = [], [], [], []
    results: list[fx.Node] = []
    for node, written in zip(nodes, dirty, strict=True):
        env: dict[fx.Node, fx.Node] = {}
        for i, arg in enumerate(_tensor_inputs(node)):
            env[arg] = graph.placeholder(f"x{len(examples)}")
            if i in written:
                marked.append(len(examples))
                graph.call_method("add_", (env[arg], 0))
            meta = _meta(arg)
            examples.append(torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype))
        arity.append(len(env))
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                env[arg] = graph.node_copy(arg)
        result = graph.node_copy(node, lambda n, env=env: env[n])
        outs = ([graph.call_function(operator.getitem, (result, i))
                 for i in range(len(node.meta["tensor_meta"]))] if _returns_tuple(node) else [result])
        results += outs
        counts.append(len(outs))
    graph.output(tuple(results))
    try:
        traced = trace_functional(fx.GraphModule(gm, graph), examples)
    except Exception as error:  # tracing raises many types; the whole trace says why
        raise _NotPiecewise(f"{nodes[0].name}..{nodes[-1].name} cannot be traced alone: "
                            f"{type(error).__name__}") from error
    modules = [f"{n.target}." if n.op == "call_module" else None for n in nodes]
    return _split(traced, counts, arity, modules, marked)


def _trace_tiles(gm: fx.GraphModule, node: fx.Node, tiles: FFMTTiles) -> _Piece:
    """The piece of an FFMTTiles node, tracing one tile of each kind (`tile_kinds`) instead
    of every tile: a trace costs per op traced, and the interior tiles of a grid run the same
    ops (mobilenet_v2's stem in 4x4 tiles: 16 tiles, 9 kinds). One trace holds the frame
    (`assemble` with stand-ins for the tiles' results: the output buffer, each band's slice, a
    marker where each tile runs, each write) and, beside it, one tile of each kind on a band of
    its own; each tile's ops then replace its marker, reading its band's slice, as a trace of
    the whole node has them (tests/test_tiling_capture.py compares the two op by op)."""
    if "." in node.target:
        raise _NotPiecewise(f"{node.name}: tiles of a nested module")
    kinds = tiles.tile_kinds()
    distinct = list(dict.fromkeys(kinds))
    meta = _meta(_tensor_inputs(node)[0])
    x = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype)
    values = [x.new_empty((*tiles.out_shape[:-2], rows[1] - rows[0], cols[1] - cols[0]))
              for (rows, cols), _ in tiles.tiles]
    bands = [torch.empty_strided((*x.shape[:-2], r1 - r0, c1 - c0), x.stride(), dtype=x.dtype)
             for _, ((r0, r1), (c0, c1)) in (tiles.tiles[k] for k in distinct)]
    try:
        traced = trace_functional(_TilesApart(node.target, tiles, distinct),
                                  [x, *values, *bands])
    except Exception as error:  # tracing raises many types; the node's own trace says why
        raise _NotPiecewise(f"{node.name}: tiles cannot be traced apart") from error
    inputs = [1 + len(values), *[1] * len(distinct)]  # as many outputs: out and the bands
    frame, *kind_pieces = _split(traced, inputs, inputs, [f"{node.target}."] * len(inputs), [])
    return _compose(frame, dict(zip(distinct, kind_pieces, strict=True)), kinds)


class _TilesApart(nn.Module):
    """An FFMTTiles module's frame, with its tiles' results as inputs, beside one tile of each
    kind on a band of its own (`_trace_tiles`); the module keeps its name in the model, so its
    constants are named as in the model."""

    def __init__(self, name: str, tiles: FFMTTiles, kinds: list[int]):
        super().__init__()
        self.add_module(name, tiles)
        self.name, self.kinds = name, kinds

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tiles: FFMTTiles = getattr(self, self.name)
        values, bands = rest[:len(tiles.tiles)], rest[len(tiles.tiles):]
        cut: list[torch.Tensor] = []

        def stand_in(k: int, band: torch.Tensor) -> torch.Tensor:
            cut.append(band)
            return values[k].clone()  # marks where the tile runs (`_compose` puts it there)

        out = tiles.assemble(x, stand_in)
        return out, *cut, *(tiles.run_tile(k, band) for k, band in zip(self.kinds, bands,
                                                                       strict=True))


def _compose(frame: _Piece, kinds: dict[int, _Piece], tile_kinds: list[int]) -> _Piece:
    """One piece from the frame's and each kind of tile's (see `_trace_tiles`)."""
    if frame.mutated or any(p.mutated for p in kinds.values()):
        raise _NotPiecewise("a tile writes its band")
    graph = fx.Graph()
    holders = {id(p): [n for n in p.graph.nodes if n.op == "placeholder"]
               for p in (frame, *kinds.values())}
    constant: dict[str, fx.Node] = {}
    for piece in (frame, *(kinds[k] for k in tile_kinds)):  # in first use, as one trace has them
        for name, held in zip(piece.constants, holders[id(piece)], strict=False):
            if name not in constant:
                constant[name] = graph.placeholder(f"c{len(constant)}")
                constant[name].meta["val"] = held.meta["val"]
    own = holders[id(frame)][len(frame.constants):]
    env = {held: constant[name] for name, held in zip(frame.constants, holders[id(frame)],
                                                        strict=False)}
    env[own[0]] = graph.placeholder("x0")
    env[own[0]].meta["val"] = own[0].meta["val"]
    stand_ins = {held: k for k, held in enumerate(own[1:])}
    (returned,) = [n.args[0] for n in frame.graph.nodes if n.op == "output"]
    for node in frame.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        ran = [stand_ins[a] for a in node.all_input_nodes if a in stand_ins]
        if not ran:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        if node.target is not torch.ops.aten.clone.default or returned[1 + ran[0]] not in env:
            raise _NotPiecewise("a tile's result is read before its marker, or its band after")
        k = ran[0]
        env[node] = _inline(graph, kinds[tile_kinds[k]], env[returned[1 + k]],
                            holders[id(kinds[tile_kinds[k]])], constant)
    graph.output((env[returned[0]],))
    viewed = 0 in frame.views or any(p.views for p in kinds.values())
    return _Piece(graph, tuple(constant), (), frame.aliases[:1], frozenset({0} if viewed else ()))


def _inline(graph: fx.Graph, piece: _Piece, band: fx.Node, holders: list[fx.Node],
            constant: dict[str, fx.Node]) -> fx.Node:
    """Copy a tile's piece into `graph`, reading `band`; its result."""
    count = len(piece.constants)
    (held,) = holders[count:]
    if _layout(held.meta["val"]) != _layout(band.meta["val"]):
        raise _NotPiecewise("a tile's band is laid out unlike the frame's slice")
    env = {h: constant[name] for h, name in zip(holders[:count], piece.constants, strict=True)}
    env[held] = band
    result = None
    for node in piece.graph.nodes:
        if node.op == "output":
            (result,) = node.args[0]
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return env[result]


def _split(traced: FunctionalTrace, counts: list[int], arity: list[int],
           modules: list[str | None], marked: list[int]) -> list[_Piece]:
    """The pieces of a trace of isolated nodes (see `_trace_pieces`; `modules`: the prefix of
    the names of each node's module, None for a function; `marked`: inputs written first)."""
    graph = traced.graph
    if any(n.op not in ("placeholder", "call_function", "output") for n in graph.nodes):
        raise _NotPiecewise("a node's trace holds constants of its own")
    if set(traced.mutated) - set(traced.user_inputs):
        raise _NotPiecewise("a node mutates a buffer of the model")
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    names = traced.constants
    constants = dict(zip(holders[:len(names)], names, strict=True))
    user = holders[len(names):]
    for held in (user[i] for i in marked):
        mark = next(n for n in graph.nodes if n.op == "call_function" and held in n.args)
        if mark.target is not torch.ops.aten.add.Tensor:
            raise _NotPiecewise(f"a written input traced as {mark.target}")
        mark.replace_all_uses_with(held)
        graph.erase_node(mark)
    firsts = list(itertools.accumulate(arity, initial=0))[:-1]
    number_of: dict[fx.Node, int] = {held: i for i, first in enumerate(firsts)
                                     for held in user[first:first + arity[i]]}
    ops = [n for n in graph.nodes if n.op == "call_function"]
    for op in ops:  # the node whose inputs it reads
        owners = {number_of[a] for a in op.all_input_nodes if a in number_of}
        if len(owners) > 1:
            raise _NotPiecewise("an op of a trace reads two nodes' inputs")
        if owners:
            number_of[op] = owners.pop()
    for op in reversed(ops):  # constant-only ops go with their users
        if op not in number_of:
            owners = {number_of[u] for u in op.users if u in number_of}
            if len(owners) != 1:
                raise _NotPiecewise("an op of a trace reads only constants and has no one node")
            number_of[op] = owners.pop()
    (returned,) = [n.args[0] for n in graph.nodes if n.op == "output"]
    index = {held.name: i for i, held in enumerate(user)}
    updates = traced.mutated
    mutated: list[list[tuple[int, fx.Node]]] = [[] for _ in arity]
    for name, new in zip(updates, returned, strict=False):
        number = number_of[user[index[name]]]
        if new is user[index[name]]:  # only the mark wrote it
            continue
        mutated[number].append((index[name] - firsts[number], new))
    outputs = list(returned[len(updates):])
    ends = list(itertools.accumulate(counts, initial=0))
    return [_piece([op for op in ops if number_of[op] == i], user[first:first + arity[i]],
                   constants, mutated[i], outputs[ends[i]:ends[i + 1]], modules[i])
            for i, first in enumerate(firsts)]


def _piece(ops: list[fx.Node], inputs: list[fx.Node], constants: dict[fx.Node, str],
           mutated: list[tuple[int, fx.Node]], outputs: list[fx.Node], module: str | None,
           ) -> _Piece:
    """One node's ops as a graph of their own (see `_Piece`); its module's constants are named
    from the module (a piece serves every module of the same structure)."""
    graph = fx.Graph()
    used = list(dict.fromkeys(a for op in ops for a in op.all_input_nodes if a in constants))
    labels = [*(f"c{i}" for i in range(len(used))), *(f"x{i}" for i in range(len(inputs)))]
    env = {}
    for held, name in zip([*used, *inputs], labels, strict=True):
        env[held] = graph.placeholder(name)
        env[held].meta["val"] = held.meta["val"]
    for op in ops:
        env[op] = graph.node_copy(op, lambda n: env[n])
    graph.output(tuple(env[n] for n in [*(new for _, new in mutated), *outputs]))
    same = {held: i for i, held in enumerate(inputs)} | {new: i for i, new in mutated}
    rooted = {held: i for i, held in enumerate(inputs)}
    for op in ops:
        if op.args and op.args[0] in rooted and _is_view(op):
            rooted[op] = rooted[op.args[0]]
    names = tuple(constants[c][len(module) - 1:] if module and constants[c].startswith(module)
                  else constants[c] for c in used)
    return _Piece(graph, names, tuple(i for i, _ in mutated),
                  tuple(_alias(n, same) for n in outputs),
                  frozenset(rooted[op] for op in ops if op in rooted))


def _alias(node: fx.Node, same: dict[fx.Node, int]) -> tuple[str, int] | None:
    """How a piece's output aliases its inputs (`same`: a node -> the input it is): the input
    itself (or its new value), a view of it (through ops whose schema returns an alias of their
    first argument), or nothing."""
    kind = _SAME
    while node not in same:
        if not _is_view(node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node, kind = node.args[0], _VIEW
    return kind, same[node]


def _is_view(op: fx.Node) -> bool:
    """An op whose result aliases its first argument (its schema says so, or a getitem)."""
    schema = getattr(op.target, "_schema", None)
    return _is_getitem(op) or (schema is not None and bool(schema.returns)
                               and schema.returns[0].alias_info is not None)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return list(dict.fromkeys(n for n in node.all_input_nodes if n.op != "get_attr"))


def _is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def _is_tuple_pick(node: fx.Node) -> bool:
    """A getitem that picks one output of a node returning several; a tensor's own `x[...]`
    (ghostnet's `out[:, :self.out_chs]`) is a piece like any other op."""
    return (_is_getitem(node) and isinstance(node.args[0], fx.Node)
            and _returns_tuple(node.args[0]))


def _returns_tuple(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # not one TensorMetadata
        if all(hasattr(m, "shape") for m in meta):
            return True
        raise _NotPiecewise(f"{node.name} returns values that are not tensors")
    return False


def _meta(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _NotPiecewise(f"{node.name} is not a tensor")
    return meta


def _layout(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def _fake(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def _attribute(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _key(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """What decides a node's ATen ops (see the module doc)."""
    inputs = _tensor_inputs(node)
    layouts = tuple((tuple(_meta(n).shape), tuple(_meta(n).stride), _meta(n).dtype)
                    for n in inputs)
    position = {n: i for i, n in enumerate(inputs)}
    args = repr(fx.map_arg((node.args, node.kwargs),
                           lambda n: f"<{position[n]}>" if n in position else f"<{n.target}>"))
    what = (_structure(gm.get_submodule(node.target)) if node.op == "call_module"
            else node.target)
    attrs = tuple(_constant(_attribute(gm, n.target)) for n in node.all_input_nodes
                  if n.op == "get_attr")
    _returns_tuple(node)  # a node returning non-tensors is not a piece
    return node.op, what, args, layouts, attrs


def _structure(module: nn.Module) -> tuple:
    """What decides a module's ATen ops: type, configuration, tensor shapes, children, code.
    A `SpatialGraph` attribute (FFMTTiles) is an analysis of a child module, which is in the
    key; any other attribute whose value is not plain data or a function keys by identity."""
    plain = tuple(sorted((k, _constant(v)) for k, v in vars(module).items()
                         if not k.startswith("_") and not isinstance(v, SpatialGraph)))
    tensors = tuple((k, _constant(t)) for k, t in
                    [*module._parameters.items(), *module._buffers.items()] if t is not None)
    children = tuple((k, _structure(c)) for k, c in module._modules.items() if c is not None)
    if isinstance(module, fx.GraphModule):  # each instance has a class of its own; its code keys it
        return fx.GraphModule, plain, tensors, children, module.code
    return type(module), plain, tensors, children, ""


def _constant(value) -> object:
    """A hashable stand-in for a module attribute or constant that decides its ATen ops."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), tuple(value.stride()), value.dtype
    if isinstance(value, (int, float, str, bool, type(None), torch.dtype, torch.Size, slice)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_constant(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple((_constant(k), _constant(v)) for k, v in value.items())
    if callable(value) and getattr(value, "__qualname__", None):  # a function or class
        return "callable", value
    return _Identity(value)


class _Identity:
    """Equal only to itself's object: an attribute memtile cannot read keys by identity (and
    is kept alive, so that its id is not reused)."""

    def __init__(self, value: object):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)
