"""Conv/linear multiply-accumulate counts of an fx graph, from propagated shapes.

Tiling must state its compute cost: FDT promises zero extra MACs, FFMT pays for recomputed halos.
Counting on the fx graph covers both module calls and the functional convs FFMT emits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from memtile.tiling.rewrite import module_of, propagate_shapes, shape

_FUNCTIONAL = {F.conv1d, F.conv2d, F.conv3d, F.linear}


def _weight_shape(gm: fx.GraphModule, node: fx.Node) -> torch.Size | None:
    module = module_of(gm, node)
    if isinstance(module, (_ConvNd, nn.Linear)):
        return module.weight.shape
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        return shape(weight)
    return None


def count_macs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> int:
    """Total conv/linear MACs of one forward pass: output elements x weights per output element."""
    propagate_shapes(gm, inputs)
    total = 0
    for node in gm.graph.nodes:
        weight = _weight_shape(gm, node)
        if weight is not None:
            out = shape(node)
            total += int(torch.Size(out).numel()) * int(torch.Size(weight[1:]).numel())
    return total
