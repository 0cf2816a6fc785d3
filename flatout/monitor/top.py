"""`flatout top`: a live terminal dashboard of a running server, read from its /metrics over HTTP
(so it works as well from another machine): per-GPU utilization, memory and power; running and
waiting requests, batch size, KV-cache usage; tokens/s; TTFT and TPOT P50/P99 over the last
minute; the engine's busy share and MBU/MFU per step type."""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flatout.monitor.prom import Scrape, fetch, histogram_quantile, rate
from flatout.monitor.step_clock import STEP_TYPES


@dataclass
class View:
    """What one screen shows, computed from the scrapes of the last `window` seconds."""

    url: str
    gpus: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)


class TopState:
    def __init__(self, url: str, window: float = 60.0) -> None:
        self.url = url
        self.window = window
        self.scrapes: deque[Scrape] = deque()

    def add(self, s: Scrape) -> None:
        self.scrapes.append(s)
        while len(self.scrapes) > 2 and s.t - self.scrapes[0].t > self.window:
            self.scrapes.popleft()

    def view(self) -> View:
        v = View(self.url)
        if not self.scrapes:
            return v
        now = self.scrapes[-1]
        prev = self.scrapes[-2] if len(self.scrapes) > 1 else None
        base = self.scrapes[0] if len(self.scrapes) > 1 else None
        val = v.values
        for key, name in [("running", "num_requests_running"), ("waiting", "num_requests_waiting"),
                          ("batch", "step_batch_size"), ("kv", "kv_cache_usage_perc"),
                          ("preemptions", "num_preemptions_total")]:
            val[key] = now.value(name)
        val["gen_tok_s"] = rate(now, prev, "generation_tokens_total")
        val["prompt_tok_s"] = rate(now, prev, "prompt_tokens_total")
        val["req_s"] = rate(now, base, "request_success_total")
        for key, name in [("ttft", "time_to_first_token_seconds"),
                          ("tpot", "time_per_output_token_seconds"),
                          ("e2el", "e2e_request_latency_seconds")]:
            buckets = now.buckets(name)
            then = base.buckets(name) if base is not None else None
            for q in (0.5, 0.99):
                val[f"{key}_p{int(q * 100)}"] = histogram_quantile(q, buckets, then)
        val["busy"] = rate(now, base, "engine_busy_seconds_total")
        bw, peak = now.value("device_peak_bandwidth_bytes_per_second"), \
            now.value("device_peak_flops")
        for kind in STEP_TYPES:
            secs = _delta(now, base, "step_device_seconds_total", kind)
            moved = _delta(now, base, "step_bytes_total", kind)
            flops = _delta(now, base, "step_flops_total", kind)
            if secs and bw and peak and moved is not None and flops is not None:
                val[f"mbu_{kind}"] = moved / secs / bw
                val[f"mfu_{kind}"] = flops / secs / peak
            else:  # nothing ran in our window: the server's own last-minute figures
                val[f"mbu_{kind}"] = now.value("mbu", step_type=kind)
                val[f"mfu_{kind}"] = now.value("mfu", step_type=kind)
        util = now.by_label("gpu_utilization_perc", "gpu")
        for gpu in sorted(util, key=lambda g: int(g) if g.isdigit() else 0):
            one = {"gpu": gpu, "util": util[gpu]}
            for key, name in [("mem_used", "gpu_memory_used_bytes"),
                              ("mem_total", "gpu_memory_total_bytes"),
                              ("power", "gpu_power_watts"), ("clock", "gpu_sm_clock_hz")]:
                one[key] = now.value(name, gpu=gpu)
            names = [lbl.get("gpu_name", "") for lbl, _ in now.series("gpu_utilization_perc",
                                                                       gpu=gpu)]
            one["name"] = names[0] if names else ""
            v.gpus.append(one)
        return v


def _delta(now: Scrape, base: Scrape | None, name: str, kind: str) -> float | None:
    if base is None:
        return None
    a, b = now.value(name, step_type=kind), base.value(name, step_type=kind)
    return None if a is None or b is None else a - b


def _num(x: float | None, fmt: str = "{:.1f}", scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else fmt.format(x * scale) + unit


def _bar(frac: float | None, width: int = 20) -> Text:
    if frac is None:
        return Text("-")
    frac = min(max(frac, 0.0), 1.0)
    n = round(frac * width)
    color = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "red"
    return Text("█" * n, style=color) + Text("░" * (width - n), style="dim") \
        + Text(f" {frac * 100:5.1f} %")


def render(v: View) -> Group:
    val = v.values
    head = Text(f"flatout top  {v.url}  {time.strftime('%H:%M:%S')}", style="bold")
    gpus = Table(title="GPUs (NVML: share of time any kernel ran)", box=box.SIMPLE_HEAD,
                 title_justify="left")
    for col in ["gpu", "utilization", "memory", "power", "SM clock"]:
        gpus.add_column(col)
    for g in v.gpus:
        mem = "-" if g["mem_used"] is None else \
            f"{g['mem_used'] / 2**30:.1f} / {(g['mem_total'] or 0) / 2**30:.1f} GiB"
        gpus.add_row(f"{g['gpu']} {g['name']}", _bar(g["util"]), mem,
                     _num(g["power"], "{:.0f}", unit=" W"),
                     _num(g["clock"], "{:.0f}", 1e-6, " MHz"))
    if not v.gpus:
        gpus.add_row("none reported", "-", "-", "-", "-")
    engine = Table(title="engine", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ["", "value"]:
        engine.add_column(col)
    engine.add_row("busy (forward in flight)", _bar(val.get("busy")))
    engine.add_row("KV cache used", _bar(val.get("kv")))
    engine.add_row("running / waiting", f"{_num(val.get('running'), '{:.0f}')} / "
                   f"{_num(val.get('waiting'), '{:.0f}')}")
    engine.add_row("batch size (last step)", _num(val.get("batch"), "{:.0f}"))
    engine.add_row("generated tokens/s", _num(val.get("gen_tok_s")))
    engine.add_row("prompt tokens/s", _num(val.get("prompt_tok_s")))
    engine.add_row("finished requests/s (last minute)", _num(val.get("req_s"), "{:.2f}"))
    engine.add_row("preemptions (total)", _num(val.get("preemptions"), "{:.0f}"))
    lat = Table(title="latency, last minute (from histograms)", box=box.SIMPLE_HEAD,
                title_justify="left")
    for col in ["", "P50", "P99"]:
        lat.add_column(col, justify="right")
    for key, name in [("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E")]:
        lat.add_row(name, _num(val.get(f"{key}_p50"), "{:.1f}", 1e3, " ms"),
                    _num(val.get(f"{key}_p99"), "{:.1f}", 1e3, " ms"))
    util = Table(title="utilization of steps (of the device's peak)", box=box.SIMPLE_HEAD,
                 title_justify="left")
    for col in ["step type", "MBU", "MFU"]:
        util.add_column(col, justify="right")
    for kind in STEP_TYPES:
        util.add_row(kind, _num(val.get(f"mbu_{kind}"), "{:.1f}", 100, " %"),
                     _num(val.get(f"mfu_{kind}"), "{:.1f}", 100, " %"))
    return Group(head, gpus, engine, lat, util)


def run_top(ns: argparse.Namespace) -> int:
    """`flatout top` (its arguments: flatout.cli_args.add_top_args)."""
    if ns.interval <= 0:
        raise ValueError("--interval must be > 0")
    state = TopState(ns.base_url, ns.window)
    console = Console()
    with httpx.Client(timeout=5.0) as http:
        def scrape() -> None:
            try:
                state.add(fetch(ns.base_url, http))
            except httpx.HTTPError as e:
                raise ValueError(f"cannot read {ns.base_url}/metrics: {e}") from None

        scrape()
        if ns.once:
            time.sleep(ns.interval)
            scrape()
            console.print(render(state.view()))
            return 0
        with Live(render(state.view()), console=console, screen=True,
                  refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(ns.interval)
                    try:
                        scrape()
                    except ValueError as e:  # keep the last screen while the server is away
                        live.update(Group(render(state.view()), Text(str(e), style="red")))
                        continue
                    live.update(render(state.view()))
            except KeyboardInterrupt:
                return 0
