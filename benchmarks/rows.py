"""Row-centric training vs ordinary and torch.utils.checkpoint: measured peaks and step times.

For each network (frozen BatchNorm on every side, like for like) and batch x resolution:
ordinary training, `torch.utils.checkpoint.checkpoint_sequential` with sqrt(n) segments over the
trunk (as a user would write it), OverL and 2PS with band counts chosen by budget mode for a
trunk budget of `--target` of the ordinary trunk activations. One SGD step (momentum 0.9) is
measured with `memtile.measure` (peak above what was held before; activations = peak minus the
gradients and optimizer state live at the peak); `--steps` more are timed without
instrumentation (median); `--rounds N` also times each row-centric side against ordinary in N
alternating steps (median ratio: robust to the shared machine's load). `--max-res` also finds
the largest square resolution that trains at batch 1 within `--budget` (whole step, measured),
ordinary vs row-centric.

Results are appended to `--out` (JSON lines) as they finish; `--table` prints the markdown table.

    OMP_NUM_THREADS=2 python benchmarks/rows.py --nets resnet50 --configs 2x512 --out rows.jsonl
    python benchmarks/rows.py --table rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from memtile import zoo
from memtile.commands.train import Side, freeze_norms, grad_error
from memtile.errors import BudgetError
from memtile.measure import measure
from memtile.rows import wrap
from memtile.rows.trunk import split_trunk
from memtile.units import format_bytes, parse_bytes


class SequentialCheckpoint(nn.Module):
    """The trunk as a user would checkpoint it: checkpoint_sequential over its top-level layers."""

    def __init__(self, layers: nn.Sequential, segments: int) -> None:
        super().__init__()
        self.layers, self.segments = layers, segments

    def forward(self, x):
        return checkpoint_sequential(self.layers, self.segments, x, use_reentrant=False)


def trunk_layers(model: nn.Module, trunk) -> nn.Sequential:
    """The model's children that make up the fx trunk, nested Sequentials flattened one level."""
    used = {n.target.split(".")[0] for n in trunk.graph.nodes if n.op == "call_module"}
    layers = []
    for name, child in model.named_children():
        if name in used:
            layers += list(child) if isinstance(child, nn.Sequential) else [child]
    return nn.Sequential(*layers)


def checkpointed(model: nn.Module) -> nn.Module:
    trunk, head = split_trunk(model)
    layers = trunk_layers(model, trunk)
    return _Chain(SequentialCheckpoint(layers, max(1, round(math.sqrt(len(layers))))), head)


class _Chain(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x):
        return self.head(self.trunk(x))


def trunk_step_peak(model: nn.Module, x: torch.Tensor,
                    stop_before: str | None = None) -> tuple[int, int]:
    """(measured peak of an ordinary trunk forward+backward, trunk parameter bytes)."""
    trunk, _ = split_trunk(model, stop_before)
    params = [p for p in trunk.parameters() if p.requires_grad]

    def step():
        y = trunk(x)
        torch.autograd.grad(y, params, torch.ones_like(y))

    return measure(step).peak_bytes, sum(p.numel() * p.element_size() for p in params)


def interleaved_ratio(base: nn.Module, other: nn.Module, x: torch.Tensor, rounds: int,
                      done: int) -> dict:
    """Median over `rounds` of other's step time / ordinary's, the two stepped alternately, so
    that both see the same load on a shared machine (separate medians do not). `base` first
    takes the `done` steps `other` has taken, so both step the same weights."""
    sides = [Side(m, list(m.parameters())) for m in (base, other)]
    for k in range(done):
        sides[0].step(x, seed=k)
    for k in range(done, done + rounds):
        for side in sides:
            side.timed_step(x, seed=k)
    ratios = [o / b for b, o in zip(sides[0].seconds, sides[1].seconds, strict=True)]
    return {"interleaved_ratio": statistics.median(ratios), "interleaved_rounds": rounds,
            "interleaved_ordinary_s": statistics.median(sides[0].seconds),
            "interleaved_s": statistics.median(sides[1].seconds)}


def run_side(model: nn.Module, x: torch.Tensor, steps: int,
             params=None) -> tuple[dict, list[torch.Tensor | None]]:
    """Timed steps, then one measured step; also the first step's gradients (same weights
    on every side, so the only ones worth comparing)."""
    side = Side(model, params if params is not None else list(model.parameters()))
    first = None
    for k in range(steps):
        side.timed_step(x, seed=k)
        if k == 0:
            first = [g.clone() if g is not None else None for g in side.grads()]
    m = side.measured_step(x, seed=steps)
    return {"peak_bytes": m.peak_bytes, "activation_bytes": m.breakdown["activations"],
            "step_s": statistics.median(side.seconds) if side.seconds else m.seconds,
            "losses": side.losses}, first


def frozen_copy(model: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(model).train()
    freeze_norms(copy_)
    return copy_


def bench_config(net: str, batch: int, res: int, methods: list[str], steps: int, target: float,
                 emit, rounds: int = 0, stop_before: str | None = None) -> None:
    model, (x,) = zoo.get(net, batch=batch, input_shape=(3, res, res))
    base_grads = None
    common = {"net": net, "batch": batch, "resolution": res}
    if "ordinary" in methods:
        result, base_grads = run_side(frozen_copy(model), x, steps)
        emit({**common, "method": "ordinary", **result})
    if "checkpoint" in methods:
        # as a user would write it first; torchvision's in-place ReLUs break it at segment
        # boundaries, so then again with them made out-of-place
        for label, inplace_off in (("checkpoint_sequential", False),
                                   ("checkpoint_sequential, ReLU not in-place", True)):
            ck = checkpointed(frozen_copy(model))
            if inplace_off:
                for m in ck.modules():
                    if isinstance(m, nn.ReLU):
                        m.inplace = False
            try:
                result, _ = run_side(ck, x, steps)
            except RuntimeError as error:
                emit({**common, "method": label, "error": str(error).splitlines()[0][:200]})
                continue
            emit({**common, "method": label, "segments": ck.trunk.segments, **result})
            break
    row_methods = [m for m in methods if m in ("overl", "2ps")]
    if not row_methods:
        return
    trunk_peak, trunk_params = trunk_step_peak(frozen_copy(model), x, stop_before)
    for strategy in row_methods:
        # the target first; if budget mode finds it out of reach, the next looser one
        for fraction in sorted({target, *(f for f in (0.3, 0.5, 0.8) if f > target)}):
            budget = int(trunk_params + fraction * (trunk_peak - trunk_params))
            copy_ = frozen_copy(model)
            params = list(copy_.parameters())
            row = wrap(copy_, stop_before, rows="auto", budget=budget, strategy=strategy,
                       bn="frozen")
            start = time.perf_counter()
            try:
                row.trunk.engine(x)
                break
            except BudgetError as error:
                emit({**common, "method": strategy, "trunk_budget_bytes": budget,
                      "target": fraction, "error": str(error)})
        else:
            continue
        choose_s = time.perf_counter() - start
        result, first = run_side(row, x, steps, params)
        fwd, bwd = row.trunk.band_counts()
        if rounds:
            result |= interleaved_ratio(frozen_copy(model), row, x, rounds, steps + 1)
        emit({**common, "method": strategy, **result, "forward_rows": fwd, "backward_rows": bwd,
              "stop_before": stop_before,
              "checkpoint": row.trunk.checkpoint, "taper": row.trunk.taper,
              "trunk_budget_bytes": budget, "target": fraction, "trunk_ordinary_peak_bytes": trunk_peak,
              "budget_measured_trunk_bytes": row.trunk.choice.measured_bytes,
              "choose_s": choose_s,
              "grad_max_rel_error": None if base_grads is None or first is None
              else grad_error(first, base_grads)})


def step_peak(model: nn.Module, x: torch.Tensor) -> int:
    return run_side(model, x, 0)[0]["peak_bytes"]


def max_resolution(net: str, budget: int, start: int, emit, step: int = 32,
                   ordinary: int | None = None, factors: tuple[float, ...] = (2.0, 2.5, 3.0)
                   ) -> None:
    """Largest square resolution (multiple of `step`) whose measured whole step fits, each way.

    `ordinary` skips the ordinary search with a result already measured (and emitted) before.
    """
    model, _ = zoo.get(net, batch=1, input_shape=(3, 64, 64))
    if ordinary is None:
        ordinary = _max_ordinary(model, net, budget, start, emit, step)
    _max_row(model, net, budget, ordinary, emit, step, factors)


def _max_ordinary(model: nn.Module, net: str, budget: int, start: int, emit, step: int) -> int:
    # fit peak = a + b * R^2 on two measured points, then verify downwards
    points = [(r, step_peak(frozen_copy(model), torch.randn(1, 3, r, r))) for r in (start // 2, start)]
    (r1, p1), (r2, p2) = points
    b = (p2 - p1) / (r2 * r2 - r1 * r1)
    res = int(math.sqrt(max(budget - (p1 - b * r1 * r1), 0) / b)) // step * step
    fits: dict[int, bool] = {}
    # the largest fits and the next step up was measured not to
    while True:
        peak = step_peak(frozen_copy(model), torch.randn(1, 3, res, res))
        fits[res] = peak <= budget
        emit({"net": net, "method": "ordinary", "probe_resolution": res, "peak_bytes": peak,
              "budget_bytes": budget, "fits": fits[res]})
        if fits[res] and fits.get(res + step) is False:
            return res
        if not fits[res] and fits.get(res - step):
            return res - step
        res += step if fits[res] else -step


def _max_row(model: nn.Module, net: str, budget: int, ordinary: int, emit, step: int,
             factors: tuple[float, ...]) -> None:
    # budget mode gets what the step leaves for the trunk, tried at each factor of the ordinary
    # side (until one does not fit)
    for factor in factors:
        res = int(ordinary * factor) // step * step
        copy_ = frozen_copy(model)
        head_and_state = 2 * sum(p.numel() * p.element_size() for p in copy_.parameters())
        row = wrap(copy_, rows="auto", budget=budget - head_and_state, bn="frozen")
        x = torch.randn(1, 3, res, res)
        try:
            row.trunk.engine(x)
            peak = step_peak(row, x)
            fits = peak <= budget
        except BudgetError as error:
            peak, fits = None, False
            emit({"net": net, "method": "row", "probe_resolution": res, "error": str(error)})
        fwd, bwd = row.trunk.band_counts() if row.trunk.rows != "auto" else (None, None)
        emit({"net": net, "method": "row", "probe_resolution": res, "peak_bytes": peak,
              "budget_bytes": budget, "fits": fits, "strategy": row.trunk.strategy,
              "forward_rows": fwd, "backward_rows": bwd, "ordinary_max_resolution": ordinary})
        if not fits:
            break


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta = next((r for r in rows if "machine" in r), {})
    out = [(f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, torch "
            f"{meta.get('torch', '?')}, {meta.get('threads', '?')} threads. Command: "
            f"`{meta.get('command', '?')}`"), "",
           ("| network | batch x res | method | bands fwd/bwd | activation peak | vs ordinary | "
            "total peak | step time | vs ordinary | grad err |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["net"], r["batch"], r["resolution"]): r for r in rows
            if r.get("method") == "ordinary" and "batch" in r and "error" not in r}
    for r in rows:
        if "batch" not in r:
            continue
        b = base.get((r["net"], r["batch"], r["resolution"]))
        cfg = f"{r['batch']} x {r['resolution']}²"
        if "error" in r:
            out.append(f"| {r['net']} | {cfg} | {r['method']} | | failed: {r['error'][:90]} "
                       "| | | | | |")
            continue
        bands = (f"{r['forward_rows']}/{r['backward_rows']}" if "forward_rows" in r
                 else f"{r['segments']} segments" if "segments" in r else "-")
        bands += ", checkpointed" if r.get("checkpoint") else ""
        bands += f", taper {r['taper']:g}" if r.get("taper") else ""
        bands += f", {r['stop_before']} ordinary" if r.get("stop_before") else ""
        method = r["method"] + (f" (target {r['target']:g})" if "target" in r else "")
        act = r["activation_bytes"]
        ratio_a = f"{act / b['activation_bytes']:.0%}" if b else ""
        ratio_t = f"{r['step_s'] / b['step_s']:.2f}x" if b else ""
        if "interleaved_ratio" in r:
            ratio_t += f" ({r['interleaved_ratio']:.2f}x interleaved)"
        err = f"{r['grad_max_rel_error']:.1e}" if r.get("grad_max_rel_error") is not None else ""
        out.append(f"| {r['net']} | {cfg} | {method} | {bands} | {format_bytes(act)} | "
                   f"{ratio_a} | {format_bytes(r['peak_bytes'])} | {r['step_s']:.2f} s | "
                   f"{ratio_t} | {err} |")
    probes = [r for r in rows if "probe_resolution" in r]
    if probes:
        out += ["", ("| network | method | resolution (batch 1) | measured step peak | "
                     "fits the budget |"), "|---|---|---|---|---|"]
        for r in probes:
            peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") else r.get("error", "")
            out.append(f"| {r['net']} | {r['method']} | {r['probe_resolution']}² | {peak} | "
                       f"{r.get('fits', False)} (budget {format_bytes(r['budget_bytes'])}) |"
                       if "budget_bytes" in r else
                       f"| {r['net']} | {r['method']} | {r['probe_resolution']}² | {peak} | no |")
    return "\n".join(out)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="vgg16,resnet50")
    parser.add_argument("--configs", default="8x224,2x512", help="BATCHxRES,...")
    parser.add_argument("--methods", default="ordinary,checkpoint,overl,2ps")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method")
    parser.add_argument("--rounds", type=int, default=0,
                        help="also time row-centric against ordinary in this many alternating "
                        "steps (median ratio)")
    parser.add_argument("--target", type=float, default=0.2,
                        help="trunk activation budget as a fraction of ordinary")
    parser.add_argument("--stop-before", default=None,
                        help="end the row-centric prefix before this submodule (e.g. layer4)")
    parser.add_argument("--max-res", action="store_true", help="largest resolution search")
    parser.add_argument("--max-res-net", default="resnet50")
    parser.add_argument("--max-res-start", type=int, default=512)
    parser.add_argument("--max-res-ordinary", type=int, default=None,
                        help="ordinary largest resolution measured before: search rows only")
    parser.add_argument("--max-res-factors", default="2,2.5,3",
                        help="row-centric resolutions tried, as multiples of the ordinary side")
    parser.add_argument("--budget", type=parse_bytes, default=parse_bytes("4GiB"))
    parser.add_argument("--out", type=Path, default=Path("rows.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0

    def emit(record: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    emit({"machine": _cpu_name(),
          "torch": torch.__version__, "threads": torch.get_num_threads(),
          "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
          "command": " ".join(["python", *sys.argv])})
    methods = args.methods.split(",")
    for net in filter(None, args.nets.split(",")):
        for config in filter(None, args.configs.split(",")):
            batch, res = (int(v) for v in config.split("x"))
            bench_config(net, batch, res, methods, args.steps, args.target, emit, args.rounds,
                         args.stop_before)
    if args.max_res:
        max_resolution(args.max_res_net, args.budget, args.max_res_start, emit,
                       ordinary=args.max_res_ordinary,
                       factors=tuple(float(f) for f in args.max_res_factors.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
