"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``, and the
mapping from flashdecode's typed errors to HTTP statuses."""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse

from ...errors import FlashDecodeError, InvalidSamplingParamsError, PromptTooLongError
from .protocol import ErrorDetail, ErrorResponse

# the "type" OpenAI gives each status (it uses "invalid_request_error" for most client errors)
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}

# InvalidSamplingParamsError messages start with the field name: "temperature must be ..."
_PARAM = re.compile(r"^(\w+) must\b")


class APIError(Exception):
    """An error the client sees as an OpenAI error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param, code)


def context_length_exceeded(message: str, param: str | None = "messages") -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param, "context_length_exceeded")


def from_flashdecode(error: FlashDecodeError) -> APIError:
    """Bad input the engine refused: always the client's fault, so 400."""
    message = str(error)
    if isinstance(error, PromptTooLongError):
        return context_length_exceeded(message, None)
    param = None
    if isinstance(error, InvalidSamplingParamsError):
        match = _PARAM.match(message)
        param = match.group(1) if match else None
    return bad_request(message, param)
