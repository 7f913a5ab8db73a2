"""A ReLU fused into the planned convolution before it: one oneDNN call, one pass over the slot.

A planned convolution zeroes its arena slot and oneDNN adds the convolution into it
(`convolution`); a ReLU after it would pass over the same bytes once more. oneDNN applies the ReLU
as a post-op instead (relu(conv(x) + 0), in the same call), so the pair becomes one step that
writes the convolution's slot, and the ReLU's output shares that slot, as an in-place ReLU would.

Only where the ReLU is the convolution's sole reader (nothing else needs the value before the
ReLU) and both tensors are channels_last (the layout in which oneDNN writes without a
temporary). The executor runs each fused call on the example inputs beside the convolution then
ReLU it replaces, and keeps it only when the result is bit-identical (measured so for all 8
pairs of vgg11 and 13 of vgg16) and it allocates no more than the convolution's workspace;
otherwise the two run as separate steps.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from memtile.capture import MemGraph
from memtile.runtime import convolution
from memtile.runtime.outvariants import OutVariant

RELU = "aten.relu.default"


def relu_pairs(graph: MemGraph, candidates: dict[str, OutVariant],
               channels_last: set[str]) -> dict[str, fx.Node]:
    """Convolution node name -> the ReLU node that may be fused into it.

    Both must be out= candidates (the convolution computed into the arena by oneDNN), the ReLU
    the only reader of the convolution's output (a graph output or a view read has another), and
    both outputs channels_last."""
    pairs = {}
    for op in graph.ops:
        node = op.node
        variant = candidates.get(node.name)
        if variant is None or variant.overload is not convolution.INTO or len(node.users) != 1:
            continue
        relu = next(iter(node.users))
        if str(relu.target) == RELU and relu.name in candidates \
                and graph.value_of[node] in channels_last and graph.value_of[relu] in channels_last:
            pairs[node.name] = relu
    return pairs


def fused(variant: OutVariant) -> OutVariant:
    """The convolution's variant with the ReLU post-op: same arguments, and no tolerance
    (it must equal the convolution's variant followed by ReLU bit for bit)."""
    return dataclasses.replace(variant, overload=convolution.INTO_RELU, tolerance=0.0)
