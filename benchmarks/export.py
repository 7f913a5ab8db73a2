"""Export table: memtile-planned ExecuTorch programs (.pte) beside ExecuTorch's greedy.

For each model: `memtile.export` (capture, memtile's schedule, to_edge, constants folded,
to_executorch with memtile's planner as the memory-planning algorithm). Columns: the planned
arena read back from the written .pte, ExecuTorch's default greedy on the same edge program in
the same run, LOAD of ExecuTorch's specs, the relative difference against eager through
ExecuTorch's runtime on fresh inputs, export seconds and the median latency of one `forward`
through the runtime (portable kernels, the Python runtime's build). `--tiled` models are tiled
first by `memtile.tile`. `--default-pipeline` adds ExecuTorch's own default output
(`to_edge(export(model)).to_executorch()`: exported order, no folding) for reference. Run:

    OMP_NUM_THREADS=1 python benchmarks/export.py --out /tmp/export.md --rows /tmp/export.jsonl
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _common import CORPUS, header

from memtile import zoo
from memtile.export import export
from memtile.export.check import fresh_inputs, latency_ms, planned_buffer_sizes

ZOO = (
    "alexnet", "vgg11", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101",
    "resnext50_32x4d", "wide_resnet50_2", "densenet121", "densenet169", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0",
    "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1", "efficientnet_b0", "efficientnet_b1",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
    "ds_cnn_kws", "mobilenet_v1_025_vww", "resnet8_cifar", "autoencoder_ad", "mobilenet_v2_035_144",
)
TILED = ("mobilenet_v2", "mobilenet_v2_035_144", "ds_cnn_kws", "mobilenet_v1_025_vww",
         "resnet8_cifar", "autoencoder_ad")
MIB = 2**20


def default_pipeline_bytes(model, inputs) -> int:
    """ExecuTorch's own default: `to_edge(torch.export(model)).to_executorch()`."""
    from executorch.exir import to_edge

    with torch.no_grad():
        edge = to_edge(torch.export.export(model, inputs, strict=False))
    return sum(edge.to_executorch().executorch_program.execution_plan[0].non_const_buffer_sizes)


def measure(name: str, tiled: bool, folder: Path, default: bool, calls: int) -> dict:
    model, inputs = zoo.get(name)
    row = {"model": name, "input": list(inputs[0].shape), "tiled": tiled, "tile_requested": tiled}
    try:
        result = export(model, inputs, folder / "m.pte", tile=tiled)
    except Exception as error:  # noqa: BLE001 - a model that does not export is a row note
        traceback.print_exc()
        return row | {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    row |= {k: v for k, v in result.as_dict().items() if k != "steps"}
    row["tiling_steps"] = len(result.steps)
    # memtile tiling's own planned peak (its ATen graph, alignment 64), for the tiled rows
    row["tiling_peak_bytes"] = result.steps[-1]["peak_bytes"] if result.steps else None
    row["latency_ms"] = latency_ms(folder / "m.pte", fresh_inputs(inputs), calls=calls) if calls else None
    if default:
        row["executorch_default_bytes"] = default_pipeline_bytes(model, inputs)
    return row


def xnnpack_row(name: str, folder: Path) -> dict:
    """The same scheduled program with XNNPACK's partitioner: what stays in the planned arena,
    the runtime latency, and the difference against eager. Delegated subgraphs allocate their
    activations inside XNNPACK (outside the plan); the arena holds the delegate's inputs and
    outputs and what XNNPACK did not take, plus ExecuTorch's 64-byte padding for XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from memtile.export.check import run_pte
    from memtile.export.hook import MemtilePlanner
    from memtile.export.program import lower, scheduled_program
    from memtile.numerics import relative_difference

    model, inputs = zoo.get(name)
    began = time.perf_counter()
    program, _ = scheduled_program(model, inputs)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    planner = MemtilePlanner()
    (folder / "x.pte").write_bytes(lower(edge, planner).buffer)
    seconds = time.perf_counter() - began
    greedy = sum(lower(edge).executorch_program.execution_plan[0].non_const_buffer_sizes)
    nodes = edge.exported_program().graph_module.graph.nodes
    fresh = fresh_inputs(inputs)
    with torch.no_grad():
        want = model(*fresh)
    return {"model": name, "delegates": sum(str(n.target) == "executorch_call_delegate" for n in nodes),
            "specs": planner.record.specs, "arena": sum(planned_buffer_sizes(folder / "x.pte")),
            "memtile_arena": planner.record.plan.arena_bytes, "greedy": greedy, "seconds": seconds,
            "max_rel_diff": relative_difference(run_pte(folder / "x.pte", fresh), [want]),
            "latency_ms": latency_ms(folder / "x.pte", fresh)}


def xnnpack_markdown(rows: list[dict]) -> str:
    lines = [("| model | delegates | specs planned | .pte arena B (memtile + 64 padding) | "
             "ExecuTorch greedy B | max rel diff | export s | latency ms (XNNPACK) |"),
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['delegates']} | {r['specs']} | {r['arena']:,} "
              f"({r['memtile_arena']:,} + 64) | {r['greedy']:,} | {r['max_rel_diff']:.1e} | "
              f"{r['seconds']:.1f} | {r['latency_ms']:.1f} |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        ("| model | input | tiled (steps found, tiling's planned peak MiB) | specs / in-place | LOAD MiB | "
        ".pte arena MiB (proven) | ExecuTorch greedy MiB | .pte / greedy | ExecuTorch default MiB | max rel diff | "
        "export s | latency ms |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        if "error" in r:
            lines.append(f"| {r['model']} | {shape} | {'yes' if r['tiled'] else 'no'} | "
                         f"{r['error']} | | | | | | | | |")
            continue
        default = r.get("executorch_default_bytes")
        tiled = "no"
        if r.get("tile_requested", r["tiled"]):
            kept = "yes" if r["tiled"] else "not kept"
            tiled = f"{kept} ({r['tiling_steps']}{_tiling_peak(r)})"
        lines.append(
            f"| {r['model']} | {shape} | {tiled} | {r['specs']} / {r['inplace_pairs']} | "
            f"{r['load_bytes'] / MIB:.3f} | "
            f"{r['planned_arena_bytes'] / MIB:.3f} ({'yes' if r['optimal'] else 'no'}) | "
            f"{r['executorch_greedy_bytes'] / MIB:.3f} | "
            f"{r['planned_arena_bytes'] / max(r['executorch_greedy_bytes'], 1):.3f} | "
            f"{'' if default is None else f'{default / MIB:.3f}'} | {r['max_rel_diff']:.1e} | "
            f"{r['seconds']:.1f} | {_latency(r)} |")
    return "\n".join(lines)


def _latency(r: dict) -> str:
    return "not timed" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}"


def _tiling_peak(r: dict) -> str:
    peak = r.get("tiling_peak_bytes")
    return "" if peak is None else f", {peak / MIB:.3f}"


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if "error" not in r]
    above = [r["model"] for r in done if r["planned_arena_bytes"] > r["executorch_greedy_bytes"]]
    mismatched = [r["model"] for r in done if r["planned_arena_bytes"] != r["memtile_arena_bytes"]]
    ratios = sorted(r["planned_arena_bytes"] / r["executorch_greedy_bytes"] for r in done)
    median = ratios[len(ratios) // 2] if ratios else float("nan")
    return "\n".join([
        f"- rows: {len(done)} exported, {len(rows) - len(done)} failed",
        f"- .pte arena == memtile's plan: {len(done) - len(mismatched)} of {len(done)}",
        (f"- .pte arena above ExecuTorch greedy: {', '.join(above) or 'none'}; "
        f"median .pte / greedy {median:.3f}"),
        (f"- within 1e-5 relative through the runtime: "
        f"{sum(r['max_rel_diff'] <= 1e-5 for r in done)} of {len(done)}"),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--corpus", action="store_true", help="also the real-model corpus")
    parser.add_argument("--tiled", default=",".join(TILED), help="models exported with --tile")
    parser.add_argument("--default-pipeline", action="store_true",
                        help="also ExecuTorch's default output for each untiled model")
    parser.add_argument("--xnnpack", default="", help="models also lowered with XNNPACK")
    parser.add_argument("--calls", type=int, default=3,
                        help="timed runtime calls per model after the check's run (0: no latency)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rows", type=Path, default=None, help="append one JSON line per row")
    args = parser.parse_args()
    jobs = [(m, False) for m in args.models.split(",") if m]
    jobs += [(m, False) for m in CORPUS] if args.corpus else []
    jobs += [(m, True) for m in args.tiled.split(",") if m]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, tiled in jobs:
            began = time.perf_counter()
            rows.append(measure(name, tiled, Path(folder), args.default_pipeline and not tiled,
                                args.calls))
            print(f"{name}{' tiled' if tiled else ''}: {time.perf_counter() - began:.0f} s",
                  file=sys.stderr, flush=True)
            if args.rows:
                with args.rows.open("a") as handle:
                    handle.write(json.dumps(rows[-1]) + "\n")
        xnnpack = [xnnpack_row(m, Path(folder)) for m in args.xnnpack.split(",") if m]
    text = f"{header('Export: memtile-planned .pte vs ExecuTorch greedy')}\n"
    if rows:
        text += f"{markdown(rows)}\n\n{summary(rows)}\n"
    if xnnpack:
        text += f"\nXNNPACK-delegated:\n\n{xnnpack_markdown(xnnpack)}\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
