"""One `flatout serve` on the demo model for the bench, top and examples tests, and a helper that
runs the `flatout` command line as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bench_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("bench-server") / "serve.log"
    server = ServerProcess(["--max-model-len", "256", "--num-kv-blocks", "1024",
                            "--max-num-seqs", "32", "--served-model-name", "demo"], log)
    try:
        yield server
    finally:
        server.stop()


def run_flatout(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`flatout ARGS` in a child process, with a wide terminal so tables do not wrap."""
    return subprocess.run(
        [sys.executable, "-m", "flatout.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, "COLUMNS": "160"},
    )


def bench(server: ServerProcess, out: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`flatout bench` against the server with a small workload; (its JSON, its stdout)."""
    proc = run_flatout("bench", "--base-url", server.url, "--no-progress", "--json", str(out),
                       "--scrape-interval", "0.25", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout
