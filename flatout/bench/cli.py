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

from flatout.bench import datasets, images
from flatout.bench.client import BenchRequest, Endpoint
from flatout.bench.metrics import parse_slo
from flatout.bench.output import print_compare, run_table, sweep_table
from flatout.bench.runner import LoadPoint, run_point
from flatout.bench.watch import Watch, is_local


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
        if ns.images_per_request is not None or ns.image_size is not None:
            raise ValueError("--images-per-request / --image-size go with the random dataset")
        return datasets.sharegpt_requests(ns.dataset_path, ns.num_prompts, ns.seed, tok,
                                          ns.sharegpt_output_len)
    if tok is None and ns.api == "chat":
        raise ValueError("random prompts for the chat API need a tokenizer: give --tokenizer "
                         "PATH, or use a server with /tokenize")
    reqs = datasets.random_requests(ns.num_prompts, ns.input_len, ns.output_len, ns.range_ratio,
                                    ns.seed, tok, prefix_len=ns.prefix_len,
                                    num_prefixes=ns.num_prefixes)
    if ns.images_per_request is not None or ns.image_size is not None:
        add_images(reqs, ns)
    return reqs


def add_images(reqs: list[BenchRequest], ns: argparse.Namespace) -> None:
    """Give each request `--images-per-request` synthetic screenshots (encoded before the run)."""
    per = 1 if ns.images_per_request is None else ns.images_per_request
    if per < 1:
        raise ValueError("--images-per-request must be >= 1")
    if ns.api != "chat":
        raise ValueError("--images-per-request / --image-size need --api chat (images travel as "
                         "image_url content parts)")
    spec = images.ImageSpec.parse(ns.image_size or "1080x2400", ns.image_format)
    urls = images.screenshot_urls(spec, per * len(reqs), ns.seed, ns.num_unique_images)
    for i, req in enumerate(reqs):
        req.images = urls[i * per:(i + 1) * per]


def run_bench(ns: argparse.Namespace) -> int:
    """`flatout bench` (its arguments: flatout.cli_args.add_bench_args)."""
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
    image_info = None
    if requests[0].images:
        image_info = {"per_request": len(requests[0].images),
                      "size": ns.image_size or "1080x2400", "format": ns.image_format}
    result: dict[str, Any] = {
        "flatout_bench": 1, "command": shlex.join(["flatout", "bench", *sys.argv[2:]]),
        "base_url": ns.base_url, "model": model, "api": ns.api,
        "workload": {"dataset": ns.dataset_name, "input_len": ns.input_len,
                     "output_len": ns.output_len, "range_ratio": ns.range_ratio,
                     "prefix_len": ns.prefix_len, "num_prompts": ns.num_prompts,
                     "prompts": "text" if tok is not None else "token ids",
                     "images": image_info},
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
        client = run.get("client") or {}
        if client.get("saturated"):
            err.print(f"{run['label']}: the load tester's event loop used "
                      f"{100 * client['loop_cpu_perc']:.0f} % of a core: it may be the limit "
                      "(split the load over several `flatout bench` processes)", markup=False)
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
