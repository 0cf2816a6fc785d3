"""Streaming clients that never read: chat streams with n=64, max_tokens=1000 and 20 top
logprobs whose sockets fill up. Each request's outputs then wait in the API process until they
pass --max-stream-backlog-bytes; the request is then aborted in the engine (KV blocks freed),
counted `aborted`, and its connection dropped; the API process's RSS stays bounded (< 200 MB of
growth) and comes back.

Scaled to the demo model on a 2-core CPU (a step of 128 sequences takes a good part of a second
there): 2 streams rather than 8, 20 top logprobs rather than 5 and a backlog limit of 1 MiB
(default 8 MiB), because the kernel first buffers about 4 MB per connection (the send buffer
grows to net.ipv4.tcp_wmem's maximum) before the server sees a reader fall behind. The bound per
stream is the limit whatever the scale (tests/engine/test_backlog.py checks it step by step)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.reliability.harness import outcomes, wait_idle
from tests.server.server_process import ServerProcess

NUM_STREAMS, N, MAX_TOKENS, LOGPROBS = 2, 64, 1000, 20
BACKLOG = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", "1100", "--max-num-seqs", str(NUM_STREAMS * N),
                       "--num-kv-blocks", "8192", "--served-model-name", "demo",
                       "--max-stream-backlog-bytes", str(BACKLOG)],
                      tmp_path_factory.mktemp("slow_reader") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _request(i: int) -> bytes:
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": f"Go {i}"}],
                       "n": N, "max_tokens": MAX_TOKENS, "logprobs": True,
                       "top_logprobs": LOGPROBS, "ignore_eos": True, "temperature": 1.0,
                       "seed": i, "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    """Read what the server sent until it closed the connection (or `timeout` passed)."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_streams_that_never_read_are_aborted_with_bounded_memory(
        server: ServerProcess) -> None:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    before = wait_idle(server)
    rss_before = _rss(server.proc.pid)
    readers = []
    for i in range(NUM_STREAMS):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a reader that stopped
        s.connect((u.hostname, u.port))
        s.sendall(_request(i))
        readers.append(s)
    rss_max = rss_before
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            rss_max = max(rss_max, _rss(server.proc.pid))
            if outcomes(server.metrics())["aborted"] - outcomes(before)["aborted"] >= NUM_STREAMS:
                break
            time.sleep(0.2)
        after = wait_idle(server)
        rss_after = _rss(server.proc.pid)
        # dropped by the server, although the client never read
        assert all(_closed_by_server(s, 10) for s in readers)
    finally:
        for s in readers:
            s.close()
    got, was = outcomes(after), outcomes(before)
    assert got["aborted"] - was["aborted"] == NUM_STREAMS, (was, got)
    assert got["completed"] == was["completed"] and got["error"] == was["error"]
    assert got["accepted"] - was["accepted"] == NUM_STREAMS
    assert after["flatout:kv_cache_usage_perc"] == 0
    assert after["flatout:num_requests_running"] == 0
    assert after["flatout:requests_in_flight"] == 0
    grew = (rss_max - rss_before) / 1e6
    assert grew < 200, f"API process RSS grew by {grew:.0f} MB"
    assert (rss_after - rss_before) / 1e6 < 100, (rss_before, rss_max, rss_after)
    log = server.output
    assert "dropped a stream whose client stopped reading" in log  # the cause: the backlog
    assert "Traceback" not in log and "ASGI callable" not in log, log
