"""Whole-network row bands at sizes where `memtile train --loss` is too slow to run on a CPU:
allocator-level step peaks (`memtile.measure`, one measured step per side) and step times
(uninstrumented steps, sides interleaved, medians), no float64 reference and no wrap-time
check (tests/test_rows_whole.py covers exactness).

    PYTHONPATH=src python benchmarks/rows_whole.py --model smp:Unet:resnet18 --resolution 1024 --rounds 3
    PYTHONPATH=src python benchmarks/rows_whole.py --model smp:Unet:resnet18 --resolution 1024 --strategy overl --rows 8
    PYTHONPATH=src python benchmarks/rows_whole.py --model smp:Unet:resnet34 --resolution 1600 --rounds 0 --sides ordinary
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from memtile import zoo
from memtile.commands.train_whole import target_for
from memtile.freeze import freeze
from memtile.measure import measure
from memtile.rows.whole import STRATEGIES, WholeBands, loss_function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smp:Unet:resnet18")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=None, help="bands (default: the strategy's)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None)
    parser.add_argument("--loss", default="bce", choices=("ce", "bce", "mse"))
    parser.add_argument("--rounds", type=int, default=1, help="timed steps per side")
    parser.add_argument("--sides", default="ordinary,banded",
                        help="which sides to run (one alone, e.g. to find the largest "
                             "resolution that fits a budget)")
    args = parser.parse_args(argv)
    shape = (3, args.resolution, args.resolution)
    model, _ = zoo.get(args.model, batch=args.batch, input_shape=shape)
    freeze(model)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the output's channels, from a strip of the input
        channels = model(x[..., :32]).shape[1]
    target = target_for(args.loss, torch.empty(args.batch, channels, *x.shape[-2:]), 0)
    fn = loss_function(args.loss)
    banded = WholeBands(copy.deepcopy(model), args.loss, rows=args.rows, verify=False,
                        strategy=args.strategy)
    strategy = banded.chosen_strategy(x, target)
    if strategy == "2ps":
        engine = banded.engine(x, target)
        bands = [list(b.new[engine.graph.output]) for b in engine.backward_plan.bands]
    else:
        bands = [[*b.rows, *b.crop] for b in banded.plan(x, target)]
    sides = {"ordinary": (model, lambda: (fn(model(x), target) / target.numel()).backward()),
             "banded": (banded, lambda: banded(x, target).backward())}
    sides = {name: sides[name] for name in args.sides.split(",")}
    result = {"model": args.model, "batch": args.batch, "resolution": args.resolution,
              "strategy": strategy, "bands": bands, "loss": args.loss}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (module, step) in sides.items():
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    for name, (module, step) in sides.items():
        module.zero_grad(set_to_none=True)
        result[f"{name}_peak_bytes"] = measure(step).peak_bytes
        result[f"{name}_step_s"] = statistics.median(seconds[name]) if seconds[name] else None
    if len(sides) == 2:
        result["peak_ratio"] = result["banded_peak_bytes"] / result["ordinary_peak_bytes"]
        result["time_ratio"] = result["banded_step_s"] / result["ordinary_step_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
