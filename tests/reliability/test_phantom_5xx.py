"""A client that hangs up before its body has arrived (headers only, a Content-Length larger than
what it sends, `Expect: 100-continue` then nothing, an unterminated chunked body) was counted as
a 500 nobody was sent: now a 499 (client closed), with no traceback in the log."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from tests.reliability.conftest import API_KEY
from tests.reliability.harness import CHAT
from tests.server.server_process import ServerProcess

HEAD = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\n")
ATTACKS = [
    HEAD + "Content-Length: 100\r\n\r\n",  # headers only
    HEAD + 'Content-Length: 100\r\n\r\n{"messages": ',  # short body
    HEAD + "Content-Length: 50\r\nExpect: 100-continue\r\n\r\n",  # waits for 100, sends nothing
    HEAD + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n",  # chunked, never terminated
]


def _status_counts(server: ServerProcess) -> dict[str, float]:
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("flatout:http_requests_total{") and f'path="{CHAT}"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_clients_that_hang_up_mid_request_are_no_5xx(hardened: ServerProcess) -> None:
    before = _status_counts(hardened)
    url = urlsplit(hardened.url)
    for attack in ATTACKS:
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(attack.encode())
            if "100-continue" in attack:
                time.sleep(0.3)  # the server may answer 100 Continue once it reads the body
            time.sleep(0.2)
    deadline = time.monotonic() + 20
    while True:
        after = _status_counts(hardened)
        closed = after.get("499", 0.0) - before.get("499", 0.0)
        if closed >= len(ATTACKS) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert closed == len(ATTACKS), (before, after)
    assert not [s for s in after if s.startswith("5") and after[s] != before.get(s, 0.0)], after
    log = hardened.output
    assert "ClientDisconnect" not in log and "Traceback" not in log, log[-3000:]
