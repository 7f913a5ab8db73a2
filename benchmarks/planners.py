"""Planned arena per model: ours (schedule + in-place + heuristics + CP-SAT) beside ExecuTorch.

For each model at batch 1 (224x224, 299 for inception_v3; the MLPerf Tiny models at their own
shapes): buffers, naive (no reuse), LOAD in the exported order, LOAD after the best schedule
and in-place ops, our best heuristic, CP-SAT (seeded with it) and ExecuTorch's default greedy
planner (`non_const_buffer_sizes` of `to_edge(...).to_executorch()`), which plans the same
exported program without in-place sharing or reordering.

ExecuTorch is optional (the `bench` extra); without it that column says why. Run:

    OMP_NUM_THREADS=1 python benchmarks/planners.py --out /tmp/planners.md
"""

import argparse
import json
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from memtile import zoo
from memtile.capture import capture
from memtile.planner import prepare
from memtile.planning import best_heuristic, lower_bound, naive_bytes, solve

TORCHVISION = (
    "alexnet", "vgg11", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101",
    "resnext50_32x4d", "wide_resnet50_2", "densenet121", "densenet169", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0",
    "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1", "efficientnet_b0", "efficientnet_b1",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
)
MIB = 2**20


def executorch_arenas(model, inputs) -> tuple[int | None, int | None, str]:
    """ExecuTorch's planned non-constant bytes: as `to_edge(...).to_executorch()` gives them,
    and after its `constant_prop_pass` (weight transposes of linear layers are otherwise
    computed into planned memory at run time); or None twice and the reason."""
    try:
        from executorch.exir import EdgeProgramManager, to_edge
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    except ImportError as error:
        return None, None, f"executorch not installed ({error.name})"

    def arena(fold: bool) -> int:  # a fresh export each time: to_executorch rewrites in place
        with torch.no_grad():
            edge = to_edge(torch.export.export(model, inputs, strict=False))
        if fold:
            edge = EdgeProgramManager(constant_prop_pass(edge.exported_program()))
        plan = edge.to_executorch().executorch_program.execution_plan[0]
        return sum(plan.non_const_buffer_sizes)

    try:
        default, folded = arena(fold=False), arena(fold=True)
    except Exception as error:  # noqa: BLE001 - a model ExecuTorch cannot lower is a row note
        return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return default, folded, ""


def measure(name: str, schedule_seconds: float, cp_sat_seconds: float) -> dict:
    model, inputs = zoo.get(name)
    began = time.perf_counter()
    graph = capture(model, inputs)
    row = {"model": name, "input": list(inputs[0].shape), "ops": graph.num_steps,
           "capture_s": time.perf_counter() - began}
    exported = prepare(graph, reorder=False, inplace=False).problem
    row |= {"buffers": len(exported.buffers), "naive": naive_bytes(exported),
            "load_exported": lower_bound(exported)}
    prepared = prepare(graph, time_limit=schedule_seconds)
    result, problem = prepared.schedule, prepared.problem
    heuristic = best_heuristic(problem)
    exact = solve(problem, "optimal", time_limit=cp_sat_seconds)
    row |= {
        "load": lower_bound(problem), "schedule_exact": result.exact,
        "reordered": result.order != list(range(graph.num_steps)), "inplace_pairs": prepared.inplace_count,
        "schedule_s": result.seconds,
        "blocks": len(result.segment_peaks),
        "blocks_lowered": [new / old for old, new in result.segment_peaks if new < old],
        "heuristic": heuristic.arena_bytes,
        "heuristic_strategy": heuristic.strategy, "cp_sat": exact.arena_bytes,
        "cp_sat_optimal": exact.optimal, "cp_sat_s": exact.seconds,
    }
    row["executorch_default"], row["executorch"], row["executorch_note"] = executorch_arenas(
        model, inputs)
    return row


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.3f}"


def table(rows: list[dict]) -> str:
    header = ("| model | input | ops | buffers | naive MiB | LOAD exported MiB | LOAD sched+in-place "
              "MiB | block peaks lowered | best heuristic MiB | CP-SAT MiB (proven, s) | ExecuTorch "
              "greedy MiB | ExecuTorch greedy, weights folded MiB | ours / ExecuTorch folded |")
    lines = [header, "|---" * 13 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * 11)
            continue
        ours = min(r["heuristic"], r["cp_sat"])
        et = r["executorch"]
        ratio = f"{ours / et:.3f}" if et else f"n/a ({r['executorch_note']})"
        sched = ("reordered" if r["reordered"] else "export kept") + (
            ", proven" if r["schedule_exact"] else ", heuristic")
        lowered = r["blocks_lowered"]
        blocks = f"{len(lowered)} of {r['blocks']}" + (
            f", median x{statistics.median(lowered):.2f}" if lowered else "")
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['ops']} | {r['buffers']} "
            f"| {_mib(r['naive'])} | {_mib(r['load_exported'])} "
            f"| {_mib(r['load'])} ({sched}; {r['inplace_pairs']} in-place) | {blocks} "
            f"| {_mib(r['heuristic'])} | {_mib(r['cp_sat'])} "
            f"({'yes' if r['cp_sat_optimal'] else 'no'}, {r['cp_sat_s']:.2f}) "
            f"| {_mib(r['executorch_default'])} | {_mib(et)} | {ratio} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if "error" not in r]
    at_load = [r["model"] for r in done if min(r["heuristic"], r["cp_sat"]) == r["load"]]
    proven = [r["model"] for r in done if r["cp_sat_optimal"]]
    above_load = [r["model"] for r in done if r["model"] not in at_load]
    shrink = statistics.median(r["load"] / r["load_exported"] for r in done)
    lines = [
        f"- models: {len(done)} planned ({len(rows) - len(done)} failed)",
        (f"- arena equals LOAD (after schedule + in-place): {len(at_load)} of {len(done)}; proven "
        f"optimal: {len(proven)} of {len(done)}; above LOAD: {', '.join(above_load) or 'none'}"),
        f"- LOAD after schedule + in-place / LOAD exported: median {shrink:.3f}",
    ]
    with_et = [r for r in done if r["executorch"]]
    if with_et:
        ratios = [min(r["heuristic"], r["cp_sat"]) / r["executorch"] for r in with_et]
        above = [min(r["heuristic"], r["cp_sat"]) / r["executorch"]
                 for r in with_et if r["executorch"] > r["load_exported"]]
        worse = [r["model"] for r, q in zip(with_et, ratios, strict=True) if q > 1]
        lines.append(
            f"- ours / ExecuTorch (weights folded) over {len(with_et)} models: median {statistics.median(ratios):.3f}, "
            f"max {max(ratios):.3f}; ours above ExecuTorch on: {', '.join(worse) or 'none'}"
        )
        lines.append(
            f"- where ExecuTorch (weights folded) is above LOAD exported ({len(above)} models): median ours / "
            f"ExecuTorch {statistics.median(above):.3f}" if above
            else "- ExecuTorch is at LOAD exported on every model"
        )
    resnet = next((r for r in done if r["model"] == "resnet18"), None)
    if resnet:
        lines.append(f"- resnet18: {_mib(min(resnet['heuristic'], resnet['cp_sat']))} MiB "
                     "(ONNX Runtime's memory pattern: 5.97 MiB)")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        et = f"executorch {version('executorch')}"
    except PackageNotFoundError:
        et = "executorch not installed"
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {et}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*TORCHVISION, *zoo.TINY_MODELS]))
    parser.add_argument("--schedule-seconds", type=float, default=10.0)
    parser.add_argument("--cp-sat-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    parser.add_argument("--rows", type=Path, default=None, help="append raw rows (JSON lines)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for name in args.models.split(","):
        began = time.perf_counter()
        try:
            row = measure(name, args.schedule_seconds, args.cp_sat_seconds)
        except Exception as error:  # noqa: BLE001 - one model's failure is reported in its row
            row = {"model": name, "error": f"{type(error).__name__}: {str(error)[:100]}"}
        rows.append(row)
        print(f"{name}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        if args.rows:
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")
    text = (
        f"## Planned arena per model\n\n`{' '.join(['python', *sys.argv])}`, {started}, "
        f"{machine()}. Batch 1; MiB = 2^20 bytes; alignment 64; LOAD is the lower bound of the "
        "given order; block peaks lowered: of the segments between ops every order passes through (an inception block, a residual block), how many the schedule gave a lower peak of their own, and by what factor (LOAD drops only when the lowered block holds the global peak); ExecuTorch plans the exported program with its default greedy "
        "(`to_edge(...).to_executorch()`, `sum(non_const_buffer_sizes)`), no reordering or "
        "in-place sharing; by default it computes the transposes of linear weights into planned "
        "memory at run time, so the comparison uses it after its own `constant_prop_pass` "
        "(weights folded).\n\n" + table(rows) + "\n\n" + summary(rows) + "\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
