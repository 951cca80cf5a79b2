"""uvicorn configured against slow and half-open connections (one place for `dermlens serve`, tests and
benchmarks): request headers must arrive within `http.header_timeout_s`, idle keep-alive connections
close after `http.keep_alive_s`, headers are capped at `http.max_header_bytes`, and open connections at
`http.max_connections`. uvicorn has no header-read time-out of its own, so HeaderTimeoutH11 adds one."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dermlens.serve.settings import ServeSettings


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's line and headers (then: close)."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # headers still incomplete: drop the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # this request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers get the same deadline (keep-alive also applies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServeSettings, log_level: str = "info", **kw: Any):
    """A uvicorn.Config for `app` with the time-outs and limits of `settings.http`."""
    import uvicorn

    h = settings.http
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=partial(HeaderTimeoutH11, header_timeout_s=h.header_timeout_s),  # type: ignore[arg-type]
        timeout_keep_alive=h.keep_alive_s,
        h11_max_incomplete_event_size=h.max_header_bytes,
        limit_concurrency=h.max_connections,
        server_header=False,
        **kw,
    )
