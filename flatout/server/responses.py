"""Pieces both endpoints use: ids, SSE framing, usage and logprob objects in OpenAI's shapes,
merging several requests' outputs, and aborting work whose client went away (whether it is
queued, waiting for its first token or streaming)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive

from flatout.engine.messages import TokenLogprobs
from flatout.engine.outputs import OutputAccumulator, RequestOutput
from flatout.server.admission import ClientDisconnected, Outcome, Ticket
from flatout.server.errors import OpenAIError, to_openai_error
from flatout.server.logs import RateLimitedLog
from flatout.server.state import ServerState

T = TypeVar("T")
_dropped_log = RateLimitedLog(logging.getLogger(__name__))
# the scope extension (connections.py) that drops a response's connection without flushing it
ABORT_CONNECTION = "flatout.abort_connection"
# the scope extension (connections.py) that sends a piece of a response body the short way
WRITE_BODY = "flatout.write_body"
_MIN_LOGPROB = -9999.0  # JSON has no -inf


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# json.dumps builds an encoder per call when given options; one, made once, serves every event
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(obj: Any) -> str:
    return f"data: {_encode(obj)}\n\n"


class ChunkFrame:
    """The SSE events of one stream's chunks: `base` (the fields every chunk starts with) is
    encoded once; `event(choice)` is `sse({**base, "choices": [choice]})`, byte for byte."""

    def __init__(self, base: dict[str, Any]) -> None:
        if "choices" in base:
            raise ValueError("a chunk's base fields come before its choices")
        head = _encode({**base, "choices": []})
        assert head.endswith("[]}")
        self._head = f"data: {head[:-2]}"

    def event(self, choice: dict[str, Any]) -> str:
        return f"{self._head}{_encode(choice)}]}}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    return sse(to_openai_error(e).body())


def usage(requests: list[OutputAccumulator]) -> dict[str, Any]:
    prompt = sum(r.num_prompt_tokens for r in requests)
    completion = sum(sum(r.num_tokens()) for r in requests)
    cached = sum(r.num_cached_tokens for r in requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


def _token(state: ServerState, lp: TokenLogprobs) -> str:
    """A generated token as logprobs report it: the text it added to the output (so the tokens
    join to the output's text), or its id on a model without a tokenizer."""
    return lp.text if lp.text is not None else state.token_text(lp.token_id)


def chat_logprobs(
    state: ServerState, lps: list[TokenLogprobs], top_n: int
) -> dict[str, list[dict[str, Any]]]:
    """`choices[i].logprobs` of a chat completion: one entry per generated token; the
    alternatives in `top_logprobs` are each decoded on their own."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for lp in lps:
        item = entry(_token(state, lp), lp.logprob)
        item["top_logprobs"] = [entry(state.token_text(t), v)
                                for t, v in list(lp.top.items())[:top_n]]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    state: ServerState, lps: list[TokenLogprobs], top_n: int, text_offset: int
) -> dict[str, list[Any]]:
    """`choices[i].logprobs` of a (legacy) completion; offsets count from `text_offset`. The
    tokens join to the choice's text; `top_logprobs` keys are tokens each decoded on its own."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for lp in lps:
        text = _token(state, lp)
        tokens.append(text)
        token_lps.append(_lp(lp.logprob))
        top = {state.token_text(t): _lp(v) for t, v in list(lp.top.items())[:top_n]}
        top.setdefault(state.token_text(lp.token_id), _lp(lp.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


async def merge(gens: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.
    Closing the merge (or an error in one) closes all of them, which aborts their requests."""
    if len(gens) == 1:
        async with aclosing(gens[0]) as g:  # type: ignore[type-var]
            async for item in g:
                yield 0, item
        return
    # bounded: what the consumer has not taken waits in each iterator (the engine client's
    # queue, where a backlog is measured and bounded), not here
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue(len(gens))

    async def pump(i: int, gen: AsyncIterator[T]) -> None:
        try:
            async with aclosing(gen) as g:  # type: ignore[type-var]
                async for item in g:
                    await queue.put((i, item, None))
            await queue.put((i, None, None))
        except Exception as e:
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, got, err = await queue.get()
            if err is not None:
                raise err
            if got is None:
                remaining -= 1
                continue
            yield i, got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (a non-streaming generation); cancel it, which aborts its requests in the
    engine, if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected


class RequestProgress:
    """The deltas of one API request's engine requests (`n` samples each) so far: joined per
    engine request, and observed for the metrics; `finish` once at the end."""

    def __init__(self, state: ServerState, num_requests: int, n: int, arrival: float, *,
                 keep_outputs: bool = True) -> None:
        """`keep_outputs=False` (a stream, which has sent them): keep only the counts."""
        self.requests = [OutputAccumulator(n, keep_outputs=keep_outputs)
                         for _ in range(num_requests)]
        self.trackers = [state.metrics.track(arrival) for _ in range(num_requests)]

    def add(self, i: int, delta: RequestOutput) -> None:
        self.trackers[i].observe(delta)
        self.requests[i].add(delta)

    def finish(self) -> None:
        for tracker, request in zip(self.trackers, self.requests, strict=True):
            tracker.finish(request)


Generators = Callable[[], list[AsyncIterator[RequestOutput]]]


async def collect(
    state: ServerState, generators: Generators, n: int, arrival: float
) -> list[OutputAccumulator]:
    """Run a non-streamed request's engine requests (`generators()` starts them) to the end;
    their joined outputs, each finished."""
    gens = generators()
    progress = RequestProgress(state, len(gens), n, arrival)
    try:
        async for i, delta in merge(gens):
            progress.add(i, delta)
    finally:
        progress.finish()
    return [ensure_finished(r) for r in progress.requests]


def ensure_finished(request: OutputAccumulator) -> OutputAccumulator:
    """`request` (an engine request's joined deltas); 500 if it did not finish."""
    if not request.finished:
        raise OpenAIError("the engine ended the request without a result", status=500)
    return request


class EventStream(StreamingResponse):
    """An SSE response that watches for its client leaving at every moment (also while the
    request is queued and nothing is being sent), and records the request's outcome.

    On a disconnect the body generator is closed, which aborts its engine requests. The body
    records `completed` or `error` itself when it ends; a stream cut short is `aborted`."""

    def __init__(self, body: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket
        self.events = body

    async def _send_body(self, send: Any, write: Callable[[bytes], Awaitable[None]] | None
                         ) -> None:
        """The response: its head through the ASGI send (the middlewares see the status), the
        body's pieces through `write` where the server offers it (one layer, not five)."""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for event in self.events:
            data = event.encode(self.charset)
            if write is not None:
                await write(data)
            else:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        write = scope.get("extensions", {}).get(WRITE_BODY)
        body = asyncio.ensure_future(self._send_body(send, write))
        gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        dropped = asyncio.ensure_future(self.ticket.abandoned.wait())
        outcome = Outcome.ERROR  # if cancelled from outside: the server cut the stream
        try:
            await asyncio.wait({body, gone, dropped}, return_when=asyncio.FIRST_COMPLETED)
            outcome = Outcome.ABORTED  # unless the body ended and recorded its own outcome
            if dropped.done() and not body.done():
                _dropped_log.warning("dropped", "dropped a stream whose client stopped reading "
                                     "(more than --max-stream-backlog-bytes behind); its "
                                     "request is aborted")
                # the client stopped reading (its socket is full): drop the connection, what
                # waits in its buffers included; a graceful close would wait for the client
                abort = scope.get("extensions", {}).get(ABORT_CONNECTION)
                if abort is not None:
                    abort()
                    await asyncio.wait({gone}, timeout=1.0)
        finally:
            for task in (body, gone, dropped):
                task.cancel()
            await asyncio.gather(body, gone, dropped, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.ticket.end(outcome)
