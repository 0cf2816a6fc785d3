"""Every test starts from the same random state, whatever ran before it: Python's `random`,
NumPy's and torch's global generators are seeded per test (torch and NumPy only when already
imported, so that torch-free tests stay torch-free). Tests that need their own streams still
use seeded generators of their own."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

import pytest

SEED = 0


@pytest.fixture(autouse=True)
def _seeded_global_generators() -> Iterator[None]:
    random.seed(SEED)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(SEED)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(SEED)
    yield
