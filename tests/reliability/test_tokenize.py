"""/tokenize and /detokenize take the /v1 path: chat's role checks and rendering (`developer`
as `system`, text parts), strict integer ids, the prompt-size limit, and large bodies tokenized
off the event loop."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS
from flatout.server.chat import ChatRenderer
from flatout.server.errors import install_error_handlers
from flatout.server.limits import OFFLOAD_BYTES
from flatout.server.state import ServerState
from flatout.server.tokenize import add_tokenize_routes
from tests.reliability.harness import CHAT


def _error(r: httpx.Response, param_prefix: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] is not None and err["param"].startswith(param_prefix), err
    assert "TypeError" not in err["message"] and "Traceback" not in err["message"], err
    return err


def test_messages_count_what_chat_sends(api: httpx.Client) -> None:
    for messages in ([{"role": "developer", "content": "Be brief."}, {"role": "user",
                                                                      "content": "hi"}],
                     [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}]):
        counted = api.post("/tokenize", json={"messages": messages})
        assert counted.status_code == 200, counted.text
        chat = api.post(CHAT, json={"messages": messages, "max_tokens": 1})
        assert chat.status_code == 200, chat.text
        assert counted.json()["count"] == chat.json()["usage"]["prompt_tokens"], messages
    dev = api.post("/tokenize", json={"messages": [{"role": "developer", "content": "S"}]})
    system = api.post("/tokenize", json={"messages": [{"role": "system", "content": "S"}]})
    assert dev.json()["tokens"] == system.json()["tokens"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "root", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [1, 2]}]}, "messages"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ({"prompt": "x" * 100_000}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
])
def test_tokenize_refuses_what_chat_refuses(api: httpx.Client, body: dict[str, Any],
                                            param: str) -> None:
    _error(api.post("/tokenize", json=body), param)


@pytest.mark.parametrize("tokens", [[1.0], ["1"], [True], [-1], [1, 10**9], "12", [[1]]])
def test_detokenize_takes_only_integer_ids_in_the_vocabulary(api: httpx.Client,
                                                             tokens: object) -> None:
    _error(api.post("/detokenize", json={"tokens": tokens}), "tokens")


def test_detokenize_round_trip(api: httpx.Client) -> None:
    ids = api.post("/tokenize", json={"prompt": "hello world",
                                      "add_special_tokens": False}).json()["tokens"]
    assert api.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "hello world"}


class _ThreadRecordingTokenizer:
    """The demo tokenizer, noting the thread each encode runs in."""

    def __init__(self) -> None:
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
        self.threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return list(self.tok.encode(*args, **kwargs))


def test_large_bodies_are_tokenized_off_the_event_loop() -> None:
    tok = _ThreadRecordingTokenizer()
    client = SimpleNamespace(tokenizer=tok, model_config=SimpleNamespace(max_model_len=4096,
                                                                         vocab_size=10**6))
    state = ServerState(client=client, ready=None, served_model_names=["demo"],  # type: ignore[arg-type]
                        renderer=ChatRenderer(tok, tok.tok.chat_template, "checkpoint"),
                        reasoning=None, metrics=None, admission=None)  # type: ignore[arg-type]
    app = FastAPI()
    install_error_handlers(app)
    add_tokenize_routes(app, state)
    with TestClient(app) as http:
        assert http.post("/tokenize", json={"prompt": "small"}).status_code == 200
        big = "word " * (OFFLOAD_BYTES // 4)
        assert http.post("/tokenize", json={"prompt": big}).status_code == 200
        many = [{"role": "user", "content": "x" * 40}] * 2000
        assert http.post("/tokenize", json={"messages": many}).status_code == 200
    small_thread, *big_threads = tok.threads
    assert not small_thread.startswith("flatout-prepare")
    assert big_threads and all(t.startswith("flatout-prepare") for t in big_threads), tok.threads
