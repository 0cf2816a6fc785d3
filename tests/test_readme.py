"""The README's quick start and server sections run verbatim against the demo model: each bash
block that starts `flatout serve` is started (its install step included) and every client block
of those sections (curl, the LangChain snippet) runs against it and must print a non-empty answer.
The quick start's test command is the one `.ci/run` runs. A README that drifts fails here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.readme_blocks import README, Block, readme_blocks, readme_test_command

ROOT = README.parent
SECTIONS = ("Quick start", "OpenAI-compatible server")
PORT = 8000  # the address the README's examples use (another one when it is taken here)
STARTUP_TIMEOUT = 300.0  # the quick start installs first


def _blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.section in SECTIONS]


def _server_blocks() -> list[Block]:
    return [b for b in _blocks() if b.lang == "bash" and "flatout serve" in b.code]


def _client_blocks() -> list[Block]:
    return [b for b in _blocks() if b not in _server_blocks() and "pytest" not in b.code]


def _env() -> dict[str, str]:
    # `pip`, `flatout` and `python` are this interpreter's, as in an activated virtualenv
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answer(block: Block, output: str) -> str:
    """The text a client block printed: the chat message's content for a curl of the chat API,
    the whole output for the others."""
    if block.lang == "bash" and "/v1/chat/completions" in block.code:
        message = json.loads(output)["choices"][0]["message"]
        return message["content"]
    return output.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_port(block: Block, port: int) -> Block:
    """The block as written when `port` is the README's; else moved to `port` (another server,
    e.g. a second test run, holds the README's port on this machine)."""
    if port == PORT:
        return block
    code = block.code.replace("flatout serve", f"flatout serve --port {port}")
    code = code.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}")
    return Block(block.section, block.lang, code)


def _run_client(block: Block) -> str:
    cmd = ["bash", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c", block.code]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert done.returncode == 0, f"README block failed:\n{block.code}\n{done.stderr[-3000:]}"
    return done.stdout


def test_readme_sections_have_what_this_test_runs() -> None:
    assert len(_server_blocks()) >= 1
    langs = {b.lang for b in _client_blocks()}
    assert langs == {"bash", "python"}, _client_blocks()
    for b in _blocks():
        assert b.lang in ("bash", "python"), f"README block of unknown language: {b}"


def test_ci_runs_the_readme_test_command() -> None:
    assert readme_test_command(readme_blocks()) == (
        'pip install torch==2.13.0 -e ".[test]" && ruff check . && lint-imports && mypy'
        " && python -m pytest -q -x")
    assert "tests/readme_blocks.py test-command" in (ROOT / ".ci" / "run").read_text()


def _start(server: Block, port: int, log: Path) -> subprocess.Popen[bytes] | None:
    """`server` started on `port`, once its own startup banner names that address (another
    server may answer on the port meanwhile); None when the port turned out to be taken."""
    block = _on_port(server, port)
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", block.code], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while f"on http://127.0.0.1:{port} " not in (text := log.read_text()):
        if proc.poll() is not None:
            if f"cannot bind 127.0.0.1:{port}" in text:
                return None
            raise AssertionError(f"{block.code} exited:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"no server after {STARTUP_TIMEOUT:.0f} s:\n{text[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> int:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.parametrize("server", _server_blocks(), ids=lambda b: b.code.split("#")[0].strip())
def test_readme_examples_run_verbatim_against_the_demo(server: Block, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    # the README's port, unless another server holds it (then, or if it is taken while this
    # one installs and starts, a free one)
    port = PORT if _port_free(PORT) else _free_port()
    proc = _start(server, port, log)
    if proc is None:
        port = _free_port()
        proc = _start(server, port, log)
    assert proc is not None, log.read_text()[-3000:]
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        for block in map(_on_port, _client_blocks(), [port] * len(_client_blocks())):
            answer = _answer(block, _run_client(block))
            assert answer, f"README block printed an empty answer:\n{block.code}"
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-3000:]
