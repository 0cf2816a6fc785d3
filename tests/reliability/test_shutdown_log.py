"""A clean shutdown of an idle server (SIGTERM from a supervisor, SIGINT from Ctrl-C) exits 0
and logs at INFO: no WARNING, ERROR or traceback in its output."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest

from tests.server.server_process import ServerProcess


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_shutdown_logs_at_info(tmp_path: Path, sig: signal.Signals) -> None:
    server = ServerProcess(["--max-model-len", "256", "--num-kv-blocks", "64"],
                           tmp_path / "serve.log")
    try:
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        server.proc.send_signal(sig)
        assert server.wait_exit(timeout=60) == 0
        log = server.output
        assert re.search(r" INFO flatout\.server\.supervisor: shutting down: finishing 0 requests",
                         log), log
        assert not re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", log), log
    finally:
        server.stop()
