"""Inference tiling: planned peak before, after FDT only, FFMT only and auto; MACs; measured peaks.

Feeds BENCHMARKS.md "Tiling". Run: `.venv/bin/python benchmarks/tiling.py [MAX_MAC_OVERHEAD]`.
float32, batch 1. Planned = arena of the best heuristic plan of the captured graph (the tiled
model's in-place tile writes and accumulations share their buffer); measured = allocator peak
of one eager call of the fx-traced model before and after tiling (the traced graph alone can
measure lower than the nn.Module, e.g. ds_cnn_kws 126 KiB vs 96 KiB, so both sides are traced).
"""

import sys
import time

from _common import header
from torch import nn

from memtile import zoo
from memtile.commands.tile import measured_peak
from memtile.tiling import tile
from memtile.trace import trace
from memtile.units import format_bytes

MODELS = [*zoo.TINY_MODELS, "mobilenet_v2", "resnet18", "mlp_100_1000_10"]


def load(name: str):
    if name == "mlp_100_1000_10":  # the dense-widening example of the FDT paper
        import torch

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()
        return model, (torch.randn(1, 100),)
    return zoo.get(name, batch=1)


def describe(step) -> str:
    """"fdt 4", "ffmt 2x2", "fdt 2 on 2 paths"; a re-split of an earlier step names it
    ("fdt 8 (re-splits 2)")."""
    split = "x".join(map(str, step.grid)) if step.grid else str(step.partitions)
    paths = f" on {step.paths} paths" if step.paths > 1 else ""
    again = f" (re-splits {step.replaces})" if step.replaces else ""
    return f"{step.method} {split}{paths}{again}"


def ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x"


def main() -> None:
    overhead = float(sys.argv[1]) if len(sys.argv) > 1 else 0.15
    print(header(f"Fused tiling (FDT, FFMT, auto), float32, batch 1, max MAC overhead {overhead:.0%}"))
    print("| model | planned peak before | FDT only | FFMT only | auto | auto, without input "
          "| MAC overhead FDT / FFMT / auto | measured eager peak before → auto | auto steps "
          "| max abs error / output scale | search time auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        model, inputs = load(name)
        reports = {}
        for label, methods in (("fdt", ("fdt",)), ("ffmt", ("ffmt",)), ("auto", ("fdt", "ffmt"))):
            began = time.perf_counter()
            tiled, report = tile(model, inputs, max_mac_overhead=overhead, methods=methods)
            reports[label] = (tiled, report, time.perf_counter() - began)
        tiled, auto, seconds = reports["auto"]
        before = auto.peak_before_bytes
        cells = [f"{format_bytes(r.peak_after_bytes)} ({ratio(before, r.peak_after_bytes)})"
                 for _, r, _ in reports.values()]
        macs = " / ".join(f"{r.mac_overhead:+.1%}" for _, r, _ in reports.values())
        steps = ", ".join(describe(s) for s in auto.steps) or "none"
        print(f"| {name} | {format_bytes(before)} | {' | '.join(cells)} | "
              f"{format_bytes(auto.peak_before_without_input_bytes)} → "
              f"{format_bytes(auto.peak_after_without_input_bytes)} "
              f"({ratio(auto.peak_before_without_input_bytes, auto.peak_after_without_input_bytes)}) | "
              f"{macs} | {format_bytes(measured_peak(trace(model), inputs))} → "
              f"{format_bytes(measured_peak(tiled, inputs))} | {steps} | "
              f"{auto.max_abs_error:.2g} / {auto.output_scale:.2g} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
