"""SIGTERM during a load run: the server stops accepting, lets the requests in flight finish
(within --shutdown-timeout, after which the rest end with an error) and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.reliability.harness import CHAT, COMPLETIONS, Stream, chat_body, completion_body, stream
from tests.server.server_process import ServerProcess

ARGS = ["--max-model-len", "2048", "--max-num-seqs", "16", "--num-kv-blocks", "4096",
        "--served-model-name", "demo"]


async def _sigterm_during(server: ServerProcess, num: int, max_tokens: int,
                          ) -> tuple[list[Stream], list[int | str]]:
    """`num` streams (at most --max-num-seqs, so all run at once); SIGTERM once each has
    its first chunk; then new requests, which are refused (503 while the server drains, or no
    connection once it has stopped listening)."""
    under_way = asyncio.Semaphore(0)
    async with httpx.AsyncClient(timeout=120) as h:
        tasks = [asyncio.ensure_future(stream(h, server.url + (CHAT if i % 2 else COMPLETIONS),
                                              (chat_body if i % 2 else completion_body)(
                                                  i, max_tokens),
                                              on_first_chunk=under_way.release))
                 for i in range(num)]
        for _ in range(num):
            await asyncio.wait_for(under_way.acquire(), timeout=240)  # a bound, not a budget
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused: list[int | str] = []
        async with httpx.AsyncClient(timeout=10) as fresh:  # new connections
            for i in range(3):
                try:
                    r = await fresh.post(server.url + COMPLETIONS,
                                         json={**completion_body(i, 4), "stream_options": None})
                    refused.append(r.status_code)
                    assert r.status_code != 503 or r.json()["error"]["code"] == "shutting_down"
                except httpx.TransportError as e:
                    refused.append(type(e).__name__)
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)), refused


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    server = ServerProcess([*ARGS, "--shutdown-timeout", "60"], tmp_path / "serve.log")
    try:
        # 8 x 64 tokens: a few seconds of work even on a loaded 2-core machine, far inside the
        # 60 s drain, and still long enough that every stream is mid-flight at the SIGTERM.
        streams, refused = asyncio.run(_sigterm_during(server, num=8, max_tokens=64))
        for s in streams:
            s.check_complete(64)
        assert all(r in (503, "ConnectError") for r in refused), refused
        assert server.wait_exit(timeout=30) == 0
        assert "shutting down: finishing 8 requests" in server.output
    finally:
        server.stop()


def test_requests_past_the_shutdown_timeout_end_with_an_error(tmp_path: Path) -> None:
    server = ServerProcess([*ARGS, "--shutdown-timeout", "1"], tmp_path / "serve.log")
    try:
        start = time.monotonic()
        # 2000 tokens each: many seconds of work, cut after one
        streams, _ = asyncio.run(_sigterm_during(server, num=8, max_tokens=2000))
        for s in streams:
            assert s.status == 200 and s.done
            assert s.error is not None and s.error["code"] == "shutting_down", s.error
        assert server.wait_exit(timeout=30) == 0
        assert time.monotonic() - start < 40  # cut after 1 s: 2000 tokens each run far longer
    finally:
        server.stop()


def test_a_second_signal_ends_every_stream_with_an_error_and_exits_non_zero(
        tmp_path: Path) -> None:
    server = ServerProcess([*ARGS, "--shutdown-timeout", "60"], tmp_path / "serve.log")
    try:
        async def run() -> list[Stream]:
            under_way = asyncio.Semaphore(0)
            async with httpx.AsyncClient(timeout=120) as h:
                tasks = [asyncio.ensure_future(stream(
                    h, server.url + (CHAT if i % 2 else COMPLETIONS),
                    (chat_body if i % 2 else completion_body)(i, 2000),
                    on_first_chunk=under_way.release)) for i in range(8)]
                for _ in range(8):
                    await asyncio.wait_for(under_way.acquire(), timeout=240)
                server.proc.send_signal(signal.SIGTERM)  # drain: 2000 tokens take far longer
                await asyncio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)  # ... so cut it short
                return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=60))

        streams = asyncio.run(run())
        for s in streams:
            assert s.status == 200 and s.done, "every stream ends with an error event and [DONE]"
            assert s.error is not None and s.error["code"] == "shutting_down", s.error
        assert server.wait_exit(timeout=30) == 128 + signal.SIGTERM
        log = server.output
        assert "second signal: ending the 8 requests" in log
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert len(log.splitlines()) < 40, log[-3000:]
    finally:
        server.stop()
