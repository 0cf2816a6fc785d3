"""`POST /tokenize` and `POST /detokenize`, shaped as vLLM's, with the served model's tokenizer.

Load generators use them to build prompts of an exact token count against a remote server.

    /tokenize   {"prompt": "text", "add_special_tokens": true}        -> {"count", "max_model_len",
                {"messages": [...], "add_generation_prompt": true}        "tokens"}
    /detokenize {"tokens": [1, 2, 3]}                                  -> {"prompt": "text"}

Both take the /v1 endpoints' path: the same strict bodies, the same limits (a prompt longer than
any that fits the context is refused before it is tokenized), the same chat rendering (so a
conversation counts exactly the tokens chat would send), and large bodies are parsed and
tokenized in the preparation thread rather than on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from flatout.server.errors import OpenAIError
from flatout.server.limits import OFFLOAD_BYTES, check_prompt_chars
from flatout.server.protocol import DetokenizeRequest, TokenizeRequest
from flatout.server.serving_chat import render_chat_prompt
from flatout.server.state import ServerState


def _tokenizer(state: ServerState) -> Any:
    if state.tokenizer is None:
        raise OpenAIError("this model has no tokenizer", code="no_tokenizer")
    return state.tokenizer


def tokenize(state: ServerState, req: TokenizeRequest) -> dict[str, Any]:
    state.check_model(req.model)
    tok = _tokenizer(state)
    if (req.prompt is None) == (req.messages is None):
        raise OpenAIError("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        text = render_chat_prompt(state, req)
        special = bool(req.add_special_tokens)  # the template wrote them already
    else:
        assert req.prompt is not None
        text = req.prompt
        check_prompt_chars(text, state.max_prompt_chars, "prompt")
        special = req.add_special_tokens is not False
    ids = list(tok.encode(text, add_special_tokens=special))
    return {"count": len(ids), "tokens": ids,
            "max_model_len": state.client.model_config.max_model_len}


def detokenize(state: ServerState, req: DetokenizeRequest) -> dict[str, Any]:
    state.check_model(req.model)
    tok = _tokenizer(state)
    vocab = state.client.model_config.vocab_size
    bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
    if bad is not None:
        raise OpenAIError(f"tokens.{bad}: token id {req.tokens[bad]} is outside the vocabulary "
                          f"[0, {vocab})", param=f"tokens.{bad}", code="invalid_value")
    return {"prompt": tok.decode(req.tokens)}


def add_tokenize_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        req, size = await state.parse(request, TokenizeRequest)
        return JSONResponse(await state.prepare(tokenize, state, req,
                                                offload=size > OFFLOAD_BYTES))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> JSONResponse:
        req, size = await state.parse(request, DetokenizeRequest)
        return JSONResponse(await state.prepare(detokenize, state, req,
                                                offload=size > OFFLOAD_BYTES))
