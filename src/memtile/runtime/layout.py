"""The memory format of each planned tensor (layout propagation).

Convolutions write straight into the arena only when their destination is channels_last (see
`convolution`), so the 4-D activations that flow between convolutions, elementwise ops, batch
norm, pooling and cat are held in channels_last. Every other tensor keeps eager's strides:
graph inputs (the caller's), graph outputs (returned in the eager layout), any storage a view op
reads (flatten before a classifier: a view of a channels_last buffer is not eager's view, so its
source stays NCHW), except `alias`, which is the same tensor in any layout (export writes
timm ghostnet's no-op channel slice `cat(...)[:, :out]` so; keeping that cat NCHW left the
convolution after it unplanned, converting its input to channels_last in a temporary: 2.3 MiB
above the arena at 224²). Two tensors of different layouts cannot share memory in place: the executor
drops such in-place pairs (an elementwise op then converts between layouts as it writes).

Channels_last changes the order in which a convolution sums its terms, so outputs differ from
eager NCHW by float rounding (measured: about 1e-6 of the output's magnitude per convolution);
`layout="eager"` keeps eager's layout and bit-exact outputs, with convolutions left unplanned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memtile.capture import ACTIVATION, MemGraph

LAYOUTS = ("auto", "channels_last", "eager")
LAYOUT_NEUTRAL_VIEWS = frozenset({"aten.alias.default"})  # the whole tensor, strides unchanged


def channels_last_tensors(graph: MemGraph, layout: str, plannable_convolution: bool) -> set[str]:
    """Storages (base tensor names) held in channels_last under `layout`.

    "auto" is channels_last when some convolution can be computed into the arena, else eager.
    `PlannedModule` has already refused a `layout` outside `LAYOUTS`.
    """
    if layout == "eager" or (layout == "auto" and not plannable_convolution):
        return set()
    read_by_view = {graph.tensors[name].base for op in graph.ops
                    if op.is_view and op.target not in LAYOUT_NEUTRAL_VIEWS for name in op.inputs}
    return {
        name for name, tensor in graph.tensors.items()
        if not tensor.is_view and tensor.category == ACTIVATION and len(tensor.shape) == 4
        and name not in read_by_view
    }


def channels_last_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


@dataclass(frozen=True)
class Restride:
    """Copy an unplanned op's result into the strides the planned ops after it were given."""

    stride: tuple[int, ...]

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tensor.shape, self.stride, dtype=tensor.dtype,
                                   device=tensor.device).copy_(tensor)
