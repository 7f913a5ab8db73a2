"""`RowCentric`: an nn.Module that trains a spatially local trunk band by band, same gradients."""

from __future__ import annotations

import torch
from torch import nn

from memtile.errors import InputShapeError, MemtileError
from memtile.freeze import freeze
from memtile.rows.engine import Engine, RowFunction
from memtile.rows.verify import Check, check_engine
from memtile.spatial import SpatialGraph

STRATEGIES = ("overl", "2ps")
BN_MODES = ("error", "frozen")


class RowCentric(nn.Module):
    """Wraps a trunk (conv, pool, frozen BN, elementwise, add, cat) and runs it in row bands.

    `rows` is the number of bands: OverL splits the trunk output rows (at most its height),
    2PS the input rows (at most the input height; bands can then be thinner than one output row);
    `forward_rows` / `backward_rows` override it per pass (forward under no_grad can use few,
    large bands; backward holds one band's activations, so it wants more, smaller ones).
    `strategy` defaults to "overl"; `rows="auto"` with `budget=BYTES` picks band counts (and
    the strategy, unless one is given) for the first input seen
    (see `memtile.rows.budget`). `checkpoint=True` also checkpoints segments inside each band;
    left at None, it is off, or in budget mode chosen with the band counts. `taper` (2PS) makes
    backward bands shrink toward the bottom (see `Engine`); budget mode chooses it too.
    `bn="frozen"` replaces the trunk's BatchNorm layers (in place, sharing their tensors) by
    `memtile.freeze.FrozenBatchNorm2d`: running statistics, never updated, in any mode;
    `frozen_layers` names what was replaced. `bn="error"` refuses BatchNorm layers in training
    mode. A frozen norm right after a convolution of a wide layer is folded into it per band
    (`memtile.foldnorm.FoldedConvBN`), so a band holds one tensor instead of two for the pair;
    a trained norm keeps the gradients its own backward computes, and in backward is folded
    only where its result stays intact for them and bands are not checkpointed
    (`rows.engine.worth_folding`).
    `verify=True` (the default) checks every new input size once, before its first forward
    returns, against ordinary autograd on a crop (`memtile.rows.verify`): GradientMismatchError
    rather than silently wrong gradients. `checks` holds the outcomes by input size.
    """

    def __init__(self, trunk: nn.Module, rows: int | str = 4, strategy: str | None = None,
                 forward_rows: int | None = None, backward_rows: int | None = None,
                 checkpoint: bool | None = None, bn: str = "error", budget: int | None = None,
                 taper: float = 0.0, verify: bool = True) -> None:
        super().__init__()
        if strategy is not None and strategy not in STRATEGIES:
            raise MemtileError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if bn not in BN_MODES:
            raise MemtileError(f"bn={bn!r}: choose 'error' or 'frozen'")
        if rows == "auto" and budget is None:
            raise MemtileError("rows='auto' needs budget=BYTES (the memory one training step "
                               "of the trunk may use)")
        if rows != "auto" and (not isinstance(rows, int) or rows < 1):
            raise MemtileError(f"rows={rows!r}: give a positive number of bands or 'auto'")
        for name, value in (("forward_rows", forward_rows), ("backward_rows", backward_rows)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MemtileError(f"{name}={value!r}: give a positive number of bands")
        self.frozen_layers = freeze(trunk) if bn == "frozen" else []
        self.trunk = trunk
        self.rows, self.bn, self.taper = rows, bn, taper
        self.checkpoint = bool(checkpoint)
        # what budget mode may pick
        self.checkpoints = (False, True) if checkpoint is None else (checkpoint,)
        self.strategy = strategy or "overl"
        self.strategies = (strategy,) if strategy else STRATEGIES
        self.forward_rows, self.backward_rows, self.budget = forward_rows, backward_rows, budget
        self.choice = None  # budget mode: the memtile.rows.budget.Choice it made
        self._graph: SpatialGraph | None = None
        self._engines: dict[tuple, Engine] = {}
        self.verify = verify
        self.checks: dict[tuple[int, ...], Check] = {}

    @property
    def graph(self) -> SpatialGraph:
        if self._graph is None:
            self._graph = SpatialGraph(self.trunk, frozen_bn=self.bn == "frozen")
        elif self.bn == "error":  # a layer may have been switched to training mode since
            SpatialGraph(self._graph.gm, frozen_bn=False)
        return self._graph

    def band_counts(self) -> tuple[int, int]:
        """(forward, backward) band counts currently configured (after budget mode chose)."""
        if self.rows == "auto":
            raise MemtileError("band counts are chosen on the first forward in budget mode")
        return (self.forward_rows or self.rows, self.backward_rows or self.rows)

    def engine(self, x: torch.Tensor) -> Engine:
        if x.dim() != 4:
            raise InputShapeError(f"RowCentric takes NCHW images, got shape {tuple(x.shape)}")
        if self.rows == "auto":
            from memtile.rows.budget import configure

            configure(self, x)
        fwd, bwd = self.band_counts()
        key = (tuple(x.shape[-2:]), self.strategy, fwd, bwd, self.checkpoint, self.taper)
        if key not in self._engines:
            engine = Engine(self.graph, *key)
            if self.verify:
                self.checks[tuple(x.shape[-2:])] = check_engine(self.trunk, engine, x)
            self._engines[key] = engine
        return self._engines[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        engine = self.engine(x)
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            with torch.no_grad():
                return engine.forward(x)[0]
        return RowFunction.apply(engine, x, *params)
