"""memtile planned vs ONNX Runtime and torch.compile (and eager), in one process, interleaved.

For each model and batch the four runners are built once (`memtile.peers.Peers`: PlannedModule,
the model exported to ONNX for an ORT CPU session, torch.compile with inductor); then, for each
intra-op thread count (the same for torch and ORT), their calls are interleaved round by round
and their medians, p95, measured peaks and output differences from eager are printed. The same
comparison for one model is `memtile run MODEL --peers`.

    .venv/bin/python benchmarks/peers.py [--models resnet50,mobilenet_v2] [--batches 1,8]
        [--threads 1,2] [--iters-b1 10] [--iters-b8 3] [--runners eager,planned,onnxruntime]

Needs the `bench` extra (onnxruntime, onnx, onnxscript); without onnxruntime its column says why.
Prints the markdown for the "Peers: ONNX Runtime" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import header

from memtile import zoo
from memtile.peers import ANCHOR, RUNNERS, Peers
from memtile.units import format_bytes

MODELS = ("resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0")


def matrix(models: list[str], batches: list[int], threads: list[int], iters: tuple[int, int],
           runners: tuple[str, ...]) -> list[dict]:
    """One row per model, batch and thread count; `iters` is (at batch 1, at other batches)."""
    rows = []
    for name in models:
        for batch in batches:
            model, inputs = zoo.get(name, batch=batch)
            peers = Peers(model, inputs, runners)
            for count in threads:
                rows.append({"model": name, "batch": batch,
                             **peers.compare(count, iters[0] if batch == 1 else iters[1])})
                print(f"<!-- done: {json.dumps(rows[-1])} -->", file=sys.stderr, flush=True)
    return rows


def _cell(result: dict | None) -> str:
    return "-" if result is None else f"{result['median_ms']:.1f} ({result['p95_ms']:.1f})"


def latency_table(rows: list[dict], runners: tuple[str, ...]) -> str:
    """Median (p95) ms per call; ratios of medians within one row (same process, interleaved);
    at 1 thread also planned / ORT in CPU time (the work without the waits for a core)."""
    lines = [(f"| model | batch | threads | {' | '.join(runners)} | planned / ORT | "
              "planned / ORT, CPU time | planned / eager | compile / eager |"),
             "|---" * (7 + len(runners)) + "|"]
    for row in rows:
        r = row["runners"]
        cells = " | ".join(_cell(r.get(name)) for name in runners)
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | {cells} | "
                     f"{_ratio(r, 'planned', ANCHOR)} | {_ratio(r, 'planned', ANCHOR, 'cpu_ms')} | "
                     f"{_ratio(r, 'planned', 'eager')} | "
                     f"{_ratio(r, 'compile', 'eager')} |")
    return "\n".join(lines)


def _ratio(results: dict, over: str, under: str, key: str = "median_ms") -> str:
    if over not in results or under not in results or results[over][key] is None:
        return "-"
    return f"{results[over][key] / results[under][key]:.2f}"


def peak_table(rows: list[dict], runners: tuple[str, ...]) -> str:
    """Peaks at 1 thread (the first thread count run), each as its runner measures it, and the
    largest output difference from eager over all thread counts."""
    lines = [(f"| model | batch | {' | '.join(f'peak {n}' for n in runners)} | "
              f"ORT arena grew by | {' | '.join(f'rel. diff {n}' for n in runners[1:])} |"),
             "|---" * (3 + 2 * len(runners) - 1) + "|"]
    seen = set()
    for row in rows:
        key = (row["model"], row["batch"])
        if key in seen:
            continue
        seen.add(key)
        r = row["runners"]
        peaks = " | ".join(_bytes(r[n]["peak_bytes"]) if n in r else "-" for n in runners)
        held = _bytes(r[ANCHOR]["arena_held_bytes"]) if ANCHOR in r else "-"
        worst = {n: max(x["runners"][n]["max_rel_diff"] for x in rows
                        if (x["model"], x["batch"]) == key and n in x["runners"])
                 for n in runners if n != "eager" and n in r}
        diffs = " | ".join(f"{worst[n]:.1e}" if n in worst else "-"
                           for n in runners if n != "eager")
        lines.append(f"| {row['model']} | {row['batch']} | {peaks} | {held} | {diffs} |")
    return "\n".join(lines)


def _bytes(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def target_check(rows: list[dict]) -> str:
    """Issue 17's targets at 1 thread: planned median <= ORT's, planned peak <= ORT's."""
    lines = []
    for row in rows:
        r = row["runners"]
        if row["threads"] != 1 or "planned" not in r or ANCHOR not in r:
            continue
        speed = r["planned"]["median_ms"] / r[ANCHOR]["median_ms"]
        planned_peak, ort_peak = r["planned"]["peak_bytes"], r[ANCHOR]["peak_bytes"]
        memory = "ORT peak unknown" if ort_peak is None else (
            f"peak {format_bytes(planned_peak)} vs {format_bytes(ort_peak)}: "
            f"{'met' if planned_peak <= ort_peak else 'MISSED'}")
        cpu = r["planned"]["cpu_ms"] / r[ANCHOR]["cpu_ms"]
        lines.append(f"- {row['model']} batch {row['batch']}: planned / ORT {speed:.2f} wall, "
                     f"{cpu:.2f} CPU time (target <= 1.00): "
                     f"{'met' if max(speed, cpu) <= 1.0 else 'MISSED'}; {memory}")
    return "\n".join(lines)


def skipped(rows: list[dict]) -> str:
    reasons = {(name, why) for row in rows for name, why in row["skipped"].items()}
    return "\n".join(f"- {name} skipped: {why}" for name, why in sorted(reasons))


def numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--batches", type=numbers, default=[1, 8], help="default 1,8")
    parser.add_argument("--threads", type=numbers, default=[1, 2],
                        help="intra-op threads, the same for every runner (default 1,2)")
    parser.add_argument("--iters-b1", type=int, default=10, help="timed rounds at batch 1")
    parser.add_argument("--iters-b8", type=int, default=3, help="timed rounds at other batches")
    parser.add_argument("--runners", default=",".join(RUNNERS),
                        help=f"comma-separated, eager first (default {','.join(RUNNERS)})")
    args = parser.parse_args()
    runners = tuple(args.runners.split(","))
    started = time.time()
    rows = matrix(args.models.split(","), args.batches, args.threads,
                  (args.iters_b1, args.iters_b8), runners)
    print(header("Peers: ONNX Runtime", args.threads))
    versions = {k: v for row in rows for k, v in row["runners"].get(ANCHOR, {}).items()
                if k in ("exporter", "version")}
    print(f"ONNX Runtime {versions.get('version', '-')} (CPU EP, exported by torch.onnx's "
          f"{versions.get('exporter', '-')} exporter), torch.compile (inductor); {time.time() - started:.0f} s "
          "in all. Median (p95) ms per call, runners interleaved round by round.\n")
    print(latency_table(rows, runners))
    print("\nPeaks (each runner's own measurement: eager and compile allocator bytes of a warm "
          "call; planned arena + its call's allocator bytes; ORT CPU-arena peak in use from "
          "session profiling), and output differences from eager (relative):\n")
    print(peak_table(rows, runners))
    print("\nTargets (issue 17, 1 thread):\n")
    print(target_check(rows))
    if any(row["skipped"] for row in rows):
        print("\n" + skipped(rows))
    print("\n<!-- raw: " + json.dumps(rows) + " -->")


if __name__ == "__main__":
    main()
