"""The bridge from a reply stream to an event loop: the stream runs in a thread of its own and hands its events
over as they come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .replies import Event, Reply, ReplyStream

if TYPE_CHECKING:
    from .session import Session


class AsyncReplyStream:
    """A reply stream for an event loop: the stream runs in a thread of its own (the session lock belongs to the
    thread that opened it) and hands its events over; ``reply`` is set once it is exhausted. ``aclose`` stops
    decoding early, and the session rolls the partial reply back."""

    _DONE = object()

    def __init__(self, open_stream: Callable[[], ReplyStream]):
        self._open = open_stream
        self._queue: asyncio.Queue[Any] | None = None
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self.reply: Reply | None = None
        self.session: Session | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        if self._thread is None:
            self._start()
        item = await self._queue.get()
        if item is self._DONE:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

        def post(item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
                return True
            except RuntimeError:  # the event loop is closed: nobody is reading any more
                return False

        def run() -> None:
            stream = None
            try:
                stream = self._open()
                for event in stream:
                    self.session = stream.session  # known once the first event was asked for
                    if self._cancelled.is_set() or not post(event):
                        break
                self.session = stream.session
                self.reply = stream.reply
                item: Any = self._DONE
            except BaseException as error:  # handed to the consumer, who raises it
                item = error
            finally:
                if stream is not None:
                    stream.close()
            post(item)

        self._thread = threading.Thread(target=run, name="sirllm-stream", daemon=True)
        self._thread.start()

    async def finish(self) -> Reply:
        """Decode to the end and return the reply."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    async def aclose(self) -> None:
        """Stop decoding (if still running) and wait until the thread has released the session."""
        self._cancelled.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
