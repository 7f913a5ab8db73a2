"""Whole-network row bands (OverL): an encoder-decoder trained band by band with a per-pixel loss.

When a model is spatially local from its image input to its per-pixel output (convolutions,
pools, frozen norms, skips, `cat`, upsampling, transposed convolutions: `memtile.rows.locality`),
output rows [a, b) come exactly from the model run on a crop of the input rows around them. So
a training step runs, band after band, the unchanged model on its crop, takes the output's
rows [a, b) and the target's, and backpropagates the band's loss SUM at once: only one band's
activations are alive at a time, every skip included. Parameter gradients add up over bands;
the mean loss is the sum over bands divided by the target's element count, as the ordinary
mean is. Crops start on the net's grid (its total stride) and reach as far as the exact-rows
analysis says, so an inner band edge never sees zero padding where the image has data.

OverL recomputes each band's halo: smp Unet(resnet18) reaches about 290 input rows each way, so
its crops are most of the image below 1000 rows. 2PS (the default where `SpatialGraph` takes the
model: convolutions, pools, frozen norms, elementwise ops, skips, `cat`, nearest upsampling)
computes every row of every node once, in output bands (`memtile.rows.engine.demand_plan`),
keeping the rows that later bands read: the per-pixel output is whole, the loss is the ordinary
mean over it, and backward runs the bands bottom-up (`RowFunction`). A skip from the stem is
recomputed from the image at the decoder's pace where that lowers the estimated peak
(`memtile.rows.recompute`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtile.errors import InputShapeError, MemtileError, UnsupportedOpError
from memtile.freeze import freeze
from memtile.rows.budget import least_bytes_bands
from memtile.rows.engine import Engine, RowFunction, swapped
from memtile.rows.locality import BandCrop, Locality, NotLocal, plan_bands
from memtile.rows.recompute import recompute_stem
from memtile.rows.verify import Check, run_check, worst_error
from memtile.spatial import SpatialGraph
from memtile.tiling.rewrite import propagate_shapes
from memtile.trace import trace

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "ce": functools.partial(F.cross_entropy, reduction="sum"),
    "bce": functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"),
    "mse": functools.partial(F.mse_loss, reduction="sum"),
}
STRATEGIES = ("2ps", "overl")
OVERL_BANDS = 4  # OverL's default band count


def loss_function(loss: str | LossFn) -> LossFn:
    """A per-pixel loss that sums over its band: one of LOSSES by name, or the callable."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise MemtileError(f"loss={loss!r}: choose one of {', '.join(LOSSES)} or pass a "
                           "callable(output, target) that returns the sum over its pixels")
    return LOSSES[loss]


class WholeBands(nn.Module):
    """`WholeBands(model, loss="ce")(x, target)` is the mean per-pixel loss of `model(x)`
    against `target`, computed and backpropagated in row bands.

    `loss`: "ce" (target: class indices N x H x W), "bce" (logits and targets of the output's
    shape), "mse", or a callable(output_rows, target_rows) returning the SUM over them; the
    result is that sum over the output divided by `target.numel()`. `strategy`: "2ps" or
    "overl" (module doc); None picks 2PS where `SpatialGraph` takes the model, else OverL, and
    `strategy_note` says why. `rows`: the band count (default: OVERL_BANDS, or for 2PS the
    count of least estimated step peak, `memtile.rows.budget.least_bytes_bands`; where that
    estimate is over 2% lower with the stem recomputed for the decoder instead of kept,
    `memtile.rows.recompute`, that, and `recomputed` names the stem's nodes). Gradients
    reach `.backward()` as ordinary ones (OverL computes them band by band inside this call),
    so DDP and any optimizer see ordinary gradients. BatchNorm layers are frozen
    (`memtile.freeze`, `frozen_layers`); the model must be spatially local to its output, else
    `NotLocal` (an UnsupportedOpError) gives `stopped_at`. With `verify` (the default) every
    new input size is checked once against ordinary autograd on a few columns with the same
    bands (`check_bands`, `check_engine`); `checks` holds the outcomes.
    """

    def __init__(self, model: nn.Module, loss: str | LossFn, rows: int | None = None,
                 bn: str = "frozen", verify: bool = True, strategy: str | None = None) -> None:
        super().__init__()
        if rows is not None and (not isinstance(rows, int) or rows < 1):
            raise MemtileError(f"rows={rows!r}: give a positive number of bands")
        if bn not in ("frozen", "error"):
            raise MemtileError(f"bn={bn!r}: choose 'error' or 'frozen'")
        if strategy is not None and strategy not in STRATEGIES:
            raise MemtileError(f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.loss = loss_function(loss)
        self.frozen_layers = freeze(model) if bn == "frozen" else []
        self.model, self.rows, self.verify = model, rows, verify
        self.locality: Locality | None = None
        self._shaped_at: tuple[int, int] | None = None  # the input size `locality` is traced at
        try:
            self.locality = Locality(model)
        except NotLocal:
            raise
        except UnsupportedOpError:  # fx traces it only at a shape (smp's input checks)
            pass  # traced at each input's shape (`_size`)
        self.strategy, self.strategy_note = strategy, None
        self.checks: dict[tuple[int, int], Check] = {}
        self._plans: dict[tuple[int, int], list[BandCrop]] = {}
        self._engines: dict[tuple[int, int], Engine] = {}
        self.recomputed: dict[tuple[int, int], list[str]] = {}  # stem copied for 2PS, per size

    def plan(self, x: torch.Tensor, target: torch.Tensor) -> list[BandCrop]:
        """The OverL bands for `x`'s size (planned and, with `verify`, checked on first use)."""
        size = self._size(x, target)
        if size not in self._plans:
            plan = plan_bands(self.locality, size, self.rows or OVERL_BANDS)
            if self.verify:
                self.checks[size] = check_bands(self, plan, x, target)
            self._plans[size] = plan
        return self._plans[size]

    def engine(self, x: torch.Tensor, target: torch.Tensor) -> Engine:
        """The 2PS engine for `x`'s size (built and, with `verify`, checked on first use)."""
        size = self._size(x, target)
        if size not in self._engines:
            graph, bands, self.recomputed[size] = self._least_bytes_graph(x)
            engine = Engine(graph, size, "2ps", bands, bands, checkpoint=False)
            if self.verify:
                self.checks[size] = check_engine(self, engine, x, target)
            self._engines[size] = engine
        return self._engines[size]

    def _least_bytes_graph(self, x: torch.Tensor) -> tuple[SpatialGraph, int, list[str]]:
        """The 2PS graph and band count of least estimated step peak, and the stem's nodes where
        that graph recomputes the stem for its later readers (`memtile.rows.recompute`): taken
        only where its estimate is more than 2% lower (the copy costs a pass of the stem)."""
        gm = propagate_shapes(trace(self.model, (x,)), (x,))
        params = [p for p in self.model.parameters() if p.requires_grad]
        graph = SpatialGraph(gm, frozen_bn=bool(self.frozen_layers))
        bands, least = least_bytes_bands(graph, x, params, self.rows)
        found = graph, bands, []
        if (copied := recompute_stem(gm)) is not None:
            other = SpatialGraph(copied[0], frozen_bn=bool(self.frozen_layers))
            other_bands, estimate = least_bytes_bands(other, x, params, self.rows)
            if estimate < 0.98 * least:
                found = other, other_bands, copied[1]
        return found

    def chosen_strategy(self, x: torch.Tensor, target: torch.Tensor) -> str:
        """`strategy`, or with None the one picked for `x`'s size (`strategy_note`: why)."""
        if self.strategy is not None:
            return self.strategy
        size = self._size(x, target)
        if size in self._plans:
            return "overl"
        try:
            self.engine(x, target)
        except UnsupportedOpError as why:
            self.strategy_note = f"OverL: 2PS does not take this model ({why})"
            self.plan(x, target)
            return "overl"
        return "2ps"

    def _size(self, x: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 4:
            raise InputShapeError(f"whole-network bands take NCHW images, got {tuple(x.shape)}")
        if x.requires_grad:
            raise MemtileError("whole-network bands compute no input gradient; pass an input "
                               "that does not require grad")
        size = tuple(x.shape[-2:])
        if self.locality is None or self._shaped_at not in (None, size):
            self.locality, self._shaped_at = Locality(self.model, (x[:1],)), size
        out = self.locality.sizes(size)[self.locality.output]
        if tuple(target.shape[-2:]) != out or target.shape[0] != x.shape[0]:
            raise InputShapeError(f"target of shape {tuple(target.shape)} for an output of "
                                  f"{x.shape[0]} images of {out[0]}x{out[1]} pixels")
        return size

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad = torch.is_grad_enabled() and bool(params)
        if self.chosen_strategy(x, target) == "2ps":
            engine = self.engine(x, target)
            if not grad:
                with torch.no_grad():
                    return self.loss(engine.forward(x)[0], target) / target.numel()
            return self.loss(RowFunction.apply(engine, x, *params), target) / target.numel()
        plan = self.plan(x, target)
        if not grad:
            with torch.no_grad():
                return run_bands(self, plan, x, target, [])
        return BandLoss.apply(self, plan, x, target, *params)


def run_bands(module: WholeBands, plan: list[BandCrop], x: torch.Tensor, target: torch.Tensor,
              params: list[torch.Tensor]) -> torch.Tensor:
    """Mean loss over all bands; with `params`, each band's loss is backpropagated at once
    into their `.grad` (stand-ins of the real parameters: see `BandLoss`)."""
    ratio = module.locality.ratios[module.locality.output][0]
    total = x.new_zeros((), dtype=torch.float64)
    for band in plan:
        (a, b), (start, end) = band.rows, band.crop
        out = module.model(x.narrow(-2, start, end - start))
        first = int(start * ratio)  # the crop's output starts at this row of the image's
        part = module.loss(out.narrow(-2, a - first, b - a), target.narrow(-2, a, b - a))
        if params:
            torch.autograd.backward(part, inputs=params)
        total += part.detach().double()
        del out, part
    return (total / target.numel()).to(x.dtype)


class BandLoss(torch.autograd.Function):
    """The mean band loss, its parameter gradients computed in forward (band by band, while
    each band's activations are alive) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, module: WholeBands, plan: list[BandCrop], x: torch.Tensor,
                target: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # gradients accumulate in place on leaf stand-ins: one buffer per parameter, and the
        # real parameters' hooks (DDP) fire once, when backward returns
        shadows = [p.detach().requires_grad_() for p in params]
        with swapped(module.model, list(params), shadows), torch.enable_grad():
            loss = run_bands(module, plan, x, target, shadows)
        ctx.grads = [s.grad for s in shadows]
        ctx.count = target.numel()
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = grad / ctx.count
        grads = [None if g is None else g.mul_(scale) for g in ctx.grads]
        ctx.grads = None
        return (None, None, None, None, *grads)


def check_bands(module: WholeBands, plan: list[BandCrop], x: torch.Tensor,
                target: torch.Tensor) -> Check:
    """The wrap-time check (`memtile.rows.verify`) of the OverL `plan`: banded loss and
    parameter gradients against ordinary autograd of the mean loss, on all rows (the same bands
    and crops) and a crop of columns (`_check_crop`)."""
    return _check(module, x, target,
                  lambda xs, ts, params: BandLoss.apply(module, plan, xs, ts, *params))


def check_engine(module: WholeBands, engine: Engine, x: torch.Tensor,
                 target: torch.Tensor) -> Check:
    """The wrap-time check of a 2PS `engine`: as `check_bands`, the engine narrowed to the
    crop's columns (its bands and plans depend on rows only)."""
    def banded(xs: torch.Tensor, ts: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        small = engine.narrowed(xs.shape[-1])
        return module.loss(RowFunction.apply(small, xs, *params), ts) / ts.numel()

    return _check(module, x, target, banded)


def _check(module: WholeBands, x: torch.Tensor, target: torch.Tensor,
           banded: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor],
           ) -> Check:
    """`banded(crop, crop_target, params)` (the mean loss) against ordinary autograd on all
    rows, the first image (see `memtile.rows.verify`) and one grid step of columns plus what
    the width has past its last whole step, so that every layer ends at the right image edge as
    at full width (a width on the net's grid: one step)."""
    locality, width = module.locality, x.shape[-1]
    step = locality.alignment[1]
    cols = min(width, step + width % step)
    out_cols = locality.sizes((x.shape[-2], cols))[locality.output][1]
    crop = x[:1, ..., :cols].detach().clone()
    crop_target = target[:1, ..., :out_cols]

    def error_at(dtype: torch.dtype) -> tuple[float, str]:
        xs = crop.to(dtype)
        ts = crop_target.to(dtype) if crop_target.is_floating_point() else crop_target
        named = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        with torch.enable_grad():
            want = module.loss(module.model(xs), ts) / ts.numel()
            want_grads = torch.autograd.grad(want, params, allow_unused=True)
            got = banded(xs, ts, params)
            got_grads = torch.autograd.grad(got, params, allow_unused=True)
        return worst_error(named, (got, want), got_grads, want_grads)

    return run_check(module.model, error_at, crop)
