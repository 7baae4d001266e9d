"""Errors answered in OpenAI's format, and :func:`api_error`, the one place that says how an exception is answered.

Every path of the server goes through it: a request refused before decoding, the first event of a stream (checked
before the first byte is sent), an error inside a stream's body (sent as an event), and any exception that escapes a
route. Nothing else turns exceptions into statuses.
"""

from __future__ import annotations

import logging
import math

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sirllm_agents import ContextOverflowError, EngineBusyError, SessionBusyError, SessionStoreUnavailable

from .schemas import ErrorBody, ErrorDetail

log = logging.getLogger("sirllm_agents.server")

CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection before the answer


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}, "request_id"}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def retry_later(cls, status: int, message: str, seconds: int, *, type: str, code: str) -> APIError:
        """A refusal to retry after ``seconds`` (at least 1), said in ``Retry-After``."""
        return cls(status, message, type=type, code=code, headers={"Retry-After": str(max(1, seconds))})

    def body(self, request_id: str | None = None) -> ErrorBody:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail, request_id=request_id)

    def response(self, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(request_id).model_dump(mode="json"), status_code=self.status, headers=self.headers
        )


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


def api_error(error: BaseException, request_id: str | None, retry_after: int = 1) -> APIError:
    """How ``error`` is answered. A request the core or the request model refuses (``ValueError``, pydantic's
    ``ValidationError``, ``ContextOverflowError``) is a 400 with its own message; a session another replica holds
    (``SessionBusyError``) a 409, a session store that cannot be reached (``SessionStoreUnavailable``: the turn was not
    committed) a 503, and a model with too many requests waiting (``EngineBusyError``) a 429, all with
    ``Retry-After``; a client gone is recorded as 499. Anything else is a 500 that says "internal error" and the
    request id, and never the exception's text: its traceback goes to the log."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, (ClientGone, ClientDisconnect)):
        return APIError(CLIENT_GONE, "The client closed the request.", code="client_closed_request")
    if isinstance(error, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code, headers=error.headers)
    if isinstance(error, ValidationError):  # before ValueError: pydantic's errors are ValueErrors too
        return _invalid(error)
    if isinstance(error, ContextOverflowError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, ValueError):
        return APIError(400, str(error), code="invalid_value")
    if isinstance(error, SessionBusyError):
        message = f"{error} (another replica is serving this session; route it there, or retry)"
        return APIError.retry_later(
            409, message, math.ceil(error.retry_after), type="conflict_error", code="session_busy"
        )
    if isinstance(error, SessionStoreUnavailable):
        log.error("request %s: %s", request_id, error, extra={"request_id": request_id})
        return APIError.retry_later(503, str(error), retry_after, type="server_error", code="session_store_unavailable")
    if isinstance(error, EngineBusyError):
        return APIError.retry_later(429, str(error), retry_after, type="rate_limit_error", code="rate_limit_exceeded")
    log.error("request %s failed", request_id, exc_info=error, extra={"request_id": request_id})
    return APIError(500, f"internal error (request id {request_id})", type="server_error", code="internal_error")


def _invalid(error: ValidationError) -> APIError:
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"Invalid request: {param}: {first['msg']}" if param else f"Invalid request: {first['msg']}"
    return APIError(400, message, param=param, code="invalid_value")
