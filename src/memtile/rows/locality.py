"""Which output rows a crop of the input computes exactly, for a whole encoder-decoder.

Whole-network bands (`memtile.rows.whole`) run the unchanged model on a horizontal crop of
the image and keep only the output rows that the crop computes exactly as the whole image
would. Near a crop edge that is not an image edge, a convolution reads zero padding where the
image has data, and the error spreads by every later layer's reach; skips, `cat`, upsampling
and transposed convolutions carry it on. So this module propagates, node by node, the interval
of full-image rows that a crop computes exactly (`Locality.exact_rows`): a row is exact when
every row it reads lies in the image's padding or in its input's exact rows. A crop must start
on a multiple of the net's total stride (`alignment`) so that every strided and upsampled grid
of the crop lies on the image's grid.

Only ops whose reach is known are accepted: those of `memtile.spatial.classify` (convolutions,
pools, frozen norms, elementwise ops, channel cat), nearest and bilinear (align_corners=False)
upsampling by a whole factor, and transposed convolutions. Anything else (global pooling,
attention, a norm over H x W, training-mode batch norm) ends the analysis with `NotLocal`,
whose `stopped_at` names the node, its op and why.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from torch import fx, nn

from memtile import ops
from memtile.errors import InputShapeError, UnsupportedOpError
from memtile.rows.trunk import kind_of_stop, op_name
from memtile.spatial import IDENTITY, Interval, Size, Transposed, Window, classify
from memtile.trace import trace

_EMPTY = (0, 0)


class NotLocal(UnsupportedOpError):
    """The model is not spatially local up to its output; `stopped_at` says where and why."""

    def __init__(self, stopped_at: dict[str, str]) -> None:
        super().__init__(f"whole-network bands stop at {stopped_at['node']} "
                         f"({stopped_at['op']}): {stopped_at['reason']}")
        self.stopped_at = stopped_at


@dataclass(frozen=True)
class _Step:
    """How one node maps its inputs' rows and columns to its own.

    kind: "input", "window" (conv/pool: `axes` are Windows), "transposed" (`axes` are
    Transposed), "resample" (upsampling by a whole factor: `size_of` gives the output size, or
    `scale` the factor), "pointwise" (elementwise, cat: inputs of one size).
    """

    kind: str
    inputs: tuple[fx.Node, ...] = ()
    axes: tuple[Window | Transposed, ...] = (IDENTITY, IDENTITY)
    bilinear: bool = False
    size_of: fx.Node | None = None
    scale: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Rows:
    """A crop's rows of one node, in full-image coordinates: where the crop's tensor lies
    (`located`) and which of those rows equal the whole image's (`exact`)."""

    located: Interval
    exact: Interval


class Locality:
    """The traced model as a spatially local graph from its image input to its one output."""

    def __init__(self, model: nn.Module, example_inputs: tuple | None = None) -> None:
        """`example_inputs`: trace at their shapes (`memtile.trace`), for models whose forward
        checks its input's shape."""
        self.gm = trace(model, example_inputs)
        self.steps: dict[fx.Node, _Step] = {}
        self.shapes: dict[fx.Node, fx.Node] = {}  # x.shape (or an item of it) -> x
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.output = self._output(node)
                break
            if node.op == "get_attr":
                continue
            try:
                step = self._classify(node)
            except UnsupportedOpError as exc:
                raise NotLocal({"node": node.name, "op": op_name(self.gm, node),
                                "reason": f"{kind_of_stop(self.gm, node)}{exc}"}) from exc
            if step is not None:
                self.steps[node] = step
        self.input = next(iter(self.steps))
        self.order = list(self.steps)[1:]
        self.ratios = self._ratios()
        self.alignment = tuple(math.lcm(*(r[axis].denominator for r in self.ratios.values()))
                               for axis in range(2))

    def _output(self, node: fx.Node) -> fx.Node:
        out = node.args[0]
        if not isinstance(out, fx.Node) or out not in self.steps:
            raise NotLocal({"node": node.name, "op": "output", "reason": "the model must return "
                            "one per-pixel tensor (a dict, tuple or shape is not one)"})
        return out

    def _classify(self, node: fx.Node) -> _Step | None:
        """The node's step, None for a shape read (kept in `shapes`) or a value computed from
        parameters, or UnsupportedOpError."""
        if node.op == "placeholder":
            if self.steps:
                raise UnsupportedOpError("whole-network bands take models with one image input")
            return _Step("input")
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            self.shapes[node] = node.args[0]
            return None
        if (node.op == "call_function" and node.target is operator.getitem
                and node.args[0] in self.shapes):
            self.shapes[node] = self.shapes[node.args[0]]
            return None
        if ops.kind(self.gm, node) == ops.UPSAMPLE:
            return self._upsample(node, ops.upsample_arguments(self.gm, node))
        op = classify(self.gm, node, self.steps, frozen_bn=False)
        if op.kind == "constant":  # computed from parameters: no rows of its own
            return None
        kind = "pointwise"
        if op.kind == "local":
            kind = "transposed" if isinstance(op.windows[0], Transposed) else "window"
        return _Step(kind, tuple(op.inputs), op.windows)

    def _upsample(self, node: fx.Node, arguments: dict) -> _Step:
        """An UPSAMPLE node (`ops.upsample_arguments`) as a resampling step."""
        mode, align_corners = arguments["mode"], arguments["align_corners"]
        size, scale = arguments["size"], arguments["scale_factor"]
        where = f"{ops.describe(self.gm, node)}, mode={mode!r}"
        if mode not in ("nearest", "nearest-exact", "bilinear") or arguments["antialias"]:
            raise UnsupportedOpError(f"{where}: only nearest and bilinear upsampling have a "
                                     "known reach")
        if mode == "bilinear" and align_corners:
            raise UnsupportedOpError(f"{where}: align_corners=True samples at positions that "
                                     "depend on the whole image's size")
        inputs = (arguments["input"],)
        if inputs[0] not in self.steps:
            raise UnsupportedOpError(f"{where}: its input is not an image tensor")
        bilinear = mode == "bilinear"
        if size is not None:
            sources = {self.shapes.get(s) for s in (size if isinstance(size, tuple | list)
                                                    else [size])}
            if len(sources) != 1 or None in sources:
                raise UnsupportedOpError(f"{where}: its size is not another image tensor's "
                                         "shape, so its factor is unknown")
            return _Step("resample", inputs, bilinear=bilinear, size_of=sources.pop())
        factors = scale if isinstance(scale, tuple | list) else (scale, scale)
        if any(float(f) != int(f) or f < 1 for f in factors):
            raise UnsupportedOpError(f"{where}: scale factor {scale} is not a whole number")
        return _Step("resample", inputs, bilinear=bilinear,
                     scale=tuple(int(f) for f in factors))

    def _ratios(self) -> dict[fx.Node, tuple[Fraction, Fraction]]:
        """Rows and columns of every node per input row and column: the net's grid."""
        ratios = {self.input: (Fraction(1), Fraction(1))}
        for node in self.order:
            step = self.steps[node]
            r = ratios[step.inputs[0]]
            if step.kind == "window":
                ratios[node] = tuple(q / w.stride for q, w in zip(r, step.axes, strict=True))
            elif step.kind == "transposed":
                ratios[node] = tuple(q * a.stride for q, a in zip(r, step.axes, strict=True))
            elif step.kind == "resample":
                ratios[node] = (ratios[step.size_of] if step.size_of is not None
                                else tuple(q * f for q, f in zip(r, step.scale, strict=True)))
                if any((a / b).denominator != 1 for a, b in zip(ratios[node], r, strict=True)):
                    raise NotLocal({"node": node.name, "op": "interpolate", "reason":
                                    "upsampling by a factor that is not a whole number"})
            else:
                ratios[node] = r
        return ratios

    # ---- sizes and exact rows ---------------------------------------------------------------

    def sizes(self, in_size: Size) -> dict[fx.Node, Size]:
        """Spatial size of every node for an input of `in_size`; InputShapeError where the
        model would not run or its grid would not be the net's (see `alignment`)."""
        sizes = {self.input: tuple(in_size)}
        for node in self.order:
            step = self.steps[node]
            first = sizes[step.inputs[0]]
            if step.kind == "window" or step.kind == "transposed":
                sizes[node] = tuple(a.out_size(n) for a, n in zip(step.axes, first, strict=True))
            elif step.kind == "resample":
                sizes[node] = (sizes[step.size_of] if step.size_of is not None
                               else tuple(n * f for n, f in zip(first, step.scale, strict=True)))
                if any(m % n for m, n in zip(sizes[node], first, strict=True)):
                    raise InputShapeError(f"{node.name}: upsampling {first} to {sizes[node]} is "
                                          "not by a whole factor at this input size")
            else:
                for arg in step.inputs[1:]:
                    if sizes[arg] != first:
                        raise InputShapeError(f"{node.name}: inputs of sizes {first} and "
                                              f"{sizes[arg]}")
                sizes[node] = first
        return sizes

    def exact_rows(self, height: int, crop: Interval, full: dict[fx.Node, Size] | None = None,
                   ) -> Rows:
        """The output rows that the model run on input rows `crop` of an image `height` rows
        high computes exactly as on the whole image (all columns in both)."""
        width = self.alignment[1]  # columns play no part; any valid width will do
        full = full or self.sizes((height, width))
        sizes = self.sizes((crop[1] - crop[0], width))
        rows = {self.input: Rows(crop, crop)}
        for node in self.order:
            rows[node] = self._rows(node, rows, sizes, full)
        return rows[self.output]

    def _rows(self, node: fx.Node, rows: dict[fx.Node, Rows], sizes: dict[fx.Node, Size],
              full: dict[fx.Node, Size]) -> Rows:
        step = self.steps[node]
        inputs = [rows[a] for a in step.inputs]
        start = inputs[0].located[0]
        if step.kind == "pointwise":
            if any(r.located != inputs[0].located for r in inputs):
                return Rows(inputs[0].located, _EMPTY)
            lo = max(r.exact[0] for r in inputs)
            hi = min(r.exact[1] for r in inputs)
            return Rows(inputs[0].located, (lo, max(lo, hi)))
        if step.kind == "window":
            stride = step.axes[0].stride
            if start % stride:
                return Rows((start // stride, start // stride), _EMPTY)
            begin = start // stride
        elif step.kind == "transposed":
            begin = start * step.axes[0].stride
        else:
            factor = full[node][0] // full[step.inputs[0]][0]
            if sizes[node][0] != factor * sizes[step.inputs[0]][0]:
                return Rows((start * factor, start * factor), _EMPTY)
            begin = start * factor
        located = (begin, begin + sizes[node][0])
        exact = _exact(self._reads(node, full), located, inputs[0].exact,
                       full[step.inputs[0]][0], full[node][0])
        return Rows(located, exact)

    def _reads(self, node: fx.Node, full: dict[fx.Node, Size]) -> Callable[[int], Interval]:
        """Unclipped rows of the input that output row o reads, as a function of o."""
        step = self.steps[node]
        if step.kind in ("window", "transposed"):
            axis = step.axes[0]
            return lambda o: axis.needs((o, o + 1))
        factor = full[node][0] // full[step.inputs[0]][0]
        if step.bilinear:  # source position (o + 1/2) / f - 1/2, and the row below it
            return lambda o: (math.floor((o + 0.5) / factor - 0.5),
                              math.floor((o + 0.5) / factor - 0.5) + 2)
        return lambda o: (o // factor, o // factor + 1)


def _exact(reads: Callable[[int], Interval], located: Interval, exact_in: Interval, n_in: int, n_out: int) -> Interval:
    """Rows o of `located` (within the image's `n_out`) whose reads, clipped to the image's
    `n_in` rows, lie within `exact_in`: both ends found by bisection (reads move down with o)."""
    lo, hi = max(located[0], 0), min(located[1], n_out)
    if hi <= lo or exact_in[1] <= exact_in[0]:
        return _EMPTY

    def top_ok(o: int) -> bool:
        return max(reads(o)[0], 0) >= exact_in[0]

    def bottom_ok(o: int) -> bool:
        return min(reads(o)[1], n_in) <= exact_in[1]

    first = _bisect(lo, hi, top_ok)  # first row whose reads start inside
    last = _bisect(lo, hi, lambda o: not bottom_ok(o))  # first row whose reads end outside
    return (first, max(first, last))


def _bisect(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """First o in [lo, hi) with ok(o) (ok is monotone: false then true); hi if none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class BandCrop:
    """One band: output rows [a, b) come exactly from the model run on input rows `crop`."""

    rows: Interval
    crop: Interval


def plan_bands(locality: Locality, in_size: Size, count: int) -> list[BandCrop]:
    """Split the output rows into `count` bands (edges on the output's share of the net's
    grid where the rows allow) and give each the smallest aligned crop that computes it
    exactly: its top edge moved up, then its bottom edge down, one grid step at a time."""
    height, step = in_size[0], locality.alignment[0]
    full = locality.sizes(in_size)
    out_rows = full[locality.output][0]
    ratio = locality.ratios[locality.output][0]
    grid = max(1, int(step * ratio))
    edges = sorted({min(out_rows, round(out_rows * i / count / grid) * grid)
                    for i in range(count)} | {out_rows})
    edges = [0, *(e for e in edges if e > 0)]
    bands = []
    for a, b in itertools.pairwise(edges):
        start = min(math.floor(a / ratio) // step * step, height)
        while start > 0 and _exact_over(locality, height, (start, height), full)[0] > a:
            start = max(0, start - step)
        end = min(-(-math.ceil(b / ratio) // step) * step, height)
        while end < height and _exact_over(locality, height, (start, end), full)[1] < b:
            end = min(height, end + step)
        bands.append(BandCrop((a, b), (start, end)))
    return bands


def _exact_over(locality: Locality, height: int, crop: Interval,
                full: dict[fx.Node, Size]) -> Interval:
    """Exact output rows of `crop`, as an interval that covers nothing when there are none
    (or the crop is too small for the model)."""
    try:
        lo, hi = locality.exact_rows(height, crop, full).exact
    except InputShapeError:
        lo = hi = 0
    return (lo, hi) if hi > lo else (math.inf, -math.inf)
