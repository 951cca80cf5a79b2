"""Request guards of the API: host/origin checks, body-size and in-flight limits (GuardMiddleware) and the
bearer-token check."""

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermlens.serve.errors import _BodyTooLarge, busy, error_response
from dermlens.serve.settings import ServeSettings

_FORM_OVERHEAD = 64 * 1024


def cross_origin(headers: dict[str, str], settings: ServeSettings) -> str | None:
    """The Origin of a cross-origin request not in `cors_origins`, else None (same origin or no Origin)."""
    origin = headers.get("origin")
    if origin is None:
        return "cross-site" if headers.get("sec-fetch-site") == "cross-site" else None
    if origin in settings.cors_origins:
        return None
    _, _, authority = origin.partition("://")
    return None if authority and authority == headers.get("host") else origin


class GuardMiddleware:
    """Before any body is read: reject missing/wrong API tokens (401), cross-origin posts (403), oversized
    bodies (413) and requests over the in-flight bound (503)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.in_flight = 0
        lim = settings.limits
        self.limits = {
            "/predict": lim.max_upload_bytes + _FORM_OVERHEAD,
            "/predict/batch": lim.max_batch_files * lim.max_upload_bytes + _FORM_OVERHEAD,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        limit = self.limits.get(path, _FORM_OVERHEAD)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path in self.limits and not token_ok(self.settings.api_token, headers.get("authorization")):
            await _unauthorized()(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and cross_origin(headers, self.settings):
            msg = "cross-origin request refused (add the page's origin to cors_origins to allow it)"
            await error_response(403, "cross_origin", msg)(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await error_response(413, "payload_too_large", f"request body exceeds {limit:,} bytes")(
                scope, receive, send
            )
            return
        if path in self.limits and self.in_flight >= self.settings.limits.max_in_flight:
            err = busy("the server is busy; retry shortly", self.settings)
            await error_response(err.status, err.code, err.message, headers=err.headers)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        counted = path in self.limits
        self.in_flight += counted
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.in_flight -= counted


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """True if no token is configured, or the header is `Bearer <expected>` (constant-time compare)."""
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())


def _unauthorized() -> JSONResponse:
    return error_response(
        401,
        "unauthorized",
        "missing or invalid API token (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )
