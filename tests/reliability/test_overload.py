"""Overload and deadlines: beyond --max-waiting-requests a request gets 503 with Retry-After at
once while the admitted ones complete; a request past --request-timeout is stopped with an error
and its KV blocks are freed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.harness import (
    COMPLETIONS,
    Stream,
    completion_body,
    outcomes,
    stream,
    total,
    wait_idle,
)
from tests.server.server_process import ServerProcess

MAX_WAITING = 8
TIMEOUT_S = 1.0


def _server(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", "2048", "--num-kv-blocks", "512",
                       "--served-model-name", "demo", *args],
                      tmp_path_factory.mktemp("overload") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # two running at a time, so that the queue drains slowly even on a fast machine
    yield from _server(tmp_path_factory, "--max-num-seqs", "2", "--max-waiting-requests",
                       str(MAX_WAITING))


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _server(tmp_path_factory, "--request-timeout", str(TIMEOUT_S))


def test_overload_is_turned_away_quickly_and_admitted_requests_complete(
        server: ServerProcess) -> None:
    num_clients, max_tokens = 48, 32
    before = wait_idle(server)

    async def one(h: httpx.AsyncClient, i: int) -> tuple[Stream, float]:
        start = time.monotonic()
        return await stream(h, server.url + COMPLETIONS, completion_body(i, max_tokens)), \
            time.monotonic() - start

    async def run() -> list[tuple[Stream, float]]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=60) as h:
            return await asyncio.gather(*(one(h, i) for i in range(num_clients)))

    results = asyncio.run(run())
    admitted = [r for r, _ in results if r.status == 200]
    turned_away = [(r, dt) for r, dt in results if r.status != 200]
    assert len(admitted) >= MAX_WAITING and turned_away, (len(admitted), len(turned_away))
    for r in admitted:
        r.check_complete(max_tokens)
    for r, seconds in turned_away:
        assert r.status == 503, r.body
        assert r.headers["retry-after"] == "1"
        err = httpx.Response(503, content=r.body).json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "overloaded", err
        assert seconds < 5.0  # no waiting in a backlog: the answer comes at once (~0.1 s)
    after = wait_idle(server)
    got = {k: v - outcomes(before)[k] for k, v in outcomes(after).items()}
    assert got == {"accepted": len(admitted), "completed": len(admitted), "error": 0,
                   "aborted": 0}
    rejected = "flatout:requests_rejected_total"
    assert total(after, rejected, reason="overloaded") - \
        total(before, rejected, reason="overloaded") == len(turned_away)


def test_request_timeout_stops_the_request_and_frees_it(timeout_server: ServerProcess) -> None:
    server = timeout_server
    # 2000 tokens take far longer than the timeout, even on a fast machine
    body = {**completion_body(1, 2000), "stream_options": None}
    before = wait_idle(server)
    start = time.monotonic()
    r = httpx.post(server.url + COMPLETIONS, json=body, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 2

    async def streamed() -> Stream:
        async with httpx.AsyncClient(timeout=30) as h:
            return await stream(h, server.url + COMPLETIONS, body)

    s = asyncio.run(streamed())
    assert s.status == 200 and s.chunks and s.done  # some tokens, then the error, then [DONE]
    assert s.error is not None and s.error["code"] == "request_timeout"
    after = wait_idle(server)
    assert after["flatout:kv_cache_usage_perc"] == 0.0
    got = {k: v - outcomes(before)[k] for k, v in outcomes(after).items()}
    assert got == {"accepted": 2, "completed": 0, "error": 2, "aborted": 0}
