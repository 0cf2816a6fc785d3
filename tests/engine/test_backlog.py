"""The engine client's bound on a request's unread outputs: a consumer that stops taking its
deltas is dropped once they pass `max_backlog_bytes` (request aborted in the core, outputs
freed, ConsumerTooSlowError), and the estimate behind it tracks the memory they really hold."""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest

from flatout.engine.async_client import AsyncEngineClient, OutputQueue, backlog_bytes
from flatout.engine.messages import (
    AbortRequest,
    ConsumerTooSlowError,
    CoreOutputs,
    CoreStats,
    EngineCoreOutput,
    EngineCoreRequest,
    TokenLogprobs,
)
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import CompletionOutput, RequestOutput
from flatout.sampling_params import SamplingParams

N, TOP = 8, 5


class _Inputs:
    eos_token_ids: list[int] = []

    def encode(self, prompt: list[int]) -> tuple[None, list[int]]:
        return None, list(prompt)

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        return params.max_tokens or 16


def _client(limit: int | None) -> tuple[AsyncEngineClient, list[object]]:
    """A client without a core process: what it sends is recorded, outputs are fed by hand."""
    client = AsyncEngineClient(None, max_backlog_bytes=limit)  # type: ignore[arg-type]
    sent: list[object] = []
    client._send = sent.append  # type: ignore[method-assign]
    client.inputs = _Inputs()  # type: ignore[assignment]
    client.outputs = OutputProcessor(None)
    client.problem = lambda: None  # type: ignore[method-assign]  # no core process: never dead
    return client, sent


def _step(request_id: str, step: int) -> CoreOutputs:
    return CoreOutputs([
        EngineCoreOutput(request_id, i, [step % 100],
                         [TokenLogprobs(step % 100, -1.0, {t: -1.0 - t for t in range(TOP)})])
        for i in range(N)], CoreStats())


def _params() -> SamplingParams:
    return SamplingParams(n=N, max_tokens=1000, logprobs=TOP, ignore_eos=True)


def test_a_consumer_that_stops_reading_is_dropped_at_the_limit() -> None:
    limit = 64 * 1024

    async def main() -> tuple[Any, ...]:
        client, sent = _client(limit)
        dropped: list[int] = []
        gen = client.generate("r", [1, 2, 3], _params(), on_too_slow=lambda: dropped.append(1))
        started = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the request is sent
        client._dispatch(_step("r", 0), client._generation)
        first = await started  # the consumer takes one delta, then stops reading
        steps = 0
        while not dropped and steps < 1000:
            steps += 1
            client._dispatch(_step("r", steps), client._generation)
        queue_left = "r" in client.queues
        with pytest.raises(ConsumerTooSlowError):
            await gen.__anext__()
        return first, steps, sent, queue_left, client

    first, steps, sent, queue_left, client = asyncio.run(_bootstrap(main))
    assert len(first.outputs) == N
    per_step = backlog_bytes(client_delta())
    # dropped as soon as the unread deltas passed the limit, not before
    assert steps == limit // per_step + 1, (steps, per_step)
    assert [type(m) for m in sent] == [EngineCoreRequest, AbortRequest]  # aborted once
    assert not queue_left and "r" not in client.outputs.requests and "r" not in client._in_core


def test_a_consumer_that_keeps_up_is_never_dropped() -> None:
    async def main() -> int:
        client, sent = _client(16 * 1024)
        gen = client.generate("r", [1], _params(), on_too_slow=lambda: pytest.fail("dropped"))
        got = 0
        for step in range(200):  # 200 steps of ~11 KB: far more than the limit in all
            taken = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)
            client._dispatch(_step("r", step), client._generation)
            await taken
            got += 1
        await gen.aclose()
        assert [type(m) for m in sent] == [EngineCoreRequest, AbortRequest]  # closed early
        return got

    assert asyncio.run(_bootstrap(main)) == 200


def test_outputs_piling_up_while_the_consumer_waits_for_the_loop_are_no_backlog() -> None:
    """Many steps dispatched back to back (the event loop was busy) while the consumer waits in
    its queue: it is merely late, not slow, and gets them all."""

    async def main() -> int:
        client, sent = _client(16 * 1024)
        gen = client.generate("r", [1], _params(), on_too_slow=lambda: pytest.fail("dropped"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the consumer now waits for its first output
        for step in range(100):  # ~1 MB at once, far over the limit
            client._dispatch(_step("r", step), client._generation)
        got = [await first] + [await gen.__anext__() for _ in range(99)]
        await gen.aclose()
        return len(got)

    assert asyncio.run(_bootstrap(main)) == 100


async def _bootstrap(main: Any) -> Any:
    return await main()


def client_delta() -> RequestOutput:
    """One step's delta of the request above, as the output processor makes it."""
    outs = [CompletionOutput(i, "", [7], None, None,
                             [TokenLogprobs(7, -1.0, {t: -1.0 - t for t in range(TOP)}, "")], -1.0)
            for i in range(N)]
    return RequestOutput("r", None, [1, 2, 3], outs, False)


@pytest.mark.parametrize(("n", "top", "text"), [(64, 5, "ab"), (8, 20, "hello"), (1, 0, "x")])
def test_estimate_tracks_the_memory_deltas_hold(n: int, top: int, text: str) -> None:
    def delta(step: int) -> RequestOutput:
        outs = [CompletionOutput(
            i, text * (1 + step % 3), [1000 + step, 2000 + i], None, None,
            [TokenLogprobs(1000 + step, -0.5 - step, {5000 + t + step: -1.0 * t - step
                                                      for t in range(top)}, text)] * 2
            if top else None, -1.0 * step) for i in range(n)]
        return RequestOutput("r", None, [1, 2, 3], outs, False)

    queue = OutputQueue()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for step in range(50):
        queue.put(delta(step))
    held = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert 0.7 * held <= queue.backlog <= 2.0 * held, (queue.backlog, held)


def test_a_big_step_is_dispatched_in_pieces_in_order() -> None:
    """A step of 100 sample outputs reaches the queues DISPATCH_CHUNK at a time with the event
    loop free between the pieces (other callbacks run), and in order: a later step's outputs
    never overtake the rest of an earlier one."""
    from flatout.engine.async_client import DISPATCH_CHUNK

    n = 100

    async def main() -> tuple[list[list[int]], list[str]]:
        client, _ = _client(None)
        client._loop = asyncio.get_running_loop()
        params = SamplingParams(n=n, max_tokens=1000, ignore_eos=True)
        gen = client.generate("big", [1, 2, 3], params)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        events: list[str] = []

        def step(k: int) -> CoreOutputs:
            return CoreOutputs([EngineCoreOutput("big", i, [k]) for i in range(n)], CoreStats())

        queue = client.queues["big"]
        put = queue.put

        def recording_put(item: Any) -> None:
            events.append(f"put {len(item.outputs)}")
            put(item)

        queue.put = recording_put  # type: ignore[method-assign]
        client._arrived(step(7), client._generation)
        client._arrived(step(8), client._generation)
        client._loop.call_soon(lambda: events.append("other"))
        for _ in range(20):
            await asyncio.sleep(0)
        got = [await first]
        while len(events) and sum(len(o.outputs) for o in got) < 2 * n:
            got.append(await gen.__anext__())
        per_sample: dict[int, list[int]] = {}
        for o in got:
            for c in o.outputs:
                per_sample.setdefault(c.index, []).extend(c.token_ids)
        await gen.aclose()
        return [per_sample[i] for i in range(n)], events

    samples, events = asyncio.run(main())
    assert all(s == [7, 8] for s in samples)  # every sample: step 7's token, then step 8's
    puts = [e for e in events if e.startswith("put")]
    assert len(puts) == 2 * -(-n // DISPATCH_CHUNK)  # pieces of DISPATCH_CHUNK outputs
    assert events.index("other") < len(events) - 1  # the loop ran another callback in between
