"""NVML readings of the local GPUs (utilization, memory, power, SM clock), and a sampler thread.

Everything degrades to "no GPUs": without the NVML library, without a driver, or on a machine with
no GPU, `Nvml.open()` returns None and callers leave the GPU columns out.

NVML's utilization is the fraction of the last sample period (1/6 s to 1 s) in which *any* kernel
was running on the GPU: a single small kernel keeps it at 100 %. It says nothing of how much of the
GPU's bandwidth or arithmetic a step uses; read it beside the engine's MBU/MFU.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization: float  # percent of the sample period with a kernel running (0..100)
    memory_used: int  # bytes
    memory_total: int
    power_watts: float | None
    sm_clock_mhz: float | None


def visible_indices(count: int, env: str | None) -> list[int]:
    """The NVML indices this process's CUDA sees (CUDA_VISIBLE_DEVICES as integers), else all."""
    if env is None or not env.strip():
        return list(range(count))
    try:
        wanted = [int(x) for x in env.split(",") if x.strip()]
    except ValueError:  # UUIDs or MIG names: report every GPU
        return list(range(count))
    return [i for i in wanted if 0 <= i < count]


class Nvml:
    """The GPUs this process can see, through an NVML module (pynvml from nvidia-ml-py)."""

    def __init__(self, lib: Any, indices: list[int]) -> None:
        self.lib = lib
        self.handles = [(i, lib.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        self.names = {}
        for i, h in self.handles:
            name = lib.nvmlDeviceGetName(h)
            self.names[i] = name.decode() if isinstance(name, bytes) else str(name)

    @classmethod
    def open(cls, lib: Any = None) -> Nvml | None:
        """NVML over the visible GPUs, or None where there is no NVML or no GPU."""
        try:
            if lib is None:
                import pynvml  # nvidia-ml-py

                lib = pynvml
            lib.nvmlInit()
            indices = visible_indices(lib.nvmlDeviceGetCount(),
                                      os.environ.get("CUDA_VISIBLE_DEVICES"))
            return cls(lib, indices) if indices else None
        except Exception:  # noqa: BLE001 - no library, no driver, no GPU: all mean "none"
            return None

    def sample(self) -> list[GpuSample]:
        lib, out = self.lib, []
        for i, h in self.handles:
            try:
                util = float(lib.nvmlDeviceGetUtilizationRates(h).gpu)
                mem = lib.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # noqa: BLE001 - a GPU that stopped answering is skipped
                continue
            out.append(GpuSample(i, self.names[i], util, int(mem.used), int(mem.total),
                                 _optional(lambda h=h: lib.nvmlDeviceGetPowerUsage(h) / 1e3),
                                 _optional(lambda h=h: float(
                                     lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_SM)))))
        return out


def _optional(read: Any) -> float | None:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - power and clocks are not readable on every GPU
        return None


class NvmlSampler:
    """Samples every GPU every `interval` seconds on a thread: `samples` holds (t, [GpuSample])
    with t on the time.perf_counter clock."""

    def __init__(self, nvml: Nvml, interval: float = 0.1) -> None:
        self.nvml = nvml
        self.interval = interval
        self.samples: list[tuple[float, list[GpuSample]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flatout-nvml", daemon=True)

    def start(self) -> NvmlSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.nvml.sample()))
            self._stop.wait(self.interval)
