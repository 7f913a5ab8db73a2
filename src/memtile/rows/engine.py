"""Band-wise forward and backward of a spatial trunk: OverL and 2PS, with exact gradients.

Forward runs bands under no_grad and keeps nothing but the output (OverL) or the few boundary rows
each layer shares with the next backward band (2PS). Backward runs the backward bands again with
grad, each backpropagating its slice of the output gradient; parameter gradients are summed over
bands and returned through one custom `autograd.Function`, so DDP and any optimizer see ordinary
gradients on ordinary parameters.

- OverL: a band recomputes its halo (`SpatialGraph.regions`); bands are independent.
- 2PS: every node's rows are split into consecutive bands, each computed once. Band i computes
  node v's rows [e_v(i-1), e_v(i)) and reads the rows it shares with band i-1 from a stored
  boundary. Backward runs bands bottom-up; a boundary enters band i as a leaf, and the gradient
  it receives is carried to band i-1, where it is added to the gradient of the rows that
  produced it.
- Frozen batch norms after the convolutions of wide layers run folded into them
  (`worth_folding`, `memtile.foldnorm`); in backward, a trained one only where its result stays
  intact for its gradient (`keeps_result`).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Container, Hashable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from memtile.foldnorm import (
    FoldedConvBN,
    move_total,
    read_back_from,
    read_back_through_sum,
    reads_back,
)
from memtile.spatial import Interval, Region, Size, SpatialGraph

Rows = Interval
Env = dict[Hashable, torch.Tensor]


@dataclass
class BandRows:
    """Rows of every node in one band: `value` is what consumers read, `new` what is computed.

    `value` starts at or before `new`; the rows before `new` are a kept boundary (2PS). For the
    input node `new` is empty and `value` is the slice of the image the band reads.
    """

    value: dict[fx.Node, Rows]
    new: dict[fx.Node, Rows]


@dataclass
class Plan:
    """Rows of every node in every band, plus (2PS) the boundary each band leaves behind."""

    bands: list[BandRows]
    keep: list[dict[fx.Node, Rows]] = field(default_factory=list)  # after band i, len B-1


def _empty(rows: Rows) -> bool:
    return rows[1] <= rows[0]


def _hull(a: Rows | None, b: Rows) -> Rows:
    if a is None or _empty(a):
        return b
    return (min(a[0], b[0]), max(a[1], b[1])) if not _empty(b) else a


def overl_plan(graph: SpatialGraph, sizes: dict[fx.Node, Size], bands: list[Rows]) -> Plan:
    """Each band reads its full receptive field from the input and computes every halo."""
    out = []
    for rows in bands:
        region = (rows, (0, sizes[graph.output][1]))
        need = {v: r[0] for v, r in graph.regions(region, (), sizes).items()}
        new = {v: r for v, r in need.items() if v is not graph.input}
        out.append(BandRows(value=need, new=new))
    return Plan(out)


def two_phase_plan(graph: SpatialGraph, sizes: dict[fx.Node, Size], bands: list[Rows]) -> Plan:
    """Split every node's rows so that band i only reads rows produced by bands <= i.

    `bands` split the *input* rows; every node then computes, in band i, all the rows that the
    input rows of bands <= i determine. This balances the large early layers of a trunk, where
    activation memory is; splitting the output evenly instead would put most of every early
    layer into the first band (its receptive field).
    """
    count = len(bands)
    ends: dict[fx.Node, list[int]] = {graph.input: [hi for _, hi in bands]}
    for c in graph.order:
        avail = [min(ends[u][i] for u in graph.ops[c].inputs) for i in range(count)]
        e: list[int] = []
        for i in range(count):
            lo, hi = e[-1] if e else 0, sizes[c][0]
            while lo < hi:  # largest prefix of c whose reads lie within the available rows
                mid = (lo + hi + 1) // 2
                if _reads(graph, sizes, c, (0, mid))[1] <= avail[i]:
                    lo = mid
                else:
                    hi = mid - 1
            e.append(lo)
        ends[c] = e
    return _plan_from_ends(graph, sizes, ends)


def demand_plan(graph: SpatialGraph, sizes: dict[fx.Node, Size], bands: list[Rows]) -> Plan:
    """2PS with `bands` over the *output* rows: in band i every node computes the rows that the
    output rows of bands <= i need, and no more.

    For an encoder-decoder whose output has the input's rows (a segmentation net), the decoder
    lags the encoder by the network's receptive field. Input bands would leave all that lag
    for the last band, at full resolution (smp Unet(resnet18) at 1024²: 570 decoder rows of
    the 1024, whatever the band count); output bands give every band its share of the
    decoder, and the first band the encoder's lag instead, at its lower resolutions.
    """
    ends: dict[fx.Node, list[int]] = {v: [] for v in [graph.input, *graph.order]}
    for _, hi in bands:
        need = {graph.output: hi}
        for c in reversed(graph.order):
            rows = _reads(graph, sizes, c, (0, min(need.get(c, 0), sizes[c][0])))[1]
            for u in graph.ops[c].inputs:
                need[u] = max(need.get(u, 0), rows)
        for v, e in ends.items():
            e.append(max(min(need.get(v, 0), sizes[v][0]), e[-1] if e else 0))
    for v, e in ends.items():  # the last band completes every node
        e[-1] = sizes[v][0]
    return _plan_from_ends(graph, sizes, ends)


def _plan_from_ends(graph: SpatialGraph, sizes: dict[fx.Node, Size],
                    ends: dict[fx.Node, list[int]]) -> Plan:
    """The 2PS plan in which band i computes rows [ends[v][i-1], ends[v][i]) of each node v,
    with the boundaries each band keeps for the next."""
    nodes = [graph.input, *graph.order]
    count = len(ends[graph.input])
    new = {v: [(ends[v][i - 1] if i else 0, ends[v][i]) for i in range(count)] for v in nodes}
    # reads[c][i]: rows of c's inputs that band i reads (clipped to >= 0; hi within ends)
    reads = {c: [_reads(graph, sizes, c, new[c][i]) for i in range(count)] for c in graph.order}
    value: list[dict[fx.Node, Rows]] = [{} for _ in range(count)]
    keep: list[dict[fx.Node, Rows]] = [{} for _ in range(count - 1)]
    for v in nodes:
        # reads only move down band by band, so the first later band a consumer computes in
        # reads the lowest row any later band reads
        first_later = {c: [ends[v][-1]] * count for c in graph.consumers[v]}
        for c, lows in first_later.items():
            for i in reversed(range(count - 1)):
                nxt = i + 1
                lows[i] = reads[c][nxt][0] if not _empty(new[c][nxt]) else lows[nxt]
        for i in range(count - 1):
            lo = min([ends[v][i], *(lows[i] for lows in first_later.values())])
            keep[i][v] = (lo, ends[v][i])
        for i in range(count):
            if v is graph.input:
                hull = None
                for c in graph.consumers[v]:
                    if not _empty(new[c][i]):
                        hull = _hull(hull, (max(reads[c][i][0], 0), reads[c][i][1]))
                value[i][v] = hull or (0, 0)
            else:
                lo = keep[i - 1][v][0] if i else new[v][i][0]
                value[i][v] = (min(lo, new[v][i][0]), new[v][i][1])
    bands_rows = [BandRows(value=value[i], new={v: new[v][i] for v in graph.order})
                  for i in range(count)]
    return Plan(bands_rows, keep)


def _reads(graph: SpatialGraph, sizes: dict[fx.Node, Size], node: fx.Node, rows: Rows) -> Rows:
    """Rows of `node`'s inputs read to compute `rows` of it, clipped below at 0."""
    if _empty(rows):
        return (0, 0)
    lo, hi = graph.needs(node, (rows, (0, sizes[node][1])))[0]
    return (max(lo, 0), min(hi, sizes[graph.ops[node].inputs[0]][0]))


def _kept_key(node: fx.Node) -> tuple[str, fx.Node]:
    return ("kept", node)


@dataclass
class KeptRows:
    """Where 2PS keeps boundary rows between forward and backward: one buffer per segment.

    The boundaries a node leaves after consecutive bands overlap when the node lags behind the
    bands (deep layers), so overlapping boundaries are merged into segments and every row is
    stored once; each band's boundary is a view of its segment.
    """

    wanted: dict[fx.Node, list[tuple[int, Rows]]]  # node -> (segment, rows)
    segment_of: dict[tuple[fx.Node, int], tuple[int, int]]  # (node, band) -> (segment, lo)
    last_used_by: dict[int, list[tuple[fx.Node, int]]]  # band -> segments free after it

    @classmethod
    def of(cls, graph: SpatialGraph, plan: Plan) -> KeptRows:
        wanted, segment_of, last_used_by = {}, {}, {}
        for v in graph.order:
            segs: list[list[int]] = []  # [lo, hi, first band]
            mine: dict[int, int] = {}  # band -> segment
            for i, keep in enumerate(plan.keep):
                lo, hi = keep.get(v, (0, 0))
                if hi <= lo:
                    continue
                if segs and lo <= segs[-1][1]:
                    segs[-1][1] = max(segs[-1][1], hi)
                else:
                    segs.append([lo, hi, i])
                mine[i] = len(segs) - 1
            for k, (lo, hi, first) in enumerate(segs):
                # backward band first + 1 is the last (in backward order) to read the segment
                last_used_by.setdefault(first + 1, []).append((v, k))
            if segs:
                wanted[v] = [(k, (lo, hi)) for k, (lo, hi, _) in enumerate(segs)]
            segment_of.update({(v, i): (k, segs[k][0]) for i, k in mine.items()})
        return cls(wanted, segment_of, last_used_by)

    def bytes(self, per_row: dict[fx.Node, int]) -> int:
        return sum(per_row[v] * (hi - lo) for v, segs in self.wanted.items() for _, (lo, hi) in segs)

    def alive(self, per_row: dict[fx.Node, int], count: int) -> list[int]:
        """Bytes still stored while each of `count` backward bands runs (bottom-up, each
        segment freed after the band that reads it last)."""
        size = {(v, k): per_row[v] * (hi - lo) for v, segs in self.wanted.items()
                for k, (lo, hi) in segs}
        freed_after = [sum(size[key] for key in self.last_used_by.get(i, ())) for i in range(count)]
        return [sum(freed_after[: i + 1]) for i in range(count)]


class BandRunner:
    """Runs the nodes of one band from an environment of tensors (image slice, kept rows)."""

    def __init__(self, graph: SpatialGraph, sizes: dict[fx.Node, Size], band: BandRows) -> None:
        self.graph, self.sizes, self.band = graph, sizes, band
        self.sums: dict[fx.Node, list] = {}  # sum node -> folds reading back through it

    def region(self, node: fx.Node, rows: Rows) -> Region:
        return (rows, (0, self.sizes[node][1]))

    def run(self, nodes: list[fx.Node], env: Env, free: bool, keep: Container = (),
            out_of_place: bool = False,
            after: Callable[[fx.Node, torch.Tensor | None, torch.Tensor], None] | None = None
            ) -> None:
        """Compute `nodes` into `env`; with `free`, drop each value (not in `keep`) after its
        last use here, so that only what autograd saved stays alive.

        `after(node, new_rows_or_None, value)` sees every node as soon as it is assembled.
        """
        graph, band = self.graph, self.band
        last_use = {a: v for v in nodes for a in graph.ops[v].inputs} if free else {}
        for v in nodes:
            value, new = band.value[v], band.new[v]
            fresh = None
            if new[0] > value[0]:
                env[v] = self._join(v, env.pop(_kept_key(v)), env, out_of_place)
                if not _empty(new):
                    fresh = _rows(env[v], (new[0] - value[0], new[1] - value[0]))
            elif not _empty(new):
                env[v] = fresh = self._compute(v, env, out_of_place)
                if self.graph.is_sum(v):
                    self._read_back_through(v, env)
            if v in env and after is not None:
                after(v, fresh, env[v])
            for a in graph.ops[v].inputs:
                if last_use.get(a) is v and a not in keep:
                    env.pop(a, None)

    def _read_back_through(self, v: fx.Node, env: Env) -> None:
        """Sum `v` = a + b of a trained fold's result and another tensor: the fold reads its
        result back as v - other, so that the result can be freed (it would be held only for
        that). Only where the result's gradient comes through `v` alone: `v` is its only
        consumer and adds every row of it this band has (rows kept for the next band get
        gradients from there); and where the other term is no fold result (each would hold
        the other)."""
        band = self.band
        if not keeps_result(self.graph, v):
            return
        a, b = self.graph.ops[v].inputs
        rows = {u: _rows(env[u], _shift(band.new[v], band.value[u][0])) for u in (a, b)}
        for u, w in ((a, b), (b, a)):
            if (self.graph.consumers[u] == [v] and band.value[u] == band.new[v]
                    and reads_back(rows[u]) and not reads_back(rows[w])):
                node = read_back_through_sum(rows[u], env[v], rows[w])
                if node is not None:
                    self.sums.setdefault(v, []).append(node)

    def _compute(self, v: fx.Node, env: Env, out_of_place: bool) -> torch.Tensor:
        inputs = [(env[a], self.region(a, self.band.value[a])) for a in self.graph.ops[v].inputs]
        return self.graph.compute(v, self.region(v, self.band.new[v]), inputs, self.sizes,
                                  out_of_place)

    def _join(self, v: fx.Node, kept: torch.Tensor, env: Env, out_of_place: bool) -> torch.Tensor:
        """`v`'s kept rows followed by its new rows, in one buffer written once (by `cat`, whose
        backward only slices the gradient).

        Concatenating `v`'s result would leave autograd holding the new rows twice (saved by an
        op that saves its output, and inside the joined copy a consumer saves). So an in-place
        elementwise op (ReLU(inplace=True)) with a private input runs on the buffer instead:
        an idempotent one (ReLU, clamp) over the whole buffer, which leaves the kept rows (its
        own outputs) as they are; any other only on the new part, written into a buffer first.
        """
        new = self.band.new[v]
        if _empty(new):
            return kept
        graph = self.graph
        inputs = graph.ops[v].inputs
        if not joins_in_place(graph, v):
            return torch.cat([kept, self._compute(v, env, out_of_place)], -2)
        src = _rows(env[inputs[0]], _shift(new, self.band.value[inputs[0]][0]))
        if idempotent(graph.gm, v):
            buf = target = torch.cat([kept, src], -2)
            rows = self.band.value[v]
            copy = _rows(buf, (kept.shape[-2], buf.shape[-2]))
            read_back_from(env[inputs[0]], copy)
            for node in self.sums.pop(inputs[0], ()):
                move_total(node, copy)
        else:  # in-place on a slice: autograd copies the slices around (CopySlices)
            k, n = kept.shape[-2], new[1] - new[0]
            buf = src.new_empty(*src.shape[:-2], k + n, src.shape[-1])
            _rows(buf, (0, k)).copy_(kept)
            target, rows = _rows(buf, (k, k + n)), new
            target.copy_(src)
        del src  # the op below writes into the buffer, which is private to this band
        graph.compute(v, self.region(v, rows), [(target, self.region(v, rows))], self.sizes)
        return buf

    def run_checkpointed(self, env: Env, keep_out: set[fx.Node]) -> None:
        """Compute all nodes in about sqrt(n) segments, each recomputed during backward."""
        segments = checkpoint_segments(self.graph.order)
        for seg, later in zip(segments, read_later(self.graph, segments), strict=True):
            outs = [v for v in seg
                    if (v in later or v in keep_out) and not _empty(self.band.value[v])]
            ins = [key for key in env
                   if key in {a for v in seg for a in self.graph.ops[v].inputs}
                   or key in {_kept_key(v) for v in seg}]

            def segment(*tensors, seg=seg, ins=ins, outs=outs):
                local = dict(zip(ins, tensors, strict=True))
                self.run(seg, local, free=False, out_of_place=True)  # inputs stay intact
                return tuple(local[v] for v in outs)

            results = torch_checkpoint(segment, *[env[key] for key in ins], use_reentrant=False)
            for key in ins:
                if key not in later and key not in keep_out:
                    env.pop(key)
            env.update(zip(outs, results, strict=True))


def checkpoint_segments(order: list[fx.Node]) -> list[list[fx.Node]]:
    """About sqrt(n) consecutive segments of n nodes: what `checkpoint=True` recomputes."""
    size = max(1, math.isqrt(len(order)))
    return [order[i:i + size] for i in range(0, len(order), size)]


def read_later(graph: SpatialGraph, segments: list[list[fx.Node]]) -> list[set[fx.Node]]:
    """Per checkpoint segment, the nodes that later segments read: the values that cross out of
    it (returned by its checkpoint and kept until then)."""
    return [{a for s in segments[k + 1:] for v in s for a in graph.ops[v].inputs}
            for k in range(len(segments))]


class Engine:
    """Forward and backward of one trunk for one input size and band configuration."""

    def __init__(self, graph: SpatialGraph, in_size: Size, strategy: str, forward_bands: int,
                 backward_bands: int, checkpoint: bool, taper: float = 0.0) -> None:
        """`taper` (2PS): backward bands shrink linearly toward the bottom, the top one
        1 + taper times the bottom one. Backward runs the bottom band first, while every
        stored boundary is still held (and, when the receptive field is larger than the image,
        with the deep layers' rows), so the top bands can afford more rows."""
        self.graph, self.strategy, self.checkpoint = graph, strategy, checkpoint
        self.taper = taper if strategy == "2ps" else 0.0
        self.sizes = graph.sizes(in_size)
        # OverL and whole-network 2PS split the output rows, trunk 2PS the input rows (see the
        # plans); counts are capped
        self.max_bands = cap = max_bands(graph, in_size, strategy)
        make = {"overl": overl_plan, "2ps": two_phase_plan}[strategy]
        if strategy == "2ps" and splits_output(graph, in_size):
            make = demand_plan
        self.forward_plan = make(graph, self.sizes, _split(cap, forward_bands))
        self.backward_plan = make(graph, self.sizes, _split(cap, backward_bands, self.taper))
        self.bands = (len(self.forward_plan.bands), len(self.backward_plan.bands))  # as run
        self.kept = KeptRows.of(graph, self.backward_plan)
        self.forward_graph = graph.folded(
            worth_folding(graph, self.sizes, self.forward_plan, grad=False))
        self.backward_graph = graph.folded(
            worth_folding(graph, self.sizes, self.backward_plan, grad=True,
                          checkpoint=checkpoint))

    def narrowed(self, width: int) -> Engine:
        """This engine for inputs `width` columns wide: the same bands, plans and folded norms
        (all depend on rows only), e.g. to check it on a crop (`memtile.rows.verify`)."""
        out = copy.copy(self)
        out.sizes = self.graph.sizes((self.sizes[self.graph.input][0], width))
        return out

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Output of the trunk, and what backward needs (2PS: the backward boundaries)."""
        graph = self.graph
        out: list[torch.Tensor | None] = [None]
        stores: dict[tuple[fx.Node, int], torch.Tensor] = {}
        wanted = self.kept.wanted
        kept: Env = {}
        for i, band in enumerate(self.forward_plan.bands):
            runner = BandRunner(self.forward_graph, self.sizes, band)
            env: Env = dict(kept)
            kept = {}
            env[graph.input] = _rows(x, band.value[graph.input])

            keep = self.forward_plan.keep[i] if i < len(self.forward_plan.keep) else {}

            def after(v: fx.Node, new: torch.Tensor | None, value: torch.Tensor,
                      band: BandRows = band, keep: dict = keep, kept: Env = kept) -> None:
                if new is not None:
                    _copy_into(stores, wanted.get(v, ()), v, new, band.new[v])
                    if v is graph.output:
                        out[0] = _write_rows(out[0], new, band.new[v], self.sizes[v][0])
                rows = keep.get(v, (0, 0))
                if not _empty(rows):
                    lo = band.value[v][0]
                    kept[_kept_key(v)] = _rows(value, _shift(rows, lo)).clone()

            runner.run(graph.order, env, free=True, after=after)
            del env
        return out[0], {"stores": stores}

    # ---- backward -----------------------------------------------------------------------

    def backward(self, x: torch.Tensor, state: dict, grad_out: torch.Tensor,
                 params: list[torch.Tensor], input_grad: bool
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Gradients of the input (if asked) and of `params`, summed over backward bands."""
        graph = self.graph
        stores = state["stores"]
        grad_x = torch.zeros_like(x) if input_grad else None
        carried: dict[fx.Node, torch.Tensor] = {}
        plan = self.backward_plan
        # Gradients accumulate in place on leaf stand-ins of the parameters: one gradient buffer
        # per parameter, and the real parameters' hooks (DDP) fire once, when backward returns.
        shadows = [p.detach().requires_grad_() for p in params]
        with swapped(graph.gm, params, shadows), torch.enable_grad():
            for i in reversed(range(len(plan.bands))):
                band = plan.bands[i]
                xr = band.value[graph.input]
                x_leaf = _rows(x, xr).detach().requires_grad_(input_grad)
                env: Env = {graph.input: x_leaf}
                leaves = {}
                for v in graph.order:
                    if band.new[v][0] > band.value[v][0]:
                        seg, lo = self.kept.segment_of[(v, i - 1)]
                        rows = plan.keep[i - 1][v]
                        leaf = _rows(stores[(v, seg)], _shift(rows, lo))
                        leaf = leaf.detach().requires_grad_()
                        env[_kept_key(v)] = leaves[v] = leaf
                roots_at = {v: rows for v, rows in [(graph.output, band.new[graph.output]),
                                                    *((v, plan.keep[i][v]) for v in carried)]
                            if not _empty(rows)}
                runner = BandRunner(self.backward_graph, self.sizes, band)
                if self.checkpoint:
                    runner.run_checkpointed(env, set(roots_at))
                else:
                    runner.run(graph.order, env, free=True, keep=roots_at)
                roots, grads, added = [], [], []
                for v, rows in roots_at.items():
                    at = _shift(rows, band.value[v][0])
                    if v is graph.output:
                        roots.append(_rows(env[v], at))
                        grads.append(_rows(grad_out, rows))
                    elif self._read_in_band(band, v):
                        added.append(_add_grad_rows(env[v], at, carried.pop(v)))
                    else:
                        roots.append(_rows(env[v], at))
                        grads.append(carried.pop(v))
                env.clear()  # autograd frees each saved tensor as soon as its backward ran
                wrt = [*shadows, *leaves.values(), *([x_leaf] if input_grad else [])]
                if roots:
                    torch.autograd.backward(roots, grads, inputs=wrt)
                if not all(done[0] for done in added):
                    raise RuntimeError(f"2PS band {i}: a carried boundary gradient was not "
                                       "added (no gradient reached its rows)")
                del roots, grads, added
                carried.update({v: leaf.grad for v, leaf in leaves.items()
                                if leaf.grad is not None})
                if input_grad and x_leaf.grad is not None:
                    _rows(grad_x, xr).add_(x_leaf.grad)
                for key in self.kept.last_used_by.get(i, ()):
                    del stores[key]
        return grad_x, [s.grad for s in shadows]


    def _read_in_band(self, band: BandRows, v: fx.Node) -> bool:
        """Whether a consumer of `v` computes rows in `band`, so that a gradient reaches `v`."""
        return any(not _empty(band.new[c]) for c in self.graph.consumers[v])


def _add_grad_rows(t: torch.Tensor, rows: Rows, grad: torch.Tensor) -> list[bool]:
    """Add `grad` to the gradient of `rows` of `t` when backward reaches `t`.

    A carried boundary gradient given as a root (`t.narrow(...)` with `grad`) would make
    autograd expand it at once to a zero-filled gradient of all of `t` and hold that until
    `t`'s producer runs, for every carried node of the band together (vgg16 2x512² at 16
    bands: 46 MiB). Added by a hook, it costs one gradient of `t`, when `t`'s turn comes.
    Returns a flag, true once the hook ran.
    """
    done, box = [False], [grad]

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()  # the incoming gradient may be shared (the two inputs of an add)
        _rows(g, rows).add_(box.pop())
        done[0] = True
        return g

    t.register_hook(hook)
    return done


@contextmanager
def swapped(root: nn.Module, params: list[torch.Tensor], stand_ins: list[torch.Tensor]):
    """Temporarily make every module that owns one of `params` use its stand-in instead."""
    by_id = {id(p): s for p, s in zip(params, stand_ins, strict=True)}
    swaps = [(m, name, p) for m in root.modules() for name, p in m._parameters.items()
             if p is not None and id(p) in by_id]
    for m, name, p in swaps:
        m._parameters[name] = by_id[id(p)]
    try:
        yield
    finally:
        for m, name, p in swaps:
            m._parameters[name] = p


def worth_folding(graph: SpatialGraph, sizes: dict[fx.Node, Size], plan: Plan,
                  grad: bool, checkpoint: bool = False) -> set[fx.Node]:
    """Convolutions whose batch norm is cheaper folded in (`FoldedConvBN`) in a plan's bands.

    Folding rescales the weight in every band (and backward goes through that); the norm it
    saves costs a pass over the band's output and its gradient. So fold where the weight is no
    larger than one image's output rows in an average band: the early, wide layers, where
    activations (and the norms' time) are. With `grad` (backward), a trained norm reads its
    normalized output back from the result, so only where nothing but a ReLU or clamp writes
    into it (`keeps_result`), and not with `checkpoint`: a checkpoint recomputes what backward
    saves, not what a fold holds to read back (measured: OverL 16/16 checkpointed on resnet50
    2x512², 634 MiB per trunk step against 336 MiB).
    """
    out = set()
    for conv, bn in graph.conv_bn_pairs().items():
        fold = FoldedConvBN(graph.ops[conv].module, graph.ops[bn].module)
        if grad and fold.trained() and (checkpoint or not keeps_result(graph, bn)):
            continue
        rows = [hi - lo for band in plan.bands for lo, hi in [band.new[conv]] if hi > lo]
        weight = fold.conv.weight
        if rows and weight.numel() <= weight.shape[0] * sizes[conv][1] * sum(rows) / len(rows):
            out.add(conv)
    return out


def keeps_result(graph: SpatialGraph, node: fx.Node) -> bool:
    """Whether `node`'s result is left as computed wherever a gradient flows back into it: no
    consumer writes into it (an in-place op writes into its first input), except a sole ReLU
    or clamp (which passes no gradient where it changed a value) whose result is kept too.
    Consumers that may return `node` itself (identity, eval dropout, contiguous) are looked
    through: mobilenetv3's in-place activation after an identity wrote into a fold's result."""
    consumers = graph.consumers[node]
    if len(consumers) == 1 and idempotent(graph.gm, consumers[0]):
        return keeps_result(graph, consumers[0])  # its result is the same storage
    for c in consumers:
        if graph.may_alias(c):  # hands `node`'s storage on: what writes into c writes into it
            if not keeps_result(graph, c):
                return False
        elif in_place(graph.gm, c) and graph.ops[c].inputs[0] is node:
            return False
    return True


def max_bands(graph: SpatialGraph, in_size: Size, strategy: str) -> int:
    """Most bands a strategy can use: output rows (OverL, whole-network 2PS) or input rows
    (trunk 2PS)."""
    if strategy == "2ps" and not splits_output(graph, in_size):
        return in_size[0]
    return graph.output_size(in_size)[0]


def splits_output(graph: SpatialGraph, in_size: Size) -> bool:
    """Whether 2PS bands split the output rows (`demand_plan`): for an encoder-decoder, whose
    rows go down and come back to the input's (a segmentation net's per-pixel output), as its
    decoder lags its encoder. A trunk's few output rows would put most of every early layer in
    its first band; a stack that keeps the input's rows throughout has no lag to place."""
    sizes = graph.sizes(in_size)
    return (sizes[graph.output][0] >= in_size[0]
            and min(size[0] for size in sizes.values()) < in_size[0])


def _split(n: int, parts: int, taper: float = 0.0) -> list[Rows]:
    """`n` rows in `parts` bands, sizes falling linearly from 1 + taper to 1 (top to bottom)."""
    parts = max(1, min(parts, n))
    weights = [1 + taper * (parts - 1 - i) / max(parts - 1, 1) for i in range(parts)]
    total, bounds = sum(weights), [0]
    for i in range(1, parts + 1):
        at = round(n * sum(weights[:i]) / total)
        bounds.append(min(max(at, bounds[-1] + 1), n - (parts - i)))
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that writes into its input (ReLU(inplace=True), +=, relu_) owns no new storage."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in (operator.iadd, operator.imul) or node.kwargs.get("inplace") is True


_IDEMPOTENT_MODULES = (nn.ReLU, nn.Hardtanh)  # ReLU6 is a Hardtanh
_IDEMPOTENT_FUNCTIONS = {torch.relu_, F.relu, F.relu6, F.hardtanh}
_IDEMPOTENT_METHODS = {"relu_", "clamp_"}


def idempotent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise op f with f(f(x)) = f(x) and a gradient mask that depends on f(x) only
    (ReLU, clamp), so running it again over its own outputs changes neither values nor
    gradients."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _IDEMPOTENT_MODULES)
    if node.op == "call_method":
        return node.target in _IDEMPOTENT_METHODS
    return node.target in _IDEMPOTENT_FUNCTIONS


def joins_in_place(graph: SpatialGraph, v: fx.Node) -> bool:
    """Whether 2PS can run `v` in place on the buffer that joins its kept and new rows: an
    in-place op with one input that nothing else reads (so no one sees it left unmodified)."""
    inputs = graph.ops[v].inputs
    return len(inputs) == 1 and graph.consumers[inputs[0]] == [v] and in_place(graph.gm, v)


def _shift(rows: Rows, origin: int) -> Rows:
    return (rows[0] - origin, rows[1] - origin)


def _rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t.narrow(-2, rows[0], rows[1] - rows[0])


def _write_rows(out: torch.Tensor | None, t: torch.Tensor, rows: Rows, height: int) -> torch.Tensor:
    if out is None:
        out = t.new_empty(*t.shape[:-2], height, t.shape[-1])
    _rows(out, rows).copy_(t)
    return out


def _copy_into(stores: dict, wanted, v: fx.Node, t: torch.Tensor, rows: Rows) -> None:
    """Copy the rows of `t` (covering `rows`) that fall inside each kept segment of `v`."""
    for i, (lo, hi) in wanted:
        a, b = max(lo, rows[0]), min(hi, rows[1])
        if b <= a:
            continue
        if (v, i) not in stores:
            stores[(v, i)] = t.new_empty(*t.shape[:-2], hi - lo, t.shape[-1])
        _rows(stores[(v, i)], (a - lo, b - lo)).copy_(_rows(t, (a - rows[0], b - rows[0])))


class RowFunction(torch.autograd.Function):
    """Attaches a band-wise computed output to autograd; backward runs the backward bands."""

    @staticmethod
    def forward(ctx, engine: Engine, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out, state = engine.forward(x)
        ctx.engine, ctx.state, ctx.params = engine, state, params
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x, grad_params = ctx.engine.backward(x, ctx.state, grad_out, list(ctx.params),
                                                  ctx.needs_input_grad[1])
        ctx.state = None
        return (None, grad_x, *grad_params)
