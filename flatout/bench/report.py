"""`--report DIR`: PNG plots and one self-contained HTML page (the plots inlined as data URIs).

Plots: latency CDFs (TTFT, TPOT, ITL, E2EL; one curve per run); per run, throughput, batch size,
KV-cache usage and GPU utilization over time; for sweeps, output throughput against P99 latency.
matplotlib (Agg backend) draws them; it is imported only here.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from flatout.bench.metrics import RequestRecord, token_times
from flatout.bench.output import flat_metrics, fmt


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, key) in zip(axes.flat, [("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"),
                                           ("E2E latency", "e2el")], strict=True):
        for run in runs:
            ok = [r for r in run["requests"] if r["success"]]
            if key == "itl":
                values = [g for r in ok for g in r["itl"]]
            else:
                values = [r[key] for r in ok if r[key] is not None]
            if not values:
                continue
            x = np.sort(np.asarray(values) * 1e3)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=run["label"])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_timeline(run: dict[str, Any], path: Path) -> None:
    plt = _plt()
    ts = run.get("timeseries") or {}
    records = [RequestRecord.from_json(r) for r in run["requests"]]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    # output tokens/s in 1 s bins, from the chunks' arrival times
    tt = token_times(records)
    if tt:
        end = max(t for t, _ in tt)
        bins = np.arange(0, np.ceil(end) + 1.0, 1.0)
        counts, _ = np.histogram([t for t, _ in tt], bins=bins, weights=[n for _, n in tt])
        axes[0].step(bins[:-1], counts, where="post")
    axes[0].set_ylabel("output tok/s")
    t = ts.get("t") or []

    def line(ax: Any, values: list[Any], label: str, scale: float = 1.0) -> None:
        pts = [(x, v * scale) for x, v in zip(t, values, strict=False) if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)

    line(axes[1], ts.get("running") or [], "running (batch)")
    line(axes[1], ts.get("waiting") or [], "waiting")
    axes[1].set_ylabel("requests")
    line(axes[2], ts.get("kv_usage") or [], "KV cache used", 100.0)
    axes[2].set_ylabel("KV cache %")
    for g, values in (ts.get("nvml_util") or {}).items():
        pts = [(x, v) for x, v in zip(ts["nvml_t"], values, strict=False) if v is not None]
        if pts:
            axes[3].plot(*zip(*pts, strict=True), label=f"GPU {g} (NVML)")
    if not ts.get("nvml_util"):
        for g, values in (ts.get("gpu_util") or {}).items():
            line(axes[3], values, f"GPU {g} (server NVML)")
    line(axes[3], ts.get("engine_busy") or [], "engine busy (forward in flight)", 100.0)
    axes[3].set_ylabel("utilization %")
    axes[3].set_xlabel("seconds since the start of the run")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    axes[0].set_title(f"{run['label']}: over time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, key) in zip(axes, [("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"),
                                      ("E2E latency", "e2el_ms")], strict=True):
        xs = [r["summary"][key]["p99"] for r in runs]
        ys = [r["summary"]["output_throughput"] for r in runs]
        ax.plot(xs, ys, marker="o")
        for x, y, r in zip(xs, ys, runs, strict=True):
            ax.annotate(r["label"], (x, y), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
        ax.set_xlabel(f"P99 {name} (ms)")
        ax.set_ylabel("output tok/s")
        ax.grid(alpha=0.3)
    fig.suptitle("throughput against P99 latency")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}
td.v{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;display:block}
code{background:#f4f4f4;padding:2px 4px}"""
# tells a headless browser (and a reader) how many plots decoded
_SCRIPT = """window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img.plot')];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.plotsRendered = ok + '/' + imgs.length;
});"""


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write DIR/*.png and DIR/index.html; return the HTML page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    plots: list[tuple[str, Path]] = [("Latency CDFs", out / "latency_cdf.png")]
    plot_cdfs(runs, plots[0][1])
    for i, run in enumerate(runs):
        p = out / f"timeline_{i}.png"
        plot_timeline(run, p)
        plots.append((f"Over time: {run['label']}", p))
    if len(runs) > 1:
        plots.append(("Sweep: throughput against P99 latency", out / "sweep.png"))
        plot_sweep(runs, plots[-1][1])
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>flatout bench</title>"
             f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
             "<h1>flatout bench</h1>",
             f"<p>Command: <code>{e(result.get('command', ''))}</code></p>",
             f"<p>Server: {e(str(result.get('base_url', '')))}, model "
             f"{e(str(result.get('model', '')))}, API {e(str(result.get('api', '')))}</p>"]
    for run in runs:
        parts.append(f"<h2>{e(run['label'])}</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td>{e(label)}</td><td class='v'>{e(fmt(v))}</td></tr>"
                  for label, v, _ in flat_metrics(run)]
        parts.append("</table>")
    for title, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{e(title)}</h2><img class='plot' alt='{e(title)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page
