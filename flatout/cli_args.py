"""The arguments of every `flatout` subcommand, and the engine flags shared by `generate`,
`serve` and the tensor-parallel worker.

This module imports only the standard library, `flatout.config`, `flatout.server.reasoning` and
`flatout.server.defaults` (plain Python), so building the parser (`flatout --help`,
`flatout SUB --help`) loads neither torch nor the server's or the bench's libraries; each command
imports those when it runs.
"""

from __future__ import annotations

import argparse

from flatout.config import (
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    add_engine_args,
    engine_args_from,
)
from flatout.server.defaults import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_MEDIA_FETCH_BYTES,
    DEFAULT_MAX_STREAM_BACKLOG,
    DEFAULT_MEDIA_FETCH_TIMEOUT,
    FD_RESERVE,
)
from flatout.server.reasoning import PARSER_NAMES
from flatout.server.tool_parsers import PARSERS as TOOL_PARSERS

__all__ = ["add_engine_args", "engine_args_from"]  # defined with EngineArgs, in flatout.config

def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 65535], got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {port}")
    return port


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("prompt", nargs="+", help="prompt text (several: one completion each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder or preset (glm-4-9b, ...; default: the demo model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"],
                   help="the device the dtype is resolved for (auto dtype: bf16 on cuda)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the KV cache's dtype the bytes per token are counted in")
    add_quantization_args(p)


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """--quantization / --quantize-lm-head as serve has them (plan, info)."""
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATION_METHODS),
                   help="count the decoder's linears as int8 / fp8 weights with fp32 "
                        "per-channel scales, or w4a16 4-bit weights with fp32 scales per "
                        "group of 128 (as `flatout serve --quantization` holds them)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantization: the LM head too")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (0: any free port)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model id(s) the API answers to (default: the model folder's name)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (or text) replacing the checkpoint's own")
    p.add_argument("--reasoning-parser", default="auto", choices=PARSER_NAMES,
                   help="split <think>...</think> into reasoning_content (auto: from the model)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="parse tool calls out of replies to requests with tools "
                   "(needs --tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, choices=["auto", *sorted(TOOL_PARSERS)],
                   help="the model's tool-call format (auto: from the checkpoint's architecture)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FLATOUT_API_KEY)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="answer only requests whose Host header names one of these (400 "
                   "otherwise; '.example.com' includes subdomains, '*' any): stops DNS-rebinding "
                   "pages from reaching a local server (default: no check)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--chat-template-content-format", default="string",
                   choices=["string", "openai"],
                   help="how list contents reach the template: one string (images as their "
                   "placeholder text) or OpenAI-style parts ({type: text|image}) for templates "
                   "that place images themselves")
    m = p.add_argument_group("images (vision models)")
    m.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow image_url parts naming local files under DIR (default: none)")
    m.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="fetch http(s) image URLs from these hosts ('.example.com' includes "
                   "subdomains, '*' any host); only a host listed by its exact name or address "
                   "may resolve to a loopback, private or link-local address; redirects are "
                   "followed to allowed hosts only (default: none, nothing is fetched)")
    m.add_argument("--media-fetch-timeout", type=_seconds, default=DEFAULT_MEDIA_FETCH_TIMEOUT,
                   metavar="SECONDS",
                   help="seconds one image fetch may take in all, redirects included "
                   f"(default {DEFAULT_MEDIA_FETCH_TIMEOUT:g})")
    m.add_argument("--max-media-fetch-bytes", type=int, default=DEFAULT_MAX_MEDIA_FETCH_BYTES,
                   metavar="BYTES",
                   help="largest fetched image in bytes; a larger one is abandoned as soon as "
                   f"it passes the limit (default {DEFAULT_MAX_MEDIA_FETCH_BYTES})")
    m.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                   help='images per request at most, e.g. \'{"image": 4}\' (default 8)')
    m.add_argument("--mm-processor-kwargs", default=None, metavar="JSON",
                   help='image resizing bounds, e.g. \'{"max_pixels": 5000000}\' '
                   "(min_pixels, max_pixels: the resized image's pixel range)")
    r = p.add_argument_group("reliability")
    r.add_argument("--max-waiting-requests", type=int, default=None,
                   help="most sequences waiting for their first token; more get 503 with "
                   "Retry-After (default: 4 x --max-num-seqs)")
    r.add_argument("--request-timeout", type=_seconds, default=None,
                   help="stop a request after this many seconds (504; default: no limit)")
    r.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (default 30)")
    r.add_argument("--restart-engine", action="store_true",
                   help="restart the engine core if it dies (default: the server exits 1)")
    r.add_argument("--engine-step-timeout", type=_seconds, default=120.0,
                   help="treat the engine as hung (kill it) after this many seconds without a "
                   "step while requests run (default 120; 0: never)")
    r.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    c = p.add_argument_group("connections")
    c.add_argument("--timeout-keep-alive", type=_seconds, default=5.0,
                   help="close a connection that sends no byte of a request for this many "
                   "seconds, from its start or after a response (default 5)")
    c.add_argument("--timeout-request-header", type=_seconds, default=10.0,
                   help="close a connection whose request head (request line and headers) "
                   "takes longer than this many seconds to arrive (default 10)")
    c.add_argument("--timeout-request-body", type=_seconds, default=30.0,
                   help="close a connection whose request body takes longer than this many "
                   "seconds to arrive after its head (default 30)")
    c.add_argument("--limit-concurrency", type=int, default=None,
                   help="answer 503 to requests while the server holds more connections than "
                   f"this, idle ones included (default: the open-file limit, raised to its "
                   f"hard limit at startup, less {FD_RESERVE})")
    c.add_argument("--max-stream-backlog-bytes", type=int, default=DEFAULT_MAX_STREAM_BACKLOG,
                   help="abort a streamed request whose client falls this many bytes (as "
                   "estimated from the outputs waiting for it) behind; it counts as aborted "
                   f"(default {DEFAULT_MAX_STREAM_BACKLOG})")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or preset (glm-4-9b, ...)")
    p.add_argument("--gpus", required=True, help="e.g. 2x24GB, 4x80GiB, 2xH100, H200")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=None,
                   help="tensor-parallel size (default: all the GPUs)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--context", type=int, default=None,
                   help="context length for the concurrency figure (default: max-model-len)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-bandwidth", type=float, default=None, help="GB/s per GPU")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto (the model's dtype) or fp8 (float8 e4m3: one byte per value, "
                   "twice bf16's tokens)")
    add_quantization_args(p)


def add_bench_args(p: argparse.ArgumentParser) -> None:
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
    w.add_argument("--images-per-request", type=int, default=None,
                   help="synthetic screenshots per request, sent as image_url parts before the "
                        "text (needs --api chat; default 1 when --image-size is given)")
    w.add_argument("--image-size", default=None, metavar="WxH",
                   help="screenshot size in pixels (default 1080x2400 when "
                        "--images-per-request is given)")
    w.add_argument("--image-format", choices=["png", "jpeg", "webp"], default="png")
    w.add_argument("--num-unique-images", type=int, default=None,
                   help="distinct screenshots, sent in turn (default: every image differs)")
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


def add_top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--window", type=float, default=60.0, help="seconds of latency history")
    p.add_argument("--once", action="store_true",
                   help="scrape twice, --interval apart, print one screen and exit")
