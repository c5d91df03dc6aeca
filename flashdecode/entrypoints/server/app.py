"""The FastAPI app: routes, OpenAI-shaped errors, the API key and body-size guard, and one log line
per request.

``build_app`` takes an ``AsyncLLMEngine`` that is already loaded, so the port only opens once the
model is ready; ``/health`` then answers 200 (and 503 once the engine loop has failed). The model
step runs in the engine's worker thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..._version import __version__
from ...errors import FlashDecodeError
from ..async_engine import AsyncLLMEngine, EngineDeadError
from .errors import APIError, error_response, from_flashdecode
from .handlers import OpenAIServing, ServerSettings
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .streaming import ClientDisconnected

logger = logging.getLogger("flashdecode.server")

# answered without the API key, as in vLLM; the chat page holds no secret and asks for the key itself
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})
# the chat page loads nothing from elsewhere: no CDN, no fonts, requests to this server only
_CHAT_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# a body over the limit is read (and dropped) up to this much before the 413, so the client gets the
# response instead of a connection reset
_DRAIN_BYTES = 64 << 20
# the OpenAPI schema (/openapi.json) documents what every route really returns: errors in OpenAI's
# shape (invalid bodies are 400s, not FastAPI's 422s), streams as server-sent events
_ERRORS = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request, missing key, unknown model or route"},
    "5XX": {"model": ErrorResponse, "description": "The engine failed"},
}
# each server-sent event: data is one JSON chunk (ChatCompletionChunk / CompletionChunk), an error
# object, or the final [DONE]
_EVENT_STREAM = {
    "text/event-stream": {
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    }
}


class GuardMiddleware:
    """API key first (from the headers alone), then the body: read whole, up to ``max_body_bytes``,
    and replayed to the app; larger bodies get 413 before any handler runs."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key):
                await _drain(receive, _DRAIN_BYTES)
                response = error_response(401, "Invalid or missing API key.", None, "invalid_api_key")
                await response(scope, receive, send)
                return
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _drain(receive, _DRAIN_BYTES)
            await self._too_large(scope, receive, send, declared)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _drain(receive, _DRAIN_BYTES, message)
                await self._too_large(scope, receive, send, f"more than {limit}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        message = f"Request body of {size} bytes is over this server's limit of {self.max_body_bytes} bytes."
        await error_response(413, message, None, "request_too_large")(scope, receive, send)


async def _drain(receive: Receive, limit: int, last: Message | None = None) -> None:
    read = 0
    while last is None or (last["type"] == "http.request" and last.get("more_body", False) and read < limit):
        last = await receive()
        read += len(last.get("body", b""))


class AccessLogMiddleware:
    """One line per request, after its response ends: method, path, status, seconds and, for
    generation requests, the request id and token counts. Never prompt or completion text."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            extra = scope["state"].get("log") or {}
            fields = " ".join(f"{k}={v}" for k, v in extra.items())
            logger.info(
                "%s %s %s %d %.3fs%s",
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["path"],
                status,
                time.monotonic() - start,
                f" {fields}" if fields else "",
            )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None, None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('msg', '')}".rstrip(": "), None, "invalid_json"
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"Invalid value for '{param}': {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param, None


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine`` (already loaded). Each app has its own metrics registry."""
    metrics = ServerMetrics(engine, settings.model_names[0])
    serving = OpenAIServing(engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the grammar vocabulary, built in a thread before the port opens: requests add matchers on
        # the event loop, and the first structured one would otherwise stall every stream there
        await asyncio.to_thread(engine.engine.structured_outputs.prepare)
        yield
        await engine.shutdown()

    app = FastAPI(title="flashdecode", version=__version__, lifespan=lifespan, responses=_ERRORS)
    app.state.serving = serving
    app.state.metrics = metrics
    chat_page = files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(FlashDecodeError)
    async def _bad_input(request: Request, exc: FlashDecodeError) -> JSONResponse:
        return from_flashdecode(exc).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return error_response(exc.status_code, message)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error.")

    @app.get("/", include_in_schema=False)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page, headers={"Content-Security-Policy": _CHAT_PAGE_CSP})

    @app.get("/health", response_class=Response, responses={200: {"description": "Ready"}})
    async def health() -> Response:
        if engine.errored:
            return error_response(503, "The engine loop has failed.")
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def models():
        return serving.list_models().model_dump(mode="json")

    @app.get("/v1/models/{name:path}", responses={200: {"model": ModelCard}})
    async def model(name: str):
        serving.check_model(name)
        return serving.model_card(name).model_dump(mode="json")

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse, "content": _EVENT_STREAM}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.create_completion(body, request)

    @app.post(
        "/v1/chat/completions",
        responses={200: {"model": ChatCompletionResponse, "content": _EVENT_STREAM}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.create_chat_completion(body, request)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}})
    async def tokenize(body: TokenizeRequest):
        return serving.tokenize(body).model_dump(mode="json")

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}})
    async def detokenize(body: DetokenizeRequest):
        return serving.detokenize(body).model_dump(mode="json")

    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLogMiddleware)  # added last: outermost, so it sees the guard's 401/413
    return app
