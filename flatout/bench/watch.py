"""What the server and its GPUs did during a run: /metrics scraped every `interval` seconds, and
NVML sampled every 100 ms when the GPUs are on this machine.

Summaries over the run: GPU utilization (mean and percentiles), memory, power, SM clock, from
NVML, else from the server's own NVML gauges; and, from a flatout server, the engine's busy
fraction and MBU/MFU per step type, as counter increases between the first and the last scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from flatout.monitor.nvml import GpuSample, Nvml, NvmlSampler
from flatout.monitor.prom import Scrape, rate
from flatout.monitor.step_clock import STEP_TYPES

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def is_local(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


class Watch:
    def __init__(self, base_url: str, headers: dict[str, str], interval: float = 0.5,
                 nvml: Nvml | None = None, nvml_interval: float = 0.1) -> None:
        self.url = base_url.rstrip("/") + "/metrics"
        self.headers = headers
        self.interval = interval
        self.scrapes: list[Scrape] = []
        self.sampler = NvmlSampler(nvml, nvml_interval) if nvml is not None else None
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self.t0 = 0.0

    async def start(self, t0: float) -> None:
        self.t0 = t0
        self._http = httpx.AsyncClient(timeout=5.0, headers=self.headers)
        await self._scrape()
        if self.sampler is not None:
            self.sampler.start()
        self._task = asyncio.create_task(self._loop())

    async def _scrape(self) -> None:
        assert self._http is not None
        try:
            r = await self._http.get(self.url)
            if r.status_code == 200:
                self.scrapes.append(Scrape.parse(r.text))
        except (httpx.HTTPError, ValueError):
            pass  # a server without /metrics: no server-side series

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._scrape()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._scrape()
        if self._http is not None:
            await self._http.aclose()
        if self.sampler is not None:
            self.sampler.stop()

    # -- results ----------------------------------------------------------------------------
    def timeseries(self) -> dict[str, Any]:
        s = self.scrapes
        ts: dict[str, Any] = {"t": [x.t - self.t0 for x in s]}
        for key, name in [("running", "num_requests_running"), ("waiting", "num_requests_waiting"),
                          ("kv_usage", "kv_cache_usage_perc")]:
            ts[key] = [x.value(name) for x in s]
        # a step's time counts when it ends, so a short interval can see more than 100 %
        ts["engine_busy"] = [None] + [_clamp(rate(b, a, "engine_busy_seconds_total"))
                                      for a, b in zip(s, s[1:], strict=False)]
        gpus = {g for x in s for g in x.by_label("gpu_utilization_perc", "gpu")}
        ts["gpu_util"] = {g: [(x.by_label("gpu_utilization_perc", "gpu").get(g) or 0.0) * 100
                              for x in s] for g in sorted(gpus)}
        if self.sampler is not None and self.sampler.samples:
            samples = self.sampler.samples
            ts["nvml_t"] = [t - self.t0 for t, _ in samples]
            ts["nvml_util"] = {str(g.index): [_pick(row, g.index, "utilization")
                                              for _, row in samples]
                               for g in samples[0][1]}
        return ts

    def gpu_summary(self) -> dict[str, Any]:
        """Per-GPU utilization (percent), memory, power, clock over the run; with `source`."""
        per_gpu: dict[str, dict[str, list[float]]] = {}
        source = None
        if self.sampler is not None and self.sampler.samples:
            source = "nvml"
            for _, row in self.sampler.samples:
                for g in row:
                    d = per_gpu.setdefault(str(g.index), {})
                    d.setdefault("util", []).append(g.utilization)
                    d.setdefault("memory_used", []).append(g.memory_used)
                    if g.power_watts is not None:
                        d.setdefault("power", []).append(g.power_watts)
                    if g.sm_clock_mhz is not None:
                        d.setdefault("sm_clock", []).append(g.sm_clock_mhz)
        elif any(x.series("gpu_utilization_perc") for x in self.scrapes):
            source = "metrics"
            for x in self.scrapes:
                for key, name, scale in [("util", "gpu_utilization_perc", 100.0),
                                         ("memory_used", "gpu_memory_used_bytes", 1.0),
                                         ("power", "gpu_power_watts", 1.0),
                                         ("sm_clock", "gpu_sm_clock_hz", 1e-6)]:
                    for gpu, v in x.by_label(name, "gpu").items():
                        per_gpu.setdefault(gpu, {}).setdefault(key, []).append(v * scale)
        out: dict[str, Any] = {"source": source, "gpus": {}}
        for gpu, d in per_gpu.items():
            out["gpus"][gpu] = {
                "util_perc": _stats(d["util"]) if d.get("util") else None,
                "memory_used_max": max(d["memory_used"]) if d.get("memory_used") else None,
                "power_watts_mean": float(np.mean(d["power"])) if d.get("power") else None,
                "sm_clock_mhz_mean": float(np.mean(d["sm_clock"])) if d.get("sm_clock") else None,
            }
        utils = [v["util_perc"]["mean"] for v in out["gpus"].values() if v["util_perc"]]
        out["util_mean"] = float(np.mean(utils)) if utils else None
        return out

    def engine_summary(self) -> dict[str, Any] | None:
        """The engine's busy share of the run and MBU/MFU per step type (flatout servers)."""
        if len(self.scrapes) < 2 or self.scrapes[-1].value("engine_busy_seconds_total") is None:
            return None
        a, b = self.scrapes[0], self.scrapes[-1]
        out: dict[str, Any] = {"busy_perc": rate(b, a, "engine_busy_seconds_total")}
        bw = b.value("device_peak_bandwidth_bytes_per_second") or 0.0
        peak = b.value("device_peak_flops") or 0.0
        for kind in STEP_TYPES:
            secs = _delta(a, b, "step_device_seconds_total", kind)
            if secs <= 0:
                continue
            out[f"mbu_{kind}"] = _delta(a, b, "step_bytes_total", kind) / secs / bw if bw else None
            out[f"mfu_{kind}"] = _delta(a, b, "step_flops_total", kind) / secs / peak \
                if peak else None
        return out


def _clamp(x: float | None) -> float | None:
    return None if x is None else min(1.0, x)


def _delta(a: Scrape, b: Scrape, name: str, kind: str) -> float:
    return (b.value(name, step_type=kind) or 0.0) - (a.value(name, step_type=kind) or 0.0)


def _pick(row: list[GpuSample], index: int, attr: str) -> float | None:
    for g in row:
        if g.index == index:
            return float(getattr(g, attr))
    return None
