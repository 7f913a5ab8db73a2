"""The MemoMalloc experiment: eager under glibc, jemalloc, tcmalloc, mimalloc vs the planned executor.

For resnet50, mobilenet_v2 and vgg16 at batch 1 and 8 with 1 and 2 serving threads (each with one
intra-op thread), every allocator runs `memtile run MODEL --json` in its own process with the
library preloaded; the planned numbers are the glibc run's. One more glibc process runs eager in
channels_last (`--eager-layout channels_last`), the layout the planned module computes
convolutions in, so that what the layout gains shows apart from what planning gains. Then, to
explain the gaps: minor page faults and allocator bytes per call (eager vs planned), and the
per-op cost of the generated straight-line program vs a dictionary-walking interpreter. Last, the
trade-off of the packed convolution weights: planned with and without them (`pack_weights=False`)
vs eager at batch 1, latency and measured peak, beside the packed bytes the module holds.

    .venv/bin/python benchmarks/allocators.py [--iters-b1 10] [--iters-b8 3] [--install]
        [--models resnet50,vgg16] [--configs 1x1,8x2]   # batch x threads; default all four

Prints the markdown for the Run section of BENCHMARKS.md (command, machine and date included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from memtile import zoo
from memtile.commands.run import ALLOCATORS, allocator_library_or_none
from memtile.measure import measure
from memtile.runtime import PlannedModule
from memtile.runtime.codegen import interpret
from memtile.timing import interleaved
from memtile.units import format_bytes

MODELS = ("resnet50", "mobilenet_v2", "vgg16")
BATCHES = (1, 8)
THREADS = (1, 2)


def ensure_allocators(install: bool) -> list[str]:
    """The allocators that can be preloaded; installs the Debian packages when asked."""
    usable = []
    for name, entry in ALLOCATORS.items():
        if entry is None or allocator_library_or_none(name):
            usable.append(name)
            continue
        if install:
            subprocess.run(["apt-get", "install", "-y", "-qq", entry[0]], check=False)
        if allocator_library_or_none(name):
            usable.append(name)
        else:
            print(f"<!-- {name} skipped: install it with `apt-get install {entry[0]}` -->")
    return usable


CHANNELS_LAST = "glibc channels_last"  # the eager channels_last run's key among a row's runs


def memtile_run(model: str, batch: int, threads: int, iters: int, allocator: str,
                eager_layout: str = "contiguous") -> dict:
    argv = [sys.executable, "-m", "memtile.cli", "run", model, "--batch", str(batch),
            "--threads", str(threads), "--iters", str(iters), "--allocator", allocator,
            "--eager-layout", eager_layout, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def matrix(allocators: list[str], iters: dict[int, int], models: list[str],
           configs: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for model in models:
        for batch, threads in configs:
            runs = {a: memtile_run(model, batch, threads, iters[batch], a) for a in allocators}
            runs[CHANNELS_LAST] = memtile_run(model, batch, threads, iters[batch], "glibc",
                                              "channels_last")
            rows.append({"model": model, "batch": batch, "threads": threads, "runs": runs})
            print(f"<!-- done {model} b{batch} t{threads} -->", file=sys.stderr, flush=True)
    return rows


def latency_table(rows: list[dict], allocators: list[str]) -> str:
    """Medians (p95) per process; planned is timed in every process, interleaved with eager."""
    runs_of = [*allocators, CHANNELS_LAST]
    lines = [
        (f"| model | batch | threads | {' | '.join(f'eager {a}' for a in runs_of)} | "
         f"{' | '.join(f'planned ({a} process)' for a in runs_of)} |"),
        "|---" * (3 + 2 * len(runs_of)) + "|",
    ]
    for row in rows:
        runs = row["runs"]
        cells = [f"{runs[a][k]:.1f} ({runs[a][k.replace('_ms', '_p95_ms')]:.1f})"
                 for k in ("eager_ms", "planned_ms") for a in runs_of]
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | "
                     f"{' | '.join(cells)} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict], allocators: list[str]) -> str:
    """planned / eager within each process (same load, interleaved round by round), and across
    processes: planned (glibc process) / the fastest allocator's eager median."""
    runs_of = [*allocators, CHANNELS_LAST]
    lines = [
        (f"| model | batch | threads | {' | '.join(f'vs eager {a}' for a in runs_of)} | "
         "across processes: vs best allocator |"),
        "|---" * (4 + len(runs_of)) + "|",
    ]
    for row in rows:
        runs = row["runs"]
        best = min(runs[a]["eager_ms"] for a in allocators)
        cells = " | ".join(f"{_ratio(runs[a]):.3f}" for a in runs_of)
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | {cells} | "
                     f"{runs['glibc']['planned_ms'] / best:.3f} |")
    return "\n".join(lines)


def _ratio(run: dict) -> float:
    return run["planned_ms"] / run["eager_ms"]


def peak_table(rows: list[dict]) -> str:
    """Measured peaks (deterministic): eager in both layouts, planned with its arena, and the
    packed convolution weights the planned module holds beside the model's."""
    lines = [("| model | batch | peak eager | peak eager channels_last | peak planned (arena) | "
              "packed weights | unplanned ops | max rel. diff |"), "|---" * 8 + "|"]
    seen = set()
    for row in rows:
        if (row["model"], row["batch"]) in seen:
            continue
        seen.add((row["model"], row["batch"]))
        planned, channels_last = row["runs"]["glibc"], row["runs"][CHANNELS_LAST]
        unplanned = ", ".join(f"`{e['op']}`" for e in planned["unplanned_ops"]) or "none"
        lines.append(
            f"| {row['model']} | {row['batch']} | {format_bytes(planned['eager_peak_bytes'])} | "
            f"{format_bytes(channels_last['eager_peak_bytes'])} | "
            f"{format_bytes(planned['planned_peak_bytes'])} "
            f"({format_bytes(planned['arena_bytes'])}) | "
            f"{format_bytes(planned['packed_weight_bytes'])} | {unplanned} | "
            f"{planned['max_rel_diff']:.2g} |")
    return "\n".join(lines)


def target_check(rows: list[dict], allocators: list[str]) -> str:
    lines = []
    for row in rows:
        runs, planned = row["runs"], row["runs"]["glibc"]
        where = f"{row['model']} batch {row['batch']}, {row['threads']} thread(s)"
        if row["batch"] == 1:
            slower = _ratio(planned) - 1
            verdict = "met" if slower <= 0.03 else "MISSED"
            lines.append(f"- {where}: planned vs eager glibc {slower:+.1%} (target <= +3%): {verdict}")
        if row["batch"] == 8 and row["threads"] == 2:
            best_name = min(allocators, key=lambda a: runs[a]["eager_ms"])
            faster = 1 - planned["planned_ms"] / runs[best_name]["eager_ms"]
            worst = max(allocators, key=lambda a: _ratio(runs[a]))
            within = 1 - _ratio(runs[worst])
            verdict = "met" if within >= 0.15 else "MISSED"
            lines.append(f"- {where}: planned {within:+.1%} faster than eager under the allocator "
                         f"it gains least on ({worst}), timed in that allocator's process "
                         f"(target >= 15%): {verdict}; across processes {faster:+.1%} vs the "
                         f"fastest allocator's eager median ({best_name})")
        peak_ok = planned["planned_peak_bytes"] <= planned["eager_peak_bytes"]
        lines.append(f"- {where}: measured peak planned {format_bytes(planned['planned_peak_bytes'])}"
                     f" vs eager {format_bytes(planned['eager_peak_bytes'])}: "
                     f"{'met' if peak_ok else 'MISSED'}")
    return "\n".join(lines)


def configs(text: str) -> list[tuple[int, int]]:
    """"1x1,8x2" -> [(1, 1), (8, 2)]: batch x serving threads."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]


def faults_and_bytes(model_name: str, batch: int, calls: int = 3) -> dict:
    """Minor page faults and allocator bytes per call, eager vs planned (one thread, glibc)."""
    torch.set_num_threads(1)
    model, inputs = zoo.get(model_name, batch=batch)
    planned = PlannedModule(model, inputs)
    result = {"model": model_name, "batch": batch}
    with torch.no_grad():
        for label, fn in (("eager", model), ("planned", planned)):
            fn(*inputs)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(calls):
                fn(*inputs)
            result[f"{label}_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                         - before) / calls
            m = measure(fn, *inputs)
            result[f"{label}_alloc_bytes"] = sum(a.size for a in m.allocations)
            result[f"{label}_allocs"] = len(m.allocations)
    result["unplanned_ops"] = len(planned.main.unplanned)
    result["planned_ops"] = len(planned.main.planned)
    result["fused"] = " / ".join(map(str, planned.main.fused_counts().values()))
    return result


def pack_weights_tradeoff(model_name: str, iters: int, batch: int = 1) -> dict:
    """Planned with and without packed convolution weights vs eager (one thread, glibc): median
    ms per call, the three interleaved round by round; measured peaks (planned: arena + a warm
    call's allocations); and the packed bytes held beside the model's weights."""
    torch.set_num_threads(1)
    model, inputs = zoo.get(model_name, batch=batch)
    packed = PlannedModule(model, inputs)
    unpacked = PlannedModule(model, inputs, pack_weights=False)
    result = {"model": model_name, "batch": batch, "packed_weight_bytes": packed.packed_bytes}
    for label, module in (("packed", packed), ("unpacked", unpacked)):
        result[f"{label}_unplanned_convolutions"] = sum(
            op == "aten.convolution.default" for op in (
                str(o.node.target) for o in module.main.graph.ops
                if o.node.name in module.main.unplanned))
    with torch.no_grad():
        result["eager_peak_bytes"] = measure(model, *inputs).peak_bytes
    for label, module in (("packed", packed), ("unpacked", unpacked)):
        module(*inputs)  # this thread's arena
        result[f"{label}_peak_bytes"] = module.arena_bytes + measure(module, *inputs).peak_bytes
    times = interleaved((model, packed, unpacked), inputs, 1, iters).wall
    for label, samples in zip(("eager", "packed", "unpacked"), times, strict=True):
        result[f"{label}_ms"] = statistics.median(samples)
    return result


def pack_table(results: list[dict]) -> str:
    lines = [("| model | batch | eager ms | planned ms (packed) | planned ms "
              "(pack_weights=False) | unpacked / packed | peak eager | peak planned (packed) | "
              "peak planned (pack_weights=False) | packed weights held | "
              "convolutions unplanned (packed / pack_weights=False) |"), "|---" * 11 + "|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['eager_ms']:.1f} | {r['packed_ms']:.1f} | "
            f"{r['unpacked_ms']:.1f} | {r['unpacked_ms'] / r['packed_ms']:.3f} | "
            f"{format_bytes(r['eager_peak_bytes'])} | {format_bytes(r['packed_peak_bytes'])} | "
            f"{format_bytes(r['unpacked_peak_bytes'])} | {format_bytes(r['packed_weight_bytes'])} | "
            f"{r['packed_unplanned_convolutions']} / {r['unpacked_unplanned_convolutions']} |")
    return "\n".join(lines)


def interpreter_overhead(model_name: str = "mobilenet_v2", shape=(3, 32, 32), calls: int = 100) -> dict:
    """Per-call time of the generated program vs the dictionary-walking interpreter on a small
    input (so that op compute does not hide the Python cost), and the difference per step."""
    torch.set_num_threads(1)
    model, inputs = zoo.get(model_name, input_shape=shape)
    planned = PlannedModule(model, inputs)
    program = planned.main
    views = program.allocate_views()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
        return statistics.median(samples) * 1e3

    with torch.no_grad():
        generated = timed(lambda: program.run(inputs, views))
        walked = timed(lambda: interpret(program.program, inputs, views))
        eager = timed(lambda: model(*inputs))
    steps = len(program.program.steps)
    return {"model": model_name, "shape": shape, "steps": steps, "generated_ms": generated,
            "interpreted_ms": walked, "eager_ms": eager,
            "saved_us_per_step": (walked - generated) * 1e3 / steps}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-b1", type=int, default=10, help="timed calls per thread, batch 1")
    parser.add_argument("--iters-b8", type=int, default=3, help="timed calls per thread, batch 8")
    parser.add_argument("--install", action="store_true", help="apt-get install missing allocators")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--configs", type=configs,
                        default=[(b, t) for b in BATCHES for t in THREADS],
                        help="batch x threads, comma-separated (default 1x1,1x2,8x1,8x2)")
    args = parser.parse_args()
    allocators = ensure_allocators(args.install)
    models = args.models.split(",")
    started = time.time()
    rows = matrix(allocators, {1: args.iters_b1, 8: args.iters_b8}, models, args.configs)
    diagnostics = [faults_and_bytes(m, 8) for m in models]
    overhead = interpreter_overhead()
    packing = [pack_weights_tradeoff(m, args.iters_b1) for m in models]
    command = " ".join(["python", "benchmarks/allocators.py", *sys.argv[1:]])
    print(f"# Allocators vs the planned executor\n\n`{command}` on {machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s. "
          f"Median (p95) ms per call; {args.iters_b1} (batch 1) or {args.iters_b8} (batch 8) timed "
          "calls per thread after 2 warm-ups, eager and planned interleaved round by round; each "
          "serving thread has one intra-op thread. Every process times the planned module too "
          "(it allocates a few MiB per call, so the allocator hardly touches it): its spread "
          "across processes shows the load, and ratios within a process are the robust ones.\n")
    print(latency_table(rows, allocators))
    print("\nplanned / eager, each timed in the same process (same load, interleaved):\n")
    print(ratio_table(rows, allocators))
    print("\nMeasured peaks (at the allocator; the planned peak includes its arena):\n")
    print(peak_table(rows))
    print("\n## Targets\n")
    print(target_check(rows, allocators))
    print("\n## Why: page faults and allocator traffic per call (batch 8, 1 thread, glibc)\n")
    print("| model | minor faults eager | minor faults planned | allocations eager | "
          "allocations planned | bytes allocated eager | bytes allocated planned | "
          "batch norms / adds fused into their convolution |")
    print("|---|---|---|---|---|---|---|---|")
    for d in diagnostics:
        print(f"| {d['model']} | {d['eager_faults']:.0f} | {d['planned_faults']:.0f} | "
              f"{d['eager_allocs']} | {d['planned_allocs']} | {format_bytes(d['eager_alloc_bytes'])} | "
              f"{format_bytes(d['planned_alloc_bytes'])} | {d['fused']} |")
    print(f"\n## Interpreter overhead ({overhead['model']} at {overhead['shape']}, "
          f"{overhead['steps']} steps)\n")
    print(f"generated program {overhead['generated_ms']:.3f} ms, dictionary-walking interpreter "
          f"{overhead['interpreted_ms']:.3f} ms, eager nn.Module {overhead['eager_ms']:.3f} ms per "
          f"call: codegen saves {overhead['saved_us_per_step']:.2f} µs per step.")
    print(f"\n## Packed convolution weights: the trade-off (batch 1, 1 thread, glibc, "
          f"{args.iters_b1} calls each, interleaved)\n")
    print(pack_table(packing))
    print("\n<!-- raw: " + json.dumps({"rows": rows, "diagnostics": diagnostics,
                                       "overhead": overhead, "packing": packing}) + " -->")


if __name__ == "__main__":
    main()
