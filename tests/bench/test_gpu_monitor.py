"""On the GPU: CUDA-event step timing, the startup peak measurement, NVML through nvidia-ml-py.
(`python -m pytest tests/bench/test_gpu_monitor.py` on the device machine.)"""

from __future__ import annotations

import pytest
import torch

from flatout.monitor.nvml import Nvml
from flatout.monitor.step_clock import StepClock, StepCost, measure_peak

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_step_clock_times_device_work_without_waiting() -> None:
    dev = torch.device("cuda")
    peak = measure_peak(dev, torch.bfloat16)
    # an H100 or H200: copy bandwidth in TB/s and bf16 matmul rate in hundreds of TFLOP/s
    assert 1e12 < peak.bandwidth < 6e12 and 2e14 < peak.flops < 1.2e15, peak
    clock = StepClock(StepCost(0, 0, 2, 0, 0), dev, peak)
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    clock.begin([1] * 8, [100] * 8, 8)
    for _ in range(20):
        x @ x
    clock.end()
    early = clock.totals()["decode"].steps  # may still be running: not folded in yet
    torch.cuda.synchronize()
    t = clock.totals()["decode"]
    assert early in (0, 1) and t.steps == 1
    # 20 matmuls of 2 * 8192^3 FLOPs at the measured rate, within a factor of two
    expected = 20 * 2 * 8192**3 / peak.flops
    assert expected / 2 < t.seconds < expected * 2


def test_nvml_sees_the_gpu() -> None:
    nv = Nvml.open()
    assert nv is not None
    (g, *_) = nv.sample()
    assert 0 <= g.utilization <= 100 and g.memory_total > 10 * 2**30
    assert g.power_watts is None or g.power_watts > 10
