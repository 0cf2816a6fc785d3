"""Security: the API key check, the default bind address, sandboxed chat templates, no fetching
on a request's behalf, no code-executing deserialization of checkpoint files, and no secrets or
prompts in the log."""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flatout.cli import build_parser
from flatout.demo import demo_model_path
from flatout.models.loader import CheckpointError, checkpoint_files
from flatout.models.registry import resolve_model_config
from flatout.server import app as app_module
from flatout.server.app import APIKeyMiddleware
from flatout.tokenizers import load_tokenizer
from tests.reliability.conftest import API_KEY
from tests.reliability.harness import CHAT
from tests.server.server_process import ServerProcess

# a checkpoint's template that, depending on the last message, tries to escape the sandbox
ATTACK_TEMPLATE = """{%- set m = messages[-1].content -%}
{%- if m == 'file' -%}{% include '/etc/passwd' %}
{%- elif m == 'import' -%}{% import '/etc/hostname' as h %}{{ h }}
{%- elif m == 'mro' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif m == 'globals' -%}{{ cycler.__init__.__globals__.os.popen('id').read() }}
{%- elif m == 'mutate' -%}{{ messages.append(1) }}
{%- elif m == 'range' -%}{% for i in range(10**9) %}{% endfor %}
{%- else -%}[gMASK]<sop><|user|>
{{ m }}<|assistant|>
{%- endif -%}"""


def _asgi_call(app: Any, headers: dict[str, str]) -> int:
    """The status an ASGI app answers a GET /v1/models with."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = app_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guarded = APIKeyMiddleware(ok, "s3cret")
    assert _asgi_call(guarded, {"Authorization": "Bearer s3cret"}) == 200
    for wrong in ("", "Bearer s3cre", "Bearer s3cret!", "Bearer " + "x" * 5000, "s3cret"):
        assert _asgi_call(guarded, {"Authorization": wrong}) == 401
    assert _asgi_call(guarded, {}) == 401
    # every comparison was of two equal-length digests: its time says nothing about the key
    assert len(calls) == 7 and set(calls) == {(32, 32)}


def test_api_key_guards_all_but_public_paths(hardened: ServerProcess) -> None:
    for path in ("/v1/models", "/tokenize", "/no-such-path"):
        r = httpx.get(hardened.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    for path in ("/health", "/version", "/metrics", "/openapi.json"):
        assert httpx.get(hardened.url + path).status_code == 200, path
    ops = httpx.get(hardened.url + "/openapi.json").json()["paths"]
    assert ops["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in ops["/health"]["get"]


def test_default_bind_is_loopback(hardened: ServerProcess) -> None:
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert hardened.url.startswith("http://127.0.0.1:")  # started without --host


@pytest.fixture(scope="module")
def attack_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("attack")
    ckpt = tmp / "ckpt"
    shutil.copytree(demo_model_path(), ckpt)
    (ckpt / "chat_template.jinja").write_text(ATTACK_TEMPLATE)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the .jinja file is the template
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    s = ServerProcess(["--model", str(ckpt), "--max-model-len", "64", "--served-model-name",
                       "demo", "--num-kv-blocks", "256"], tmp / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("attack", ["file", "import", "mro", "globals", "mutate", "range"])
def test_checkpoint_template_cannot_escape_the_sandbox(attack_server: ServerProcess,
                                                       attack: str) -> None:
    body = {"messages": [{"role": "user", "content": attack}], "max_tokens": 2}
    r = httpx.post(attack_server.url + CHAT, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] in ("chat_template_unsafe", "chat_template_failed"), err
    assert "template" in err["message"]
    assert "root:" not in r.text and "uid=" not in r.text
    # the server stays up, and the template's harmless branch still renders
    assert httpx.get(attack_server.url + "/health").status_code == 200
    ok = httpx.post(attack_server.url + CHAT, timeout=30,
                    json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_no_url_or_file_is_fetched_for_a_request(api: httpx.Client) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
    parts = [{"type": "image_url", "image_url": {"url": url}},
             {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
             {"type": "input_audio", "input_audio": {"data": url, "format": "wav"}},
             {"type": "file", "file": {"file_id": url}}]
    for part in parts:
        r = api.post(CHAT, json={"messages": [{"role": "user", "content": [part]}]})
        assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()


def test_checkpoint_pickles_and_remote_code_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_model_path(), ckpt)
    (ckpt / "model.safetensors").unlink()

    class Payload:  # unpickling it creates the marker file
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return open, (str(marker), "w")

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (ckpt / "tokenization_evil.py").write_text(code)
    (ckpt / "modeling_evil.py").write_text(code)
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tok_config["tokenizer_class"] = "EvilTokenizer"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="only safetensors"):
        checkpoint_files(ckpt)
    tok = load_tokenizer(str(ckpt))
    assert tok.encode("hello")  # the tokenizer works, from tokenizer.json alone
    resolve_model_config(str(ckpt), dtype="auto", device_type="cpu", max_model_len=None,
                         load_format="auto", tokenizer=None)
    assert not marker.exists()


def test_secrets_and_prompts_stay_out_of_the_log(hardened: ServerProcess,
                                                 api: httpx.Client) -> None:
    secret_prompt = "PROMPT-MARKER-4c1d"
    assert api.post(CHAT, json={"messages": [{"role": "user", "content": secret_prompt}],
                                "max_tokens": 2}).status_code == 200
    assert api.post(CHAT, json={"messages": [{"role": "user", "content": secret_prompt}],
                                "temperature": secret_prompt}).status_code == 400
    assert api.post("/v1/completions", json={"prompt": secret_prompt * 4000}).status_code == 400
    wrong = httpx.post(hardened.url + CHAT, headers={"Authorization": "Bearer KEY-MARKER-9e"},
                       json={"messages": [{"role": "user", "content": secret_prompt}]})
    assert wrong.status_code == 401
    log = hardened.output
    assert "serving 'demo'" in log  # it is the right log
    for secret in (API_KEY, secret_prompt, "KEY-MARKER-9e"):
        assert secret not in log
