"""Plan and run on the real-model corpus (issue 13's 15 timm models and 3 smp nets).

Feeds BENCHMARKS.md "Real models: plan and run". Each model runs `memtile plan MODEL --json` and
`memtile run MODEL --json` in their own processes (what a user types; a failure is a row, not
the end of the table), and one JSON line per model is appended to the output:

    .venv/bin/python benchmarks/real_models.py [MODEL ...] >> real.jsonl
    .venv/bin/python benchmarks/real_models.py --table real.jsonl

Columns: the planned arena against LOAD (the lower bound) and whether it is proven optimal;
the planned executor against eager in one process (`memtile run`: relative difference of the
outputs, median ms, allocator-level measured peak) and whether the outputs agree.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CORPUS

from memtile.units import format_bytes

RUN_ITERATIONS = "10"


def memtile_json(*argv: str) -> dict:
    """One CLI call's `--json` object, or its last stderr line as the error (run in a temporary
    folder: `plan` writes its files into ./memtile-out)."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-m", "memtile.cli", *argv, "--json"], cwd=folder,
                              capture_output=True, text=True, check=False)
    if done.returncode in (0, 1) and done.stdout.strip():
        return json.loads(done.stdout)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"exit {done.returncode}: {lines[-1] if lines else ''}"[:160]}


def measure(name: str) -> dict:
    plan = memtile_json("plan", name)
    run = memtile_json("run", name, "--iters", RUN_ITERATIONS)
    row = {"model": name}
    if "error" in plan:
        row["plan_error"] = plan["error"]
    else:
        row |= {"load_bytes": plan["load_bytes"], "arena_bytes": plan["best"]["arena_bytes"],
                "optimal": plan["best"]["optimal"]}
    if "error" in run:
        row["run_error"] = run["error"]
    else:
        row |= {key: run[key] for key in (
            "input_shape", "max_rel_diff", "equivalent", "eager_ms", "planned_ms",
            "eager_peak_bytes", "planned_peak_bytes")}
    return row


def table(rows: list[dict]) -> str:
    lines = [("| model | input | plan: arena / LOAD (proven) | run: rel diff (agrees) | "
              "ms eager → planned | measured peak eager → planned |"),
             "|---|---|---|---|---|---|"]
    for r in rows:
        plan = r.get("plan_error") or (
            f"{format_bytes(r['arena_bytes'])} / {format_bytes(r['load_bytes'])} "
            f"({'yes' if r['optimal'] else 'no'})")
        if "run_error" in r:
            lines.append(f"| {r['model']} | | {plan} | {r['run_error']} | | |")
            continue
        shape = "x".join(map(str, r["input_shape"]))
        lines.append(
            f"| {r['model']} | {shape} | {plan} | {r['max_rel_diff']:.1e} "
            f"({'yes' if r['equivalent'] else 'NO'}) | {r['eager_ms']:.1f} → "
            f"{r['planned_ms']:.1f} ({r['planned_ms'] / r['eager_ms']:.2f}x) | "
            f"{format_bytes(r['eager_peak_bytes'])} → {format_bytes(r['planned_peak_bytes'])} "
            f"({r['planned_peak_bytes'] / r['eager_peak_bytes']:.2f}x) |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line]
        print(table(rows))
        return 0
    for name in sys.argv[1:] or CORPUS:
        print(json.dumps(measure(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
