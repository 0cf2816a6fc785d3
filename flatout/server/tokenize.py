"""`POST /tokenize` and `POST /detokenize`, shaped as vLLM's, with the served model's tokenizer.

Load generators use them to build prompts of an exact token count against a remote server.

    /tokenize   {"prompt": "text", "add_special_tokens": true}        -> {"count", "max_model_len",
                {"messages": [...], "add_generation_prompt": true}        "tokens"}
    /detokenize {"tokens": [1, 2, 3]}                                  -> {"prompt": "text"}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from flatout.server.errors import OpenAIError, from_validation_error
from flatout.server.state import ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise from_validation_error(e) from None


def _tokenizer(state: ServerState) -> Any:
    if state.tokenizer is None:
        raise OpenAIError("this model has no tokenizer", code="no_tokenizer")
    return state.tokenizer


def add_tokenize_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = await _parse(request, TokenizeRequest)
        state.check_model(req.model)
        tok = _tokenizer(state)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = state.renderer.render(req.messages,
                                         add_generation_prompt=req.add_generation_prompt,
                                         template_kwargs=req.chat_template_kwargs)
            ids = state.renderer.encode(text)
        else:
            ids = list(tok.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        return JSONResponse({"count": len(ids), "tokens": ids,
                             "max_model_len": state.client.model_config.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = await _parse(request, DetokenizeRequest)
        state.check_model(req.model)
        vocab = state.client.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is outside the vocabulary [0, {vocab})",
                              param="tokens")
        return JSONResponse({"prompt": _tokenizer(state).decode(req.tokens)})
