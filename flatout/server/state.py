"""What every request handler shares: the engine client, the served model's names, the chat
renderer, the reasoning parser, the metrics, admission control."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from flatout.engine.async_client import AsyncEngineClient
from flatout.engine.messages import CoreReady
from flatout.server.admission import Admission
from flatout.server.chat import ChatRenderer
from flatout.server.errors import OpenAIError
from flatout.server.large_json import ResponseBuilder
from flatout.server.limits import OFFLOAD_BYTES
from flatout.server.media import MediaPolicy
from flatout.server.metrics import ServerMetrics
from flatout.server.protocol import validate_body
from flatout.server.reasoning import ReasoningParser
from flatout.server.tool_parsers import ToolParser

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)


@dataclass
class ServerState:
    client: AsyncEngineClient
    ready: CoreReady
    served_model_names: list[str]  # the first is the id /v1/models reports and responses carry
    renderer: ChatRenderer
    reasoning: ReasoningParser | None
    metrics: ServerMetrics
    admission: Admission
    api_key: str | None = None
    tool_parser: ToolParser | None = None  # --enable-auto-tool-choice
    max_prompt_chars: int | None = None  # longer prompts cannot fit (see limits.py)
    # vision models: the template text of one image and where images may come from
    image_placeholder: str | None = None
    content_format: str = "string"  # --chat-template-content-format
    media: MediaPolicy = field(default_factory=MediaPolicy)
    started: float = field(default_factory=time.time)
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)
    # one thread renders and tokenizes large requests, so the event loop keeps streaming
    _prepare_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="flatout-prepare"),
        repr=False)
    # builds non-streamed responses, the large ones off the event loop (large_json.py)
    responses: ResponseBuilder = field(default_factory=ResponseBuilder, repr=False)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    async def prepare(self, fn: Callable[..., T], *args: Any, offload: bool) -> T:
        """Run a request's synchronous preparation (template, tokenization, validation): in the
        preparation thread when `offload` (a large body), else inline (no thread hop)."""
        if not offload:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def parse(self, request: Request, model: type[B]) -> tuple[B, int]:
        """The request's body validated as `model` (a 400 naming the field otherwise) and its
        size in bytes. A body over OFFLOAD_BYTES is parsed in the preparation thread, as the
        rest of its preparation is. The body is gathered into one growing buffer as it arrives
        (joining megabytes of pieces at the end would be one long copy on the event loop).
        Note: pydantic's validator holds the GIL for most of a parse, so a body of tens of MB
        still delays the event loop by about its parse time (a good part of a second for
        64 MB); --max-request-body-bytes (8 MiB by default) bounds that."""
        body = bytearray()
        async for piece in request.stream():
            body += piece
        parsed = await self.prepare(validate_body, model, body, offload=len(body) > OFFLOAD_BYTES)
        return parsed, len(body)

    def check_model(self, requested: str | None) -> str:
        """The model id to answer with (the name the client used, if it is one of ours);
        404 for a name this server does not serve."""
        if not requested:
            return self.model_name
        if requested in self.served_model_names:
            return requested
        raise OpenAIError(
            f"The model `{requested}` does not exist. This server serves "
            f"{', '.join(repr(n) for n in self.served_model_names)}.",
            status=404, param="model", code="model_not_found",
        )

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (with special tokens), as logprobs report tokens."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.tokenizer
            if tok is None:
                text = f"token_id:{token_id}"
            else:
                text = tok.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text
