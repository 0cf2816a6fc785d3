"""500 concurrent streaming clients on the demo model, a third of which hang up at random moments
(while queued, before their first token, mid-stream): every other client gets a complete,
well-formed stream, the outcome counters add up to the requests sent, and the KV block pool ends
fully free."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.harness import (
    CHAT,
    COMPLETIONS,
    Stream,
    chat_body,
    completion_body,
    outcomes,
    stream,
    total,
    wait_idle,
)
from tests.server.server_process import ServerProcess

NUM_CLIENTS = 500
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", "128", "--max-num-seqs", "128", "--num-kv-blocks",
                       "2048", "--max-waiting-requests", str(NUM_CLIENTS),
                       "--served-model-name", "demo"],
                      tmp_path_factory.mktemp("load") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


async def _client(h: httpx.AsyncClient, base: str, i: int, plan: tuple[str, float] | None,
                  ) -> tuple[Stream, bool]:
    """One client; `plan` makes it hang up: ("after", seconds after its request was accepted)
    or ("chunks", count). Returns what it received and whether it hung up."""
    path, body = (CHAT, chat_body(i, MAX_TOKENS)) if i % 2 else \
        (COMPLETIONS, completion_body(i, MAX_TOKENS))
    if plan is None:
        return await stream(h, base + path, body), False
    kind, value = plan
    if kind == "chunks":
        return await stream(h, base + path, body, stop_after_chunks=int(value)), True
    return await stream(h, base + path, body, stop_after_seconds=value), True


def test_500_streams_with_a_third_hanging_up(server: ServerProcess) -> None:
    rng = random.Random(6)
    leavers = set(rng.sample(range(NUM_CLIENTS), NUM_CLIENTS // 3))
    plans: dict[int, tuple[str, float]] = {
        i: ("after", rng.uniform(0.0, 1.0)) if rng.random() < 0.5
        else ("chunks", rng.randint(1, MAX_TOKENS)) for i in leavers}
    before = wait_idle(server)

    async def run() -> list[tuple[Stream, bool]]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 10)
        async with httpx.AsyncClient(limits=limits, timeout=180) as h:
            return await asyncio.gather(*(_client(h, server.url, i, plans.get(i))
                                          for i in range(NUM_CLIENTS)))

    results = asyncio.run(run())
    stayed = [r for r, left in results if not left]
    assert len(stayed) == NUM_CLIENTS - len(leavers)
    for r in stayed:
        r.check_complete(MAX_TOKENS)
    # a leaver whose stream ended before its moment came got everything; the others hung up
    # while queued, before their first token or mid-stream
    leavers_served = sum(1 for r, left in results if left and r.done)
    cut_short = len(leavers) - leavers_served
    assert cut_short >= len(leavers) // 3
    # before any token (queued or in prefill; a chat stream starts with a role-only chunk)
    early = sum(1 for i, (r, left) in enumerate(results)
                if left and not r.done and len(r.chunks) <= i % 2)
    assert 0 < early < cut_short, (early, cut_short)  # the others left mid-stream

    after = wait_idle(server)
    got = {k: v - outcomes(before)[k] for k, v in outcomes(after).items()}
    assert got["accepted"] == NUM_CLIENTS
    assert got["completed"] + got["aborted"] + got["error"] == NUM_CLIENTS, got
    assert got["error"] == 0, got
    assert got["completed"] >= len(stayed) + leavers_served, got
    assert got["aborted"] <= cut_short, got
    # a hang-up can cross the end of its stream (the server finished it, the client had not
    # read it yet); any other cut-short stream was aborted
    assert got["aborted"] >= 0.7 * cut_short, (got, cut_short)
    # the engine saw each request end once (finished or aborted), and holds nothing now
    success = "flatout:request_success_total"
    assert total(after, success) - total(before, success) == NUM_CLIENTS
    assert total(after, success, finished_reason="abort") > total(before, success,
                                                                  finished_reason="abort")
    assert after["flatout:kv_cache_usage_perc"] == 0.0
    assert after["flatout:num_requests_running"] == 0
    assert after["flatout:num_requests_waiting"] == 0
    assert after["flatout:requests_in_flight"] == 0 and after["flatout:requests_queued"] == 0
    assert not any(k.startswith("flatout:http_requests_total") and 'status="5' in k
                   for k in after)
