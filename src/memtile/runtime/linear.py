"""Large fully connected layers through oneDNN, their output allocated in its arena slot (`slots`).

A linear layer is `addmm(bias, x, permute(weight))` in core ATen (`mm` without a bias), which
ATen runs through MKL's sgemm. oneDNN's `mkldnn._linear_pointwise(x, weight, bias)` reads the
model's own weight (a packed copy measured no faster) and from 4 rows on is faster: time
oneDNN / addmm, one thread, 2026-12-03, on this machine's Xeon (AVX-512):

| weight (out x in) | 1 row | 2 rows | 4 rows | 8 rows | 32 rows |
|---|---|---|---|---|---|
| 4096 x 25088 (vgg16 fc6) | 1.12 | 1.31 | 0.69 | 0.53 | 0.78 |
| 4096 x 4096 | 0.90 | 1.72 | 0.93 | 0.71 | 0.82 |
| 1000 x 2048 (resnet50 fc) | 1.17 | 1.74 | 0.94 | 0.79 | 0.87 |
| 1000 x 1280 | 1.20 | 1.89 | 0.99 | 0.82 | 1.03 |

At 1-2 rows addmm is a matrix-vector product, where MKL is faster. So a layer goes through
oneDNN from `MIN_ROWS` rows and `MIN_WEIGHT` weight elements (where the time saved is
milliseconds, not microseconds); a fixed rule, so a module's numerics do not depend on timing
noise at construction. Each call allocates oneDNN's workspace (514 KB from 4 rows on,
measured), freed within the call. oneDNN sums in another order: results differ from `addmm` by
float rounding (measured 9e-7 of the output's magnitude on fc6), checked within `TOLERANCE` at
construction.
"""

from __future__ import annotations

import torch
from torch import fx

from memtile.runtime import slots
from memtile.runtime.outvariants import OutVariant

TARGETS = ("aten.addmm.default", "aten.mm.default")
LINEAR = torch.ops.mkldnn._linear_pointwise.default
TOLERANCE = 1e-5
SCRATCH_BYTES = 1024 * 1024  # oneDNN's matmul workspace per call: 514 KB measured from 4 rows on
MIN_ROWS = 4
MIN_WEIGHT = 1 << 20  # 4 MiB of float32


def weight_and_bias(node: fx.Node, constants: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when the node is a linear layer with constant float32 parameters on CPU:
    `addmm(bias, x, permute(weight, [1, 0]))` or `mm(x, permute(weight, [1, 0]))`."""
    if str(node.target) not in TARGETS or node.kwargs:
        return None
    *bias_arg, x, transposed = node.args
    if not isinstance(transposed, fx.Node) or str(transposed.target) != "aten.permute.default" \
            or list(transposed.args[1]) != [1, 0]:
        return None
    weight = constants.get(transposed.args[0].name)
    bias = constants.get(bias_arg[0].name) if bias_arg and isinstance(bias_arg[0], fx.Node) \
        else None
    example = x.meta.get("val") if isinstance(x, fx.Node) else None
    if weight is None or (bias_arg and (bias is None or bias.dim() != 1)) \
            or not isinstance(example, torch.Tensor) or example.dim() != 2 \
            or weight.dtype != torch.float32 or example.dtype != torch.float32 \
            or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return weight, bias


class LinearInto:
    """`x @ weight.T + bias` through oneDNN, written into `out` (a contiguous matrix)."""

    def __call__(self, x, weight, bias, *, out):
        return slots.call_into(out, LINEAR, x, weight, bias, "none", [], "")

    def __repr__(self) -> str:
        return "mkldnn._linear_pointwise (its output allocated in out=)"


INTO = LinearInto()


def variant(node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> OutVariant | None:
    """The oneDNN variant of one linear layer, or None where `addmm` stays (too few rows, a
    small weight, or no slot allocator: oneDNN would then allocate its output and copy it)."""
    rows = node.args[-2].meta["val"].shape[0]
    if rows < MIN_ROWS or weight.numel() < MIN_WEIGHT or slots.load() is not None:
        return None

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[-2], weight, bias), {}

    return OutVariant(INTO, ("out",), rewrite, tolerance=TOLERANCE, scratch_bytes=SCRATCH_BYTES)
