"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Client mistakes are 4xx with type `invalid_request_error` (or `authentication_error`); only a
failure of the server itself (a dead engine) is 5xx.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flatout.engine.messages import (
    EngineDeadError,
    EngineRequestError,
    RequestError,
    RequestFieldError,
    RequestTimeoutError,
)
from flatout.sampling_params import SamplingParamsError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what 503s advise; the queue turns over in well under a second at load

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "invalid_request_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# pydantic error types that mean "right type, value out of range": code invalid_value
_RANGE_ERRORS = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
    "too_short", "too_long", "string_too_short", "string_too_long", "literal_error", "enum",
})


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (default: 400 invalid_request_error)."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None,
        code: str | None = None, type: str | None = None,
        headers: Mapping[str, str] | None = None,
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
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation_error(e: ValidationError) -> OpenAIError:
    """The first problem pydantic found, with the field path as `param`. Of a union's errors,
    one where the type matched and a range did not says more than "not a string"."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] in _RANGE_ERRORS), errors[0])
    if err["type"] == "json_invalid":
        return OpenAIError(f"request body is not valid JSON: {err['msg']}", code="json_invalid")
    param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
    if err["type"] == "missing":
        return OpenAIError(f"missing required field {param!r}", param=param, code="missing")
    where = f"{param}: " if param else "request body: "
    value = err.get("input")
    got = "" if err["type"] == "model_type" else f" (got {json.dumps(value, default=str)[:80]})"
    code = "invalid_value" if err["type"] in _RANGE_ERRORS else "invalid_type"
    return OpenAIError(f"{where}{err['msg']}{got}", param=param, code=code)


def _is_union_tag(loc: str | int) -> bool:
    """pydantic names a union's member in the error path ('str', 'list[int]', 'constrained-str');
    it is no field of the request."""
    return isinstance(loc, str) and ("[" in loc or "-" in loc or loc in _TYPE_NAMES)


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def to_openai_error(e: BaseException) -> OpenAIError:
    """Map the exceptions our request path raises to the error a client sees."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValidationError):
        return from_validation_error(e)
    if isinstance(e, SamplingParamsError):
        return OpenAIError(str(e), param=e.field, code="invalid_value")
    if isinstance(e, RequestFieldError):
        return OpenAIError(str(e), param=e.field, code="invalid_value")
    if isinstance(e, RequestError):
        msg = str(e)
        code = "context_length_exceeded" if "max_model_len" in msg or "KV cache" in msg else None
        return OpenAIError(msg, code=code)
    if isinstance(e, EngineDeadError):  # as admission's engine_unavailable: retry shortly
        return OpenAIError(f"the engine is not running: {e}", status=503,
                           code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, RequestTimeoutError):
        return OpenAIError("the request ran past the server's --request-timeout and was stopped",
                           status=504, code="request_timeout")
    if isinstance(e, EngineRequestError):
        return OpenAIError(str(e), status=500, code="engine_refused_request")
    if isinstance(e, ValueError):  # any other validation our engine does on user input
        return OpenAIError(str(e))
    # the traceback without the exception's message, which may quote a prompt
    log.error("unexpected %s while serving a request:\n%s", type(e).__name__,
              "".join(traceback.format_tb(e.__traceback__)))
    return OpenAIError(f"internal error: {type(e).__name__}", status=500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, e: OpenAIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return OpenAIError(str(e.detail), status=e.status_code, code=code,
                           headers=e.headers).response()  # e.g. 405's Allow

    @app.exception_handler(ClientDisconnect)
    async def _client_closed(_: Request, __: ClientDisconnect) -> Response:
        # the client hung up while its body was being read: nobody is left to answer, and
        # nothing went wrong here (no 500, no traceback in the log)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        return to_openai_error(e).response()
