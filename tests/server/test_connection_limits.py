"""The pieces of the connection limits that need no server: the limits' validation and the
log that writes one line per condition per interval."""

from __future__ import annotations

import logging

import pytest

from flatout.server.connections import ConnectionLimits
from flatout.server.logs import RateLimitedLog, RateLimitFilter


def test_limits_name_the_bad_flag() -> None:
    with pytest.raises(ValueError, match="--timeout-request-header"):
        ConnectionLimits(timeout_request_header=0)
    with pytest.raises(ValueError, match="--timeout-keep-alive"):
        ConnectionLimits(timeout_keep_alive=float("nan"))
    with pytest.raises(ValueError, match="--limit-concurrency"):
        ConnectionLimits(limit_concurrency=0)


def test_one_line_per_key_per_interval_with_the_count_left_out(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("flatout.server.logs.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(logging.getLogger("test.limited"), interval=10)
    with caplog.at_level(logging.WARNING, logger="test.limited"):
        for _ in range(1000):
            limited.warning("a", "accept failed")
        limited.warning("b", "other condition")
        clock[0] += 10.5
        limited.warning("a", "accept failed")
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed", "other condition",
        "accept failed (999 more like this in the last 10 s)"]


def test_filter_drops_repeats_of_a_library_message(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("flatout.server.logs.time.monotonic", lambda: clock[0])
    f = RateLimitFilter(interval=5)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [f.filter(record("Invalid HTTP request received.")) for _ in range(50)]
    assert passed == [True] + [False] * 49
    assert f.filter(record("Exceeded concurrency limit."))  # another message: its own budget
    clock[0] = 6
    again = record("Invalid HTTP request received.")
    assert f.filter(again) and "49 more" in again.getMessage()
