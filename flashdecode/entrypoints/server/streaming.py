"""Server-sent events and client disconnects.

``AsyncLLMEngine.generate`` aborts its request when its consumer stops, but only if the stop reaches
it as one plain cancellation: under Starlette's anyio cancel scopes every ``await`` in its cleanup
would be cancelled again. So the work of a request (the SSE producer, or the whole non-streamed
handler) runs in a task of its own, and a disconnect, a failed send or the end of the response
cancels that task once and waits for its cleanup, shielded, before the response returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

_END = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, each with its iterator's index. Closing (or
    cancelling) the merge cancels every iterator still running and waits for its cleanup."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((index, _END, exc))
        else:
            queue.put_nowait((index, _END, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) response was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` (which must have read the body already) unless the client disconnects first; then
    cancel it, wait for its cleanup (the engine's abort) and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([task])
            raise ClientDisconnected()
    return task.result()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response whose events are produced in a task of its own (see the
    module docstring); the producer is cancelled, and its cleanup awaited, however the response
    ends."""

    def __init__(self, events: AsyncIterator[str], headers: dict[str, str] | None = None):
        self._events = events
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        super().__init__(
            self._relay(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def _produce(self) -> None:
        try:
            async with contextlib.aclosing(self._events) as events:
                async for event in events:
                    self._chunks.put_nowait(event)
        except Exception as exc:  # noqa: BLE001 - re-raised by the relay, which ends the response
            self._chunks.put_nowait(exc)
        finally:
            self._chunks.put_nowait(_END)

    async def _relay(self) -> AsyncIterator[str]:
        while True:
            item = await self._chunks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce())
        try:
            await super().__call__(scope, receive, send)
        finally:
            producer.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([producer])


def sse(data: str) -> str:
    return f"data: {data}\n\n"
