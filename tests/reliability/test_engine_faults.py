"""The engine core process killed or hung under load: every in-flight client gets an error within
seconds, /health turns 503, nothing hangs; the server then exits 1, or with --restart-engine
starts a new engine and serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from tests.reliability.harness import COMPLETIONS, Stream, completion_body, outcomes, stream
from tests.server.server_process import ServerProcess

MAX_NUM_SEQS = 16
ARGS = ["--max-model-len", "2048", "--max-num-seqs", str(MAX_NUM_SEQS), "--num-kv-blocks",
        "4096", "--served-model-name", "demo"]
NUM_CLIENTS = 24  # 16 generating, 8 queued
# Every client hears of a dead engine within this (about 0.1 s on an idle machine; the bound
# leaves room for a 2-core machine shared with another CPU-heavy job).
KILLED_WITHIN = 8.0
# --engine-step-timeout for the hang: long enough that a loaded machine's slow step (the first
# ones of a new core) is not taken for a hang, short enough to keep the test quick
STEP_TIMEOUT = 6.0


def _until(predicate, timeout: float) -> float:  # noqa: ANN001
    """Seconds until `predicate()` held (fails after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def _health(server: ServerProcess) -> int:
    try:
        return httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return 0  # the server is gone


async def _load_then(server: ServerProcess, fault) -> tuple[list[Stream], float]:  # noqa: ANN001
    """Long streams (1500 tokens: seconds of work even on a fast machine); once the first batch
    is generating, `fault()`; returns the streams and how long after the fault the last one
    ended."""
    generating = asyncio.Semaphore(0)
    async with httpx.AsyncClient(timeout=60) as h:
        tasks = [asyncio.ensure_future(stream(h, server.url + COMPLETIONS,
                                              completion_body(i, 1500),
                                              on_first_chunk=generating.release))
                 for i in range(NUM_CLIENTS)]
        for _ in range(MAX_NUM_SEQS):  # a bound, not a budget: generous for a loaded machine
            await asyncio.wait_for(generating.acquire(), timeout=240)
        assert not any(t.done() for t in tasks)
        fault()
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        return list(results), time.monotonic() - t0


def _check_failed(streams: list[Stream]) -> None:
    for s in streams:
        assert s.status == 200 and s.done, "the stream must end properly, with [DONE]"
        assert s.error is not None and s.error["type"] == "service_unavailable", s.error
        assert "engine" in s.error["message"]


def test_engine_killed_under_load_errors_everyone_and_exits_1(tmp_path: Path) -> None:
    server = ServerProcess(ARGS, tmp_path / "serve.log")
    try:
        pid = server.engine_core_pid()
        streams, seconds = asyncio.run(_load_then(server, lambda: os.kill(pid, signal.SIGKILL)))
        _check_failed(streams)
        assert seconds < KILLED_WITHIN
        assert _health(server) in (503, 0)
        r = None
        try:  # during the short linger: refused, not queued
            r = httpx.post(server.url + COMPLETIONS, json=completion_body(0, 4), timeout=5)
        except httpx.TransportError:
            pass
        assert r is None or r.status_code == 503
        assert server.wait_exit(timeout=15) == 1
        assert "engine core died" in server.output and "the server exits" in server.output
    finally:
        server.stop()


def test_restart_engine_after_a_kill_and_a_hang(tmp_path: Path) -> None:
    server = ServerProcess([*ARGS, "--restart-engine", "--engine-step-timeout", str(STEP_TIMEOUT)],
                           tmp_path / "serve.log")
    try:
        for fault in (signal.SIGKILL, signal.SIGSTOP):  # dead, then hung
            before = outcomes(server.metrics())
            pid = server.engine_core_pid()
            streams, seconds = asyncio.run(_load_then(server, lambda p=pid, f=fault:
                                                      os.kill(p, f)))
            _check_failed(streams)
            # a hang is noticed after --engine-step-timeout
            assert seconds < KILLED_WITHIN + (STEP_TIMEOUT if fault == signal.SIGSTOP else 0.0)
            _until(lambda: _health(server) == 200, timeout=240)  # a new engine core
            assert server.engine_core_pid() != pid
            r = httpx.post(server.url + COMPLETIONS, json={**completion_body(0, 5),
                                                           "stream_options": None}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
            after = outcomes(server.metrics())
            got = {k: v - before[k] for k, v in after.items()}
            assert got == {"accepted": NUM_CLIENTS + 1, "aborted": 0, "error": NUM_CLIENTS,
                           "completed": 1}, got
        assert server.metrics()["flatout:engine_restarts_total"] == 2
        assert "stopped answering" in server.output
    finally:
        server.stop()
