"""Wrap-time check cost against one full-size row-centric step, measured in one process.

    PYTHONPATH=src python benchmarks/wrapcheck.py resnet18 --resolution 512 --rows 1,6
    PYTHONPATH=src python benchmarks/wrapcheck.py timm:regnetx_002 --resolution 1024

Wraps MODEL as `memtile train` does (2PS, frozen norms; budget mode at 20% of ordinary
activations unless `--rows FORWARD,BACKWARD` gives the band counts budget mode chose, which
saves its measurements), then times, interleaved: the check as it was before the wrapcheck
branch (whole batch, max(32, W/16) columns, ATen kernels at the process's thread count), the
check now (`rows.verify.check_engine`), and full-size row-centric SGD steps. Prints one JSON
object: wall and CPU seconds of each, medians, fractions of the median step, load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import UTC, datetime

import torch

from memtile import zoo
from memtile.commands.train import DEFAULT_FRACTION, Side, _wrap_at_fraction, freeze_norms
from memtile.rows import verify, wrap


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def check_before(trunk, engine, x: torch.Tensor) -> None:
    """The check of main 7504083: the whole batch, max(32, W/16) columns, oneDNN off."""
    cols = min(x.shape[-1], max(32, x.shape[-1] // 16))
    crop = x[..., :cols].detach().clone()
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        error, _ = verify._error(trunk, engine.narrowed(cols), crop)
    finally:
        torch._C._set_mkldnn_enabled(enabled)
    assert error <= verify.TOLERANCE, error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", default=None, metavar="FORWARD,BACKWARD")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model, (x,) = zoo.get(args.model, batch=args.batch,
                          input_shape=(3, args.resolution, args.resolution))
    row_copy = copy.deepcopy(model).train()
    freeze_norms(row_copy)
    params = list(row_copy.parameters())
    options = {"strategy": "2ps", "bn": "frozen", "verify": False}
    if args.rows:
        fwd, bwd = map(int, args.rows.split(","))
        wrapped = wrap(row_copy, rows=bwd, forward_rows=fwd, backward_rows=bwd, **options)
        engine = wrapped.trunk.engine(x)
    else:
        wrapped, engine, _ = _wrap_at_fraction(row_copy, x, DEFAULT_FRACTION, options)
    trunk = wrapped.trunk.trunk
    side = Side(wrapped, params)
    side.step(x, 0)  # warm: oneDNN compiles the full-size shapes once
    times: dict[str, list] = {"before": [], "now": [], "step": []}
    checks = []
    for k in range(args.rounds):
        times["before"].append(timed(lambda: check_before(trunk, engine, x)))
        times["now"].append(timed(lambda: checks.append(verify.check_engine(trunk, engine, x))))
        times["step"].append(timed(lambda k=k: side.step(x, k + 1)))
    check = checks[-1]
    step = statistics.median(t[0] for t in times["step"])
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(json.dumps({
        "model": args.model, "batch": args.batch, "resolution": args.resolution,
        "bands": list(engine.bands), "strategy": engine.strategy,
        "check_input_shape": list(check.input_shape), "check_dtype": check.dtype,
        "check_max_rel_error": check.max_rel_error,
        "seconds_wall_cpu": times,
        "fraction_before": statistics.median(t[0] for t in times["before"]) / step,
        "fraction_now": statistics.median(t[0] for t in times["now"]) / step,
        "threads": torch.get_num_threads(), "loadavg": load,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
