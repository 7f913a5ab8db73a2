"""Inference tiling: FDT (channel split) and FFMT (spatial tiles) with automatic path discovery.

`tile(model, inputs, budget=None, max_mac_overhead=0.1, methods=("fdt", "ffmt"))` returns a
rewritten `torch.fx.GraphModule` with the same outputs and a lower planned peak, and a TileReport.
"""

from memtile.tiling.discovery import BudgetNotMetError, TileReport, TileStep, tile

__all__ = ["BudgetNotMetError", "TileReport", "TileStep", "tile"]
