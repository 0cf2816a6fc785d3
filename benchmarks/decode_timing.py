"""Timing decode steps of a running engine, shared by the GPU benchmarks.

The engine launches step N+1 before it reads step N back, so one `step()` call is not one step's
latency; in a steady decode phase the interval between calls is the step time, and the device
is measured two ways: the engine's own CUDA events (first to last kernel of each step) and the
profiler's kernel records (the union of kernel, memcpy and memset intervals over the wall time,
which also counts the gaps inside a step as idle).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def run_to_decode(core: Any) -> None:
    """Step until every queued sequence is decoding and the prefill's token is read back."""
    while core.scheduler.waiting or any(
        s.num_uncomputed_tokens > 1 for s in core.scheduler.running
    ):
        core.step()
    core.step()


def steady_decode(core: Any) -> dict:
    """Run the decode phase to the end: median step interval and the event-timed busy fraction."""
    run_to_decode(core)
    core.runner.reset_busy_time()  # waits for the device
    stamps = [time.perf_counter()]
    while core.has_unfinished():
        core.step()
        stamps.append(time.perf_counter())
    wall = stamps[-1] - stamps[0]
    busy = core.runner.busy_time()
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    mid = intervals[2:-2] if len(intervals) > 8 else intervals
    return {"step_ms": statistics.median(mid) * 1e3, "steps": len(intervals),
            "gpu_busy_events": busy / wall if wall else 0.0}


def profile_decode(core: Any, steps: int = 12, top: int = 12) -> dict:
    """Profile `steps` decode steps: kernel-busy fraction of the wall time and the kernels that
    take it (by total time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    run_to_decode(core)
    for _ in range(3):
        core.step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    while core.has_unfinished():
        core.step()
    spans = []
    per_name: dict[str, float] = defaultdict(float)
    collective = 0.0  # NCCL and custom all-reduce kernels (their time includes waiting for peers)
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ts, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        spans.append((ts, ts + dur))
        name = ev.get("name", "?")
        per_name[name[:80]] += dur
        if "nccl" in name.lower() or "all_reduce" in name.lower():
            collective += dur
    spans.sort()
    busy, end = 0.0, float("-inf")
    first = spans[0][0] if spans else 0.0
    last = max((e for _, e in spans), default=0.0)
    for s, e in spans:
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    window = max(last - first, 1.0)
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": steps,
        "wall_ms_per_step": wall_us / steps / 1e3,
        "kernel_busy_of_wall": busy / wall_us if wall_us else 0.0,
        "kernel_busy_of_span": busy / window,
        "kernel_ms_per_step": busy / steps / 1e3,
        "collective_ms_per_step": collective / steps / 1e3,
        "top_kernels": [{"name": n, "ms_per_step": t / steps / 1e3} for n, t in kernels],
    }
