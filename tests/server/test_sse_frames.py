"""How a stream's events are framed and written: a chunk framed with its base fields encoded
once is byte for byte the chunk encoded whole; the generated-tokens counter is reported at
scrape time; a stream's body reaches an HTTP/1.1 client in chunked encoding (written the short
way, `flatout.write_body`) and an HTTP/1.0 client close-delimited (the ordinary ASGI send), with
the same events."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from flatout.engine.messages import CoreStats
from flatout.engine.outputs import CompletionOutput, RequestOutput
from flatout.server.metrics import ServerMetrics
from flatout.server.responses import ChunkFrame, sse
from tests.server.server_process import ServerProcess


@pytest.mark.parametrize("base", [
    {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "demo"},
    {"id": "chatcmpl-ü", "object": "chat.completion.chunk", "created": 7, "model": "模型",
     "system_fingerprint": None, "usage": None},
])
def test_a_framed_chunk_is_the_chunk_encoded_whole(base: dict) -> None:
    frame = ChunkFrame(base)
    for choice in [{"index": 0, "text": "a\"b\n你", "logprobs": None, "finish_reason": None},
                   {"index": 3, "delta": {"content": "\u2028x"}, "logprobs": {"content": [
                       {"token": "x", "logprob": -0.5, "bytes": [120]}]},
                    "finish_reason": "stop", "stop_reason": 2}]:
        assert frame.event(choice) == sse({**base, "choices": [choice]})
        json.loads(frame.event(choice)[len("data: "):])
    with pytest.raises(ValueError, match="choices"):
        ChunkFrame({**base, "choices": []})


def test_generated_tokens_are_counted_at_scrape_time() -> None:
    metrics = ServerMetrics(lambda: CoreStats(), "demo", nvml=None)
    tracker = metrics.track()

    def delta(*tokens: list[int]) -> RequestOutput:
        return RequestOutput("r", None, [1, 2, 3], [
            CompletionOutput(i, "x", ids, None) for i, ids in enumerate(tokens)], False)

    tracker.observe(delta([5]))
    tracker.observe(delta([5, 6], [7]))
    tracker.observe(delta([]))
    text = metrics.render().decode()
    assert 'flatout:generation_tokens_total{model_name="demo"} 4.0' in text
    assert 'flatout:prompt_tokens_total{model_name="demo"} 3.0' in text
    assert text.count("# TYPE flatout:generation_tokens_total counter") == 1


def _stream(server: ServerProcess, version: str) -> bytes:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    body = json.dumps({"model": "demo", "prompt": "The quick brown fox", "max_tokens": 12,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "logprobs": 2}).encode()
    head = (f"POST /v1/completions HTTP/{version}\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(head + body)
        got = b""
        while piece := s.recv(1 << 16):
            got += piece
    return got


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return out
        out, body = out + body[:size], body[size:]
        assert body.startswith(b"\r\n")
        body = body[2:]


def _events(body: bytes) -> list[dict]:
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_a_stream_reaches_http_1_0_and_1_1_clients_alike(demo_server: ServerProcess) -> None:
    answers = {}
    for version in ("1.0", "1.1"):
        head, body = _stream(demo_server, version).split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/{version} 200".encode()) or head.startswith(b"HTTP/1.1 200")
        chunked = b"transfer-encoding: chunked" in head.lower()
        assert chunked == (version == "1.1")
        events = _events(_dechunk(body) if chunked else body)
        # how the tokens fall into chunks depends on timing (a stream resumed late takes
        # what waited as one chunk): compare what the chunks carry, joined
        answers[version] = (
            "".join(c["text"] for e in events for c in e["choices"]),
            [(t, lp) for e in events for c in e["choices"] for t, lp in zip(
                c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"], strict=True)],
            [c["finish_reason"] for e in events for c in e["choices"]][-1])
    assert answers["1.0"] == answers["1.1"]
    text, tokens, finish = answers["1.1"]
    assert text and "".join(t for t, _ in tokens) == text and len(tokens) == 12
    assert finish == "length"
