"""The engine core is known dead from the moment the kernel starts tearing it down (its main
thread exiting, long before a big process's pipes close) or its pipe closes, before the event
loop has failed its requests: /health and admission say so from then on, a request in that
window is a 503 with Retry-After counted as rejected, and a send into the closed pipe is no 500."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import prometheus_client as prom
import pytest

from flatout.config import EngineArgs
from flatout.engine.async_client import AsyncEngineClient, OutputQueue, process_exiting
from flatout.engine.messages import EngineDeadError
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Admission
from flatout.server.errors import OpenAIError, to_openai_error


class _Process:
    exitcode = -9
    pid = None

    def is_alive(self) -> bool:  # the OS has not reaped it yet: it still looks alive
        return True

    def join(self, timeout: float | None = None) -> None:
        pass


class _ClosedPipe:
    def recv(self) -> Any:
        raise EOFError

    def send(self, msg: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")


class _Loop:
    """An event loop busy elsewhere: what the reader hands it has not run yet."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, ...]] = []

    def call_soon_threadsafe(self, *args: Any) -> None:
        self.pending.append(args)


def _client() -> AsyncEngineClient:
    client = AsyncEngineClient(EngineArgs())
    client.process = _Process()  # type: ignore[assignment]
    client._inbox_w = _ClosedPipe()  # type: ignore[assignment]  # noqa: SLF001
    client._generation = 1  # noqa: SLF001
    return client


def test_dead_from_the_moment_the_pipe_closes() -> None:
    client = _client()
    loop = _Loop()
    client._loop = loop  # type: ignore[assignment]  # noqa: SLF001
    assert client.problem() is None and client.is_alive
    client._read_outputs(_ClosedPipe(), client.process, 1)  # type: ignore[arg-type]  # noqa: SLF001
    assert loop.pending, "the failure is queued for the event loop, which has not run it"
    assert client.dead is None  # not dispatched yet ...
    assert client.problem() is not None and not client.is_alive  # ... but known already

    registry = prom.CollectorRegistry()
    admission = Admission(registry, max_waiting=4, request_timeout=None,
                          engine_problem=client.problem)
    assert admission.unavailable() is not None  # /health: 503
    with pytest.raises(OpenAIError) as e:
        admission.accept(1, 0.0)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert registry.get_sample_value("flatout:requests_rejected_total",
                                     {"reason": "engine_unavailable"}) == 1
    assert registry.get_sample_value("flatout:requests_accepted_total") == 0

    async def first() -> None:
        gen = client.generate("r", [1, 2], SamplingParams())
        await gen.__anext__()

    with pytest.raises(EngineDeadError):
        asyncio.run(first())


def test_a_send_into_the_closed_pipe_is_engine_death_not_a_500() -> None:
    client = _client()
    with pytest.raises(EngineDeadError, match="pipe is closed"):
        client._send(object())  # noqa: SLF001
    err = to_openai_error(EngineDeadError("engine core died"))
    assert err.status == 503 and err.headers == {"Retry-After": "1"}
    assert err.code == "engine_unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_process_is_exiting_before_it_can_be_waited_for() -> None:
    # a killed engine core with many threads and a big heap is a zombie main thread for a
    # while before its pipes close: that is when /health must already say 503
    assert not process_exiting(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_exiting(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while not process_exiting(child.pid):  # not waited for: a zombie, then
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.wait()
    assert process_exiting(child.pid)  # reaped: gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_requests_in_flight_hear_of_an_exiting_core_at_once() -> None:
    client = _client()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        client.process = child  # type: ignore[assignment]  # pid is all notice_exit reads
        queue = OutputQueue()
        client.queues["r"] = queue
        client.notice_exit()
        assert client.dead is None and not queue._items  # alive: nothing happens
        child.kill()
        deadline = time.monotonic() + 10
        while not process_exiting(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client.notice_exit()  # the supervisor's tick; the pipe has not closed
        assert client.dead is not None and "exiting" in client.dead
        assert isinstance(queue._items[0][0], EngineDeadError)
    finally:
        child.wait()
