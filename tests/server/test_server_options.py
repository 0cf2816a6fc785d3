"""Server flags: --api-key (over $FLATOUT_API_KEY), --reasoning-parser none, --chat-template."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.server_process import ServerProcess
from tests.server.thinking_checkpoint import ANSWER, REASONING, make_thinking_checkpoint

KEY = "sk-flatout-test"
# ends the prompt with "\n", so the tiny thinking model opens <think> itself
TEMPLATE = "{% for m in messages %}<|user|>\n{{ m.content }}{% endfor %}<|assistant|>{{ '\\n' }}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("options")
    path = make_thinking_checkpoint(tmp / "ckpt")
    template = tmp / "plain.jinja"
    template.write_text(TEMPLATE)
    s = ServerProcess(
        ["--model", str(path), "--api-key", KEY, "--reasoning-parser", "none",
         "--chat-template", str(template), "--max-model-len", "128"],
        tmp / "serve.log", env={"FLATOUT_API_KEY": "the-flag-wins"},
    )
    try:
        yield s
    finally:
        s.stop()


def test_api_key_guards_v1_only(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    url = f"{server.url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer the-flag-wins"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401, headers
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code \
        == 200
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY").models.list()


def test_parser_none_and_template_override(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "x"}])
    msg = r.choices[0].message
    # no parser: the tags stay in the content; the override template ended the prompt with "\n"
    assert msg.content == f"<think> {REASONING}</think>{ANSWER}"
    assert "reasoning_content" not in (msg.model_extra or {})
    assert r.usage.prompt_tokens == 5  # <|user|> \n x <|assistant|> \n
    log = server.output
    assert "template: --chat-template plain.jinja" in log
    assert "reasoning parser: none" in log
    assert "serving 'ckpt'" in log  # default model id: the checkpoint folder's name


def test_bind_errors_are_reported(server: ServerProcess) -> None:
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "flatout.cli", "serve", "--port", port],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot bind 127.0.0.1:{port}" in r.stderr


def _engine_core_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise AssertionError("engine core process not found")


def test_dead_engine_gives_503_not_a_hang(server: ServerProcess) -> None:
    # last test of the module: it kills this server's engine core
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/health").status_code == 200
    os.kill(_engine_core_pid(server.proc.pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers,
                   timeout=10)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
