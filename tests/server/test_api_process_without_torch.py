"""The API process needs no torch: importing the server and serving requests work where
`import torch` raises; only the engine core process (spawned separately) loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.server.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
API_MODULES = ("flatout.server.app", "flatout.server.serve", "flatout.server.stream",
               "flatout.engine.async_client", "flatout.engine.messages",
               "flatout.engine.output_processor")


def test_api_modules_import_without_torch() -> None:
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = sys.modules['triton'] = None\n"
        f"for name in {API_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from flatout.server.app import build_app\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_serving_without_torch_in_the_api_process(tmp_path: Path) -> None:
    server = ServerProcess(["--max-model-len", "256", "--num-kv-blocks", "256"],
                           tmp_path / "serve.log", module="tests.server.serve_without_torch")
    try:
        body = {"prompt": "the model", "max_tokens": 8, "logprobs": 1, "stream": True,
                "stream_options": {"include_usage": True}}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
