"""`flatout bench` against a real `flatout serve` on 127.0.0.1: closed loop, open loop, sweep,
workloads; the table's numbers recomputed from the per-request JSON by an independent
calculation."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.bench.conftest import bench, run_flatout
from tests.server.server_process import ServerProcess

SMALL = ["--input-len", "24", "--output-len", "6", "--num-prompts", "12"]


def table(stdout: str) -> dict[str, float]:
    """The `label   value` rows of the printed tables."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s*(\S.*?)\s{2,}(-?[\d.]+)\s*$", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def pct(values: list[float], q: float) -> float:
    """Percentile by hand: linear between the two closest ranks."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def recompute(records: list[dict[str, Any]], duration: float) -> dict[str, float]:
    ok = [r for r in records if r["success"]]
    lat = {
        "TTFT": [r["ttft"] * 1e3 for r in ok],
        "TPOT": [(r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) * 1e3
                 for r in ok if r["output_tokens"] > 1],
        "ITL": [g * 1e3 for r in ok for g in r["itl"]],
        "E2EL": [r["e2el"] * 1e3 for r in ok],
    }
    out = {"Successful requests": len(ok),
           "Total generated tokens": sum(r["output_tokens"] for r in ok),
           "Request throughput (req/s)": len(ok) / duration,
           "Output token throughput (tok/s)": sum(r["output_tokens"] for r in ok) / duration}
    for name, xs in lat.items():
        out[f"Mean {name} (ms)"] = statistics.fmean(xs)
        out[f"Median {name} (ms)"] = statistics.median(xs)
        out[f"P90 {name} (ms)"] = pct(xs, 90)
        out[f"P99 {name} (ms)"] = pct(xs, 99)
    return out


def max_overlap(records: list[dict[str, Any]]) -> int:
    events = sorted([(r["start"], 1) for r in records]
                    + [(r["start"] + r["e2el"], -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_closed_loop_table_agrees_with_json(bench_server: ServerProcess, tmp_path: Path) -> None:
    data, stdout = bench(bench_server, tmp_path / "c.json", *SMALL, "--concurrency", "3",
                         "--slo", "ttft:3000", "tpot:40", "--report", str(tmp_path / "report"))
    (run,) = data["runs"]
    records = run["requests"]
    assert sorted(r["index"] for r in records) == list(range(12))
    assert all(r["success"] for r in records), records
    assert {r["output_tokens"] for r in records} == {6}  # ignore_eos + min_tokens
    # the server's prompt length: 24 random tokens plus the special tokens it adds
    specials = httpx.post(f"{bench_server.url}/tokenize", json={"prompt": "x"}).json()["count"] \
        - httpx.post(f"{bench_server.url}/tokenize",
                     json={"prompt": "x", "add_special_tokens": False}).json()["count"]
    assert {r["prompt_len"] for r in records} == {24 + specials}
    duration = run["summary"]["duration_s"]
    assert max(r["start"] + r["e2el"] for r in records) <= duration + 1e-6
    assert 2 <= max_overlap(records) <= 3  # three users, never more in flight
    printed = table(stdout)
    for label, value in recompute(records, duration).items():
        assert printed[label] == pytest.approx(value, abs=0.006, rel=1e-3), label
    good = sum(1 for r in records if r["ttft"] <= 3.0 and r["tpot"] <= 0.040)
    assert printed["Goodput (req/s, SLO ttft:3000 tpot:40 ms)"] == pytest.approx(
        good / duration, abs=0.006)
    # the engine's own utilization, from the server's /metrics over the run
    eng = run["engine"]
    assert 0.05 < eng["busy_perc"] <= 1.05
    assert eng["mbu_decode"] > 0 and eng["mfu_prefill"] > 0
    assert printed["Engine busy, forward in flight (%)"] == pytest.approx(
        100 * eng["busy_perc"], abs=0.006)
    # the load tester's own CPU: its event loop's share of a core, and the whole process's
    client = run["client"]
    assert 0 < client["loop_cpu_s"] <= client["process_cpu_s"] + 1e-3
    assert 0 < client["loop_cpu_perc"] <= 1.05 and client["wall_s"] >= duration
    assert client["saturated"] == (client["loop_cpu_perc"] >= 0.9)
    assert printed["Load tester CPU, event loop (% of a core)"] == pytest.approx(
        100 * client["loop_cpu_perc"], abs=0.006)
    ts = run["timeseries"]
    # scrapes every 0.5 s of a run this short may all land between steps (0 running): only the
    # upper bound is certain
    running = [v for v in ts["running"] if v is not None]
    assert running and max(running) <= 3, ts["running"]
    assert run["gpu"]["source"] is None  # no GPU here, and the server reports none
    # the report: a page and its plots, which decode to images with something drawn
    import matplotlib.image as mpimg

    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for name in ["latency_cdf.png", "timeline_0.png"]:
        img = mpimg.imread(tmp_path / "report" / name)
        assert img.shape[0] > 300 and np.asarray(img).std() > 0.05, name


def test_open_loop_chat_shared_prefix(bench_server: ServerProcess, tmp_path: Path) -> None:
    before = bench_server.metrics().get("flatout:prefix_cache_hits_total", 0.0)
    data, _ = bench(bench_server, tmp_path / "o.json", "--api", "chat", "--request-rate", "6",
                    "--burstiness", "0.5", "--prefix-len", "64", "--input-len", "8",
                    "--output-len", "4", "--num-prompts", "10", "--seed", "3")
    (run,) = data["runs"]
    records = sorted(run["requests"], key=lambda r: r["index"])
    assert run["load"] == {"mode": "open", "request_rate": 6.0, "burstiness": 0.5,
                           "max_concurrency": None}
    assert all(r["success"] and r["output_tokens"] == 4 for r in records)
    starts = [r["start"] for r in records]
    assert starts == sorted(starts) and starts[-1] > 0.3  # sent over time, in arrival order
    # every prompt after the first finds the shared 64-token prefix's full blocks cached
    hits = bench_server.metrics()["flatout:prefix_cache_hits_total"] - before
    assert hits >= 9 * 48


def test_sweep_then_compare(bench_server: ServerProcess, tmp_path: Path) -> None:
    data, stdout = bench(bench_server, tmp_path / "s.json", "--input-len", "16",
                         "--output-len", "4", "--num-prompts", "6", "--concurrency", "1", "4",
                         "--report", str(tmp_path / "rep"))
    assert [r["label"] for r in data["runs"]] == ["concurrency 1", "concurrency 4"]
    assert all(len(r["requests"]) == 6 for r in data["runs"])
    assert max_overlap(data["runs"][0]["requests"]) == 1
    assert "sweep" in stdout and (tmp_path / "rep" / "sweep.png").stat().st_size > 10_000
    # after = before with output throughput doubled and P99 TTFT halved
    after = json.loads(json.dumps(data))
    for run in after["runs"]:
        run["summary"]["output_throughput"] *= 2
        run["summary"]["ttft_ms"]["p99"] /= 2
    (tmp_path / "after.json").write_text(json.dumps(after))
    proc = run_flatout("bench", "--compare", str(tmp_path / "s.json"), str(tmp_path / "after.json"),
                       "--labels", "before", "after", "--markdown")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "| metric | before | after | change |" in lines
    tput = [ln for ln in lines if ln.startswith("| Output token throughput")]
    ttft = [ln for ln in lines if ln.startswith("| P99 TTFT")]
    assert len(tput) == 2 and all("+100.0 % (better)" in ln for ln in tput)
    assert all("-50.0 % (better)" in ln for ln in ttft)
    mean_ttft = [ln for ln in lines if ln.startswith("| Mean TTFT")]
    assert all(ln.endswith("| +0.0 % |") for ln in mean_ttft)


def test_tokenize_endpoints_give_exact_prompts(bench_server: ServerProcess) -> None:
    from flatout.bench.datasets import RemoteTokenizer, random_requests

    url = bench_server.url
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) > 0 and r.json()["max_model_len"] == 256
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["count"] > 3
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    tok = RemoteTokenizer.probe(url, "demo", {})
    assert tok is not None
    reqs = random_requests(6, 40, 8, 0.25, seed=1, tok=tok)
    for req in reqs:
        assert isinstance(req.prompt, str)
        assert len(tok.encode(req.prompt)) == req.prompt_len
        assert 30 <= req.prompt_len <= 50 and 6 <= (req.output_len or 0) <= 10


def test_sharegpt_file(bench_server: ServerProcess, tmp_path: Path) -> None:
    convs = [{"conversations": [{"from": "human", "value": f"question {i}: " + "why " * (5 + i)},
                                {"from": "gpt", "value": "because " * (6 + i)}]}
             for i in range(8)]
    convs.append({"conversations": [{"from": "human", "value": "too short a reply"},
                                    {"from": "gpt", "value": "no"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    data, _ = bench(bench_server, tmp_path / "g.json", "--dataset-name", "sharegpt",
                    "--dataset-path", str(path), "--num-prompts", "5", "--concurrency", "5")
    records = data["runs"][0]["requests"]
    assert len(records) == 5 and all(r["success"] for r in records)
    # output lengths are the replies' token counts (forced with ignore_eos), each >= 4
    assert all(r["output_tokens"] == r["expected_output_len"] >= 4 for r in records)
    bad = run_flatout("bench", "--base-url", bench_server.url, "--dataset-name", "sharegpt")
    assert bad.returncode == 2 and "--dataset-path" in bad.stderr
