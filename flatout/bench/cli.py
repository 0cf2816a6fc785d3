"""`flatout bench`: load-test an OpenAI-compatible server, or compare two results."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flatout.bench import datasets
from flatout.bench.client import BenchRequest, Endpoint
from flatout.bench.metrics import parse_slo
from flatout.bench.output import print_compare, run_table, sweep_table
from flatout.bench.runner import LoadPoint, run_point
from flatout.bench.watch import Watch, is_local


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an OpenAI-compatible server (or --compare A B)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id to request (default: the server's "
                   "first in /v1/models)")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder for exact prompt "
                   "lengths (default: the server's checkpoint if local, else its /tokenize)")
    g = p.add_argument_group("load (a list of values runs a sweep)")
    g.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="closed loop: N users, each sending its next request when one finishes")
    g.add_argument("--request-rate", type=float, nargs="+", default=None,
                   help="open loop: requests/s (inf: all at once; the default)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="open loop: at most this many requests in flight")
    g.add_argument("--num-prompts", type=int, default=200, help="requests per load point")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    w.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    w.add_argument("--input-len", "--random-input-len", type=int, default=512)
    w.add_argument("--output-len", "--random-output-len", type=int, default=128)
    w.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    w.add_argument("--prefix-len", "--random-prefix-len", type=int, default=0,
                   help="shared prompt prefix in tokens (exercises prefix caching)")
    w.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    w.add_argument("--sharegpt-output-len", type=int, default=None)
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop early (default: ignore_eos + min_tokens)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("measurement and output")
    o.add_argument("--slo", "--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="goodput SLOs, e.g. ttft:500 tpot:50 e2el:10000")
    o.add_argument("--json", default=None, metavar="FILE", help="results and every request")
    o.add_argument("--report", default=None, metavar="DIR", help="HTML page + PNG plots")
    o.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print the before/after table of two --json results and exit")
    o.add_argument("--labels", nargs=2, default=None, help="column names for --compare")
    o.add_argument("--markdown", action="store_true", help="--compare as a Markdown table")
    o.add_argument("--scrape-interval", type=float, default=0.5, help="/metrics period (s)")
    o.add_argument("--no-nvml", action="store_true", help="do not sample local GPUs")
    o.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_bench)


def load_points(ns: argparse.Namespace) -> list[LoadPoint]:
    if ns.concurrency and ns.request_rate:
        raise ValueError("give --concurrency (closed loop) or --request-rate (open loop), not "
                         "both; cap an open loop with --max-concurrency")
    if ns.concurrency:
        return [LoadPoint(concurrency=c) for c in ns.concurrency]
    return [LoadPoint(request_rate=r, burstiness=ns.burstiness,
                      max_concurrency=ns.max_concurrency) for r in ns.request_rate or [math.inf]]


def _server_model(base_url: str, headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    cards = r.json().get("data") or []
    if not cards:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return cards[0]


def _tokenizer(ns: argparse.Namespace, card: dict[str, Any], model: str,
               headers: dict[str, str]) -> datasets.Tokenizer | None:
    if ns.tokenizer:
        return datasets.LocalTokenizer(ns.tokenizer)
    root = card.get("root")
    if is_local(ns.base_url) and isinstance(root, str) and Path(root).is_dir():
        try:
            return datasets.LocalTokenizer(root)
        except (OSError, ValueError):
            pass
    return datasets.RemoteTokenizer.probe(ns.base_url, model, headers)


def build_requests(ns: argparse.Namespace, tok: datasets.Tokenizer | None) -> list[BenchRequest]:
    if ns.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if ns.dataset_name == "sharegpt":
        if not ns.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
        return datasets.sharegpt_requests(ns.dataset_path, ns.num_prompts, ns.seed, tok,
                                          ns.sharegpt_output_len)
    if tok is None and ns.api == "chat":
        raise ValueError("random prompts for the chat API need a tokenizer: give --tokenizer "
                         "PATH, or use a server with /tokenize")
    return datasets.random_requests(ns.num_prompts, ns.input_len, ns.output_len, ns.range_ratio,
                                    ns.seed, tok, prefix_len=ns.prefix_len,
                                    num_prefixes=ns.num_prefixes)


def run_bench(ns: argparse.Namespace) -> int:
    console = Console()
    if ns.compare:
        print_compare(ns.compare, ns.labels, ns.markdown, console)
        return 0
    slo = parse_slo(ns.slo)
    points = load_points(ns)
    api_key = ns.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        card = _server_model(ns.base_url, headers)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {ns.base_url}: {e}") from None
    model = ns.model or card["id"]
    tok = _tokenizer(ns, card, model, headers)
    requests = build_requests(ns, tok)
    ep = Endpoint(ns.base_url, model, ns.api, api_key, ns.ignore_eos, ns.temperature,
                  json.loads(ns.extra_body) if ns.extra_body else {})
    nvml = None
    if not ns.no_nvml and is_local(ns.base_url):
        from flatout.monitor.nvml import Nvml

        nvml = Nvml.open()
    err = Console(stderr=True)
    err.print(f"flatout bench: {len(requests)} requests per point against {ns.base_url} "
              f"({model}, {ns.api}); GPU samples: {'NVML' if nvml else 'server /metrics'}")
    result: dict[str, Any] = {
        "flatout_bench": 1, "command": shlex.join(["flatout", "bench", *sys.argv[2:]]),
        "base_url": ns.base_url, "model": model, "api": ns.api,
        "workload": {"dataset": ns.dataset_name, "input_len": ns.input_len,
                     "output_len": ns.output_len, "range_ratio": ns.range_ratio,
                     "prefix_len": ns.prefix_len, "num_prompts": ns.num_prompts,
                     "prompts": "text" if tok is not None else "token ids"},
        "runs": [],
    }
    progress = None if ns.no_progress else Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=False)
    if progress is not None:
        progress.start()
    try:
        for point in points:
            watch = Watch(ns.base_url, headers, ns.scrape_interval, nvml)
            run = run_point(point, requests, ep, seed=ns.seed, timeout=ns.timeout, slo=slo,
                            watch=watch, progress=progress)
            result["runs"].append(run)
    finally:
        if progress is not None:
            progress.stop()
    for run in result["runs"]:
        console.print(run_table(run))
        failed = [r for r in run["requests"] if not r["success"]]
        if failed:
            err.print(f"{len(failed)} requests failed; first error: {failed[0]['error']}",
                      markup=False)
    if len(result["runs"]) > 1:
        console.print(sweep_table(result["runs"]))
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(result, indent=1))
        err.print(f"wrote {ns.json}")
    if ns.report:
        from flatout.bench.report import write_report

        err.print(f"wrote {write_report(result, ns.report)}")
    return 0 if all(r["summary"]["completed"] for r in result["runs"]) else 1
