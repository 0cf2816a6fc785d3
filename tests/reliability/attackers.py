"""Misbehaving TCP clients for the connection tests, and a well-behaved /health prober that
measures the server's latency while they run. Raw sockets, so that nothing is hidden by a
client library (no retries, no pooling)."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SLOW_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
SLOW_BODY = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
             b"\r\nContent-Length: 100000\r\n\r\n{")


@dataclass
class Attack:
    """Connections that send nothing (idle), a request head a byte at a time (slow header) or
    a body a byte at a time (slow body); each records when the server closed it."""

    host: str
    port: int
    opened: dict[socket.socket, float] = field(default_factory=dict)
    closed: dict[socket.socket, float] = field(default_factory=dict)
    trickle: list[socket.socket] = field(default_factory=list)  # sent a byte every interval

    def open(self, num_idle: int, num_slow_header: int, num_slow_body: int = 0,
             batch: int = 50, pause: float = 0.04) -> None:
        kinds = [b""] * num_idle + [SLOW_HEAD] * num_slow_header + [SLOW_BODY] * num_slow_body
        for start in range(0, len(kinds), batch):
            for first in kinds[start:start + batch]:
                s = socket.create_connection((self.host, self.port), timeout=10)
                s.setblocking(False)
                self.opened[s] = time.monotonic()
                if first:
                    s.send(first)
                    self.trickle.append(s)
            time.sleep(pause)

    def watch(self, until: float, interval: float = 0.5) -> None:
        """Until every connection is closed by the server or `until` (monotonic) passes: send
        the trickling ones a byte every `interval`, record each server close (EOF or reset)."""
        sel = selectors.DefaultSelector()
        for s in self.opened:
            sel.register(s, selectors.EVENT_READ)
        next_send = time.monotonic() + interval
        while len(self.closed) < len(self.opened) and time.monotonic() < until:
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # a response (a 4xx) may come first; EOF is what counts
                    self.closed[s] = time.monotonic()
                    sel.unregister(s)
            if time.monotonic() >= next_send:
                next_send += interval
                for s in self.trickle:
                    if s not in self.closed:
                        try:
                            s.send(b"a")
                        except OSError:
                            pass  # reset: the read side records the close
        sel.close()

    def lifetimes(self) -> list[float]:
        return [self.closed[s] - self.opened[s] for s in self.closed]

    def close_all(self) -> None:
        for s in self.opened:
            s.close()


class HealthProbe:
    """GET /health on a fresh connection every `interval` seconds, from a process of its own
    (the attack's threads here would otherwise delay it: one GIL); records each answer's
    latency (connect to the end of the response) and status."""

    def __init__(self, host: str, port: int, interval: float = 0.05) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.samples: list[tuple[float, int]] = []  # (seconds, status; 0: no answer)
        self.times: list[float] = []  # when each sample began (monotonic)
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> HealthProbe:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.attackers", self.host, str(self.port),
             str(self.interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2])
        # wait for the first answer, so that the attack the caller starts next is watched from
        # its start (a Python process takes a while to start on a loaded machine)
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline()
        assert ready == "ready\n", ready
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=30)
        for when, seconds, status in json.loads(out):
            self.times.append(when)
            self.samples.append((seconds, status))

    def once(self, timeout: float = 5.0) -> tuple[float, int]:
        return probe_once(self.host, self.port, timeout)

    @property
    def worst(self) -> float:
        return max(t for t, _ in self.samples)

    @property
    def statuses(self) -> set[int]:
        return {status for _, status in self.samples}


def probe_once(host: str, port: int, timeout: float = 5.0) -> tuple[float, int]:
    """(seconds, status) of one GET /health on a new connection; status 0: no answer."""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return time.monotonic() - start, 0
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return time.monotonic() - start, status


def _probe_main(host: str, port: int, interval: float) -> None:
    """Probe until a line arrives on stdin, then print [[when, seconds, status], ...]."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    samples = []
    while not stop.is_set():
        when = time.monotonic()
        samples.append((when, *probe_once(host, port)))
        if len(samples) == 1:
            print("ready", flush=True)
        stop.wait(interval)
    print(json.dumps(samples))


if __name__ == "__main__":
    _probe_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
