"""What every request handler shares: the engine client, the served model's names, the chat
renderer, the reasoning parser, the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flatout.engine.core_client import AsyncEngineClient, CoreReady
from flatout.server.chat import ChatRenderer
from flatout.server.errors import OpenAIError
from flatout.server.metrics import ServerMetrics
from flatout.server.reasoning import ReasoningParser


@dataclass
class ServerState:
    client: AsyncEngineClient
    ready: CoreReady
    served_model_names: list[str]  # the first is the id /v1/models reports and responses carry
    renderer: ChatRenderer
    reasoning: ReasoningParser | None
    metrics: ServerMetrics
    api_key: str | None = None
    started: float = field(default_factory=time.time)
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    def require_engine(self) -> None:
        if not self.client.is_alive:
            raise OpenAIError("the engine is not running", status=503)

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
