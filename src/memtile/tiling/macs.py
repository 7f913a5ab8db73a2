"""Conv/linear multiply-accumulate counts of one forward pass, counted at the ATen dispatcher.

Tiling must state its compute cost: FDT promises zero extra MACs, FFMT pays for recomputed halos.
Counting the kernels that actually run (convolution, mm, addmm, bmm) covers module calls, the
functional convs inside FFMT tiles and any cropping they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_MAC_OPS = {"aten.convolution", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Total conv/linear MACs (FLOPs / 2) of `model(*inputs)`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    flops = counter.get_flop_counts().get("Global", {})
    return sum(v for op, v in flops.items() if str(op) in _MAC_OPS) // 2
