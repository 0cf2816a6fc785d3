"""`flatout serve`: bind the address, start the engine core process, then serve the OpenAI API
with uvicorn in this process.

The listening socket is bound before the model loads, so a taken port fails at once and
`--port 0` picks a free port (the banner says which).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

from flatout.cli import add_engine_args, engine_args_from
from flatout.server.reasoning import PARSER_NAMES


def add_serve_parser(sub: Any) -> None:
    """Register `flatout serve` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API over HTTP")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model id(s) the API answers to (default: the model folder's name)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (or text) replacing the checkpoint's own")
    p.add_argument("--reasoning-parser", default="auto", choices=PARSER_NAMES,
                   help="split <think>...</think> into reasoning_content (auto: from the model)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FLATOUT_API_KEY)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.set_defaults(func=run_serve)


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
    return [
        f"flatout {_version()} serving {state.model_name!r} on {url} (OpenAI API under /v1)",
        f"  model     {mc.model} ({mc.architecture}), dtype {mc.dtype}, device {ready.device}, "
        f"max_model_len {mc.max_model_len}",
        f"  KV cache  {cc.num_blocks} blocks x {cc.block_size} = {cache_tokens} tokens = "
        f"{cache_tokens / mc.max_model_len:.1f} concurrent sequences at max length",
        f"  chat      template: {state.renderer.source}; reasoning parser: {parser}",
        f"  startup   {startup_seconds:.1f} s (model load {ready.load_seconds:.1f} s)",
    ]


def _version() -> str:
    import flatout

    return flatout.__version__


def run_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from flatout.engine.core_client import AsyncEngineClient, EngineDeadError
    from flatout.server.app import build_app
    from flatout.server.chat import ChatRenderer, load_template_override, resolve_chat_template
    from flatout.server.metrics import ServerMetrics
    from flatout.server.reasoning import choose_reasoning_parser
    from flatout.server.state import ServerState

    start = time.monotonic()
    args = engine_args_from(ns)
    api_key = ns.api_key or os.environ.get("FLATOUT_API_KEY") or None
    if ns.chat_template is not None:
        load_template_override(ns.chat_template)  # a bad file fails before the model loads
    sock = bind_socket(ns.host, ns.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    client = AsyncEngineClient(args)
    try:
        ready = client.start()
    except EngineDeadError as e:
        sock.close()
        client.shutdown()
        print(f"flatout: error: {e}", file=sys.stderr)
        return 1
    try:
        mc = ready.model_config
        template, source = resolve_chat_template(ns.chat_template, client.tokenizer,
                                                 mc.architecture)
        parser = choose_reasoning_parser(ns.reasoning_parser, architecture=mc.architecture,
                                         chat_template=template, tokenizer=client.tokenizer)
        names = ns.served_model_name or [default_model_name(mc.model)]
        state = ServerState(
            client=client, ready=ready, served_model_names=names,
            renderer=ChatRenderer(client.tokenizer, template, source), reasoning=parser,
            metrics=ServerMetrics(lambda: client.stats, names[0]), api_key=api_key,
        )
    except BaseException:
        client.shutdown()
        sock.close()
        raise

    def on_ready() -> None:
        print("\n".join(banner_lines(state, url, time.monotonic() - start)), flush=True)

    app = build_app(state, on_ready=on_ready)
    config = uvicorn.Config(app, log_level=ns.uvicorn_log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0

