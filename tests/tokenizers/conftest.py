"""Session fixtures: tokenizer files trained once for all tokenizer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tokenizers.tokenizer_fixtures import train_spm_model, trained_ranks


@pytest.fixture(scope="session")
def glm4_ranks() -> dict[bytes, int]:
    return trained_ranks()


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_spm_model(tmp_path_factory.mktemp("spm") / "tokenizer.model")
