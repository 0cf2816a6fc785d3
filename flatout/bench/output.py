"""The terminal tables: one run's results, a sweep's overview, and before/after comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

_LATENCIES = [("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2EL", "e2el_ms")]
_STATS = [("Mean", "mean"), ("Median", "median"), ("P90", "p90"), ("P99", "p99")]


def flat_metrics(run: dict[str, Any]) -> list[tuple[str, float | None, bool | None]]:
    """(label, value, higher is better) for every reported number of one run."""
    s = run["summary"]
    rows: list[tuple[str, float | None, bool | None]] = [
        ("Successful requests", s["completed"], None),
        ("Failed requests", s["failed"], False),
        ("Benchmark duration (s)", s["duration_s"], False),
        ("Total input tokens", s["total_input_tokens"], None),
        ("Total generated tokens", s["total_output_tokens"], None),
        ("Request throughput (req/s)", s["request_throughput"], True),
        ("Output token throughput (tok/s)", s["output_throughput"], True),
        ("Total token throughput (tok/s)", s["total_token_throughput"], True),
    ]
    if "goodput" in s:
        slo = " ".join(f"{k}:{v:g}" for k, v in s["slo_ms"].items())
        rows.append((f"Goodput (req/s, SLO {slo} ms)", s["goodput"], True))
    for name, key in _LATENCIES:
        for stat_label, stat in _STATS:
            rows.append((f"{stat_label} {name} (ms)", s[key][stat], False))
    gpu = run.get("gpu") or {}
    for g, d in sorted((gpu.get("gpus") or {}).items()):
        u = d.get("util_perc")
        if u:
            for stat in ("mean", "p50", "p90", "p99"):
                rows.append((f"GPU {g} utilization {stat} (%, {gpu['source']})", u[stat], None))
        if d.get("memory_used_max") is not None:
            rows.append((f"GPU {g} memory used max (GiB)", d["memory_used_max"] / 2**30, None))
        if d.get("power_watts_mean") is not None:
            rows.append((f"GPU {g} power mean (W)", d["power_watts_mean"], None))
        if d.get("sm_clock_mhz_mean") is not None:
            rows.append((f"GPU {g} SM clock mean (MHz)", d["sm_clock_mhz_mean"], None))
    eng = run.get("engine") or {}
    if eng.get("busy_perc") is not None:
        rows.append(("Engine busy, forward in flight (%)", 100 * eng["busy_perc"], None))
    client = run.get("client") or {}
    if client.get("loop_cpu_perc") is not None:
        rows.append(("Load tester CPU, event loop (% of a core)", 100 * client["loop_cpu_perc"],
                     None))
        rows.append(("Load tester CPU, whole process (% of a core)",
                     100 * client["process_cpu_perc"], None))
    for key in sorted(k for k in eng if k.startswith(("mbu_", "mfu_"))):
        if eng[key] is not None:
            kind, step = key.split("_", 1)
            rows.append((f"{kind.upper()} {step} steps (%)", 100 * eng[key], True))
    return rows


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value)}"
    return f"{value:.2f}"


def run_table(run: dict[str, Any], title: str | None = None) -> Table:
    t = Table(title=title or f"flatout bench: {run['label']}", box=box.SIMPLE_HEAD,
              show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for label, value, _ in flat_metrics(run):
        t.add_row(Text(label), fmt(value))
    return t


def sweep_table(runs: list[dict[str, Any]]) -> Table:
    t = Table(title="sweep", box=box.SIMPLE_HEAD)
    for col in ["load", "req/s", "out tok/s", "P99 TTFT ms", "P99 TPOT ms", "P99 E2EL ms",
                "GPU util %", "busy %", "client CPU %"]:
        t.add_column(col, justify="right")
    for r in runs:
        s, gpu, eng = r["summary"], r.get("gpu") or {}, r.get("engine") or {}
        busy, loop = eng.get("busy_perc"), (r.get("client") or {}).get("loop_cpu_perc")
        t.add_row(r["label"], fmt(s["request_throughput"]), fmt(s["output_throughput"]),
                  fmt(s["ttft_ms"]["p99"]), fmt(s["tpot_ms"]["p99"]), fmt(s["e2el_ms"]["p99"]),
                  fmt(gpu.get("util_mean")), fmt(None if busy is None else 100 * busy),
                  fmt(None if loop is None else 100 * loop))
    return t


def change(a: float | None, b: float | None) -> float | None:
    """Percent change from a to b."""
    if a is None or b is None or a == 0 or math.isnan(a) or math.isnan(b):
        return None
    return (b - a) / abs(a) * 100


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) of two runs, over the metrics both have."""
    before = {label: (v, better) for label, v, better in flat_metrics(a)}
    rows = []
    for label, v, better in flat_metrics(b):
        if label not in before:
            continue
        old = before[label][0]
        pct = change(old, v)
        mark = ""
        if pct is not None and better is not None and abs(pct) >= 0.5:
            mark = " (better)" if (pct > 0) == better else " (worse)"
        rows.append((label, fmt(old), fmt(v), "" if pct is None else f"{pct:+.1f} %{mark}"))
    return rows


def load_result(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if "runs" not in data:
        raise ValueError(f"{path}: not a `flatout bench --json` file")
    return data


def print_compare(paths: list[str], labels: list[str] | None, markdown: bool,
                  console: Console) -> None:
    a, b = (load_result(p) for p in paths)
    names = labels or [Path(p).stem for p in paths]
    if len(a["runs"]) != len(b["runs"]):
        raise ValueError(f"{paths[0]} has {len(a['runs'])} runs, {paths[1]} has "
                         f"{len(b['runs'])}: compare results of the same sweep")
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        rows = compare_rows(ra, rb)
        title = ra["label"] if ra["label"] == rb["label"] else f"{ra['label']} / {rb['label']}"
        if markdown:
            console.print(f"**{title}**\n", markup=False)
            console.print(f"| metric | {names[0]} | {names[1]} | change |", markup=False)
            console.print("|---|---:|---:|---:|", markup=False)
            for row in rows:
                console.print("| " + " | ".join(row) + " |", markup=False, soft_wrap=True)
            console.print()
            continue
        t = Table(title=title, box=box.SIMPLE_HEAD)
        columns: list[tuple[str, JustifyMethod]] = [
            ("metric", "left"), (names[0], "right"), (names[1], "right"), ("change", "right")]
        for col, just in columns:
            t.add_column(col, justify=just)
        for row in rows:
            t.add_row(*(Text(cell) for cell in row))
        console.print(t)
