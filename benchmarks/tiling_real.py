"""Tiling on real models (timm, smp): planned peak before/after, with and without the input.

Feeds BENCHMARKS.md "Tiling on real models". One model per process, so that each can be run
under its own limit on a shared machine:

    .venv/bin/python benchmarks/tiling_real.py timm:NAME [MAX_SECONDS] >> results.jsonl
    .venv/bin/python benchmarks/tiling_real.py --table results.jsonl

The first form runs `memtile tile`'s discovery (auto, max MAC overhead 10%, the CLI defaults)
at the model's default input size, checks the tiled model on a fresh random input (relative
error = max |tiled - original| / max |original|; past 1e-5 both models are also compared with
float64, `memtile.numerics`) and prints one JSON line. MAX_SECONDS bounds
the search (`tile(max_seconds=...)`): the best found by then is kept and `timed_out` is set.
"""

import json
import sys
import time
from pathlib import Path

import torch
from _common import CORPUS, header

from memtile import zoo
from memtile.numerics import agreement
from memtile.tiling import tile
from memtile.units import format_bytes

MODELS = [*CORPUS, "mobilenet_v2"]


def measure(name: str, max_seconds: float | None) -> dict:
    model, inputs = zoo.get(name)
    began = time.perf_counter()
    tiled, report = tile(model, inputs, max_seconds=max_seconds, progress=lambda text: print(
        f"{name} {time.perf_counter() - began:.0f}s {text}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - began
    fresh = (torch.randn_like(inputs[0]),)
    with torch.no_grad():
        agreed = agreement(tiled(*fresh), model, fresh)
    steps = [f"{s.method} {'x'.join(map(str, s.grid)) if s.grid else s.partitions}"
             for s in report.steps]
    return {"model": name, "input_shape": list(inputs[0].shape[1:]),
            "peak_before": report.peak_before_bytes, "peak_after": report.peak_after_bytes,
            "without_input_before": report.peak_before_without_input_bytes,
            "without_input_after": report.peak_after_without_input_bytes,
            "mac_overhead": report.mac_overhead, "seconds": round(seconds, 1),
            "fresh_rel_diff": agreed.vs_eager, "fresh_agreement": agreed.as_dict(), "steps": steps, "barriers": report.barriers,
            "timed_out": report.timed_out}


def table(path: str) -> None:
    print(header("Tiling on real models: planned peak (auto, max MAC overhead 10%)"))
    print("| model | input | planned peak before → after | ratio | without input | ratio "
          "| MACs | rel diff (fresh input) | search s | steps | why not further (op: candidates) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        ratio = r["peak_before"] / r["peak_after"]
        ratio_in = r["without_input_before"] / r["without_input_after"]
        seconds = f"{r['seconds']:.0f}" + (" (limit)" if r["timed_out"] else "")
        own = ("FFMTTiles", "PartialSum", "Accumulate")  # rows measured before 2e3ce13
        barriers = [b for b in r["barriers"] if not any(o in b for o in own)]
        why = "; ".join(barriers[:3]) if ratio < 2 else ""
        print(f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} "
              f"| {format_bytes(r['peak_before'])} → {format_bytes(r['peak_after'])} "
              f"| {ratio:.2f}x | {format_bytes(r['without_input_before'])} → "
              f"{format_bytes(r['without_input_after'])} | {ratio_in:.2f}x "
              f"| {r['mac_overhead']:+.1%} | {_agreement(r)} | {seconds} "
              f"| {', '.join(r['steps']) or 'none'} | {why} |")


def _agreement(row: dict) -> str:
    """The fresh input's relative difference; past 1e-5 also both models' distance from
    float64 (memtile.numerics: float32 rounding when the tiled one is no further than eager)."""
    text = f"{row['fresh_rel_diff']:.1e}"
    agreed = row.get("fresh_agreement", {})
    if agreed.get("float64_rel_diff") is not None:
        text += (f" (float64: tiled {agreed['float64_rel_diff']:.1e}, eager "
                 f"{agreed['eager_float64_rel_diff']:.1e})")
    return text


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        table(sys.argv[2])
        return
    name = sys.argv[1]
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else None
    print(json.dumps(measure(name, limit)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
