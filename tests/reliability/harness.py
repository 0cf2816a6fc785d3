"""Shared pieces of the reliability tests: an SSE client that checks every line it reads, and
metric lookups over `ServerProcess.metrics()`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.server.server_process import ServerProcess

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass
class Stream:
    """What one streaming client received."""

    status: int = 0
    chunks: list[dict[str, Any]] = field(default_factory=list)  # parsed `data: {...}` events
    done: bool = False  # saw `data: [DONE]`
    error: dict[str, Any] | None = None  # an error event's "error" object
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""  # the body of a non-200 answer

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for ch in self.chunks for c in ch.get("choices", [])
                if c.get("finish_reason")]

    @property
    def usage(self) -> dict[str, Any] | None:
        return next((ch["usage"] for ch in self.chunks if ch.get("usage")), None)

    def check_complete(self, max_tokens: int) -> None:
        """A complete, well-formed stream of one request (n=1) that generated `max_tokens`."""
        assert self.status == 200, (self.status, self.body)
        assert self.error is None, self.error
        assert self.done, "no [DONE]"
        assert len({ch["id"] for ch in self.chunks}) == 1, "chunks of several ids"
        assert self.finish_reasons == ["length"], self.finish_reasons
        assert self.usage is not None and self.usage["completion_tokens"] == max_tokens


async def stream(h: httpx.AsyncClient, url: str, body: dict[str, Any],
                 stop_after_chunks: int | None = None, stop_after_seconds: float | None = None,
                 on_first_chunk: Callable[[], None] | None = None) -> Stream:
    """POST a streaming request and read it, checking each SSE line's form. Hang up after
    `stop_after_chunks` events, or `stop_after_seconds` after the response began, if given
    (the response begins once the server has accepted the request)."""
    out = Stream()
    async with h.stream("POST", url, json={**body, "stream": True}) as r:
        out.status, out.headers = r.status_code, dict(r.headers)
        if r.status_code != 200:
            out.body = (await r.aread()).decode()
            return out
        try:
            async with asyncio.timeout(stop_after_seconds):
                await _read_events(r, out, stop_after_chunks, on_first_chunk)
        except TimeoutError:
            pass  # leaving the block closes the connection
    return out


async def _read_events(r: httpx.Response, out: Stream, stop_after_chunks: int | None,
                       on_first_chunk: Callable[[], None] | None) -> None:
    async for line in r.aiter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not out.done, "data after [DONE]"
        data = line[len("data: "):]
        if data == "[DONE]":
            out.done = True
            continue
        event = json.loads(data)
        if "error" in event:
            assert set(event["error"]) == {"message", "type", "param", "code"}, event
            out.error = event["error"]
            continue
        out.chunks.append(event)
        if on_first_chunk is not None and len(out.chunks) == 1:
            on_first_chunk()
        if stop_after_chunks is not None and len(out.chunks) >= stop_after_chunks:
            return  # the caller's leaving the block closes the connection mid-stream


def completion_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": "demo", "prompt": f"Request {i}: the fox and the dog " * (1 + i % 3),
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


def chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": f"Say {i} things"}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's series that carry all of `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    series = {k: v for k, v in metrics.items() if k.startswith(name + "{")}
    if not series:
        return metrics.get(name, 0.0)
    return sum(v for k, v in series.items() if all(w in k for w in want))


def outcomes(metrics: dict[str, float]) -> dict[str, float]:
    names = ("completed", "error", "aborted")
    return {o: total(metrics, "flatout:requests_finished_total", outcome=o) for o in names} | {
        "accepted": metrics.get("flatout:requests_accepted_total", 0.0)}


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """/metrics once nothing runs, waits or holds KV blocks (or when `timeout` has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["flatout:kv_cache_usage_perc"] == 0 and m["flatout:num_requests_running"] == 0
                and m["flatout:num_requests_waiting"] == 0 and m["flatout:requests_in_flight"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
