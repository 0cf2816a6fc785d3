"""Admission and outcomes: which requests the server takes on, and how each one ended.

A request is *accepted* once it is valid and admitted. From then on it ends in exactly one
outcome, counted in `flatout:requests_finished_total{outcome}`:
- `completed`: the whole response (or stream, through `[DONE]`) was produced;
- `error`: it ended with an error response or error event (engine died, timeout, ...);
- `aborted`: its client went away first (its engine work is aborted and its KV blocks freed).
So `requests_accepted_total` = the sum of `requests_finished_total` + `requests_in_flight`.

Requests turned away before that are counted by reason in `flatout:requests_rejected_total`
(invalid ones only in `flatout:http_requests_total`, by status): `overloaded` when the waiting
queue is full, `shutting_down` while the server drains, `engine_unavailable` while the engine is
dead or restarting. All three are 503s with `Retry-After`.

The waiting queue is bounded: the sequences of accepted requests that have not produced their
first token yet (queued in the engine, or in prefill; a request with n=4 counts 4) are at most
`max_waiting` (--max-waiting-requests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

import prometheus_client as prom

from flatout.server.errors import RETRY_AFTER_S, OpenAIError

T = TypeVar("T")


class Outcome(StrEnum):
    COMPLETED = "completed"
    ERROR = "error"
    ABORTED = "aborted"


class ClientDisconnected(Exception):
    """The client went away before its response was complete."""


class Admission:
    def __init__(
        self, registry: prom.CollectorRegistry, *, max_waiting: int,
        request_timeout: float | None, engine_problem: Callable[[], str | None],
    ) -> None:
        """`engine_problem` says why the engine cannot take work now (None: it can)."""
        if max_waiting < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self.engine_problem = engine_problem
        self.draining = False
        self.num_waiting = 0  # sequences accepted and not yet generating
        self.num_in_flight = 0  # accepted requests without an outcome yet
        r = registry
        self.accepted = prom.Counter("flatout:requests_accepted",
                                     "Requests admitted (valid, and the queue had room).",
                                     registry=r)
        self.finished = prom.Counter(
            "flatout:requests_finished", "Accepted requests by outcome: completed, error, or "
            "aborted (the client went away).", ["outcome"], registry=r)
        self.rejected = prom.Counter(
            "flatout:requests_rejected", "Valid requests turned away with 503: overloaded, "
            "shutting_down, engine_unavailable.", ["reason"], registry=r)
        for outcome in Outcome:
            self.finished.labels(outcome.value)  # show zeros from the start
        for reason in ("overloaded", "shutting_down", "engine_unavailable"):
            self.rejected.labels(reason)
        prom.Gauge("flatout:requests_in_flight", "Accepted requests without an outcome yet.",
                   registry=r).set_function(lambda: self.num_in_flight)
        prom.Gauge("flatout:requests_queued", "Sequences accepted that have not produced a "
                   "token yet (bounded by --max-waiting-requests).",
                   registry=r).set_function(lambda: self.num_waiting)

    def unavailable(self) -> str | None:
        """Why no request can be accepted now (None: they can)."""
        if self.draining:
            return "the server is shutting down"
        problem = self.engine_problem()
        return f"the engine is not available: {problem}" if problem else None

    def check(self, num_seqs: int = 1) -> None:
        """Raise the 503 (or 400) that `accept` would, without taking a place: lets a handler
        turn a request away before it does any work on it."""
        if self.draining:
            self._reject("shutting_down", "the server is shutting down; retry on another instance")
        problem = self.engine_problem()
        if problem is not None:
            self._reject("engine_unavailable", f"the engine is not available: {problem}")
        if num_seqs > self.max_waiting:
            raise OpenAIError(
                f"the request needs {num_seqs} sequences (prompts x n); this server queues at "
                f"most {self.max_waiting}", param="n", code="too_many_sequences")
        if self.num_waiting + num_seqs > self.max_waiting:
            self._reject("overloaded", f"the server is overloaded ({self.num_waiting} sequences "
                         f"waiting, at most {self.max_waiting}); retry after a moment")

    def accept(self, num_seqs: int, arrival: float) -> Ticket:
        """Admit a validated request of `num_seqs` sequences, or raise 503 / 400."""
        self.check(num_seqs)
        self.num_waiting += num_seqs
        self.num_in_flight += 1
        self.accepted.inc()
        deadline = arrival + self.request_timeout if self.request_timeout else None
        return Ticket(self, num_seqs, deadline)

    def _reject(self, reason: str, message: str) -> None:
        self.rejected.labels(reason).inc()
        raise OpenAIError(message, status=503, code=reason,
                          headers={"Retry-After": str(RETRY_AFTER_S)})


class Ticket:
    """One accepted request: its place in the waiting queue, its deadline, its outcome."""

    def __init__(self, admission: Admission, num_seqs: int, deadline: float | None) -> None:
        self.admission = admission
        self.num_waiting = num_seqs
        self.deadline = deadline  # on time.monotonic() (the event loop's clock), or None
        self.outcome: Outcome | None = None
        self.abandoned = asyncio.Event()  # set by `too_slow`

    def too_slow(self) -> None:
        """The engine dropped the request because its client stopped reading its stream:
        it is `aborted` now, and its response should hang up (`abandoned`)."""
        self.end(Outcome.ABORTED)
        self.abandoned.set()

    def on_started(self, num_seqs: int) -> Callable[[], None]:
        """A callback that leaves the waiting queue for `num_seqs` sequences (once)."""
        done = False

        def started() -> None:
            nonlocal done
            if not done:
                done = True
                self._leave_queue(num_seqs)

        return started

    def _leave_queue(self, num_seqs: int) -> None:
        n = min(num_seqs, self.num_waiting)
        self.num_waiting -= n
        self.admission.num_waiting -= n

    def end(self, outcome: Outcome) -> None:
        """Record the outcome; only the first call counts."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._leave_queue(self.num_waiting)
        self.admission.num_in_flight -= 1
        self.admission.finished.labels(outcome.value).inc()

    async def settle(self, work: Awaitable[T]) -> T:
        """Await a non-streaming response and record how it ended."""
        try:
            result = await work
        except ClientDisconnected:
            self.end(Outcome.ABORTED)
            raise
        except BaseException:
            self.end(Outcome.ERROR)
            raise
        self.end(Outcome.COMPLETED)
        return result
