"""Pictures and the `memtile report` page."""
