"""Driving the load: closed loop (N users, each sending its next request when the last one
finished) or open loop (requests arriving at a rate, Poisson or gamma-distributed gaps, however
many are in flight, optionally capped), one run per load point of a sweep."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatout.bench.client import BenchRequest, Endpoint, make_client, send_request
from flatout.bench.metrics import RequestRecord, summarize
from flatout.bench.watch import Watch


@dataclass(frozen=True)
class LoadPoint:
    concurrency: int | None = None  # closed loop with this many users
    request_rate: float = math.inf  # open loop (inf: every request at once)
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, lower is burstier
    max_concurrency: int | None = None  # cap on requests in flight in the open loop

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1 (got {self.concurrency})")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (got {self.request_rate})")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0 (got {self.burstiness})")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        cap = f", max {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"rate {rate}/s{cap}"

    def to_json(self) -> dict[str, Any]:
        if self.concurrency is not None:
            return {"mode": "closed", "concurrency": self.concurrency}
        return {"mode": "open", "request_rate": None if math.isinf(self.request_rate)
                else self.request_rate, "burstiness": self.burstiness,
                "max_concurrency": self.max_concurrency}


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from the start) of n requests: gaps drawn from a gamma distribution with
    shape `burstiness` and mean 1/rate (exponential, so a Poisson process, at burstiness 1)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps).tolist()


async def run_load(point: LoadPoint, requests: list[BenchRequest], ep: Endpoint, *,
                   seed: int = 0, timeout: float = 600.0, watch: Watch | None = None,
                   on_done: Callable[[RequestRecord], None] | None = None,
                   ) -> tuple[list[RequestRecord], float]:
    """Send every request under `point`; return the records (in request order) and the run's
    duration: first request sent to last answer finished."""
    in_flight = point.concurrency or point.max_concurrency or len(requests)
    records: list[RequestRecord | None] = [None] * len(requests)
    async with make_client(max(1, in_flight), timeout) as client:
        t0 = time.perf_counter()
        if watch is not None:
            await watch.start(t0)

        async def one(req: BenchRequest) -> None:
            rec = await send_request(client, ep, req, t0)
            records[req.index] = rec
            if on_done is not None:
                on_done(rec)

        if point.concurrency is not None:
            queue = iter(requests)

            async def user() -> None:
                for req in queue:  # a shared iterator: each user takes the next request
                    await one(req)

            await asyncio.gather(*(user() for _ in range(point.concurrency)))
        else:
            gate = asyncio.Semaphore(in_flight)

            async def limited(req: BenchRequest) -> None:
                async with gate:
                    await one(req)

            tasks = []
            times = arrival_times(len(requests), point.request_rate, point.burstiness, seed)
            for req, at in zip(requests, times, strict=True):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(req)))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if watch is not None:
            await watch.stop()
    return [r for r in records if r is not None], duration



# the event loop's share of one core above which the load tester, not the server, may set the
# pace (its sends, reads and timestamps queue behind one another)
CLIENT_BUSY = 0.9


def client_cpu(wall_s: float, loop_cpu_s: float, process_cpu_s: float) -> dict[str, Any]:
    """The load tester's own CPU use over a run: the event loop's thread (one core at most: the
    limit that matters) and the whole process (the GPU and metrics watchers' threads too)."""
    wall = wall_s if wall_s > 0 else float("nan")
    loop = loop_cpu_s / wall
    return {"wall_s": wall_s, "loop_cpu_s": loop_cpu_s, "process_cpu_s": process_cpu_s,
            "loop_cpu_perc": loop, "process_cpu_perc": process_cpu_s / wall,
            "saturated": bool(loop >= CLIENT_BUSY)}


def run_point(point: LoadPoint, requests: list[BenchRequest], ep: Endpoint, *, seed: int,
              timeout: float, slo: dict[str, float], watch: Watch | None,
              progress: Any = None) -> dict[str, Any]:
    """One load point, start to finish: the run's JSON (summary, GPU, engine, series, records)."""
    task = None
    if progress is not None:
        task = progress.add_task(point.label, total=len(requests))

    def done(_: RequestRecord) -> None:
        if task is not None:
            progress.advance(task)

    wall0, loop0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    records, duration = asyncio.run(run_load(point, requests, ep, seed=seed, timeout=timeout,
                                             watch=watch, on_done=done))
    run: dict[str, Any] = {"label": point.label, "load": point.to_json(),
                           "summary": summarize(records, duration, slo),
                           "client": client_cpu(time.perf_counter() - wall0,
                                                time.thread_time() - loop0,
                                                time.process_time() - proc0)}
    if watch is not None:
        run["gpu"] = watch.gpu_summary()
        run["engine"] = watch.engine_summary()
        run["timeseries"] = watch.timeseries()
    run["requests"] = [r.to_json() for r in records]
    return run
