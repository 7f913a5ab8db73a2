"""Row-centric training (LR-CNN): a conv trunk trained band by band with exact gradients.

`RowCentric(trunk, rows=..., strategy="overl"|"2ps", ...)` wraps a spatially local trunk;
`wrap(model)` wraps the longest spatially local prefix of a whole CNN.
"""

from memtile.rows.module import RowCentric
from memtile.rows.trunk import wrap

__all__ = ["RowCentric", "wrap"]
