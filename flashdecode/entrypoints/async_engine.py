"""The engine for asyncio callers (the HTTP server): streaming outputs and abort.

One background task owns the ``LLMEngine``: it applies queued additions and aborts between steps and
runs each step in a worker thread, so the event loop never blocks on the model and the engine is
never touched by two threads at once. Each request's outputs reach its caller through a queue; a
caller that stops listening (a client disconnect) aborts its request, which frees its KV blocks
before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ..config import EngineConfig
from ..engine.llm_engine import EngineStats, LLMEngine, PromptType
from ..engine.sequence import Request
from ..errors import FlashDecodeError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request in flight gets this error."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # appended in the event loop, drained in the worker thread: deque appends/pops are atomic
        self._pending_adds: deque[Request] = deque()
        self._pending_aborts: dict[str, asyncio.Future[None]] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, **options: Any) -> AsyncLLMEngine:
        return cls(LLMEngine(config or EngineConfig(**options)))

    # --- public API -----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as the engine produces them (cumulative, delta or
        final-only per ``params.output_kind``). Leaving the loop early aborts the request."""
        self._ensure_running()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        # validation and tokenization happen here, in the caller, so bad input fails its own call; a
        # grammar's matchers are built in a thread (a big schema takes a while), so other streams go on
        if getattr(params, "grammar", None) is not None:
            request = await asyncio.to_thread(self.engine.make_request, request_id, prompt, params, priority)
        else:
            request = self.engine.make_request(request_id, prompt, params, priority)
        if request_id in self._streams:
            raise FlashDecodeError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._pending_adds.append(request)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are back in the pool."""
        if self._task is None or self._task.done():
            self.engine.abort(request_id)
            return
        future = self._pending_aborts.get(request_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending_aborts[request_id] = future
            self._wakeup.set()
        await asyncio.shield(future)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def errored(self) -> bool:
        """Whether the engine loop has failed (every later request gets ``EngineDeadError``)."""
        return self._error is not None

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # a failed step: already handed to every stream as EngineDeadError
                pass
            self._task = None

    # --- the loop -------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed: {self._error!r}")
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flashdecode-engine")

    def _apply_pending(self) -> None:
        """Runs in the worker thread, between steps: the only place the scheduler changes hands."""
        while self._pending_adds:
            request = self._pending_adds.popleft()
            if request.request_id in self._pending_aborts:
                continue  # aborted before it ever ran
            self.engine.enqueue(request)
        for request_id in list(self._pending_aborts):
            self.engine.abort(request_id)

    def _step(self) -> list[RequestOutput]:
        self._apply_pending()
        return self.engine.step()

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._pending_adds or self._pending_aborts or self.engine.has_unfinished_requests():
                    aborts = dict(self._pending_aborts)
                    outputs = await asyncio.to_thread(self._step)
                    for request_id, future in aborts.items():
                        self._pending_aborts.pop(request_id, None)
                        if not future.done():
                            future.set_result(None)
                    for out in outputs:
                        queue = self._streams.get(out.request_id)
                        if queue is not None:
                            queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a failed step must not strand its requests: each gets the error
            self._error = exc
            for queue in self._streams.values():
                queue.put_nowait(EngineDeadError(f"the engine loop failed: {exc!r}"))
            for future in self._pending_aborts.values():
                if not future.done():
                    future.set_result(None)
            raise
