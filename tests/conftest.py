import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run: CI must not fail by chance.
settings.register_profile("memtile", derandomize=True, database=None)
settings.load_profile("memtile")

# Tests import small fixture models by `tests_models:NAME` (the zoo's pkg.module:attr form).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
