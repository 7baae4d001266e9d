"""The OpenAI-compatible HTTP app on an :class:`~sirllm_agents.Engine`: ``POST /v1/chat/completions`` (plain and
server-sent events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``.

Each request goes to the engine's pool of sessions: the one named by the ``X-Session-Id`` header, else the one whose
transcript is the longest prefix of the messages (a client resending the whole conversation, the model's last reply
included, continues its session and only the new turn is prefilled), else a new one. The session's id comes back in
the ``X-Session-Id`` response header. Decoding runs in the engine's worker threads, so the event loop keeps serving;
a client that goes away mid-stream has its stream closed, and the session rolls the partial reply back.

With a shared session store (``Engine(store=SharedDirectoryStore(...))``) several of these servers are replicas of one
service: a session another replica holds is answered 409 with ``Retry-After``, sessions idle for
``ServerSettings.handoff_idle_seconds`` are saved to the store and their leases given up, and every session is handed
over when the server stops.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sirllm_agents import ContextOverflowError, Engine, Reply, SessionBusyError, TextDelta, ToolCallDelta

from .metrics import Metrics
from .schemas import ChatCompletionRequest

MODEL_ALIAS = "sirllm"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class ServerSettings:
    """``api_key``: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``. ``model_names``:
    the names a request's ``model`` may give besides the served model's own name (default ``sirllm``).
    ``max_queue``: chat requests being decoded or waiting, past which the server answers 429. ``max_body_bytes``:
    the largest request body (413 past it). ``default_max_tokens``: a reply's bound when the request gives none
    (None: the library's, ``GenerationConfig.max_new_tokens``). ``handoff_idle_seconds``: with a shared store, a
    session idle this long is saved to the store and its lease given up, so another replica may continue it (None:
    only when spilled for room or when the server stops)."""

    api_key: str | None = None
    model_names: tuple[str, ...] = (MODEL_ALIAS,)
    max_queue: int = 16
    max_body_bytes: int = 8 * 1024 * 1024
    default_max_tokens: int | None = None
    retry_after_seconds: int = 1
    handoff_idle_seconds: float | None = 30.0


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class _Call:
    """One chat request in flight: releases its place in the queue and records its figures exactly once."""

    app_state: _State
    started: float = field(default_factory=time.perf_counter)
    done: bool = False

    def end(self, status: int) -> None:
        if not self.done:
            self.done = True
            self.app_state.in_flight -= 1
            self.app_state.metrics.in_flight = self.app_state.in_flight
            self.app_state.metrics.request_done(CHAT_PATH, status, time.perf_counter() - self.started)


@dataclass
class _State:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0  # touched on the event loop only


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving ``engine``'s model."""
    settings = settings or ServerSettings()
    state = _State(engine, settings)
    served = engine.model.name
    accepted = {served, *settings.model_names}
    replica = getattr(engine.pool.store, "owner", None)  # a shared store's name for this server

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        shared = engine.pool.store.shared
        handoff = None
        if shared and settings.handoff_idle_seconds is not None:
            handoff = asyncio.create_task(_hand_off_idle(engine, settings.handoff_idle_seconds))
        try:
            yield
        finally:
            if handoff is not None:
                handoff.cancel()
            if shared:  # stopping: every session goes to the store, for the other replicas to continue
                await asyncio.to_thread(engine.pool.spill_all)

    app = FastAPI(title="sirllm-agents", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.sirllm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        if request.url.path != CHAT_PATH:
            state.metrics.request_done(request.url.path, error.status, 0.0)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}: {error}"
        return APIError(500, message, type="server_error", code="internal_error").response()

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": served,
            "live_sessions": len(engine.pool.live_ids()),
            "spilled_sessions": len(engine.pool.spilled_ids()),
            "requests_in_flight": state.in_flight,
            "replica": getattr(engine.pool.store, "owner", None),
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        names = [served, *(name for name in settings.model_names if name != served)]
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sirllm-agents"} for name in names],
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        check_key(request)
        return PlainTextResponse(state.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request):
        try:
            check_key(request)
        except APIError as error:
            state.metrics.request_done(CHAT_PATH, error.status, 0.0)
            raise
        if state.in_flight >= settings.max_queue:
            state.metrics.request_done(CHAT_PATH, 429, 0.0)
            raise APIError(
                429,
                f"The server is busy: {state.in_flight} requests are in flight (at most {settings.max_queue}). "
                "Retry later.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )
        state.in_flight += 1
        state.metrics.in_flight = state.in_flight
        call = _Call(state)
        try:
            response = await _chat(request, call)
        except APIError as error:
            call.end(error.status)
            raise
        except BaseException:
            call.end(500)
            raise
        if not isinstance(response, _EventStream):
            call.end(200)
        return response

    async def _chat(request: Request, call: _Call):
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as error:
            raise APIError(400, f"The request body is not valid JSON: {error}", code="invalid_json") from None
        try:
            chat = ChatCompletionRequest.model_validate(payload)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            message = f"Invalid request: {param}: {first['msg']}" if param else f"Invalid request: {first['msg']}"
            raise APIError(400, message, param=param, code="invalid_value") from None
        refused = chat.unsupported()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_value")
        if chat.model not in accepted:
            raise APIError(
                404,
                f"The model {chat.model!r} does not exist: this server serves {served!r} "
                f"(also accepted: {', '.join(sorted(accepted - {served}))}).",
                param="model",
                code="model_not_found",
            )
        session_header = request.headers.get("x-session-id") or None
        try:
            messages = chat.core_messages()
            options = chat.options(settings.default_max_tokens)
            # Routed here, before decoding, so the session's id can go in the response headers.
            session = await asyncio.to_thread(
                engine.route,
                messages,
                session_header,
                tools=options.get("tools"),
                response_format=options.get("response_format"),
            )
        except ValueError as error:
            raise _bad_request(error) from None
        except SessionBusyError as error:
            raise _busy(error) from None
        new_session = session_header is None and not session.transcript.messages

        def forget_new_session() -> None:  # a refused first call leaves no empty session behind
            if new_session and not session.transcript.messages:
                engine.drop_session(session.session_id)

        stream = engine.astream(messages, session.session_id, **options)
        headers = {"X-Session-Id": session.session_id}
        if replica is not None:
            headers["X-Replica"] = replica
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not chat.stream:
            try:
                reply = await stream.finish()
            except ValueError as error:
                forget_new_session()
                raise _bad_request(error) from None
            except SessionBusyError as error:  # lost to another replica between routing and decoding
                raise _busy(error) from None
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            state.metrics.turn(reply.stats)
            return JSONResponse(_completion(reply, completion_id, created, served), headers=headers)

        events = stream.__aiter__()
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            if isinstance(error, ValueError):
                forget_new_session()
                raise _bad_request(error) from None
            if isinstance(error, SessionBusyError):
                raise _busy(error) from None
            raise
        chunk = _Chunks(completion_id, created, served, chat.stream_options and chat.stream_options.include_usage)

        async def body_events() -> AsyncIterator[str]:
            yield chunk.sse({"role": "assistant", "content": ""})
            if first is not None:
                yield chunk.sse(_delta(first))
                try:
                    async for event in events:
                        yield chunk.sse(_delta(event))
                except ValueError as error:
                    yield _sse(_bad_request(error).body())
                    return
            reply = stream.reply
            assert reply is not None
            state.metrics.turn(reply.stats)
            yield chunk.sse({}, finish_reason=reply.finish_reason)
            if chunk.include_usage:
                yield _sse({**chunk.head(), "choices": [], "usage": _usage(reply)})
            yield "data: [DONE]\n\n"

        async def cleanup() -> None:
            await stream.aclose()  # a no-op once finished; otherwise stops decoding and rolls the reply back
            call.end(200)

        return _EventStream(body_events(), cleanup, headers=headers)

    return app


class _EventStream(StreamingResponse):
    """Server-sent events whose ``cleanup`` runs however the response ends: finished, the client gone, or never
    started."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Any], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._cleanup()


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _hand_off_idle(engine: Engine, idle_seconds: float) -> None:
    """Save sessions idle for ``idle_seconds`` to the shared store and give their leases up, checking a few times
    per period."""
    while True:
        await asyncio.sleep(max(idle_seconds / 4, 0.05))
        await asyncio.to_thread(engine.pool.spill_idle, idle_seconds)


def _busy(error: SessionBusyError) -> APIError:
    return APIError(
        409,
        f"{error} (another replica is serving this session; route it there, or retry)",
        type="conflict_error",
        code="session_busy",
        headers={"Retry-After": str(max(1, math.ceil(error.retry_after)))},
    )


def _bad_request(error: ValueError) -> APIError:
    if isinstance(error, ContextOverflowError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    return APIError(400, str(error), code="invalid_value")


def _usage(reply: Reply) -> dict[str, Any]:
    stats = reply.stats
    return {
        "prompt_tokens": stats.input_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.input_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
    }


def _completion(reply: Reply, completion_id: str, created: int, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["content"] = reply.content or None
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            }
            for call in reply.tool_calls
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
        "usage": _usage(reply),
    }


def _delta(event: TextDelta | ToolCallDelta) -> dict[str, Any]:
    if isinstance(event, TextDelta):
        return {"content": event.text}
    call = {"index": event.index, "id": event.id, "type": "function"}
    return {"tool_calls": [{**call, "function": {"name": event.name, "arguments": event.arguments}}]}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class _Chunks:
    completion_id: str
    created: int
    model: str
    include_usage: bool | None

    def head(self) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def sse(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {
            **self.head(),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return _sse(chunk)
