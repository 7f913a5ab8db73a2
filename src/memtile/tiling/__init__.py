"""Inference tiling: FDT (channel split) and FFMT (spatial tiles) with automatic path discovery."""
