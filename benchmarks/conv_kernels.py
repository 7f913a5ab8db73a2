"""Per convolution shape of one model: eager's kernel vs the planned executor's.

Each distinct convolution (input shape, weight shape, stride, padding, dilation, groups) is run
alone, in the main thread at `--threads` intra-op threads: eager as `F.conv2d` on NCHW tensors
(oneDNN's blocked kernels with their reorders, or ATen's MKL GEMM path for 1x1 stride-1
convolutions at batch < 16 and 1 thread); oneDNN as memtile runs it
(`mkldnn._convolution_pointwise` on channels_last with the weight packed once, at this thread
count, and a bias, as a folded batch norm gives); and, for 1x1 stride-1 ungrouped convolutions, memtile's GEMM over the channels_last rows
(`convolution.MatmulInto`, weight packed as C_in x C_out). "planned" is the one memtile's fixed
rule picks (`convolution.runs_as_matmul`). Calls alternate; each figure is the smallest CPU time
(`time.thread_time`) of `--calls` calls, which on a loaded machine is the work without the
preemptions. The kernel names are oneDNN's own (`ONEDNN_VERBOSE` output of one call; "ATen
GEMM" where oneDNN ran no convolution).

    .venv/bin/python benchmarks/conv_kernels.py [--model resnet50] [--batch 1] [--calls 15]
        [--threads 1] [--end-to-end ROUNDS]

`--end-to-end ROUNDS` also times whole planned calls of the model with the GEMM rule and
without it (the same module built with `MATMUL_MAX_MACS = 0`), interleaved, CPU-time medians.

Prints the markdown tables for "Executor at 1 thread" and "1x1 convolutions as GEMMs" in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter

import torch
import torch.nn.functional as F
from _common import header
from torch import nn

from memtile import zoo
from memtile.runtime import PlannedModule, convolution


def convolutions(model: nn.Module, inputs: tuple) -> Counter:
    """(input shape, conv module's parameters) -> how many times the model runs it."""
    found: Counter = Counter()

    def record(module, args, _):
        found[(tuple(args[0].shape), module)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    shapes: Counter = Counter()
    examples = {}
    for (shape, conv), count in found.items():
        key = (shape, tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
        shapes[key] += count
        examples.setdefault(key, conv)
    return Counter({(key, examples[key]): count for key, count in shapes.items()})


def runners(shape: tuple, conv: nn.Conv2d):
    """(eager call, oneDNN call, GEMM call or None) on a seeded input of `shape`."""
    x = torch.randn(shape)
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    # planned calls carry a bias: a batch norm after the convolution is folded into one
    folded_bias = torch.randn(weight.shape[0]) if bias is None else bias
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, stride, dilation, conv.groups, list(shape))
    x_last = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty(shape[0], weight.shape[0], shape[2], shape[3]).to(
        memory_format=torch.channels_last)
    matrix = convolution.as_matrix(weight).contiguous()

    def eager():
        return F.conv2d(x, weight, bias, stride, padding, dilation, conv.groups)

    def onednn():
        return convolution.DIRECT(x_last, packed, folded_bias, padding, stride, dilation,
                                  conv.groups, "none", [], None)

    def gemm():
        return convolution.MatmulInto()(x_last, matrix, folded_bias, padding, stride,
                                        dilation, conv.groups, out=out)

    one_by_one = convolution.is_one_by_one(tuple(weight.shape), stride, padding, conv.groups)
    return eager, onednn, gemm if one_by_one else None


def kernel_names(fn) -> str:
    """oneDNN's implementation names for the convolutions of one call of `fn`."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        fields = [line.split(",") for line in log if ",exec,cpu," in line]
    names = [f[6] for f in fields if f[5] == "convolution"]
    reorders = sum(f[5] == "reorder" for f in fields)
    name = "+".join(names) or "ATen GEMM"
    return f"{name} + {reorders} reorders" if reorders else name


def smallest_cpu_ms(fns, calls: int) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(calls):
        for k, fn in enumerate(fns):
            began = time.thread_time()
            fn()
            best[k] = min(best[k], (time.thread_time() - began) * 1e3)
    return best


def table(model_name: str, batch: int, calls: int) -> str:
    model, inputs = zoo.get(model_name, batch=batch)
    found = convolutions(model, inputs)
    rows, totals = [], [0.0, 0.0]
    with torch.no_grad():
        for ((shape, weight, stride, padding, _, groups), conv), count in found.items():
            eager, onednn, gemm = runners(shape, conv)
            fns = (eager, onednn) if gemm is None else (eager, onednn, gemm)
            for fn in fns:
                fn()  # warm: oneDNN's primitive cache
            ms = smallest_cpu_ms(fns, calls)
            matmul = convolution.runs_as_matmul(shape, weight, stride, padding, groups)
            planned = ms[2] if matmul else ms[1]
            totals = [t + count * m for t, m in zip(totals, (ms[0], planned), strict=True)]
            layer = (f"{shape[1]}->{weight[0]} {weight[2]}x{weight[3]} /{stride[0]} "
                     f"{shape[2]}x{shape[3]}" + (f" g{groups}" if groups > 1 else "")
                     + (f" p{padding[0]}" if padding[0] != weight[2] // 2 else ""))
            gemm_ms = "-" if gemm is None else f"{ms[2]:.3f} ({ms[2] / ms[1]:.2f})"
            rows.append(f"| {layer} | {count} | {kernel_names(eager)} | {ms[0]:.3f} | "
                        f"{kernel_names(onednn)} | {ms[1]:.3f} | {gemm_ms} | "
                        f"{'GEMM' if matmul else 'oneDNN'} | {planned / ms[0]:.2f} |")
    title = ("| convolution (in->out kxk /stride HxW) | count | eager kernel | eager ms | "
             "oneDNN kernel | oneDNN ms | GEMM ms (/ oneDNN) | planned runs | planned / eager |")
    total = (f"| all, times count | {sum(found.values())} | | {totals[0]:.1f} | | | | | "
             f"{totals[1] / totals[0]:.2f} ({totals[1]:.1f} ms) |")
    return "\n".join([title, "|---" * 9 + "|", *rows, total])


def end_to_end(model_name: str, batch: int, rounds: int) -> str:
    """Median CPU ms of planned calls with the GEMM rule and without it, interleaved."""
    model, inputs = zoo.get(model_name, batch=batch)
    with_rule = PlannedModule(model, inputs)
    kept, convolution.MATMUL_MAX_MACS = convolution.MATMUL_MAX_MACS, 0
    try:
        without = PlannedModule(model, inputs)
    finally:
        convolution.MATMUL_MAX_MACS = kept
    gemms = sum(isinstance(v.overload, convolution.MatmulInto)
                for v in with_rule.main.planned.values())
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(3):
        with_rule(*inputs), without(*inputs)
    for _ in range(rounds):
        for key, module in (("without", without), ("with", with_rule)):
            began = time.thread_time()
            module(*inputs)
            times[key].append((time.thread_time() - began) * 1e3)
    new, old = (statistics.median(times[k]) for k in ("with", "without"))
    return (f"{model_name} batch {batch}: {gemms} convolutions as GEMMs; planned call {old:.2f} ms "
            f"without the rule, {new:.2f} ms with it ({new / old:.3f}); CPU-time medians of "
            f"{rounds} interleaved rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="ROUNDS",
                        help="also time whole planned calls with and without the GEMM rule")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header(f"Convolution kernels, {args.model} batch {args.batch}, {args.threads} thread(s)"))
    print(table(args.model, args.batch, args.calls))
    if args.end_to_end:
        print("\n" + end_to_end(args.model, args.batch, args.end_to_end))


if __name__ == "__main__":
    main()
