"""Many streaming clients at once are batched by the engine and get their own outputs; clients
that go away mid-request have their requests aborted and their KV blocks freed."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from flatout import SamplingParams

NO_EOS = {"ignore_eos": True}
ABORTED = 'flatout:request_success_total{finished_reason="abort",model_name="demo"}'


def _prompts(n: int) -> list[str]:
    return [f"Request {i}: " + "the fox and the dog " * (1 + i % 7) + f"number {i * 37}"
            for i in range(n)]


def test_64_concurrent_streams_are_batched_and_independent(demo_server, llm) -> None:  # noqa: ANN001
    prompts = _prompts(64)
    expected = [o.text for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    assert len(set(expected)) > 32  # the prompts lead to different outputs

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model="demo", prompt=prompt, max_tokens=16, temperature=0, stream=True,
            extra_body=NO_EOS)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(base_url=f"{demo_server.url}/v1", api_key="EMPTY",
                                    max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    before = demo_server.metrics()
    results = asyncio.run(run_all())
    after = demo_server.metrics()
    assert [t for t, _ in results] == expected
    assert {f for _, f in results} == {"length"}
    steps = after["flatout:engine_steps_total"] - before["flatout:engine_steps_total"]
    tokens = (after["flatout:generation_tokens_total"]
              - before["flatout:generation_tokens_total"])
    assert tokens == 64 * 16
    assert tokens / steps > 1.5, (tokens, steps)  # one forward per request would give 1
    assert after["flatout:mean_running_batch_size"] > 1
    assert after["flatout:kv_cache_usage_perc"] == 0.0


def _wait_idle(server, timeout: float = 15.0) -> dict[str, float]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["flatout:kv_cache_usage_perc"] == 0 and m["flatout:num_requests_running"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_disconnecting_clients_free_their_blocks(demo_server) -> None:  # noqa: ANN001
    url = f"{demo_server.url}/v1/completions"
    body = {"model": "demo", "max_tokens": 300, "temperature": 0.8, "stream": True, **NO_EOS}
    aborts_before = _wait_idle(demo_server).get(ABORTED, 0.0)

    async def run() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=60) as h:
            streams = []
            for p in _prompts(8):
                cm = h.stream("POST", url, json={**body, "prompt": p})
                r = await cm.__aenter__()
                lines = r.aiter_lines()
                got = 0
                while got < 3:  # a few tokens in: the request holds KV blocks now
                    if (await anext(lines)).startswith("data: "):
                        got += 1
                streams.append(cm)
            busy = await asyncio.to_thread(demo_server.metrics)
            for cm in streams:  # hang up mid-stream
                await cm.__aexit__(None, None, None)
            return busy

    busy = asyncio.run(run())
    assert busy["flatout:kv_cache_usage_perc"] > 0
    assert busy["flatout:num_requests_running"] > 0
    idle = _wait_idle(demo_server)
    assert idle["flatout:kv_cache_usage_perc"] == 0.0
    assert idle["flatout:num_requests_running"] == 0 and idle["flatout:num_requests_waiting"] == 0
    assert idle[ABORTED] - aborts_before == 8


def test_non_streaming_client_timeout_aborts(demo_server) -> None:  # noqa: ANN001
    # 8 samples of 350 tokens each: several seconds of work, cut after half a second
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 350, "n": 8,
            "temperature": 1.0, **NO_EOS}
    aborts_before = _wait_idle(demo_server).get(ABORTED, 0.0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{demo_server.url}/v1/completions", json=body, timeout=0.5)
    idle = _wait_idle(demo_server)
    assert idle["flatout:kv_cache_usage_perc"] == 0.0
    assert idle["flatout:num_requests_running"] == 0
    assert idle[ABORTED] - aborts_before == 8  # all 8 samples were cut short
