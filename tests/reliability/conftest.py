"""One `flatout serve` on the demo model shared by the bad-input, fuzz and security tests: small
context (so that any valid request a fuzzer makes is cheap), an API key and a body limit. The
load, overload, fault and shutdown tests start servers of their own."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.server_process import ServerProcess

API_KEY = "sk-reliability-7f3a9c"
MAX_MODEL_LEN = 48
MAX_BODY_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hardened") / "serve.log"
    server = ServerProcess(
        ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "128", "--num-kv-blocks",
         "1024", "--served-model-name", "demo", "--max-request-body-bytes", str(MAX_BODY_BYTES)],
        log, env={"FLATOUT_API_KEY": API_KEY})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(hardened: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hardened.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
