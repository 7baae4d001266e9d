"""The OpenAI-compatible HTTP app on an :class:`~sirllm_agents.Engine`: ``POST /v1/chat/completions`` (plain and
server-sent events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``.

Each request goes to the engine's pool of sessions: the one named by the ``X-Session-Id`` header, else the one whose
transcript is the longest prefix of the messages (a client resending the whole conversation, the model's last reply
included, continues its session and only the new turn is prefilled), else a new one. The session's id comes back in
the ``X-Session-Id`` response header. Decoding runs in the engine's worker threads, so the event loop keeps serving;
a client that goes away (mid-stream, or while a plain reply or a prompt is being decoded) has its stream closed, and
the session rolls the partial reply back.

The app converts types and nothing else: the request body is read by :class:`~.schemas.ChatCompletionRequest`, the
answers are the response models of :mod:`.schemas`, every exception is answered by :func:`~.errors.api_error`, and
:class:`~.request_log.RequestLog` gives each request its id, its log line and its count in ``/metrics``.

With a shared session store (``Engine(store=RedisStore(...))`` or ``SharedDirectoryStore(...)``) several of these
servers are replicas of one service: each turn is committed to the store before it is answered (a plain reply is
returned, a stream's final chunk sent, only after the commit), a session another replica holds is answered 409 with
``Retry-After``, sessions idle for ``ServerSettings.handoff_idle_seconds`` are saved to the store and their leases
given up, and every session is handed over when the server stops.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sirllm_agents import AsyncReplyStream, Engine, Reply, TextDelta, ToolCallDelta

from .errors import CLIENT_GONE, APIError, ClientGone, api_error
from .metrics import CHAT_PATH, Metrics
from .request_log import RequestLog, RequestRecord, record_of
from .schemas import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, Delta, Usage, sse

MODEL_ALIAS = "sirllm"
ENDPOINTS = frozenset({CHAT_PATH, "/v1/models", "/health", "/metrics"})

T = TypeVar("T")


@dataclass
class ServerSettings:
    """``api_key``: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``. ``model_names``:
    the names a request's ``model`` may give besides the served model's own name (default ``sirllm``).
    ``max_queue``: chat requests being decoded or waiting, past which the server answers 429. ``max_body_bytes``:
    the largest request body (413 past it). ``default_max_tokens``: a reply's bound when the request gives none
    (None: the library's, ``GenerationConfig.max_new_tokens``). ``retry_after_seconds``: the ``Retry-After`` of a
    429. ``handoff_idle_seconds``: with a shared store, a session idle this long is saved to the store and its lease
    given up, so another replica may continue it (None: only when spilled for room or when the server stops)."""

    api_key: str | None = None
    model_names: tuple[str, ...] = (MODEL_ALIAS,)
    max_queue: int = 16
    max_body_bytes: int = 8 * 1024 * 1024
    default_max_tokens: int | None = None
    retry_after_seconds: int = 1
    handoff_idle_seconds: float | None = 30.0


@dataclass
class _State:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0  # touched on the event loop only

    def admit(self) -> Callable[[], None]:
        """Take a place in the queue; returns what gives it back (once, however often it is called)."""
        if self.in_flight >= self.settings.max_queue:
            raise APIError.retry_later(
                429,
                f"The server is busy: {self.in_flight} requests are in flight (at most {self.settings.max_queue}). "
                "Retry later.",
                self.settings.retry_after_seconds,
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1
        self.metrics.in_flight = self.in_flight
        held = [True]

        def release() -> None:
            if held:
                held.clear()
                self.in_flight -= 1
                self.metrics.in_flight = self.in_flight

        return release


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
    app.add_middleware(RequestLog, metrics=state.metrics, endpoints=ENDPOINTS, retry_after=settings.retry_after_seconds)

    async def answer(request: Request, error: Exception) -> Response:
        request_id = record_of(request).request_id
        return api_error(error, request_id, settings.retry_after_seconds).response(request_id)

    # The errors that routes raise are answered here; any other exception by RequestLog. Both through api_error.
    app.add_exception_handler(APIError, answer)
    app.add_exception_handler(StarletteHTTPException, answer)

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
            "replica": replica,
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
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        release = state.admit()
        try:
            response = await _chat(request, record_of(request), release)
        except BaseException:
            release()
            raise
        if not isinstance(response, _EventStream):  # a stream gives its place back when it ends
            release()
        return response

    async def _chat(request: Request, record: RequestRecord, release: Callable[[], None]) -> Response:
        chat = ChatCompletionRequest.model_validate_json(await _read_body(request, settings.max_body_bytes))
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
        record.session_id = session.session_id
        new_session = session_header is None and not session.transcript.messages
        stream = engine.astream(messages, session.session_id, **options)
        try:
            # Prefill and the first token, with the client watched: one gone stops the decoding.
            first = await _until_gone(request, _next_event(stream))
            if first is not None:
                state.metrics.first_token_after(record.first_token())
            reply = None if chat.stream else await _until_gone(request, stream.finish())
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # stops decoding; the session rolls the partial reply back
            if isinstance(error, ValueError) and new_session and not session.transcript.messages:
                engine.drop_session(session.session_id)  # a refused first call leaves no empty session behind
            raise
        headers = {"X-Session-Id": session.session_id}
        if replica is not None:
            headers["X-Replica"] = replica
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if reply is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            finished(record, reply)
            completion = ChatCompletion.of(reply, completion_id, created, served)
            return Response(completion.model_dump_json(), media_type="application/json", headers=headers)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        chunks = _Chunks(completion_id, created, served, include_usage)
        ended = [False]

        async def body_events() -> AsyncIterator[str]:
            yield chunks.sse(Delta(role="assistant", content=""))
            try:
                if first is not None:
                    yield chunks.sse(Delta.of(first))
                    async for event in stream:
                        yield chunks.sse(Delta.of(event))
                reply = stream.reply
                assert reply is not None
                finished(record, reply)
                yield chunks.sse(Delta(), finish_reason=reply.finish_reason)
                if include_usage:
                    yield chunks.usage(reply)
            except Exception as error:  # the status line has gone: the error is the stream's last event
                refusal = api_error(error, record.request_id, settings.retry_after_seconds)
                record.status = refusal.status
                yield sse(refusal.body(record.request_id).model_dump(mode="json"))
                ended[0] = True
                return
            yield "data: [DONE]\n\n"
            ended[0] = True

        async def cleanup() -> None:
            await stream.aclose()  # a no-op once finished; otherwise stops decoding and rolls the reply back
            if not ended[0]:
                record.status = CLIENT_GONE
            release()

        return _EventStream(body_events(), cleanup, headers=headers)

    def finished(record: RequestRecord, reply: Reply) -> None:
        state.metrics.turn(reply.stats)
        record.prompt_tokens, record.completion_tokens = reply.stats.input_tokens, reply.stats.generated_tokens

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


@dataclass
class _Chunks:
    """The chunks of one streamed completion."""

    completion_id: str
    created: int
    model: str
    include_usage: bool

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def sse(self, delta: Delta, finish_reason: str | None = None) -> str:
        return self._chunk([ChunkChoice(delta=delta, finish_reason=finish_reason)]).sse(self.include_usage)

    def usage(self, reply: Reply) -> str:
        return self._chunk([], Usage.of(reply.stats)).sse(include_usage=True)


async def _next_event(stream: AsyncReplyStream) -> TextDelta | ToolCallDelta | None:
    """The stream's first event (the prompt prefilled and the first token decoded), or None if it has none."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _until_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, unless the client closes its connection first: it is then cancelled, and
    :class:`ClientGone` raised."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
