import sys
from pathlib import Path

import pytest
import torch

# Tests import small fixture models by `tests_models:NAME` (the zoo's pkg.module:attr form).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
