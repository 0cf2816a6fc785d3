"""Fixtures: one `flatout serve` on the demo model for the whole session (other modules start
their own on special checkpoints), and the offline engine configured the same way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.server_process import ServerProcess

DEMO_MAX_MODEL_LEN = 384


@pytest.fixture(scope="session")
def llm():  # noqa: ANN201
    """The offline engine on the demo model, configured as the demo server: the oracle."""
    from flatout import LLM

    return LLM(max_model_len=DEMO_MAX_MODEL_LEN, num_kv_blocks=512)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("demo-server") / "serve.log"
    server = ServerProcess(
        ["--max-model-len", str(DEMO_MAX_MODEL_LEN), "--num-kv-blocks", "2048",
         "--max-num-seqs", "128", "--served-model-name", "demo", "demo-alias"],
        log,
    )
    try:
        yield server
    finally:
        server.stop()
