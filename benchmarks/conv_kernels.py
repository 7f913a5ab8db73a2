"""Per convolution shape of one model: eager's kernel vs the planned executor's, at 1 thread.

Each distinct convolution (input shape, weight shape, stride, padding, dilation, groups) is run
alone, in the main thread at 1 intra-op thread: eager as `F.conv2d` on NCHW tensors (oneDNN's
blocked kernels with their reorders, or ATen's MKL GEMM path for 1x1 stride-1 convolutions at
batch < 16 and 1 thread), planned as memtile runs it (`mkldnn._convolution_pointwise` on
channels_last with the weight packed once, at this thread count). Calls alternate; each
figure is the smallest CPU time (`time.thread_time`) of `--calls` calls, which on a loaded
machine is the work without the preemptions. The kernel names are oneDNN's own (`ONEDNN_VERBOSE`
output of one call; "ATen GEMM" where oneDNN ran no convolution).

    .venv/bin/python benchmarks/conv_kernels.py [--model resnet50] [--batch 1] [--calls 15]

Prints the markdown table for "Executor at 1 thread" in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter

import torch
import torch.nn.functional as F
from _common import header
from torch import nn

from memtile import zoo
from memtile.runtime import convolution


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
    """(eager call, planned call) on a seeded input of `shape`."""
    x = torch.randn(shape)
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, stride, dilation, conv.groups, list(shape))
    x_last = x.contiguous(memory_format=torch.channels_last)

    def eager():
        return F.conv2d(x, weight, bias, stride, padding, dilation, conv.groups)

    def planned():
        return convolution.DIRECT(x_last, packed, bias, padding, stride, dilation, conv.groups,
                                  "none", [], None)

    return eager, planned


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
            eager, planned = runners(shape, conv)
            eager(), planned()  # warm: oneDNN's primitive cache
            names = kernel_names(eager), kernel_names(planned)
            ms = smallest_cpu_ms((eager, planned), calls)
            totals = [t + count * m for t, m in zip(totals, ms, strict=True)]
            layer = (f"{shape[1]}->{weight[0]} {weight[2]}x{weight[3]} /{stride[0]} "
                     f"{shape[2]}x{shape[3]}" + (f" g{groups}" if groups > 1 else "")
                     + (f" p{padding[0]}" if padding[0] != weight[2] // 2 else ""))
            rows.append(f"| {layer} | {count} | {names[0]} | {ms[0]:.3f} | {names[1]} | "
                        f"{ms[1]:.3f} | {ms[1] / ms[0]:.2f} |")
    title = ("| convolution (in->out kxk /stride HxW) | count | eager kernel | eager ms | "
             "planned kernel | planned ms | planned / eager |")
    total = (f"| all, times count | {sum(found.values())} | | {totals[0]:.1f} | | "
             f"{totals[1]:.1f} | {totals[1] / totals[0]:.2f} |")
    return "\n".join([title, "|---" * 7 + "|", *rows, total])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header(f"Convolution kernels, {args.model} batch {args.batch}, 1 thread"))
    print(table(args.model, args.batch, args.calls))


if __name__ == "__main__":
    main()
