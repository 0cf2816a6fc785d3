"""Log lines a client can make the server repeat at will (a failing accept() at the file
descriptor limit, invalid requests, the connection limit, slow readers) are written once per
condition per interval, with the count of those left out since, and without a traceback: the
log stays readable and bounded under attack.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

INTERVAL_S = 10.0


class RateLimitedLog:
    """Writes at most one line per key per `interval` seconds to `logger`."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL_S) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when a line for `key` was written less than `interval` ago (this one is
        counted), else how many were left out since that line."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        left_out = self.allow(key)
        if left_out is None:
            return
        if left_out:
            msg += f" ({left_out} more like this in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, key, msg, *args)


class RateLimitFilter(logging.Filter):
    """A logging filter letting through one record per (logger, message template) per
    interval, for loggers of libraries that log per event (uvicorn's "Invalid HTTP request
    received.", "ASGI callable returned without completing response.")."""

    def __init__(self, interval: float = INTERVAL_S) -> None:
        super().__init__()
        self.limiter = RateLimitedLog(logging.getLogger(__name__), interval)

    def filter(self, record: logging.LogRecord) -> bool:
        left_out = self.limiter.allow(f"{record.name}:{record.msg}")
        if left_out is None:
            return False
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like this in the last " \
                         f"{self.limiter.interval:g} s)"
        return True


def install_loop_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Make the event loop report what it cannot hand to anyone (an accept() that failed for
    lack of file descriptors, an error in a callback) as one line per kind per interval."""
    limiter = RateLimitedLog(logging.getLogger("flatout.server"))

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "error in the event loop")
        exc = context.get("exception")
        kind = type(exc).__name__ if exc is not None else ""
        detail = f": {kind}: {exc}" if isinstance(exc, OSError) else (f": {kind}" if kind else "")
        limiter.log(logging.ERROR, f"{message}:{kind}", "event loop: %s%s", message, detail)

    loop.set_exception_handler(handler)
