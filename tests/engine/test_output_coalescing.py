"""A consumer that falls behind takes the deltas that waited as one (`join_deltas` in the
request's OutputQueue): the joined delta holds exactly what the deltas held one by one, an error
still comes after them, and a model without a tokenizer keeps one delta per step."""

from __future__ import annotations

import asyncio
import random

import pytest

from flatout.engine.async_client import AsyncEngineClient, OutputQueue
from flatout.engine.messages import (
    ConsumerTooSlowError,
    CoreOutputs,
    CoreStats,
    EngineCoreOutput,
    TokenLogprobs,
)
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import CompletionOutput, OutputAccumulator, RequestOutput, join_deltas
from flatout.sampling_params import SamplingParams


def _deltas(seed: int, n: int = 2, steps: int = 30) -> list[RequestOutput]:
    """Deltas of a request with `n` samples, some steps advancing only one sample, with
    logprobs, reasoning on some steps, the samples finishing at different steps."""
    rng = random.Random(seed)
    ends = [rng.randrange(steps // 2, steps) for _ in range(n)]
    out = []
    for step in range(steps):
        outs = []
        for i in range(n):
            if step > ends[i] or rng.random() < 0.3:
                continue
            tok = rng.randrange(100)
            done = step == ends[i]
            outs.append(CompletionOutput(
                index=i, text=f"<{i}:{tok}>", token_ids=[tok],
                finish_reason="length" if done else None, stop_reason=None,
                logprobs=[TokenLogprobs(tok, -0.1 * step, {tok: -0.1 * step}, text=f"{tok}")],
                cumulative_logprob=-float(step),
                reasoning=f"r{step}" if rng.random() < 0.5 else None))
        finished = all(step >= e for e in ends)
        out.append(RequestOutput("r", "p", [1, 2], outs, finished, num_cached_tokens=step,
                                 metrics={"queue_time": 0.5}))
    return out


def _whole(deltas: list[RequestOutput], n: int = 2) -> RequestOutput:
    acc = OutputAccumulator(n)
    for d in deltas:
        acc.add(d)
    return acc.result()


def test_joined_deltas_hold_what_the_deltas_held() -> None:
    for seed in range(20):
        rng = random.Random(100 + seed)
        deltas = _deltas(seed)
        expected = _whole(_deltas(seed))
        joined: list[RequestOutput] = []  # runs of consecutive deltas joined at random cuts
        for d in deltas:
            if joined and rng.random() < 0.6:
                joined[-1] = join_deltas(joined[-1], d)
            else:
                joined.append(d)
        assert len(joined) < len(deltas)
        whole = _whole(joined)
        assert whole == expected


def test_the_queue_joins_what_waited_and_keeps_the_error_for_after() -> None:
    async def main() -> None:
        deltas = _deltas(0, steps=10)
        q = OutputQueue(coalesce=True)
        for d in deltas[:4]:
            q.put(d)
        q.put(TimeoutError("late"))
        q.put(deltas[4])  # after an error: never joined into what came before it
        first = await q.get()
        assert isinstance(first, RequestOutput)
        assert _whole([first]) == _whole(_deltas(0, steps=10)[:4])
        assert isinstance(await q.get(), TimeoutError)
        assert await q.get() is deltas[4]
        assert q.backlog == 0

        plain = OutputQueue()  # without coalescing: one at a time
        for d in deltas[5:8]:
            plain.put(d)
        assert [await plain.get() for _ in range(3)] == deltas[5:8]
        assert plain.backlog == 0

    asyncio.run(main())


class _Inputs:
    eos_token_ids: list[int] = []

    def encode(self, prompt: list[int]) -> tuple[None, list[int]]:
        return None, list(prompt)

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        return params.max_tokens or 16


def _client(tokenizer: object) -> AsyncEngineClient:
    client = AsyncEngineClient(None)  # type: ignore[arg-type]  # no core process
    client._send = lambda msg: None  # type: ignore[method-assign]
    client.inputs = _Inputs()  # type: ignore[assignment]
    client.outputs = OutputProcessor(None)
    client.tokenizer = tokenizer
    client.problem = lambda: None  # type: ignore[method-assign]
    return client


def _step(step: int, last: bool = False) -> CoreOutputs:
    return CoreOutputs([EngineCoreOutput("r", 0, [step], finish_reason="length" if last else None)],
                       CoreStats())  # type: ignore[arg-type]


def _steps_taken(tokenizer: object) -> list[list[int]]:
    """Token ids of each delta a consumer takes when 5 steps arrive while it waits to resume,
    then 1 more once it has."""

    async def main() -> list[list[int]]:
        client = _client(tokenizer)
        gen = client.generate("r", [1], SamplingParams(max_tokens=6, ignore_eos=True))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the consumer waits for its first output
        for step in range(5):  # the loop dispatches 5 steps before the consumer resumes
            client._dispatch(_step(step), client._generation)
        got = [await first]
        nxt = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        client._dispatch(_step(5, last=True), client._generation)
        got.append(await nxt)
        return [o.token_ids for o in got]

    return asyncio.run(main())


def test_a_consumer_resumed_late_takes_the_waiting_steps_as_one_delta() -> None:
    assert _steps_taken(tokenizer=object()) == [[0, 1, 2, 3, 4], [5]]


def test_without_a_tokenizer_every_step_stays_a_delta() -> None:
    async def main() -> int:
        client = _client(tokenizer=None)
        gen = client.generate("r", [1], SamplingParams(max_tokens=5, ignore_eos=True))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        for step in range(5):
            client._dispatch(_step(step, last=step == 4), client._generation)
        got = [await first] + [d async for d in gen]
        return len(got)

    assert asyncio.run(main()) == 5


def test_a_joining_consumer_that_stops_reading_is_dropped_at_the_limit() -> None:
    """Joining changes what the consumer takes, not what waits: the backlog counts every delta
    waiting (a joined delta, once taken, counted the bytes of each it joined), so a consumer
    that takes what waited, then stops reading, is dropped as soon as the deltas that came since
    pass the limit, exactly as without joining."""
    n, top, limit = 4, 20, 32 * 1024

    def step(i: int) -> CoreOutputs:
        return CoreOutputs([EngineCoreOutput(
            "r", k, [i % 100], [TokenLogprobs(i % 100, -1.0, {t: -1.0 - t for t in range(top)})])
            for k in range(n)], CoreStats())

    async def main() -> tuple[int, int, RequestOutput, bool]:
        client = _client(tokenizer=object())
        client.max_backlog_bytes = limit
        sent: list[object] = []
        client._send = sent.append  # type: ignore[method-assign]
        dropped: list[int] = []
        gen = client.generate("r", [1], SamplingParams(n=n, max_tokens=10_000, logprobs=top,
                                                       ignore_eos=True),
                              on_too_slow=lambda: dropped.append(1))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # waiting: what piles up now is the loop's lateness, no backlog
        for i in range(3):
            client._dispatch(step(i), client._generation)
        joined = await first
        queue = client.queues["r"]
        assert queue.backlog == 0  # the three deltas left the queue, all their bytes with them
        per_step = 0
        steps = 0
        while not dropped and steps < 1000:  # the consumer no longer reads
            client._dispatch(step(3 + steps), client._generation)
            steps += 1
            if steps == 1:
                per_step = queue.backlog
        with pytest.raises(ConsumerTooSlowError):
            await gen.__anext__()
        assert [type(m).__name__ for m in sent] == ["EngineCoreRequest", "AbortRequest"]
        return steps, per_step, joined, "r" in client.queues

    steps, per_step, joined, still_queued = asyncio.run(main())
    assert [o.token_ids for o in joined.outputs] == [[0, 1, 2]] * n
    assert all(len(o.logprobs or []) == 3 for o in joined.outputs)
    assert steps == limit // per_step + 1, (steps, per_step)
    assert not still_queued
