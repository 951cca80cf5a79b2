"""The API's error vocabulary: ApiError, the short JSON error body, and the handlers that turn every
failure (validation, HTTP, unexpected) into one."""

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dermlens.preprocess import ImageDecodeError
from dermlens.serve import schemas
from dermlens.serve.settings import ServeSettings

log = logging.getLogger("dermlens.serve")

MAX_MESSAGE_CHARS, MAX_DETAILS = 300, 10


# ImageDecodeError.code -> (HTTP status, API error code)
_DECODE_ERRORS = {
    "unsupported_format": (400, "not_an_image"),
    "empty_file": (400, "empty_file"),
    "image_too_large": (413, "image_too_large"),
    "corrupt_image": (400, "corrupt_image"),
}


PILLOW_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default MAX_IMAGE_PIXELS


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error with an HTTP status and a stable code, rendered as the JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def body(self) -> schemas.ErrorBody:
        return schemas.ErrorBody(code=self.code, message=self.message)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit:,} bytes")


class _Busy(HTTPException):
    """Raised while a body completes and no in-flight slot is free: 503 with Retry-After."""

    def __init__(self, retry_after_s: int):
        headers = {"Retry-After": str(retry_after_s)}
        super().__init__(503, "the server is busy; retry shortly", headers=headers)


def error_response(
    status: int, code: str, message: str, details: list | None = None, headers=None
) -> JSONResponse:
    """The JSON error body, bounded: message cut to MAX_MESSAGE_CHARS, at most MAX_DETAILS details."""
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
    if details is not None:
        details = [{k: str(v)[:MAX_MESSAGE_CHARS] for k, v in d.items()} for d in details[:MAX_DETAILS]]
    body = schemas.ErrorResponse(error=schemas.ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def busy(message: str, settings: ServeSettings) -> ApiError:
    """503 with Retry-After: the server is saturated or the records database is locked; nothing was stored."""
    return ApiError(503, "unavailable", message, {"Retry-After": str(settings.limits.retry_after_s)})


def decode_error(e: ImageDecodeError) -> ApiError:
    """A decoder failure as this API's own 4xx (the library's message never reaches the client)."""
    status, code = _DECODE_ERRORS.get(getattr(e, "code", ""), (400, "corrupt_image"))
    return ApiError(status, code, getattr(e, "reason", "not a readable image"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d['loc'][1:]) or 'request'}: {d['msg']}" for d in details)
        return error_response(422, "validation_error", summary or "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
