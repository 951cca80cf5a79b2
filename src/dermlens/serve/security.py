"""Request guards of the API (GuardMiddleware): bearer token with a per-client limit on failures, origin
check, body size, per-client uploads and the in-flight bound."""

import hmac

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermlens.serve.errors import _BodyTooLarge, _Busy, error_response
from dermlens.serve.ratelimit import FailureWindow, PerKeyCount
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


AUTH_PATHS = frozenset({"/predict", "/predict/batch", "/monitor"})


class GuardMiddleware:
    """Before any body is read: refuse clients with too many failed tokens (429), missing/wrong API tokens
    (401), cross-origin posts (403), oversized bodies (413) and a client's uploads over its cap (429).
    Once a prediction's body is complete it needs an in-flight slot (else 503): a slow or stalled upload
    never holds one."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.in_flight = 0
        lim = settings.limits
        self.limits = {
            "/predict": lim.max_upload_bytes + _FORM_OVERHEAD,
            "/predict/batch": lim.max_batch_files * lim.max_upload_bytes + _FORM_OVERHEAD,
        }
        self.auth_failures = FailureWindow(lim.max_auth_failures, lim.auth_failure_window_s)
        self.uploads = PerKeyCount(lim.max_uploads_per_client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = (scope.get("client") or ("",))[0]
        refusal = self._refusal(path, scope["method"], headers, client)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif path not in self.limits:
            await self.app(scope, self._limited(receive, _FORM_OVERHEAD), send)
        elif not self.uploads.acquire(client):
            msg = f"at most {self.uploads.limit} uploads at once per client; retry when one is done"
            await _too_many("too_many_uploads", msg, self.settings.limits.retry_after_s)(scope, receive, send)
        else:
            await self._prediction(scope, receive, send, self.limits[path], client)

    def _refusal(self, path: str, method: str, headers: dict[str, str], client: str) -> Response | None:
        """The response refusing this request from its headers alone, or None to let it through."""
        if path in AUTH_PATHS and self.settings.api_token and method != "OPTIONS":
            wait = self.auth_failures.retry_after(client)
            if wait is not None:
                return _too_many("too_many_auth_failures", "too many failed API tokens; retry later", wait)
            if not token_ok(self.settings.api_token, headers.get("authorization")):
                self.auth_failures.fail(client)
                return _unauthorized()
        if method not in ("GET", "HEAD", "OPTIONS") and cross_origin(headers, self.settings):
            msg = "cross-origin request refused (add the page's origin to cors_origins to allow it)"
            return error_response(403, "cross_origin", msg)
        length, limit = headers.get("content-length", ""), self.limits.get(path, _FORM_OVERHEAD)
        if length.isdigit() and int(length) > limit:
            return error_response(413, "payload_too_large", f"request body exceeds {limit:,} bytes")
        return None

    async def _prediction(self, scope: Scope, receive: Receive, send: Send, limit: int, client: str) -> None:
        """Run a prediction request: its upload counts for `client` until the body is in, then it needs an
        in-flight slot."""
        uploading, counted = True, False

        async def body_then_slot() -> Message:
            nonlocal uploading, counted
            message = await receive()
            done = message["type"] != "http.request" or not message.get("more_body", False)
            if done and uploading:
                uploading = False
                self.uploads.release(client)
                if message["type"] == "http.request":
                    if self.in_flight >= self.settings.limits.max_in_flight:
                        raise _Busy(self.settings.limits.retry_after_s)
                    self.in_flight, counted = self.in_flight + 1, True
            return message

        try:
            await self.app(scope, self._limited(body_then_slot, limit), send)
        finally:
            if uploading:
                self.uploads.release(client)
            self.in_flight -= counted

    @staticmethod
    def _limited(receive: Receive, limit: int) -> Receive:
        """`receive` that refuses a body over `limit` bytes (whatever Content-Length said)."""
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return limited_receive


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """True if no token is configured, or the header is `Bearer <expected>` (constant-time compare)."""
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())


def _too_many(code: str, message: str, retry_after_s: int) -> JSONResponse:
    return error_response(429, code, message, headers={"Retry-After": str(retry_after_s)})


def _unauthorized() -> JSONResponse:
    return error_response(
        401,
        "unauthorized",
        "missing or invalid API token (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )
