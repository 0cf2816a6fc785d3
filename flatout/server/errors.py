"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Client mistakes are 4xx with type `invalid_request_error` (or `authentication_error`); only a
failure of the server itself (a dead engine) is 5xx.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flatout.engine.core_client import EngineDeadError
from flatout.engine.llm_engine import RequestError
from flatout.sampling_params import SamplingParamsError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "invalid_request_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (default: 400 invalid_request_error)."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None,
        code: str | None = None, type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        if type is None:
            type = _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else
                                       "server_error")
        self.type = type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_validation_error(e: ValidationError) -> OpenAIError:
    """The first problem pydantic found, with the field path as `param`."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return OpenAIError(f"request body is not valid JSON: {err['msg']}", code="json_invalid")
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "missing":
        return OpenAIError(f"missing required field {param!r}", param=param, code="missing")
    where = f"{param}: " if param else "request body: "
    value = err.get("input")
    got = "" if err["type"] == "model_type" else f" (got {json.dumps(value, default=str)[:80]})"
    return OpenAIError(f"{where}{err['msg']}{got}", param=param, code="invalid_type")


def to_openai_error(e: BaseException) -> OpenAIError:
    """Map the exceptions our request path raises to the error a client sees."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValidationError):
        return from_validation_error(e)
    if isinstance(e, SamplingParamsError):
        return OpenAIError(str(e), param=e.field, code="invalid_value")
    if isinstance(e, RequestError):
        msg = str(e)
        code = "context_length_exceeded" if "max_model_len" in msg or "KV cache" in msg else None
        return OpenAIError(msg, code=code)
    if isinstance(e, EngineDeadError):
        return OpenAIError(f"the engine is not running: {e}", status=503)
    if isinstance(e, ValueError):  # any other validation our engine does on user input
        return OpenAIError(str(e))
    log.exception("unexpected error while serving a request", exc_info=e)
    return OpenAIError(f"internal error: {type(e).__name__}", status=500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return OpenAIError(str(e.detail), status=e.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        return to_openai_error(e).response()
