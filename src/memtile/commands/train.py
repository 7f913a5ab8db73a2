"""`memtile train MODEL`: ordinary vs row-centric SGD steps, same seed: peaks, times, gradients."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from rich.table import Table
from torch import nn

from memtile.commands.common import (
    add_model_arguments,
    byte_size,
    check_batch,
    console,
    print_json,
)
from memtile.errors import BudgetError, GradientMismatchError, MemtileError, UnsupportedOpError
from memtile.freeze import FrozenBatchNorm2d, freeze
from memtile.rows.trunk import find_split
from memtile.rows.verify import TOLERANCE
from memtile.units import format_bytes

DEFAULT_FRACTION = 0.2  # default budget: this share of the trunk's ordinary activations

HELP = ("train a CNN's conv trunk row by row (LR-CNN OverL/2PS): measured peak, step time and "
        "gradient error against ordinary training")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--resolution", type=int, default=None, metavar="R",
                        help="square input R x R (overrides H,W of --input-shape)")
    parser.add_argument("--rows", default=None, metavar="N|auto",
                        help="row bands, or 'auto' (budget mode); default: auto, with --budget "
                             "or else a budget of 20%% of the trunk's ordinary activations, 2PS unless "
                             "--strategy says otherwise")
    parser.add_argument("--forward-rows", type=int, default=None, help="bands for forward only")
    parser.add_argument("--backward-rows", type=int, default=None, help="bands for backward only")
    parser.add_argument("--budget", type=byte_size, default=None, metavar="BYTES",
                        help="bytes one trunk training step may allocate (with --rows auto)")
    parser.add_argument("--strategy", choices=("overl", "2ps"), default=None,
                        help="default: overl, or with --rows auto the one budget mode picks; "
                             "with --loss 2ps where it takes the model, else overl")
    parser.add_argument("--checkpoint", action="store_true",
                        help="also checkpoint segments inside each band (with --rows auto, "
                             "budget mode adds it when it needs to)")
    parser.add_argument("--bn", choices=("frozen", "error"), default="frozen",
                        help="BatchNorm: frozen running statistics on both sides (default), or "
                             "refuse models that have it")
    parser.add_argument("--stop-before", default=None, metavar="MODULE",
                        help="end the row-centric prefix before this submodule (e.g. layer4): "
                             "it and the rest run ordinarily")
    parser.add_argument("--steps", type=int, default=1, help="timed SGD steps per side")
    parser.add_argument("--no-f64-check", action="store_true",
                        help="skip the float64 reference gradients (saves time and memory)")
    parser.add_argument("--loss", choices=("ce", "bce", "mse"), default=None,
                        help="band the whole model to its per-pixel output (a spatially local "
                             "encoder-decoder) and train it with this per-band loss against a "
                             "seeded random target; --rows N sets the bands (default: 2PS "
                             "the count of least estimated peak, OverL 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def freeze_norms(model: nn.Module) -> list[str]:
    """Freeze BatchNorm by construction (`memtile.freeze`), put other norms and dropout in eval
    mode; return the type names of what was replaced or switched, for the report."""
    frozen = set(freeze(model))
    for m in model.modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout | nn.Dropout2d)
                and not isinstance(m, FrozenBatchNorm2d)):
            m.eval()
            frozen.add(type(m).__name__)
    return sorted(frozen)


def _loss(out: torch.Tensor, seed: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOpError(
            f"memtile train needs a model that returns one tensor; this one returns "
            f"{type(out).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    if out.dim() == 2:
        target = torch.randint(0, out.shape[1], (out.shape[0],), generator=gen)
        return nn.functional.cross_entropy(out, target)
    return (out - torch.randn(out.shape, generator=gen)).square().mean()


class Side:
    """One model and its SGD optimizer, stepped on the same data as its peer.

    `params` lists the parameters in the original model's order (wrapping reorders them).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter],
                 objective: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None
                 ) -> None:
        """`objective(model, x, seed)` is the loss of a step (default: `_loss(model(x), seed)`)."""
        self.model, self.params = model, params
        self.objective = objective or (lambda model, x, seed: _loss(model(x), seed))
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def step(self, x: torch.Tensor, seed: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.objective(self.model, x, seed)
        loss.backward()
        self.opt.step()
        return loss.item()

    def timed_step(self, x: torch.Tensor, seed: int) -> None:
        start = time.perf_counter()
        self.losses.append(self.step(x, seed))
        self.seconds.append(time.perf_counter() - start)

    def measured_step(self, x: torch.Tensor, seed: int):
        """One step under `memtile.measure`; gradients are freed first so the peak includes them."""
        from memtile.measure import measure

        self.opt.zero_grad(set_to_none=True)
        return measure(self.step, x, seed, model=self.model, optimizer=self.opt)

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]


def grad_errors(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> list[float]:
    """Per parameter, max|a - b| / max|b| (0 where both are missing, inf where one is)."""
    out = []
    for ga, gb in zip(a, b, strict=True):
        if ga is None or gb is None:
            out.append(0.0 if ga is None and gb is None else float("inf"))
        else:
            out.append(((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item())
    return out


def grad_error(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Max over parameters of max|a - b| / max|b| (0 where both are missing)."""
    return max(grad_errors(a, b), default=0.0)


def check_gradients(names: list[str], row: list, base: list, f64_row: float | None) -> None:
    """GradientMismatchError naming the first parameter whose row-centric gradient is off by
    more than TOLERANCE, unless the float64 reference says float32 rounding explains it."""
    errors = grad_errors(row, base)
    if max(errors, default=0.0) <= TOLERANCE or (f64_row is not None and f64_row <= TOLERANCE):
        return
    name, error = next((n, e) for n, e in zip(names, errors, strict=True) if e > TOLERANCE)
    raise GradientMismatchError(
        f"row-centric gradients differ from ordinary training: parameter {name!r} is off by "
        f"{error:.1e} relative (tolerance {TOLERANCE:.0e}{_f64_note(f64_row)}); this is a "
        "memtile bug, please report it"
    )


def _f64_note(f64_row: float | None) -> str:
    return "" if f64_row is None else f", {f64_row:.1e} against float64"


def float64_grads(model: nn.Module, x: torch.Tensor,
                  objective: Callable[[nn.Module, torch.Tensor], torch.Tensor]
                  ) -> list[torch.Tensor | None]:
    """First-step gradients of ordinary training in float64, `objective(model, x)` the loss:
    the reference both sides face."""
    ref = copy.deepcopy(model).double().train()
    freeze_norms(ref)
    objective(ref, x.double()).backward()
    return [p.grad for p in ref.parameters()]


def judge(model: nn.Module, x: torch.Tensor,
          objective: Callable[[nn.Module, torch.Tensor], torch.Tensor],
          banded_f64_grads: Callable[[], list], base: Side, row: Side, f64_check: bool) -> dict:
    """First-step gradient errors, and GradientMismatchError unless the banded gradients are
    exact: within TOLERANCE of ordinary float32, of ordinary float64 (`objective` is the loss),
    or, computed in float64 themselves (`banded_f64_grads()`), of ordinary float64. The last
    settles ill-conditioned gradients, where float32 rounding alone moves both sides far apart:
    smp Unet(resnet18) 512x64, bce, random weights: ordinary float32 is 1.4e-2 off float64,
    banded float64 6.5e-15."""
    worst = grad_error(row.grads(), base.grads())
    out: dict[str, float | None] = {"grad_max_rel_error": worst,
                                    "grad_max_rel_error_f64_baseline": None,
                                    "grad_max_rel_error_f64_row": None,
                                    "grad_max_rel_error_f64_banded_f64": None}
    if f64_check or worst > TOLERANCE:  # float32 ordinary training can be the one off
        ref = float64_grads(model, x, objective)
        out["grad_max_rel_error_f64_baseline"] = grad_error(base.grads(), ref)
        out["grad_max_rel_error_f64_row"] = explained = grad_error(row.grads(), ref)
        if worst > TOLERANCE and explained > TOLERANCE:
            out["grad_max_rel_error_f64_banded_f64"] = explained = grad_error(
                banded_f64_grads(), ref)
        check_gradients([n for n, _ in model.named_parameters()], row.grads(), base.grads(),
                        explained)
    return out


def _banded_f64_grads(model: nn.Module, x: torch.Tensor, trunk, row_kwargs: dict) -> list:
    """First-step gradients of `model` wrapped in float64 with the bands `trunk` (a configured
    RowCentric) runs; no wrap-time check."""
    from memtile.rows import wrap

    wide = copy.deepcopy(model).double().train()
    freeze_norms(wide)
    params = list(wide.parameters())  # wrapping reorders them
    fwd, bwd = trunk.band_counts()
    banded = wrap(wide, stop_before=row_kwargs.get("stop_before"), rows=bwd,
                  strategy=trunk.strategy, forward_rows=fwd, backward_rows=bwd,
                  checkpoint=trunk.checkpoint, bn="frozen", taper=trunk.taper, verify=False)
    _loss(banded(x.double()), seed=0).backward()
    return [p.grad for p in params]


def compare(model: nn.Module, x: torch.Tensor, steps: int = 1, f64_check: bool = True,
            budget_fraction: float | None = None, **row_kwargs) -> dict:
    """Ordinary vs row-centric training of copies of `model`, same data and seeds.

    Both sides run with BatchNorm frozen (running statistics) and dropout off, like for like.
    Steps are timed without instrumentation; one more step per side is measured for the peak.
    Gradients are compared on the first step, the one where both start from the same weights;
    later steps are compared by their losses. With `f64_check` both sides' first-step gradients
    are also compared with ordinary training in float64 (float32 kernels can differ from it by
    more than the two sides differ from each other).
    """
    from memtile.rows import wrap

    base = copy.deepcopy(model).train()
    frozen = freeze_norms(base)
    row_copy = copy.deepcopy(model).train()
    freeze_norms(row_copy)
    row_params = list(row_copy.parameters())
    if budget_fraction is None:
        row_model = wrap(row_copy, **row_kwargs)
        # trace, plan (in budget mode choose and measure) and verify on a crop, before timing
        engine = row_model.trunk.engine(x)
    else:
        row_model, engine, budget_fraction = _wrap_at_fraction(row_copy, x, budget_fraction,
                                                               row_kwargs)
    base_side, row_side = Side(base, list(base.parameters())), Side(row_model, row_params)
    checks: dict[str, float | None] = {}
    for k in range(steps):
        base_side.timed_step(x, seed=k)
        row_side.timed_step(x, seed=k)
        if k == 0:  # the only step where both sides start from bit-identical weights
            checks = judge(model, x, lambda m, x: _loss(m(x), seed=0),
                           lambda: _banded_f64_grads(model, x, row_model.trunk, row_kwargs),
                           base_side, row_side, f64_check)
    base_m = base_side.measured_step(x, seed=steps)
    row_m = row_side.measured_step(x, seed=steps)
    trunk = row_model.trunk
    fwd, bwd = engine.bands
    check = trunk.checks[tuple(x.shape[-2:])]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30)
                    for a, b in zip(row_side.losses, base_side.losses, strict=True))
    return {
        "model": type(model).__name__,
        "batch": x.shape[0],
        "input_shape": list(x.shape[1:]),
        "strategy": trunk.strategy,
        "forward_rows": fwd,
        "backward_rows": bwd,
        "rows_requested": list(trunk.band_counts()),
        "max_rows": engine.max_bands,
        "stopped_at": row_model.stopped_at,
        "checkpoint": trunk.checkpoint,
        "taper": trunk.taper,
        "trunk_output_shape": list(trunk.graph.output_size(tuple(x.shape[-2:]))),
        "baseline_peak_bytes": base_m.peak_bytes,
        "row_peak_bytes": row_m.peak_bytes,
        "baseline_activation_bytes": base_m.breakdown.get("activations"),
        "row_activation_bytes": row_m.breakdown.get("activations"),
        "parameter_bytes": base_m.parameter_bytes,
        "baseline_step_s": statistics.median(base_side.seconds),
        "row_step_s": statistics.median(row_side.seconds),
        **checks,
        "loss_baseline": base_side.losses,
        "loss_row": row_side.losses,
        "loss_max_rel_diff": loss_diff,
        "frozen_layers": frozen,
        "verify": {**check.as_json(),
                   "step_fraction": check.seconds / statistics.median(row_side.seconds)},
        "budget_bytes": trunk.budget,
        "budget_fraction_of_ordinary_activations": budget_fraction,
        "budget_measured_trunk_bytes": trunk.choice.measured_bytes if trunk.choice else None,
    }


def _wrap_at_fraction(model: nn.Module, x: torch.Tensor, fraction: float, row_kwargs: dict):
    """`wrap(model)` in budget mode, aiming at `fraction` of the trunk's ordinary activations:
    the budget is the trunk's parameter gradients (held either way) plus that fraction of the
    rest of an ordinary trunk step's peak. The fraction doubles while no configuration meets
    it (small inputs leave little to save).

    Returns the wrapped model, its engine for `x` and the fraction used.
    """
    from memtile.rows import wrap
    from memtile.rows.budget import ordinary_step_bytes

    trunk = find_split(model, row_kwargs.get("stop_before")).trunk
    grads = sum(p.numel() * p.element_size() for p in trunk.parameters() if p.requires_grad)
    activations = max(ordinary_step_bytes(trunk, x) - grads, 0)
    while True:
        budget = grads + int(fraction * activations)
        wrapped = wrap(model, **{**row_kwargs, "rows": "auto", "budget": budget})
        try:
            return wrapped, wrapped.trunk.engine(x), fraction
        except BudgetError:
            if fraction >= 1:
                raise
            fraction = min(1.0, 2 * fraction)


def run(args: argparse.Namespace) -> int:
    from memtile import zoo

    check_batch(args.batch)
    if args.steps < 1:
        raise MemtileError(f"--steps must be at least 1, got {args.steps}")
    if args.loss is not None:
        from memtile.commands.train_whole import run_whole

        return run_whole(args)
    rows = _parse_rows(args.rows, args.budget)
    fraction = None
    if args.rows is None and args.budget is None:  # the default: budget mode at a fraction
        fraction = DEFAULT_FRACTION
        if args.forward_rows is not None or args.backward_rows is not None:
            rows, fraction = 4, None  # bands asked per pass: fixed counts, 4 for the other
    model, inputs = zoo.get(args.model, batch=args.batch, input_shape=input_shape(args))
    norms = batch_norms(args, model)
    result = compare(model, inputs[0], steps=args.steps, f64_check=not args.no_f64_check,
                     budget_fraction=fraction, rows=rows,
                     strategy=args.strategy or ("2ps" if fraction else None),
                     forward_rows=args.forward_rows, backward_rows=args.backward_rows,
                     checkpoint=args.checkpoint or None, bn="frozen", budget=args.budget,
                     stop_before=args.stop_before)
    result["model"] = args.model
    result["stop_before"] = args.stop_before
    result["bn"] = "frozen" if norms else "none"
    if args.json:
        print_json(result)
    else:
        _print_table(result)
    return 0


def batch_norms(args: argparse.Namespace, model: nn.Module) -> list[str]:
    """Names of the model's BatchNorm layers; UnsupportedOpError if there are any and --bn is
    error."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and args.bn == "error":
        raise UnsupportedOpError(
            f"{args.model} has BatchNorm layers (first: {norms[0]}), which cannot be split into "
            "row bands in training mode; run with --bn frozen to train with running statistics"
        )
    return norms


def input_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """--input-shape, with H and W replaced by --resolution when given."""
    shape = args.input_shape
    if args.resolution is not None:
        shape = (shape[0] if shape else 3, args.resolution, args.resolution)
    return shape


def _parse_rows(text: str | None, budget: int | None) -> int | str:
    if text is None or text == "auto":
        if budget is None and text is not None:
            raise MemtileError("--rows auto needs --budget BYTES (e.g. --budget 2GiB)")
        return "auto"
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise MemtileError(f"--rows {text!r}: give a positive number of bands or 'auto'")
    return rows


def _print_table(r: dict) -> None:
    table = Table(title=f"memtile train {r['model']}: batch {r['batch']}, input "
                        f"{'x'.join(map(str, r['input_shape']))}, {len(r['loss_row'])} step(s)")
    table.add_column("")
    table.add_column("ordinary", justify="right")
    table.add_column(f"row-centric ({r['strategy']})", justify="right")
    table.add_column("ratio", justify="right")
    for label, a, b, fmt in [
        ("measured peak", r["baseline_peak_bytes"], r["row_peak_bytes"], format_bytes),
        ("activations at peak", r["baseline_activation_bytes"], r["row_activation_bytes"],
         format_bytes),
        ("step time (median)", r["baseline_step_s"], r["row_step_s"], lambda s: f"{s:.3f} s"),
    ]:
        ratio = f"{b / a:.2f}x" if a else "-"
        table.add_row(label, fmt(a), fmt(b), ratio)
    console.print(table)
    console.print(f"bands: {r['forward_rows']} forward / {r['backward_rows']} backward of "
                  f"{r['trunk_output_shape'][0]} trunk output rows"
                  f"{', checkpointed inside bands' if r['checkpoint'] else ''}"
                  f"{', backward bands tapered ' + format(r['taper'], 'g') if r['taper'] else ''}"
                  f"; max relative gradient error "
                  f"{r['grad_max_rel_error']:.2e}; loss curves differ by at most "
                  f"{r['loss_max_rel_diff']:.2e} (relative)")
    if r["grad_max_rel_error_f64_row"] is not None:
        console.print(f"against float64 ordinary training: ordinary float32 "
                      f"{r['grad_max_rel_error_f64_baseline']:.2e}, row-centric "
                      f"{r['grad_max_rel_error_f64_row']:.2e}")
    if r["rows_requested"] != [r["forward_rows"], r["backward_rows"]]:
        console.print(f"asked for {' / '.join(map(str, r['rows_requested']))} (forward / "
                      f"backward) bands; {r['strategy']} splits {r['max_rows']} rows here (one "
                      "band each at most), so fewer are used")
    if r["stopped_at"]:
        stop = r["stopped_at"]
        console.print(f"bands stop at {stop['node']} ({stop['op']}): {stop['reason']}")
    else:
        console.print("bands cover the whole model")
    v = r["verify"]
    console.print(f"checked at wrap time on a {'x'.join(map(str, v['input_shape']))} crop "
                  f"({v['dtype']}): max relative error {v['max_rel_error']:.1e} in "
                  f"{v['seconds']:.2f} s ({v['step_fraction']:.0%} of a row-centric step)")
    if r["frozen_layers"]:
        console.print(f"both sides ran with {', '.join(r['frozen_layers'])} in eval mode "
                      "(frozen BatchNorm statistics, no dropout), like for like")


def report_section(name: str, model, inputs, out) -> str:
    """Markdown for `memtile report`: one ordinary vs 2PS training comparison, measured."""
    try:
        r = compare(model, inputs[0], steps=2, rows=16, forward_rows=2, strategy="2ps",
                    bn="frozen")
    except MemtileError as error:
        return f"## Train: row-centric training\n\nNot applicable to `{name}`: {error}\n"
    frozen = (f" Both sides ran with {', '.join(r['frozen_layers'])} in eval mode (frozen "
              "statistics), like for like." if r["frozen_layers"] else "")
    return f"""## Train: row-centric training (LR-CNN 2PS)

`memtile.rows.wrap` found the spatially local trunk of `{name}` (output
{'x'.join(map(str, r['trunk_output_shape']))}) and trained it in {r['backward_rows']} row bands
for backward and {r['forward_rows']} for forward, sharing boundary rows between bands (2PS),
against ordinary training of the same model on the same data (SGD, momentum 0.9).{frozen}
Peaks measured at the allocator for one step; activations are the peak minus the gradients and
optimizer state live at it; times are medians of {len(r['loss_row'])} uninstrumented steps.

| | ordinary | row-centric | ratio |
|---|---|---|---|
| measured step peak | {format_bytes(r['baseline_peak_bytes'])} | {format_bytes(r['row_peak_bytes'])} | {r['row_peak_bytes'] / r['baseline_peak_bytes']:.2f}x |
| activations at the peak | {format_bytes(r['baseline_activation_bytes'])} | {format_bytes(r['row_activation_bytes'])} | {r['row_activation_bytes'] / max(r['baseline_activation_bytes'], 1):.2f}x |
| step time | {r['baseline_step_s']:.3f} s | {r['row_step_s']:.3f} s | {r['row_step_s'] / r['baseline_step_s']:.2f}x |

Gradients: row-centric vs ordinary differ by at most {r['grad_max_rel_error']:.1e} (max
relative, per parameter); against ordinary training in float64, ordinary float32 is off by
{r['grad_max_rel_error_f64_baseline']:.1e} and row-centric by {r['grad_max_rel_error_f64_row']:.1e}.
Losses of the two runs differ by at most {r['loss_max_rel_diff']:.1e} (relative).
"""
