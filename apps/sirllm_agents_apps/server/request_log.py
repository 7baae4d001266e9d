"""Request ids, the log line of each request, and its count in the metrics: one ASGI middleware around the app.

Every response carries ``X-Request-Id``: the client's own when it sent one that is short and printable, else a new
one. An exception that escapes a route is answered by :func:`~.errors.api_error` here (so a 500 carries the id too).
When the response has gone, whether finished or cut short, the request is counted in ``/metrics`` and logged in one
line on the ``sirllm_agents.server`` logger: method, path, status, session, prompt and completion tokens, time to
first token, total seconds and request id.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import api_error
from .metrics import Metrics

log = logging.getLogger("sirllm_agents.server")

MAX_REQUEST_ID = 128  # characters of a client's id that are taken as they are; a longer one is replaced


@dataclass
class RequestRecord:
    """What the log line and the metrics say of one request; the routes fill in what they know."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None  # the outcome, when it is not the status sent (a client gone, a stream's error)
    session_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_seconds: float | None = None

    def first_token(self) -> float:
        """Mark the first token's arrival; returns the time to it."""
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.started
        return self.first_token_seconds


def record_of(connection: HTTPConnection) -> RequestRecord:
    return connection.scope["state"]["sirllm_request"]


def request_id(given: str | None) -> str:
    """The client's id when short and printable ASCII (no spaces), else a new one."""
    if given and len(given) <= MAX_REQUEST_ID and all("!" <= char <= "~" for char in given):
        return given
    return f"req_{uuid.uuid4().hex}"


class RequestLog:
    """The middleware (see the module docstring). ``endpoints``: the paths counted by name in ``/metrics``; any
    other path is counted as ``other``, so that stray paths add no series. ``retry_after``: the ``Retry-After`` of a
    429 it answers."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str], retry_after: int = 1):
        self.app, self.metrics, self.endpoints, self.retry_after = app, metrics, endpoints, retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id(Headers(scope=scope).get("x-request-id")))
        scope.setdefault("state", {})["sirllm_request"] = record
        sent: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])
                MutableHeaders(scope=message)["X-Request-Id"] = record.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            answer = api_error(error, record.request_id, self.retry_after)
            record.status = answer.status
            if sent:  # the answer had begun: nothing more can be said to the client
                raise
            await answer.response(record.request_id)(scope, receive, send_with_id)
        finally:
            self._done(scope, record, sent[0] if sent else 500)

    def _done(self, scope: Scope, record: RequestRecord, sent: int) -> None:
        seconds = time.perf_counter() - record.started
        status = record.status or sent
        path = scope["path"]
        self.metrics.request_done(path if path in self.endpoints else "other", status, seconds)
        log.info(
            "%s %s status=%d session=%s prompt_tokens=%s completion_tokens=%s ttft=%s seconds=%.3f request_id=%s",
            scope["method"],
            path,
            status,
            record.session_id or "-",
            _figure(record.prompt_tokens),
            _figure(record.completion_tokens),
            "-" if record.first_token_seconds is None else f"{record.first_token_seconds:.3f}",
            seconds,
            record.request_id,
            extra={"request_id": record.request_id, "session_id": record.session_id, "status": status},
        )


def _figure(value: int | None) -> str:
    return "-" if value is None else str(value)
