"""Connection limits: how long a TCP connection may hold the server without progress, and how
many it may hold at once.

uvicorn (h11) arms its keep-alive timer only after a response, so a connection that never sends
a request, or sends its head or body a byte at a time, is otherwise held forever. Each phase of
a connection here has its own limit; a connection past it is closed:
- idle (just connected, or between requests, no byte of the next request yet):
  `--timeout-keep-alive` seconds;
- request head (from its first byte to the end of its headers): `--timeout-request-header`
  seconds in all;
- request body (from the end of the head to the end of the body): `--timeout-request-body`
  seconds in all (a body sent a byte at a time holds nothing longer than that);
- the response: no limit here (`--request-timeout` is the application's).

`--limit-concurrency`: a request that arrives while the server holds more connections than
that gets a 503 (OpenAI error shape, `Retry-After`, `Connection: close`). Idle connections count,
as in uvicorn's option of that name: the limit is on what the process holds (file descriptors),
and the idle ones are closed by their timeout.

A streamed response whose client stopped reading is dropped by the application through the
scope extension `flatout.abort_connection` (the transport's abort: a graceful close would wait
for the client to read what is buffered).

A stream's body pieces may take the short way of the scope extension `flatout.write_body`: the
chunked-encoding frame written to the transport, with uvicorn's flow control (a full socket
holds the writer back) and none of the per-message layers (the middlewares' send wrappers, the
ASGI message, h11's state machine, which a body piece does not move). Anything but a chunked
response body under way takes the ordinary ASGI send.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from flatout.server.admission import RETRY_AFTER_S
from flatout.server.defaults import FD_RESERVE
from flatout.server.errors import OpenAIError
from flatout.server.logs import RateLimitedLog
from flatout.server.responses import ABORT_CONNECTION, WRITE_BODY

log = logging.getLogger(__name__)

try:  # h11's writer of a chunked body; the short way is left out where h11 moved it
    from h11._writers import ChunkedWriter as _ChunkedWriter

    ChunkedWriter: type | None = _ChunkedWriter
except ImportError:  # pragma: no cover - another h11
    ChunkedWriter = None



@dataclass(frozen=True)
class ConnectionLimits:
    timeout_keep_alive: float = 5.0
    timeout_request_header: float = 10.0
    timeout_request_body: float = 30.0
    limit_concurrency: int | None = None  # None: no limit

    def __post_init__(self) -> None:
        for name in ("timeout_keep_alive", "timeout_request_header", "timeout_request_body"):
            value = getattr(self, name)
            if not value > 0:  # also NaN
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"--limit-concurrency must be >= 1, got {self.limit_concurrency}")


def raise_open_file_limit(target: int = 65536) -> int:
    """Raise this process's soft limit on open files towards its hard limit (at most
    `target`), as servers holding many connections do; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def default_limit_concurrency() -> int:
    """The open-file limit less a reserve: beyond it, accept() would fail."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, soft - FD_RESERVE)


class ConnectionCount:
    """The connections the server holds now, kept by the protocol, read by ConcurrencyLimit."""

    def __init__(self) -> None:
        self.open = 0


def h11_protocol(limits: ConnectionLimits, count: ConnectionCount) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the phase timeouts of `limits`, counting into `count`
    (pass it as `uvicorn.Config(http=...)`, with `timeout_keep_alive` from `limits`)."""

    class Protocol(_TimedH11Protocol):
        pass

    Protocol.limits, Protocol.count = limits, count
    return Protocol


class _TimedH11Protocol(H11Protocol):
    limits: ConnectionLimits
    count: ConnectionCount

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.count.open += 1
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        # uvicorn's own keep-alive slot: its data_received cancels the timer at the first byte
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self.count.open -= 1
        self._cancel_head()
        self._cancel_body()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._offer_abort()
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # part of a request head is buffered: its clock starts now
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.timeout_request_header, self._expire)
            return
        self._cancel_head()
        if state is h11.SEND_BODY:  # the head is in: the body's clock starts
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.timeout_request_body,
                                                        self._expire)
        else:  # the whole request is in: the response has no limit here
            self._cancel_body()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request's cycle
        self._offer_abort()

    def _offer_abort(self) -> None:
        """Give the current request's app a way to drop this connection at once, unflushed
        (the ASGI scope's extensions; read before the app's task first runs)."""
        cycle = self.cycle
        if cycle is not None:
            extensions: dict[str, Any] = cycle.scope.setdefault(
                "extensions", {})
            extensions[ABORT_CONNECTION] = self.transport.abort
            if WRITE_BODY not in extensions and ChunkedWriter is not None:
                extensions[WRITE_BODY] = _body_writer(self.conn, cycle)

    def _expire(self) -> None:
        self._head_timer = self._body_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # the app, if it waits for the body, sees a disconnect

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


def _body_writer(conn: h11.Connection, cycle: RequestResponseCycle
                 ) -> Callable[[bytes], Awaitable[None]]:
    """`flatout.write_body` of one request's cycle: `await write(piece)` sends a piece of the
    response body (more to come), as the ASGI send of an `http.response.body` would."""

    async def write(data: bytes) -> None:
        if (cycle.response_started and not cycle.response_complete and data
                and conn.our_state is h11.SEND_BODY
                and type(getattr(conn, "_writer", None)) is ChunkedWriter):
            if cycle.flow.write_paused and not cycle.disconnected:
                await cycle.flow.drain()
            if not cycle.disconnected:
                cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return
        await cycle.send({"type": "http.response.body", "body": data, "more_body": True})

    return write


class ConcurrencyLimit:
    """Pure-ASGI middleware answering 503 while the server holds more than `limit`
    connections (the one the request came on included)."""

    def __init__(self, app: Any, limit: int, count: ConnectionCount) -> None:
        self.app = app
        self.limit = limit
        self.count = count
        self.log = RateLimitedLog(log)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.count.open <= self.limit:
            await self.app(scope, receive, send)
            return
        self.log.warning("over-limit", "%d connections open, more than --limit-concurrency %d: "
                         "answering 503", self.count.open, self.limit)
        err = OpenAIError(
            f"the server holds more than {self.limit} connections; retry after a moment",
            status=503, code="too_many_connections",
            headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        await err.response()(scope, receive, send)
