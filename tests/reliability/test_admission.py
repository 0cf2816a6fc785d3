"""Admission control and outcome accounting without a server: the waiting queue's bound, 503
reasons, exactly one outcome per accepted request, and a core that refuses one request without
dying."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import prometheus_client as prom
import pytest

from flatout.engine.core_process import _add
from flatout.engine.messages import CoreRejected, EngineCoreRequest, EngineRequestError
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Admission, ClientDisconnected, Outcome
from flatout.server.errors import OpenAIError, to_openai_error


def _admission(max_waiting: int = 4, problem: str | None = None) -> Admission:
    return Admission(prom.CollectorRegistry(), max_waiting=max_waiting, request_timeout=5.0,
                     engine_problem=lambda: problem)


def _count(adm: Admission, outcome: Outcome) -> float:
    return adm.finished.labels(outcome.value)._value.get()


def test_queue_bound_and_release() -> None:
    adm = _admission(max_waiting=4)
    a = adm.accept(3, arrival=100.0)
    assert a.deadline == 105.0 and adm.num_waiting == 3
    with pytest.raises(OpenAIError) as e:
        adm.accept(2, arrival=100.0)
    assert e.value.status == 503 and e.value.code == "overloaded"
    assert e.value.headers == {"Retry-After": "1"}
    started = a.on_started(3)
    started()
    started()  # once only
    assert adm.num_waiting == 0
    b = adm.accept(4, arrival=0.0)
    with pytest.raises(OpenAIError) as e:
        adm.accept(5, arrival=0.0)  # more than the whole queue: never admissible
    assert e.value.status == 400 and e.value.code == "too_many_sequences"
    b.end(Outcome.ABORTED)  # ending gives back what never started
    assert adm.num_waiting == 0 and adm.num_in_flight == 1
    assert adm.rejected.labels("overloaded")._value.get() == 1


def test_exactly_one_outcome_per_request() -> None:
    adm = _admission()
    t = adm.accept(1, arrival=0.0)
    t.end(Outcome.COMPLETED)
    t.end(Outcome.ERROR)
    t.end(Outcome.ABORTED)
    assert [_count(adm, o) for o in Outcome] == [1, 0, 0]
    assert adm.num_in_flight == 0

    async def settle(exc: BaseException | None) -> None:
        ticket = adm.accept(1, arrival=0.0)

        async def work() -> int:
            if exc is not None:
                raise exc
            return 1

        try:
            await ticket.settle(work())
        except BaseException:
            pass

    for exc in (None, ClientDisconnected(), ValueError("x"), asyncio.CancelledError()):
        asyncio.run(settle(exc))
    assert [_count(adm, o) for o in Outcome] == [2, 2, 1]  # completed, error, aborted
    assert adm.num_in_flight == 0 and adm.accepted._value.get() == 5


def test_draining_and_dead_engine_are_503() -> None:
    adm = _admission(problem="engine core process was killed by signal 9")
    with pytest.raises(OpenAIError) as e:
        adm.check()
    assert e.value.status == 503 and e.value.code == "engine_unavailable"
    assert "signal 9" in (adm.unavailable() or "")
    adm = _admission()
    assert adm.unavailable() is None
    adm.draining = True
    with pytest.raises(OpenAIError) as e:
        adm.accept(1, arrival=0.0)
    assert e.value.code == "shutting_down" and adm.num_in_flight == 0


def test_core_refuses_one_request_without_dying() -> None:
    class Core:
        def add_request(self, req: EngineCoreRequest) -> None:
            raise ValueError(f"request id {req.request_id!r} is already in use")

    recv, send = mp.Pipe(duplex=False)
    _add(Core(), EngineCoreRequest("r1", [1, 2], SamplingParams(), 4), send)  # type: ignore[arg-type]
    msg = recv.recv()
    assert isinstance(msg, CoreRejected) and msg.request_id == "r1"
    assert "already in use" in msg.message
    err = to_openai_error(EngineRequestError(msg.message))
    assert err.status == 500 and err.code == "engine_refused_request"
