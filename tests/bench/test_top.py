"""`flatout top` against a live server: one screen captured from the command, and the renderer
through rich's recording console; GPU rows from a server that reports NVML gauges."""

from __future__ import annotations

import re
import threading
import time

import httpx
from rich.console import Console

from flatout.monitor.prom import Scrape, fetch
from flatout.monitor.top import TopState, render
from tests.bench.conftest import run_flatout
from tests.server.server_process import ServerProcess


class Traffic:
    """Streams completions from two threads until stopped (bounded: at most 60 s)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.completed = threading.Semaphore(0)  # released once per finished request
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(2)]

    def _loop(self) -> None:
        deadline = time.monotonic() + 60
        body = {"model": "demo", "prompt": "hello " * 20, "max_tokens": 8, "ignore_eos": True,
                "stream": True}
        while not self.stop.is_set() and time.monotonic() < deadline:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    pass
            self.completed.release()

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        # the server is warm once requests finish (bounded wait, no fixed sleep)
        for _ in range(2):
            assert self.completed.acquire(timeout=60), "no request finished within 60 s"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _value(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s+([\d.]+)", text)
    assert m, f"{label!r} not on the screen:\n{text}"
    return float(m.group(1))


def test_top_once_shows_a_live_server(bench_server: ServerProcess) -> None:
    with Traffic(bench_server.url):
        # --once compares two scrapes: the interval holds finished requests even on a loaded
        # machine (each takes well under a second on an idle one)
        proc = run_flatout("top", "--base-url", bench_server.url, "--once", "--interval", "3")
    assert proc.returncode == 0, proc.stderr
    screen = proc.stdout
    assert f"flatout top  {bench_server.url}" in screen
    assert _value(screen, "generated tokens/s") > 0
    assert re.search(r"TTFT\s+[\d.]+ ms\s+[\d.]+ ms", screen), screen
    assert re.search(r"decode\s+[\d.]+ %\s+[\d.]+ %", screen), screen  # MBU and MFU
    assert "busy (forward in flight)" in screen and "none reported" in screen  # no GPU here


def test_top_renders_through_a_recording_console(bench_server: ServerProcess) -> None:
    state = TopState(bench_server.url)
    with Traffic(bench_server.url), httpx.Client() as http:
        state.add(fetch(bench_server.url, http))
        # wait (bounded) until the window holds finished requests, instead of a fixed sleep
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.5)
            state.add(fetch(bench_server.url, http))
            view = state.view()
            if view.values["tpot_p50"] is not None or time.monotonic() > deadline:
                break
    assert view.values["gen_tok_s"] and view.values["gen_tok_s"] > 0
    assert view.values["tpot_p50"] is not None and view.values["tpot_p50"] > 0
    console = Console(record=True, width=120, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(view))
    text = console.export_text()
    assert "latency, last minute" in text and "KV cache used" in text
    assert f"{view.values['tpot_p50'] * 1e3:.1f} ms" in text


def test_top_shows_gpus_a_server_reports() -> None:
    text = """flatout:gpu_utilization_perc{gpu="0",gpu_name="NVIDIA H100"} 0.42
flatout:gpu_memory_used_bytes{gpu="0",gpu_name="NVIDIA H100"} 7.516192768e10
flatout:gpu_memory_total_bytes{gpu="0",gpu_name="NVIDIA H100"} 8.589934592e10
flatout:gpu_power_watts{gpu="0",gpu_name="NVIDIA H100"} 512
flatout:gpu_sm_clock_hz{gpu="0",gpu_name="NVIDIA H100"} 1.98e9
"""
    state = TopState("http://gpu-host:8000")
    state.add(Scrape.parse(text, t=0.0))
    console = Console(record=True, width=120, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(state.view()))
    out = console.export_text()
    row = next(line for line in out.splitlines() if "NVIDIA H100" in line)
    assert "42.0 %" in row and "70.0 / 80.0 GiB" in row and "512 W" in row and "1980 MHz" in row
