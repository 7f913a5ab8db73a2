"""Whole-network row bands at sizes where `memtile train --loss` is too slow to run on a CPU:
one measured step per side (allocator-level peak, `memtile.measure`) and its time, no
float64 reference and no wrap-time check (tests/test_rows_whole.py covers exactness).

    PYTHONPATH=src python benchmarks/rows_whole.py --model smp:Unet:resnet18 --resolution 1024 --rows 8
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from memtile import zoo
from memtile.commands.train_whole import target_for
from memtile.freeze import freeze
from memtile.measure import measure
from memtile.rows.whole import WholeBands, loss_function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smp:Unet:resnet18")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--loss", default="bce", choices=("ce", "bce", "mse"))
    args = parser.parse_args(argv)
    shape = (3, args.resolution, args.resolution)
    model, _ = zoo.get(args.model, batch=args.batch, input_shape=shape)
    freeze(model)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the output's channels, from a strip of the input
        channels = model(x[..., :32]).shape[1]
    target = target_for(args.loss, torch.empty(args.batch, channels, *x.shape[-2:]), 0)
    fn = loss_function(args.loss)
    banded = WholeBands(copy.deepcopy(model), args.loss, rows=args.rows, verify=False)
    sides = {"ordinary": lambda: (fn(model(x), target) / target.numel()).backward(),
             "banded": lambda: banded(x, target).backward()}
    result = {"model": args.model, "batch": args.batch, "resolution": args.resolution,
              "rows": args.rows, "loss": args.loss,
              "crops": [list(b.crop) for b in banded.plan(x, target)]}
    for name, step in sides.items():
        start = time.perf_counter()
        result[f"{name}_peak_bytes"] = measure(step).peak_bytes
        result[f"{name}_step_s"] = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    result["peak_ratio"] = result["banded_peak_bytes"] / result["ordinary_peak_bytes"]
    result["time_ratio"] = result["banded_step_s"] / result["ordinary_step_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
