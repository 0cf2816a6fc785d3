"""The FastAPI application: routes, API-key check, error shapes, engine attach on startup."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import flatout
from flatout.server.connections import ConcurrencyLimit, ConnectionCount
from flatout.server.defaults import DEFAULT_MAX_BODY_BYTES
from flatout.server.errors import (
    OpenAIError,
    install_error_handlers,
    to_openai_error,
)
from flatout.server.limits import OFFLOAD_BYTES, BodySizeLimit
from flatout.server.metrics import HTTPMetricsMiddleware
from flatout.server.openapi import install_openapi
from flatout.server.protocol import ChatCompletionRequest, CompletionRequest
from flatout.server.request_guards import RequestGuards
from flatout.server.responses import ClientDisconnected
from flatout.server.serving_chat import create_chat_completion
from flatout.server.serving_completion import create_completion
from flatout.server.state import ServerState
from flatout.server.supervisor import Supervisor
from flatout.server.tokenize import add_tokenize_routes

_CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; nobody reads it


PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json"})


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every path but PUBLIC_PATHS (the API under /v1,
    /tokenize, ...). The header and the key are compared as SHA-256 digests with
    hmac.compare_digest: in constant time, leaking not even the key's length."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in PUBLIC_PATHS:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(hashlib.sha256(got).digest(), self.expected):
                err = OpenAIError(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    status=401, code="invalid_api_key",
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _answer(work: Awaitable[Response]) -> Response:
    """Await a handler; any exception becomes the OpenAI error a client should see."""
    try:
        return await work
    except (OpenAIError, ClientDisconnected):
        raise
    except Exception as e:
        raise to_openai_error(e) from e


def build_app(
    state: ServerState, supervisor: Supervisor | None = None,
    on_ready: Callable[[], None] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_hosts: list[str] | None = None,
    limit_concurrency: tuple[int, ConnectionCount] | None = None,
) -> FastAPI:
    """The API over a started engine client; the engine's outputs are routed into the server's
    event loop when it starts, and the engine is shut down with the server. The supervisor
    (engine death and hangs, draining) runs while the server does. `limit_concurrency`: the
    most connections (and the count the protocol keeps) above which requests get a 503."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        state.client.attach(loop)
        if supervisor is not None:
            supervisor.start(loop)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            if supervisor is not None:
                await supervisor.stop()
            await asyncio.to_thread(state.client.shutdown)

    app = FastAPI(title="flatout", version=flatout.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.flatout = state
    install_error_handlers(app)
    add_tokenize_routes(app, state)  # /tokenize, /detokenize (load generators use them)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, size = await state.parse(request, ChatCompletionRequest)
        return await _answer(create_chat_completion(state, req, request,
                                                    offload=size > OFFLOAD_BYTES))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, size = await state.parse(request, CompletionRequest)
        return await _answer(create_completion(state, req, request,
                                               offload=size > OFFLOAD_BYTES))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        mc = state.client.model_config
        cards = [
            {"id": name, "object": "model", "created": int(state.started), "owned_by": "flatout",
             "root": mc.model, "max_model_len": mc.max_model_len}
            for name in state.served_model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/health")
    async def health() -> Response:
        problem = state.admission.unavailable()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return OpenAIError(problem, status=503).response()

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": flatout.__version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=prom.CONTENT_TYPE_LATEST)

    install_openapi(app, api_key_required=bool(state.api_key), public_paths=PUBLIC_PATHS)
    # outermost last: metrics see every response (the 503s over the connection limit too), the
    # key is checked before any body is read, the Host and Content-Type before the key
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)
    app.add_middleware(RequestGuards, allowed_hosts=allowed_hosts)
    if limit_concurrency is not None:
        limit, count = limit_concurrency
        app.add_middleware(ConcurrencyLimit, limit=limit, count=count)
    app.add_middleware(HTTPMetricsMiddleware, metrics=state.metrics)
    return app
