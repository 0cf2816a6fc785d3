"""/openapi.json: what the server accepts and answers, precisely enough to fuzz it.

The handlers parse their bodies themselves (for OpenAI-shaped errors and size limits), so FastAPI
cannot see the request models; this fills in each endpoint's request body schema, its responses
(bodies of the JSON ones, the SSE stream's media type) and every error status it can answer, all
in OpenAI's error shape. A fuzzer (schemathesis) can then check the server against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from flatout.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)


# -- response bodies (documentation only) -----------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class AssistantMessage(BaseModel):
    role: str
    content: str | None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class Completion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class Tokens(BaseModel):
    count: int
    tokens: list[int]
    max_model_len: int


class Text(BaseModel):
    prompt: str


class Status(BaseModel):
    status: str


class Version(BaseModel):
    version: str


_ERRORS = {
    "400": "Invalid request (the error names the field in `param`).",
    "401": "Missing or wrong API key.",
    "404": "Unknown model, or no such path.",
    "405": "Method not allowed on this path.",
    "413": "Request body larger than --max-request-body-bytes.",
    "415": "Request body not sent as Content-Type: application/json.",
    "500": "The engine refused a request it had accepted (a bug: please report it).",
    "503": "Overloaded (queue full), shutting down, or the engine is not running; see "
           "Retry-After.",
    "504": "The request ran past --request-timeout.",
}
# (path, request body, 200 body, one event of the SSE stream sent with stream: true)
_Model = type[BaseModel]
_GENERATION: tuple[tuple[str, _Model, _Model, _Model], ...] = (
    ("/v1/chat/completions", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk),
    ("/v1/completions", CompletionRequest, Completion, CompletionChunk),
)
_GETS: dict[str, _Model] = {"/v1/models": ModelList, "/health": Status, "/version": Version}
_TOKENIZE: tuple[tuple[str, _Model, _Model], ...] = (
    ("/tokenize", TokenizeRequest, Tokens), ("/detokenize", DetokenizeRequest, Text))


def install_openapi(app: FastAPI, *, api_key_required: bool,
                    public_paths: frozenset[str] = frozenset()) -> None:
    """Serve the schema described above; with an API key, every path but `public_paths` is
    documented as needing it."""
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title="flatout", version=app.version, routes=app.routes,
                             description="OpenAI-compatible API of a flatout server.")
        components = schema.setdefault("components", {}).setdefault("schemas", {})

        def ref(model: type[BaseModel]) -> dict[str, str]:
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[model.__name__] = s
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        error = {"application/json": {"schema": ref(ErrorResponse)}}

        def errors(*codes: str) -> dict[str, Any]:
            return {c: {"description": _ERRORS[c], "content": error} for c in codes}

        def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
            """An event of the stream: `data:` holds a chunk, an error, or `[DONE]` last."""
            json_data = {"type": "string", "contentMediaType": "application/json",
                         "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]}}
            return {"type": "object", "required": ["data"], "properties": {
                "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}

        paths = schema["paths"]
        for path, request, response, chunk in _GENERATION:
            op = paths[path]["post"]
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(request)}}}
            op["responses"] = {
                "200": {"description": "The completion; with `stream: true`, server-sent events "
                        "(`data: {chunk}` lines, then `data: [DONE]`).",
                        "content": {"application/json": {"schema": ref(response)},
                                    "text/event-stream": {"schema": sse_event(chunk)}}},
                **errors("400", "404", "405", "413", "415", "500", "503", "504"),
            }
        for path, request, response in _TOKENIZE:
            op = paths[path]["post"]
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(request)}}}
            op["responses"] = {"200": {"description": "OK", "content": {
                "application/json": {"schema": ref(response)}}}}
        for path, response in _GETS.items():
            op = paths[path]["get"]
            op["responses"] = {"200": {"description": "OK", "content": {
                "application/json": {"schema": ref(response)}}}}
            if path == "/health":
                op["responses"].update(errors("503"))
        paths["/metrics"]["get"]["responses"] = {"200": {
            "description": "Prometheus metrics.", "content": {"text/plain": {
                "schema": {"type": "string"}}}}}
        for path, ops in paths.items():
            for method, op in ops.items():
                if method == "post":  # other routes that parse JSON bodies themselves
                    op.setdefault("requestBody", {"required": True, "content": {
                        "application/json": {"schema": {"type": "object"}}}})
                    for code, resp in errors("400", "404", "405", "413", "415", "503").items():
                        op["responses"].setdefault(code, resp)
                op["responses"].update(errors("405"))
                if api_key_required and path not in public_paths:
                    op["security"] = [{"bearer": []}]
                    op["responses"].update(errors("401"))
        if api_key_required:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                  "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
