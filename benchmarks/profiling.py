"""Measured peak vs LOAD (inference, batch 1) and measured training-step peaks (batch 4).

Feeds BENCHMARKS.md "Profile". Run: `.venv/bin/python benchmarks/profiling.py`.
"""

import sys

from _common import header

from memtile import zoo
from memtile.commands.profile import profile
from memtile.units import format_bytes

INFERENCE = ["resnet18", "resnet50", "mobilenet_v2", "vgg16", "densenet121", "efficientnet_b0",
             *zoo.TINY_MODELS[:4]]
TRAINING = ["resnet18", "vgg16"]


def main() -> None:
    print(header("Measured inference peak vs LOAD, batch 1 (float32)"))
    print("| model | input | LOAD (capture) | measured peak (allocator) | peak / LOAD | at the peak |")
    print("|---|---|---|---|---|---|")
    for name in INFERENCE:
        model, inputs = zoo.get(name)
        s, _ = profile(model, inputs)
        print(f"| {name} | {tuple(inputs[0].shape[1:])} | {format_bytes(s['load_bytes'])} | "
              f"{format_bytes(s['measured_peak_bytes'])} | "
              f"{s['measured_peak_bytes'] / s['load_bytes']:.2f} | "
              f"{s['peak_op']} in {s['peak_module'] or '-'} |", flush=True)
    print("\n| model (training step, SGD momentum, batch 4) | measured peak | gradients | optimizer "
          "state | activations + temporaries | parameters (held before) |")
    print("|---|---|---|---|---|---|")
    for name in TRAINING:
        model, inputs = zoo.get(name, batch=4)
        s, _ = profile(model, inputs, train=True)
        b = s["breakdown"]
        print(f"| {name} | {format_bytes(s['measured_peak_bytes'])} | {format_bytes(b['gradients'])} | "
              f"{format_bytes(b['optimizer_state'])} | {format_bytes(b['activations'])} | "
              f"{format_bytes(b['parameters'])} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
