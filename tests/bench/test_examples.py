"""examples/: the Grafana dashboard queries only metrics the server exports; the locustfile runs
against a live server (when locust is installed); the HTML report renders in headless Chromium
(when Chromium is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flatout.bench.metrics import RequestRecord
from flatout.bench.report import write_report
from tests.bench.conftest import ROOT
from tests.server.server_process import ServerProcess

DASHBOARD = ROOT / "examples" / "grafana" / "flatout-dashboard.json"


def test_grafana_dashboard_uses_exported_metrics(bench_server: ServerProcess) -> None:
    body = {"model": "demo", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{bench_server.url}/v1/completions", json=body, timeout=60).is_success
    exported = set(bench_server.metrics())
    exported |= {n.split("{", 1)[0] for n in exported}
    # NVML gauges appear only on GPU machines: their names come from the collector's source
    source = (ROOT / "flatout" / "monitor" / "utilization.py").read_text()
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    used = {m for e in exprs for m in re.findall(r"flatout:[a-z0-9_]+", e)}
    for name in sorted(used):
        if name.startswith("flatout:gpu_"):
            assert name.removeprefix("flatout:") in source, name
        else:
            assert name in exported, f"{name} is not on /metrics"
    for key in ["engine_busy", "mbu", "mfu", "gpu_utilization", "time_to_first_token"]:
        assert any(key in e for e in exprs), key


@pytest.mark.skipif(shutil.which("locust") is None, reason="locust is not installed")
def test_locustfile_runs(bench_server: ServerProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["locust", "-f", str(ROOT / "examples" / "locustfile.py"), "--host", bench_server.url,
         "--headless", "--users", "2", "--spawn-rate", "2", "--run-time", "6s",
         "--stop-timeout", "60", "--only-summary", "--csv", str(tmp_path / "loc")],
        capture_output=True, text=True, timeout=120,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "LLM_MAX_TOKENS": "4",
             "LLM_PROMPT_WORDS": "16"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in (tmp_path / "loc_stats.csv").read_text().splitlines()[1:]:
        cols = line.split(",")
        rows[cols[1]] = (int(cols[2]), int(cols[3]))  # name -> (requests, failures)
    assert rows["/v1/completions"][0] >= 2 and rows["/v1/completions"][1] == 0
    assert rows["TTFT"][0] == rows["TPOT"][0] >= 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    def rec(i: int) -> dict:
        return RequestRecord(i, 32, 8, start=0.1 * i, success=True, ttft=0.05 + 0.01 * i,
                             e2el=0.4 + 0.02 * i, itl=[0.05] * 7, output_tokens=8).to_json()

    runs = [{"label": f"concurrency {c}", "load": {"mode": "closed", "concurrency": c},
             "summary": _summary(c), "requests": [rec(i) for i in range(20)],
             "timeseries": {"t": [0.0, 0.5, 1.0], "running": [0, c, 0],
                            "waiting": [0, 1, 0], "kv_usage": [0.0, 0.3, 0.0],
                            "engine_busy": [None, 0.8, 0.2]}} for c in (1, 4)]
    page = write_report({"command": "flatout bench", "runs": runs}, tmp_path / "rep")
    chrome = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([chrome, *flags, "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-plots-rendered="4/4"' in dom.stdout, dom.stdout[:500] + dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([chrome, *flags, f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (2400, 1200) and img.std() > 0.05


def _summary(c: int) -> dict:
    from flatout.bench.metrics import summarize

    recs = [RequestRecord(i, 32, 8, success=True, ttft=0.05 * c, e2el=0.5 * c, itl=[0.05],
                          output_tokens=8) for i in range(4)]
    return summarize(recs, 1.0)
