"""Row-centric training on whatever device is at hand (CUDA when present): gradients against
ordinary training and the measured step peaks, one JSON object per model.

    PYTHONPATH=src python benchmarks/rows_device.py --models resnet18,timm:regnetx_002 --resolution 512

It runs `memtile train`'s own comparison (`commands.train.compare`: ordinary and row-centric
copies from the same weights, wrap-time check included, first-step gradients compared, float64
reference) with the default 2PS budget mode. On CUDA, memtile.measure reads the CUDA caching
allocator's events, so the peaks are the device's.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from memtile import zoo
from memtile.commands.train import DEFAULT_FRACTION, compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,timm:regnetx_002")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failures = 0
    for name in args.models.split(","):
        model, _ = zoo.get(name, batch=args.batch, input_shape=(3, args.resolution, args.resolution))
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
        try:
            result = compare(model.to(device), x, steps=args.steps, budget_fraction=DEFAULT_FRACTION,
                             strategy="2ps", bn="frozen")
        except Exception as error:  # noqa: BLE001 (one line per model: the others still run)
            failures += 1
            print(json.dumps({"model": name, "device": str(device), "error": f"{type(error).__name__}: {error}"}))
            continue
        result.update(model=name, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      torch=torch.__version__)
        print(json.dumps({k: v for k, v in result.items() if k not in ("frozen_layers",)}, default=str))
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
