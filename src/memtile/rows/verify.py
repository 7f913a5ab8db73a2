"""Wrap-time check: banded forward and backward against ordinary autograd, before any use.

A wrong band plan gives wrong gradients silently, and training would go on. So every new input
size is checked once, on a crop that ordinary training surely fits, cut so that it still runs
exactly what the full-size engine runs:

- All rows: the band plans (rows, halos, kept boundaries, band edges) and the folded norms
  depend on the input rows only, so the crop runs the same bands through the same code.
- The first image of the batch. Every band tensor holds the whole batch and nothing in a band
  plan or in `Engine` depends on it (rows are `narrow`ed along dim -2, buffers take the batch
  from their input); norms are frozen (running statistics) or refused in training mode, so each
  image's gradient is the same function of that image whatever the batch. ATen's convolution
  backward loops over images and writes a weight-sized gradient per image and band: resnet18
  2x512², 6 bands, one thread, banded side 0.82 s for 2 images, 0.46 s for 1.
- The fewest columns with the same column edges (`check_width`): every convolution and pool
  meets the right image edge with the same padding as at full width, so the crop takes the same
  padding branches (`spatial._apply_local`) that the full width takes.
- One thread (`small_kernels`): the crop's calls are small, and each parallel region of a
  2-thread pool on a loaded 2-core machine waits for a descheduled thread: resnet18's banded
  side on 2x512x32 took 19 s at 2 threads, 1.2 s at 1, in one process (load 4 to 7).

A float32 mismatch is checked again in float64 before it fails, so float32 rounding alone never
raises; the float64 pass runs only then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from memtile.errors import GradientMismatchError, InputShapeError, UnsupportedOpError
from memtile.rows.engine import Engine, RowFunction
from memtile.spatial import Size, SpatialGraph

TOLERANCE = 1e-4  # max relative gradient error accepted (float32 ordinary is within 1e-5)
ZERO_FLOOR = 1e-6  # a gradient below this share of the largest one counts as zero-sized


@dataclass(frozen=True)
class Check:
    """Outcome of one wrap-time check (`asdict` gives the JSON of `memtile train`)."""

    max_rel_error: float  # max over the output and parameter gradients
    worst: str  # the first one over TOLERANCE (else the largest): output or a parameter
    input_shape: tuple[int, ...]
    dtype: str
    seconds: float

    def as_json(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape)}


def check_width(engine: Engine, width: int) -> int:
    """Fewest columns whose every convolution and pool ends at the right image edge as at
    `width`: the same read past the edge, so the same padding (resnet18 at 512: 32, one output
    column; 16 columns pad differently, and its max pools' float32 near-ties sent the check to
    float64). The left edge is the same at any width. Widths the trunk cannot take are passed
    over: too narrow for a window, or a ceil-mode average pool's partial last window (timm's
    resnet-D shortcuts at 1 column)."""
    graph = engine.graph
    height = engine.sizes[graph.input][0]
    want = column_edges(graph, (height, width))
    for cols in range(1, width):
        try:
            if column_edges(graph, (height, cols)) == want:
                return cols
        except (InputShapeError, UnsupportedOpError):
            continue
    return width


def column_edges(graph: SpatialGraph, size: Size) -> list[int]:
    """Per convolution and pool, how far its last output column reads past its input's last
    column (InputShapeError where `size` is too small for the trunk)."""
    sizes = graph.sizes(size)
    edges = []
    for v in graph.order:
        op = graph.ops[v]
        if op.kind == "local":
            edges.append(op.windows[1].needs((0, sizes[v][1]))[1] - sizes[op.inputs[0]][1])
    return edges


def check_engine(trunk: nn.Module, engine: Engine, x: torch.Tensor) -> Check:
    """Check `engine` (built for `x`'s size) on a crop of `x`; GradientMismatchError if its
    output or gradients differ from ordinary autograd through `trunk` by more than TOLERANCE."""
    cols = check_width(engine, x.shape[-1])
    crop = x[:1, ..., :cols].detach().clone()
    small = engine.narrowed(cols)
    return run_check(trunk, lambda dtype: _error(trunk, small, crop.to(dtype)), crop)


def run_check(model: nn.Module, error_at: Callable[[torch.dtype], tuple[float, str]],
              crop: torch.Tensor) -> Check:
    """`error_at(dtype)` (largest relative error, what it is in) in `crop`'s dtype, and again
    in float64 when over TOLERANCE with `model` widened meanwhile; GradientMismatchError if
    still over."""
    start = time.perf_counter()
    dtype = crop.dtype
    with small_kernels():
        error, worst = error_at(dtype)
        if error > TOLERANCE and dtype != torch.float64:
            dtype = torch.float64
            model.double()
            try:
                error, worst = error_at(dtype)
            finally:
                model.to(crop.dtype)
    check = Check(error, worst, tuple(crop.shape), str(dtype).removeprefix("torch."),
                  time.perf_counter() - start)
    if error > TOLERANCE:
        raise GradientMismatchError(
            f"row-centric training differs from ordinary autograd: {worst} is off by "
            f"{error:.1e} relative (tolerance {TOLERANCE:.0e}, on a "
            f"{'x'.join(map(str, check.input_shape))} crop in {check.dtype}); this is a memtile "
            "bug, please report it; train this model without row bands meanwhile"
        )
    return check


@contextmanager
def small_kernels() -> Iterator[None]:
    """ATen's kernels on one thread, for the crop's many small calls.

    oneDNN compiles a kernel for every new convolution shape (each band's, here once more at the
    crop's width): 40 ms each on a loaded CPU, more than the crop's arithmetic; ATen's own
    kernels compute the same band plan without that cost (`torch.backends.mkldnn.flags`, without
    its TF32 warning on restore). One thread: see the module docstring."""
    enabled, threads = torch._C._get_mkldnn_enabled(), torch.get_num_threads()
    torch._C._set_mkldnn_enabled(False)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch._C._set_mkldnn_enabled(enabled)


def _error(trunk: nn.Module, engine: Engine, crop: torch.Tensor) -> tuple[float, str]:
    """Largest relative error of the banded output and parameter gradients, and the first of
    them (the output, then parameters in the trunk's order) over TOLERANCE.

    The input gradient is left out: where a max pool's window holds near-equal values, float32
    rounding may route its gradient to another input position, in either run (resnet18 at
    2x512², a 16-column crop: input gradient 0.12 off in float32, 5e-15 in float64).
    """
    named = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with torch.enable_grad():
        want = trunk(crop)
        grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(0),
                           dtype=want.dtype).to(want.device)
        want_grads = torch.autograd.grad(want, params, grad, allow_unused=True) if params else ()
        got = RowFunction.apply(engine, crop, *params)
        got_grads = torch.autograd.grad(got, params, grad, allow_unused=True) if params else ()
    return worst_error(named, (got, want), got_grads, want_grads)


def worst_error(named: list[tuple[str, torch.Tensor]], outputs: tuple[torch.Tensor, torch.Tensor],
                got_grads, want_grads) -> tuple[float, str]:
    """Largest relative error of the output (`outputs`: got, want) and of the gradients of
    the `named` parameters, and the first of them over TOLERANCE (else the largest)."""
    floor = ZERO_FLOOR * max((g.abs().max().item() for g in want_grads if g is not None),
                             default=0.0)
    errors = [(_relative(*outputs, 0.0), "output"),
              *((_relative(g, w, floor), f"parameter {name!r}")
                for (name, _), g, w in zip(named, got_grads, want_grads, strict=True))]
    largest = max(e for e, _ in errors)
    first = next((name for e, name in errors if e > TOLERANCE), max(errors)[1])
    return largest, first


def _relative(got: torch.Tensor | None, want: torch.Tensor | None, floor: float) -> float:
    """max|got - want| / max|want| (a missing gradient is zero)."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        got, want = (torch.zeros_like(want) if got is None else got,
                     torch.zeros_like(got) if want is None else want)
    scale = max(want.abs().max().item(), floor, 1e-30)
    return (got.detach() - want.detach()).abs().max().item() / scale
