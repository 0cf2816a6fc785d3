"""Prometheus collector for honest GPU utilization: NVML per GPU beside the engine's own measures.

Exported at scrape time from the engine's latest CoreStats (cumulative per step type) and NVML:

- `flatout:engine_busy_seconds_total`: device time with a forward in flight (steps, start to end);
  `flatout:engine_busy_perc`: its share of wall time over the window below;
- `flatout:step_{device_seconds,tokens,bytes,flops}_total{step_type}` and
  `flatout:steps_by_type_total{step_type}` for prefill / decode / mixed steps;
- `flatout:mbu{step_type}`, `flatout:mfu{step_type}`: bytes and FLOPs a step must move and compute
  over its device time, against `flatout:device_peak_{bandwidth_bytes_per_second,flops}`;
- `flatout:gpu_{utilization_perc,memory_used_bytes,memory_total_bytes,power_watts,sm_clock_hz}
  {gpu}` from NVML, absent where there is no NVML.

Window: since the oldest scrape of the last minute (since start on the first scrape). MBU/MFU of a
step type that ran no step in the window are over all its steps since start.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flatout.monitor.nvml import Nvml
from flatout.monitor.step_clock import STEP_TYPES, StepTotals

WINDOW_SECONDS = 60.0


class UtilizationCollector:
    def __init__(self, stats_source: Callable[[], Any], model_name: str,
                 nvml: Nvml | None) -> None:
        self._stats = stats_source
        self.model_name = model_name
        self.nvml = nvml
        self.started = time.monotonic()
        # (monotonic time, busy seconds, per-type totals) at each scrape
        self._history: deque[tuple[float, float, dict[str, StepTotals]]] = deque()

    def _window(self, totals: dict[str, StepTotals]
                ) -> tuple[float, float, dict[str, StepTotals]]:
        now = time.monotonic()
        busy = sum(t.seconds for t in totals.values())
        h = self._history
        while h and now - h[0][0] > WINDOW_SECONDS:
            h.popleft()
        base = h[0] if h else (self.started, 0.0, {})
        h.append((now, busy, totals))
        return now - base[0], busy - base[1], base[2]

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        totals: dict[str, StepTotals] = st.step_totals
        name = [self.model_name]
        yield from self._engine(st, totals, name)  # zeros until the first step
        if self.nvml is not None:
            yield from self._gpus()

    def _engine(self, st: Any, totals: dict[str, StepTotals], name: list[str]
                ) -> Iterator[Metric]:
        wall, busy, base = self._window(totals)

        def family(kind: type, metric: str, doc: str, labels: list[str]) -> Any:
            return kind(metric, doc, labels=["model_name", *labels])

        busy_total = family(CounterMetricFamily, "flatout:engine_busy_seconds",
                            "Device time with a forward in flight (each step, start to end).", [])
        busy_total.add_metric(name, sum(t.seconds for t in totals.values()))
        yield busy_total
        busy_perc = family(GaugeMetricFamily, "flatout:engine_busy_perc",
                           "Share of wall time with a forward in flight, over the last minute.",
                           [])
        busy_perc.add_metric(name, min(1.0, busy / wall) if wall > 0 else 0.0)
        yield busy_perc

        fields = [("steps_by_type", "steps", "Steps run, by step type."),
                  ("step_device_seconds", "seconds", "Device time of steps, by step type."),
                  ("step_tokens", "tokens", "Tokens computed by steps, by step type."),
                  ("step_bytes", "bytes", "Least bytes the steps must move (weights + KV)."),
                  ("step_flops", "flops", "FLOPs of the steps (linear layers + attention).")]
        for metric, attr, doc in fields:
            c = family(CounterMetricFamily, f"flatout:{metric}", doc, ["step_type"])
            for kind in STEP_TYPES:
                c.add_metric([*name, kind], getattr(totals.get(kind, StepTotals()), attr))
            yield c

        peaks = [("flatout:device_peak_bandwidth_bytes_per_second", st.peak_bandwidth,
                  "Copy bandwidth of the device (bytes read + written per second)."),
                 ("flatout:device_peak_flops", st.peak_flops,
                  "Matmul rate of the device in the model's dtype (FLOP/s).")]
        for metric, value, doc in peaks:
            if value > 0:  # known once the engine reported after its first step
                g = family(GaugeMetricFamily, metric, doc, [])
                g.add_metric(name, value)
                yield g

        mbu = family(GaugeMetricFamily, "flatout:mbu", "Memory-bandwidth utilization of steps "
                     "(bytes / device time / peak bandwidth), last minute.", ["step_type"])
        mfu = family(GaugeMetricFamily, "flatout:mfu", "FLOP utilization of steps "
                     "(FLOPs / device time / peak FLOP/s), last minute.", ["step_type"])
        for kind in STEP_TYPES:
            now, then = totals.get(kind, StepTotals()), base.get(kind, StepTotals())
            if now.steps == then.steps:  # none in the window: all steps since start
                then = StepTotals()
            seconds = now.seconds - then.seconds
            if now.steps == 0 or seconds <= 0:
                continue
            if st.peak_bandwidth > 0:
                mbu.add_metric([*name, kind],
                               (now.bytes - then.bytes) / seconds / st.peak_bandwidth)
            if st.peak_flops > 0:
                mfu.add_metric([*name, kind], (now.flops - then.flops) / seconds / st.peak_flops)
        yield mbu
        yield mfu

    def _gpus(self) -> Iterator[Metric]:
        assert self.nvml is not None
        samples = self.nvml.sample()
        specs: list[tuple[str, str, Callable[[Any], float | None]]] = [
            ("gpu_utilization_perc", "Share of NVML's sample period with any kernel running "
             "(0..1): not how much of the GPU a kernel uses.", lambda s: s.utilization / 100),
            ("gpu_memory_used_bytes", "GPU memory in use (all processes).",
             lambda s: s.memory_used),
            ("gpu_memory_total_bytes", "GPU memory in all.", lambda s: s.memory_total),
            ("gpu_power_watts", "GPU power draw.", lambda s: s.power_watts),
            ("gpu_sm_clock_hz", "GPU SM clock.",
             lambda s: None if s.sm_clock_mhz is None else s.sm_clock_mhz * 1e6),
        ]
        for metric, doc, read in specs:
            g = GaugeMetricFamily(f"flatout:{metric}", doc, labels=["gpu", "gpu_name"])
            for s in samples:
                value = read(s)
                if value is not None:
                    g.add_metric([str(s.index), s.name], value)
            yield g
