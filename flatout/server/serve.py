"""`flatout serve`: bind the address, start the engine core process, then serve the OpenAI API
with uvicorn in this process.

The listening socket is bound before the model loads, so a taken port fails at once and
`--port 0` picks a free port (the banner says which). Exit status: 0 after a drained shutdown
(SIGTERM/SIGINT, also while loading), 1 when the engine died (or failed to start) and was not
restarted, 2 for bad arguments, 128 + the signal's number when a second signal cut the drain
short.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from flatout.config import engine_args_from

log = logging.getLogger(__name__)


# The API process's threads that do CPU work (building a large response, tokenising a large
# prompt) hand the GIL back to the event loop every SWITCH_INTERVAL_S instead of Python's 5 ms:
# each time the loop returns from a system call (accept, read, write, epoll) it waits for the
# GIL, so one /health request of a dozen such waits took 30-60 ms behind a busy thread.
SWITCH_INTERVAL_S = 0.0005


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def default_model_name(model_path: str) -> str:
    return os.path.basename(os.path.normpath(model_path)) or model_path


def banner_lines(state: Any, url: str, startup_seconds: float) -> list[str]:
    ready = state.ready
    mc, cc = ready.model_config, ready.cache_config
    cache_tokens = cc.num_blocks * cc.block_size
    parser = state.reasoning.name if state.reasoning else "none"
    kv_dtype = "float8_e4m3fn" if cc.cache_dtype == "fp8" else mc.dtype
    return [
        f"flatout {_version()} serving {state.model_name!r} on {url} (OpenAI API under /v1)",
        f"  model     {mc.model} ({mc.architecture}), dtype {mc.dtype}, device {ready.device}, "
        f"max_model_len {mc.max_model_len}",
        f"  KV cache  {cc.num_blocks} blocks x {cc.block_size} = {cache_tokens} tokens = "
        f"{cache_tokens / mc.max_model_len:.1f} concurrent sequences at max length, in {kv_dtype}",
        f"  chat      template: {state.renderer.source}; reasoning parser: {parser}",
        f"  limits    {state.admission.max_waiting} waiting sequences, request timeout "
        f"{_duration(state.admission.request_timeout)}",
        f"  startup   {startup_seconds:.1f} s (model load {ready.load_seconds:.1f} s)",
    ]


def _duration(seconds: float | None) -> str:
    return "none" if not seconds else f"{seconds:g} s"


class _Interrupted(Exception):
    """SIGTERM while the model was loading."""


def _interrupted(sig: int, frame: object) -> None:
    raise _Interrupted


def _version() -> str:
    import flatout

    return flatout.__version__


def run_serve(ns: argparse.Namespace) -> int:
    from flatout.engine.async_client import AsyncEngineClient
    from flatout.engine.messages import EngineDeadError

    start = time.monotonic()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.WARNING)
    logging.getLogger("flatout").setLevel(logging.INFO)  # flatout's own notes, e.g. shutdown
    args = engine_args_from(ns)
    for flag in ("max_waiting_requests", "max_request_body_bytes"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    _json_flag(ns, "limit_mm_per_prompt", _MM_LIMITS)  # bad flags fail before the model loads
    _json_flag(ns, "mm_processor_kwargs", _MM_PROCESSOR_KWARGS)
    media_fetcher(ns)
    if ns.chat_template is not None:
        from flatout.server.chat import load_template_override

        load_template_override(ns.chat_template)  # a bad file fails before the model loads
    from flatout.server.connections import ConnectionLimits, raise_open_file_limit

    limits = ConnectionLimits(  # checked before the model loads
        timeout_keep_alive=ns.timeout_keep_alive, timeout_request_header=ns.timeout_request_header,
        timeout_request_body=ns.timeout_request_body, limit_concurrency=ns.limit_concurrency)
    raise_open_file_limit()
    sock = bind_socket(ns.host, ns.port)
    client = AsyncEngineClient(args, max_backlog_bytes=ns.max_stream_backlog_bytes,
                                freeze_heap=True)
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        client.start()
    except (_Interrupted, KeyboardInterrupt):
        client.shutdown()
        sock.close()
        return 0
    except EngineDeadError as e:
        sock.close()
        client.shutdown()
        print(f"flatout: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        return _serve(ns, client, sock, start, limits)
    finally:
        client.shutdown()  # no-op when the server's shutdown has stopped it
        sock.close()


def _serve(ns: argparse.Namespace, client: Any, sock: socket.socket, start: float,
           limits: Any) -> int:
    import uvicorn

    from flatout.server.admission import Admission
    from flatout.server.app import build_app
    from flatout.server.chat import ChatRenderer, resolve_chat_template
    from flatout.server.connections import (
        ConnectionCount,
        default_limit_concurrency,
        h11_protocol,
    )
    from flatout.server.limits import max_prompt_chars
    from flatout.server.logs import RateLimitFilter
    from flatout.server.metrics import ServerMetrics
    from flatout.server.reasoning import choose_reasoning_parser
    from flatout.server.state import ServerState
    from flatout.server.supervisor import FlatoutServer, Supervisor

    ready = client.ready
    mc = ready.model_config
    template, source = resolve_chat_template(ns.chat_template, client.tokenizer, mc.architecture)
    parser = choose_reasoning_parser(ns.reasoning_parser, architecture=mc.architecture,
                                     chat_template=template, tokenizer=client.tokenizer)
    tool_parser = None
    if ns.enable_auto_tool_choice:
        from flatout.server.tool_parsers import get_tool_parser

        if ns.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        tool_parser = get_tool_parser(ns.tool_call_parser, mc.architecture)
    names = ns.served_model_name or [default_model_name(mc.model)]
    metrics = ServerMetrics(lambda: client.stats, names[0])

    admission = Admission(
        metrics.registry, max_waiting=ns.max_waiting_requests or 4 * ns.max_num_seqs,
        request_timeout=ns.request_timeout or None, engine_problem=client.problem)
    placeholder, media = _image_settings(ns, client)
    state = ServerState(
        client=client, ready=ready, served_model_names=names,
        image_placeholder=placeholder, media=media,
        content_format=ns.chat_template_content_format,
        renderer=ChatRenderer(client.tokenizer, template, source), reasoning=parser,
        tool_parser=tool_parser, metrics=metrics, admission=admission,
        api_key=ns.api_key or os.environ.get("FLATOUT_API_KEY") or None,
        max_prompt_chars=max_prompt_chars(client.tokenizer, mc.max_model_len)
        if client.tokenizer is not None else None,
    )
    supervisor = Supervisor(state, restart_engine=ns.restart_engine,
                            step_timeout=ns.engine_step_timeout or None,
                            shutdown_timeout=ns.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def on_ready() -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # what startup built (tokenizer, app, libraries) lives as long as the process: keep it
        # out of the collector's full passes, which would otherwise scan it all and stall the
        # event loop for a large fraction of a second under a burst of connections
        gc.freeze()
        print("\n".join(banner_lines(state, url, time.monotonic() - start)), flush=True)

    count = ConnectionCount()
    max_connections = limits.limit_concurrency or default_limit_concurrency()
    app = build_app(state, supervisor, on_ready=on_ready,
                    max_body_bytes=ns.max_request_body_bytes, allowed_hosts=ns.allowed_hosts,
                    limit_concurrency=(max_connections, count))
    config = uvicorn.Config(app,
                            http=h11_protocol(limits, count), log_level=ns.uvicorn_log_level,
                            access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=limits.timeout_keep_alive)
    logging.getLogger("uvicorn.error").addFilter(RateLimitFilter())  # per-event lines
    FlatoutServer(config, supervisor).run(sockets=[sock])
    return supervisor.exit_code


_MM_LIMITS = ("image",)
_MM_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")


def _json_flag(ns: argparse.Namespace, name: str, allowed: tuple[str, ...]) -> dict[str, int]:
    """A JSON-object flag whose keys are `allowed` with positive integer values."""
    flag = "--" + name.replace("_", "-")
    raw = getattr(ns, name)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not JSON ({e})") from None
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise ValueError(f"{flag}: a JSON object with keys among {sorted(allowed)}")
    for k, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{flag}: {k} must be a non-negative integer (got {v!r})")
    return value


def media_fetcher(ns: argparse.Namespace) -> Any:
    """The fetcher of http(s) image URLs the flags describe (ValueError naming a bad flag)."""
    from flatout.server.media_fetch import MediaFetcher, parse_allowed_domains

    return MediaFetcher(parse_allowed_domains(ns.allowed_media_domains),
                        timeout=ns.media_fetch_timeout, max_bytes=ns.max_media_fetch_bytes)


def _image_settings(ns: argparse.Namespace, client: Any) -> tuple[str | None, Any]:
    """The prompt text of one image (None: the model takes no images) and the media policy;
    the flags' limits also go to the client's input processor, which enforces them again."""
    from pathlib import Path

    from flatout.server.media import MediaPolicy

    limits = _json_flag(ns, "limit_mm_per_prompt", _MM_LIMITS)
    pixels = _json_flag(ns, "mm_processor_kwargs", _MM_PROCESSOR_KWARGS)
    local = ns.allowed_local_media_path
    if local is not None and not Path(local).is_dir():
        raise ValueError(f"--allowed-local-media-path: no such directory: {local}")
    media = MediaPolicy(allowed_local_media_path=Path(local) if local else None,
                        fetcher=media_fetcher(ns))
    inputs = client.inputs
    if "image" in limits:
        media.max_images_per_prompt = inputs.max_images_per_prompt = limits["image"]
    model = client.ready.model_config
    if pixels and model.eva_vision is not None:
        s = model.eva_vision.image_size
        raise ValueError(f"--mm-processor-kwargs: {model.model} resizes every image to its "
                         f"fixed {s}x{s}; it takes no pixel range")
    inputs.min_pixels = pixels.get("min_pixels", inputs.min_pixels)
    inputs.max_pixels = pixels.get("max_pixels", inputs.max_pixels)
    placeholder = inputs.image_placeholder
    if placeholder is None and (model.vision is not None or model.eva_vision is not None):
        log.warning("the tokenizer does not spell the image tokens as single tokens: image "
                    "parts will be refused")
    return placeholder, media
