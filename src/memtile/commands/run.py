"""`memtile run MODEL`: eager and planned side by side: latency, measured peak, outputs compared.

`--threads T` runs T serving threads at once, each calling the model back to back with one
intra-op thread (the MemoMalloc setting: allocator contention shows between requests, not inside
one). `--allocator NAME` re-runs the command with a general-purpose allocator preloaded
(`LD_PRELOAD`), so eager can be compared against jemalloc, tcmalloc or mimalloc.
`--layout` is the planned module's (`PlannedModule(layout=...)`); `--eager-layout
channels_last` runs eager on a channels_last copy of the model (its input converted inside each
call), to separate what the layout gains from what planning gains. `--no-pack-weights` leaves
convolution weights in the model's format (oneDNN reorders them at every call) instead of
holding a packed copy beside them: less memory held, more work per call. `--no-fuse` runs
batch norm and residual add as steps of their own instead of inside the convolution's call.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from memtile.commands.common import (
    add_model_arguments,
    console,
    load_model,
    max_abs_difference,
    print_json,
)
from memtile.errors import MemtileError
from memtile.numerics import agreement
from memtile.runtime.layout import LAYOUTS
from memtile.timing import interleaved, p95
from memtile.units import format_bytes

HELP = "run a model eagerly and from its planned arena: latency, measured peak, output difference"

# name -> (Debian package, shared library file name); glibc is the default, nothing preloaded
ALLOCATORS = {
    "glibc": None,
    "jemalloc": ("libjemalloc2", "libjemalloc.so.2"),
    "tcmalloc": ("libtcmalloc-minimal4", "libtcmalloc_minimal.so.4"),
    "mimalloc": ("libmimalloc2.0", "libmimalloc.so.2"),
}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib")
ACTIVE = "MEMTILE_ALLOCATOR"  # set in the re-executed child, so it does not re-execute again
EAGER_LAYOUTS = ("contiguous", "channels_last")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="serving threads calling the model at once (default 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per thread (default 20)")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="glibc",
                        help="general-purpose allocator to preload (default glibc: none)")
    parser.add_argument("--strategy", default="best", help="planning strategy (default best)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="planned activations' memory format (default auto: channels_last "
                             "when convolutions can then run from the arena)")
    parser.add_argument("--eager-layout", choices=EAGER_LAYOUTS, default="contiguous",
                        help="eager model's memory format (default contiguous, as given)")
    parser.add_argument("--no-pack-weights", dest="pack_weights", action="store_false",
                        help="planned: no packed copy of convolution weights (reordered per call)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="planned: batch norm and residual add as separate steps, not "
                             "inside the convolution's call")
    parser.add_argument("--peers", action="store_true",
                        help="compare eager and planned with ONNX Runtime and torch.compile in "
                             "this process; --threads is then every runner's intra-op threads "
                             "(needs pip install 'memtile[bench]')")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in README)")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.iters < 1:
        raise MemtileError("--threads and --iters must be at least 1")
    if args.allocator != "glibc" and os.environ.get(ACTIVE) != args.allocator:
        return _rerun_with(args)
    if args.peers:
        return run_peers(args)
    model, inputs = load_model(args)
    summary = {"model": args.model, "batch": args.batch, "input_shape": list(inputs[0].shape[1:]),
               "allocator": args.allocator, "allocator_loaded": allocator_loaded(args.allocator),
               **compare(model, inputs, args.threads, args.iters, args.strategy, args.layout,
                         args.eager_layout, args.pack_weights, args.fuse)}
    if args.json:
        print_json(summary)
    else:
        console.print(table(summary))
    if not summary["equivalent"]:
        print(f"memtile: planned outputs differ from eager by {summary['max_rel_diff']:.3g} of their "
              "magnitude, beyond float32 rounding (see float64_rel_diff)", file=sys.stderr)
        return 1
    return 0


def run_peers(args: argparse.Namespace) -> int:
    """`--peers`: the four runners of `memtile.peers` on one model, printed as a table or JSON."""
    from memtile import peers

    if args.eager_layout != "contiguous":
        raise MemtileError("--peers runs every peer on the model as given: drop --eager-layout")
    peers.import_onnxruntime()  # before building anything: say how to install it
    model, inputs = load_model(args)
    built = peers.Peers(model, inputs, strategy=args.strategy, layout=args.layout,
                        pack_weights=args.pack_weights, fuse=args.fuse)
    summary = {"model": args.model, "batch": args.batch, "input_shape": list(inputs[0].shape[1:]),
               "allocator": args.allocator, **built.compare(args.threads, args.iters)}
    if args.json:
        print_json(summary)
    else:
        console.print(peers_table(summary))
    return 0


def peers_table(summary: dict) -> Table:
    grid = Table(title=f"memtile run --peers: {summary['model']} (batch {summary['batch']}, "
                       f"{summary['threads']} intra-op thread(s) each, {summary['iters']} "
                       "interleaved calls)",
                 caption="peak: allocator = bytes a warm call allocated (memtile.measure); "
                         "arena+allocator = the planned arena + that; ort-arena-profile = ORT's "
                         "CPU arena peak in use above the loaded session (session profiling)")
    for column in ("runner", "median ms", "p95 ms", "/ ORT", "peak", "peak source",
                   "rel. diff", "build s"):
        grid.add_column(column, no_wrap=column == "runner")
    for name, r in summary["runners"].items():
        ratio = r[f"vs_{summary['anchor']}"]
        ratio = "-" if ratio is None else f"{ratio:.2f}"
        peak = "-" if r["peak_bytes"] is None else format_bytes(r["peak_bytes"])
        grid.add_row(name, f"{r['median_ms']:.2f}", f"{r['p95_ms']:.2f}", ratio, peak,
                     r["peak_source"], f"{r['max_rel_diff']:.2g}", f"{r['build_seconds']:.1f}")
    for name, reason in summary["skipped"].items():
        grid.add_row(name, "skipped", "", "", "", reason)
    return grid


def compare(model: torch.nn.Module, inputs: tuple, threads: int = 1, iters: int = 20,
            strategy: str = "best", layout: str = "auto", eager_layout: str = "contiguous",
            pack_weights: bool = True, fuse: bool = True) -> dict:
    """Eager vs planned on the same inputs: median/p95 ms per call, measured peaks, max |diff|.

    The planned peak is the arena plus what a warm planned call allocates (unplanned ops and
    fresh outputs); the eager peak is what one eager call allocates.
    """
    from memtile.measure import measure
    from memtile.runtime import PlannedModule, slots

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        slot_allocator_missing = slots.load()  # before the module: it installs the allocator
        planned = PlannedModule(model, inputs, strategy=strategy, layout=layout,
                                pack_weights=pack_weights, fuse=fuse)
        build_seconds = time.perf_counter() - started
        eager = model if eager_layout == "contiguous" else ChannelsLast(model)
        with torch.no_grad():
            expected = eager(*inputs)
            eager_peak = measure(eager, *inputs).peak_bytes
        got = planned(*inputs)  # allocates this thread's arena
        call_peak = measure(planned, *inputs).peak_bytes
        eager_ms, planned_ms = interleaved((eager, planned), inputs, threads, iters).wall
    finally:
        torch.set_num_threads(previous)
    agreed = agreement(got, model, inputs, expected)  # tensors, tuples or dicts
    return {
        "layout": layout,
        "eager_layout": eager_layout,
        "pack_weights": pack_weights,
        "fuse": fuse,
        "fused": planned.main.fused_counts(),
        "threads": threads,
        "iters": iters,
        "eager_ms": statistics.median(eager_ms),
        "planned_ms": statistics.median(planned_ms),
        "eager_p95_ms": p95(eager_ms),
        "planned_p95_ms": p95(planned_ms),
        "arena_bytes": planned.arena_bytes,
        "eager_peak_bytes": eager_peak,
        "planned_peak_bytes": planned.arena_bytes + call_peak,
        "max_abs_diff": max_abs_difference(expected, got),
        **agreed.as_dict(),
        "packed_weight_bytes": planned.packed_bytes,
        "slot_allocator": {"installed": slot_allocator_missing is None,
                           "reason": slot_allocator_missing},
        "planned_ops": len(planned.main.planned),
        "unplanned_ops": [{"op": op, "reason": reason} for op, reason in planned.unplanned_ops],
        "build_seconds": build_seconds,
    }


class ChannelsLast(torch.nn.Module):
    """Eager in channels_last: a copy of the model with 4-D weights in channels_last, its 4-D
    inputs converted inside each call (a caller hands NCHW tensors, as to the planned module)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, *inputs: torch.Tensor):
        return self.model(*(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4
                            else x for x in inputs))


def allocator_library_or_none(name: str) -> str | None:
    """The installed shared library of an allocator, or None (glibc, or not installed)."""
    if ALLOCATORS[name] is None:
        return None
    for folder in LIBRARY_DIRS:
        found = sorted(glob.glob(os.path.join(folder, ALLOCATORS[name][1] + "*")))
        if found:
            return found[0]
    return None


def allocator_library(name: str) -> str | None:
    """The shared library to preload for an allocator; a MemtileError says how to install it."""
    library = allocator_library_or_none(name)
    if library is not None or ALLOCATORS[name] is None:
        return library
    package, library = ALLOCATORS[name]
    raise MemtileError(
        f"{name} is not installed ({library} not found in {', '.join(LIBRARY_DIRS)}); "
        f"install it with: apt-get install {package}"
    )


def allocator_loaded(name: str) -> bool:
    """Whether this process really runs with the allocator (its library is mapped)."""
    if ALLOCATORS[name] is None:
        return True
    try:
        return ALLOCATORS[name][1] in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _rerun_with(args: argparse.Namespace) -> int:
    """Run this same command again in a child process with the allocator preloaded."""
    library = allocator_library(args.allocator)
    env = dict(os.environ, **{ACTIVE: args.allocator})
    env["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    argv = [sys.executable, "-m", "memtile.cli", "run", args.model, "--batch", str(args.batch),
            "--threads", str(args.threads), "--iters", str(args.iters), "--allocator",
            args.allocator, "--strategy", args.strategy, "--layout", args.layout,
            "--eager-layout", args.eager_layout]
    if args.input_shape:
        argv += ["--input-shape", ",".join(map(str, args.input_shape))]
    if not args.pack_weights:
        argv.append("--no-pack-weights")
    if not args.fuse:
        argv.append("--no-fuse")
    if args.peers:
        argv.append("--peers")
    if args.json:
        argv.append("--json")
    return subprocess.run(argv, env=env, check=False).returncode


def table(summary: dict) -> Table:
    grid = Table(title=f"memtile run: {summary['model']} (batch {summary['batch']}, "
                       f"{summary['threads']} thread(s), allocator {summary['allocator']})")
    for column in ("", f"eager ({summary['eager_layout']})",
                   f"planned (layout {summary['layout']})"):
        grid.add_column(column)
    grid.add_row("median ms per call", f"{summary['eager_ms']:.2f}", f"{summary['planned_ms']:.2f}")
    grid.add_row("p95 ms per call", f"{summary['eager_p95_ms']:.2f}",
                 f"{summary['planned_p95_ms']:.2f}")
    grid.add_row("measured peak", format_bytes(summary["eager_peak_bytes"]),
                 format_bytes(summary["planned_peak_bytes"]))
    grid.add_row("arena (planned)", "-", format_bytes(summary["arena_bytes"]))
    grid.add_row("packed convolution weights", "-", format_bytes(summary["packed_weight_bytes"]))
    grid.add_row("fused into convolutions", "-",
                 "batch norms {batch_norm}, adds {add}, SiLUs {activation}"
                 .format(**summary["fused"])
                 if summary["fuse"] else "off (--no-fuse)")
    slot = summary["slot_allocator"]
    grid.add_row("slot allocator", "", "installed" if slot["installed"] else
                 f"not installed ({slot['reason']}): convolutions zero their destinations")
    grid.add_row("max |planned - eager|", "", f"{summary['max_abs_diff']:.3g} "
                 f"({summary['max_rel_diff']:.3g} of the output's magnitude)")
    for entry in summary["unplanned_ops"]:
        grid.add_row(f"unplanned: {entry['op']}", "", entry["reason"])
    return grid


def report_section(name: str, model, inputs, out: Path) -> str:
    """Markdown for `memtile report`: eager vs planned latency and measured peak."""
    s = compare(model, inputs, threads=1, iters=10)
    unplanned = "\n".join(f"- `{e['op']}`: {e['reason']}" for e in s["unplanned_ops"]) or "- none"
    return f"""## Run: the planned executor

`PlannedModule` runs `{name}` with every planned op writing into its offset of one
{format_bytes(s['arena_bytes'])} arena (planned), built in {s['build_seconds']:.1f} s.
Median of {s['iters']} calls, one thread, eager and planned interleaved; peaks measured at the
allocator (the planned peak includes the arena).

| | eager | planned |
|---|---|---|
| median ms per call | {s['eager_ms']:.2f} | {s['planned_ms']:.2f} |
| p95 ms per call | {s['eager_p95_ms']:.2f} | {s['planned_p95_ms']:.2f} |
| measured peak | {format_bytes(s['eager_peak_bytes'])} | {format_bytes(s['planned_peak_bytes'])} |

Outputs differ by at most {s['max_abs_diff']:.3g}, {s['max_rel_diff']:.3g} of the output's
magnitude (0 means bit-exact; planned convolutions run in channels_last through oneDNN, which
rounds differently from eager's NCHW). {s['planned_ops']} ops run from the arena (convolutions
with weights packed once: {format_bytes(s['packed_weight_bytes'])} held beside the model's);
these run outside it, because no kernel for them writes straight into a given buffer (measured
when the module was built):

{unplanned}
"""
