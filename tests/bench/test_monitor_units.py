"""Prometheus parsing, histogram quantiles, step accounting and the utilization collector, with
fakes standing in for the GPU and NVML."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import prometheus_client as prom
import pytest
import torch

from flatout.models.registry import resolve_model_config
from flatout.monitor.nvml import Nvml, visible_indices
from flatout.monitor.prom import Scrape, histogram_quantile, rate
from flatout.monitor.step_clock import StepClock, StepCost, StepTotals, measure_peak, step_type
from flatout.monitor.top import TopState
from flatout.monitor.utilization import UtilizationCollector

TEXT = """# TYPE flatout:lat_seconds histogram
flatout:lat_seconds_bucket{le="0.1",model_name="m"} 10
flatout:lat_seconds_bucket{le="0.2",model_name="m"} 30
flatout:lat_seconds_bucket{le="+Inf",model_name="m"} 40
flatout:lat_seconds_count{model_name="m"} 40
flatout:lat_seconds_sum{model_name="m"} 5
# TYPE flatout:tokens counter
flatout:tokens_total{model_name="m"} 100
# TYPE flatout:gpu_utilization_perc gauge
flatout:gpu_utilization_perc{gpu="0",gpu_name="X"} 0.5
flatout:gpu_utilization_perc{gpu="1",gpu_name="X"} 0.25
"""


def test_scrape_values_rates_and_quantiles() -> None:
    now = Scrape.parse(TEXT, t=10.0)
    assert now.prefix == "flatout:"
    assert now.value("tokens_total") == 100
    assert now.by_label("gpu_utilization_perc", "gpu") == {"0": 0.5, "1": 0.25}
    assert now.value("gpu_utilization_perc", gpu="1") == 0.25
    assert now.value("missing") is None
    then = Scrape.parse(TEXT.replace("} 100", "} 40"), t=8.0)
    assert rate(now, then, "tokens_total") == pytest.approx(30.0)
    b = now.buckets("lat_seconds")
    assert b[:2] == [(0.1, 10.0), (0.2, 30.0)]
    # median: the 20th of 40 observations, halfway through the (0.1, 0.2] bucket
    assert histogram_quantile(0.5, b) == pytest.approx(0.15)
    assert histogram_quantile(0.25, b) == pytest.approx(0.1)
    # beyond the last finite bound: that bound
    assert histogram_quantile(0.99, b) == pytest.approx(0.2)
    # only the observations made since `then` count: 10 more, all in (0.1, 0.2]
    then_b = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 30.0)]
    assert histogram_quantile(0.5, b, then_b) == pytest.approx(0.15)
    assert histogram_quantile(0.5, then_b, then_b) is None


def _top_scrape(t: float, secs: float, flops: float | None) -> Scrape:
    text = f"""# TYPE flatout:device_peak_bandwidth_bytes_per_second gauge
flatout:device_peak_bandwidth_bytes_per_second 100
# TYPE flatout:device_peak_flops gauge
flatout:device_peak_flops 1000
# TYPE flatout:step_device_seconds counter
flatout:step_device_seconds_total{{step_type="decode"}} {secs}
# TYPE flatout:step_bytes counter
flatout:step_bytes_total{{step_type="decode"}} {secs * 50}
"""
    if flops is not None:
        text += f"""# TYPE flatout:step_flops counter
flatout:step_flops_total{{step_type="decode"}} {flops}
"""
    return Scrape.parse(text, t=t)


def test_top_mbu_mfu_over_the_window_and_without_a_series() -> None:
    state = TopState("http://x")
    state.add(_top_scrape(0.0, 1.0, 100.0))
    state.add(_top_scrape(1.0, 3.0, 1100.0))
    view = state.view()
    assert view.values["mbu_decode"] == pytest.approx(0.5)  # 100 bytes / 2 s / 100 B/s
    assert view.values["mfu_decode"] == pytest.approx(0.5)  # 1000 flops / 2 s / 1000 FLOP/s
    # a server that exports device seconds but not FLOPs: the server's own figures (none here),
    # where the division used to fail on None
    state = TopState("http://x")
    state.add(_top_scrape(0.0, 1.0, None))
    state.add(_top_scrape(1.0, 3.0, None))
    view = state.view()
    assert view.values["mfu_decode"] is None and view.values["mbu_decode"] is None


def test_step_cost_of_glm4_9b_matches_the_design_figure() -> None:
    cfg = resolve_model_config("glm-4-9b", dtype="bfloat16", device_type="cuda",
                               load_format="dummy")
    cost = StepCost.of(cfg)
    assert cost.weight_bytes / 1e9 == pytest.approx(17.6, abs=0.1)  # DESIGN.md: ~17.6 GB
    nbytes, flops = cost.work([1, 1], [512, 100], num_sampled=2)
    assert nbytes == cost.weight_bytes + cost.kv_bytes_per_token * 612
    assert flops == 2 * cost.linear_flops_per_token + 2 * cost.lm_head_flops_per_row \
        + cost.attn_flops_per_pair * 612
    # a 4-token prefill chunk after 2 cached tokens attends to 3 + 4 + 5 + 6 keys
    _, flops = cost.work([4], [6], num_sampled=0)
    assert flops == 4 * cost.linear_flops_per_token + 18 * cost.attn_flops_per_pair


def test_step_types_and_cpu_clock() -> None:
    assert step_type([1, 1]) == "decode"
    assert step_type([5, 7]) == "prefill"
    assert step_type([1, 7]) == "mixed"
    cost = StepCost(100, 10, 2, 0, 0)
    clock = StepClock(cost, torch.device("cpu"), measure_peak(torch.device("cpu"),
                                                              torch.float32, 1e9, 1e12))
    clock.begin([1, 1], [3, 4], 2)
    clock.end()
    clock.begin([8], [8], 1)
    clock.end()
    t = clock.totals()
    assert (t["decode"].steps, t["decode"].tokens, t["decode"].bytes) == (1, 2, 100 + 70)
    assert (t["prefill"].steps, t["prefill"].tokens, t["mixed"].steps) == (1, 8, 0)
    assert t["decode"].seconds > 0
    clock.end()  # an end without a begin changes nothing
    assert clock.totals()["decode"].steps == 1


def test_given_peaks_scale_with_tensor_parallel_ranks() -> None:
    p = measure_peak(torch.device("cpu"), torch.float32, 3e12, 7e14, num_devices=2)
    assert (p.bandwidth, p.flops, p.source) == (6e12, 1.4e15, "given")
    m = measure_peak(torch.device("cpu"), torch.float32, bandwidth=1.0)
    assert m.bandwidth == 1.0 and m.flops > 1e6 and m.source == "measured"


class FakeNvml:
    """pynvml's calls, answering for two GPUs."""

    NVML_CLOCK_SM = 1

    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 2
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetName(self, h: int) -> bytes: return b"Fake H100"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[97, 40][h])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int: return 350_000  # mW
    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int: return 1980


class BrokenNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise RuntimeError("NVML Shared Library Not Found")


@dataclass
class Stats:
    step_totals: dict[str, StepTotals] = field(default_factory=dict)
    peak_bandwidth: float = 0.0
    peak_flops: float = 0.0


def _render(collector: UtilizationCollector) -> Scrape:
    reg = prom.CollectorRegistry()
    reg.register(collector)
    return Scrape.parse(prom.generate_latest(reg).decode())


def test_nvml_degrades_and_honours_visible_devices() -> None:
    assert Nvml.open(BrokenNvml()) is None
    assert visible_indices(4, None) == [0, 1, 2, 3]
    assert visible_indices(4, "2,0") == [2, 0]
    assert visible_indices(4, "GPU-1234") == [0, 1, 2, 3]
    nv = Nvml.open(FakeNvml())
    assert nv is not None
    s = nv.sample()
    assert [(g.index, g.utilization, g.power_watts) for g in s] == [(0, 97.0, 350.0),
                                                                    (1, 40.0, 350.0)]


def test_utilization_collector_exports_gpus_busy_and_mbu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("flatout.monitor.utilization.time.monotonic", lambda: clock[0])
    stats = Stats()
    collector = UtilizationCollector(lambda: stats, "m", Nvml.open(FakeNvml()))
    first = _render(collector)  # before any step: zeros, no peaks, no MBU
    assert first.value("engine_busy_seconds_total") == 0.0
    assert first.value("mbu") is None and first.value("device_peak_flops") is None
    assert first.by_label("gpu_utilization_perc", "gpu") == {"0": 0.97, "1": 0.40}
    assert first.value("gpu_power_watts", gpu="1") == 350.0
    assert first.value("gpu_sm_clock_hz", gpu="0") == 1.98e9
    stats.step_totals = {"decode": StepTotals(10, 2.0, 80, 4e12, 8e12),
                         "prefill": StepTotals(1, 0.5, 4096, 1e11, 2e14)}
    stats.peak_bandwidth, stats.peak_flops = 4e12, 8e14
    clock[0] = 50.0
    s = _render(collector)
    assert s.value("engine_busy_seconds_total") == pytest.approx(2.5)
    assert s.value("mbu", step_type="decode") == pytest.approx(4e12 / 2.0 / 4e12)
    assert s.value("mfu", step_type="prefill") == pytest.approx(2e14 / 0.5 / 8e14)
    assert s.value("mbu", step_type="mixed") is None  # no mixed step ever ran
    assert s.value("step_tokens_total", step_type="prefill") == 4096
    assert s.value("engine_busy_perc") == pytest.approx(2.5 / 50)
    # 50 s later the window starts at the previous scrape: 10 more decode steps moving bytes
    # at half the rate, busy 2 s of 50
    clock[0] = 100.0
    stats.step_totals = {"decode": StepTotals(20, 4.0, 160, 6e12, 9e12),
                         "prefill": StepTotals(1, 0.5, 4096, 1e11, 2e14)}
    s = _render(collector)
    assert s.value("mbu", step_type="decode") == pytest.approx(2e12 / 2.0 / 4e12)
    assert s.value("engine_busy_perc") == pytest.approx(2.0 / 50)
    # prefill ran nothing in the window: its figure is over all its steps
    assert s.value("mfu", step_type="prefill") == pytest.approx(2e14 / 0.5 / 8e14)
