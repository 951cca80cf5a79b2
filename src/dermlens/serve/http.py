"""uvicorn configured against slow, half-open and malformed connections (one place for `dermlens serve`,
tests and benchmarks). GuardedH11 is uvicorn's h11 protocol plus:

- request line + headers must arrive within `http.header_timeout_s` and fit in `http.max_header_bytes`
  (also when they arrive complete in one packet); else 400 and close;
- a body must arrive within `http.body_timeout_s`, at `http.min_body_rate_bytes_s` or faster once
  `http.body_grace_s` have passed; else 408 and close (a stalled upload frees its connection);
- a request with both Content-Length and Transfer-Encoding is refused (RFC 9112 6.3): 400 and close;
- a protocol error after the response began (e.g. a malformed chunked body) closes the connection with
  one log line.
Idle keep-alive connections close after `http.keep_alive_s`; open connections are capped at
`http.max_connections`."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dermlens.serve.settings import Http, ServeSettings

log = logging.getLogger("dermlens.serve")

_TICK_S = 0.25
_TIMEOUT_BODY = b'{"error":{"code":"request_timeout","message":"the request body arrived too slowly"}}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection time-outs and sizes GuardedH11 enforces (from `settings.http`)."""

    header_timeout_s: float
    max_header_bytes: int
    body_timeout_s: float
    body_grace_s: float
    min_body_rate: float

    @classmethod
    def of(cls, h: Http) -> ConnectionLimits:
        return cls(
            h.header_timeout_s, h.max_header_bytes, h.body_timeout_s, h.body_grace_s, h.min_body_rate_bytes_s
        )


def head_size(event: h11.Request) -> int:
    """Bytes of a request line plus its headers as sent (give or take optional whitespace)."""
    line = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items()) + 2


def check_request(event: h11.Request, max_header_bytes: int) -> None:
    """Refuse oversized heads and ambiguous framing (h11 accepts both)."""
    if head_size(event) > max_header_bytes:
        raise h11.RemoteProtocolError("request line and headers too large", error_status_hint=431)
    names = {k.lower() for k, _ in event.headers.raw_items()}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", error_status_hint=400)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with header/body deadlines, a head-size cap and strict framing."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_t0, self._body_bytes = 0.0, 0
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            event = next_event()
            if isinstance(event, h11.Request):
                check_request(event, limits.max_header_bytes)
            return event

        self.conn.next_event = checked_next_event  # type: ignore[method-assign]

    # -- request line and headers ----------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # headers still incomplete: drop the connection

    # -- body ------------------------------------------------------------------------------------------
    def _watch_body(self) -> None:
        if self._body_timer is None:
            self._body_t0, self._body_bytes = time.monotonic(), 0
            self._body_timer = self.loop.call_later(_TICK_S, self._check_body)

    def _unwatch_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the app is behind, not the client: restart the clock
            self._body_t0, self._body_bytes = time.monotonic(), 0
        elif self._body_too_slow(time.monotonic() - self._body_t0):
            self._body_timed_out()
            return
        self._body_timer = self.loop.call_later(_TICK_S, self._check_body)

    def _body_too_slow(self, elapsed: float) -> bool:
        lim = self.limits
        slow = elapsed > lim.body_grace_s and self._body_bytes < lim.min_body_rate * elapsed
        return slow or elapsed > lim.body_timeout_s

    def _body_timed_out(self) -> None:
        log.warning("closing a connection whose request body arrived too slowly (%s)", _peer(self.client))
        if self.conn.our_state is h11.SEND_RESPONSE:  # nothing answered yet: say why
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()

    # -- uvicorn hooks ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._body_timer is not None:
            self._body_bytes += len(data)
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE:  # this request's headers are complete
            self._disarm()
        if state is h11.SEND_BODY:
            self._watch_body()
        else:
            self._unwatch_body()

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # a response is under way: just close
            log.warning("closing a connection after an HTTP protocol error (%s)", _peer(self.client))
            self.transport.close()
            return
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # a pipelined request already started
            self._watch_body()
        else:
            self._arm()  # the next request's headers get the same deadline (keep-alive also applies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_body()
        super().connection_lost(exc)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown peer"


def uvicorn_config(app: Any, settings: ServeSettings, log_level: str = "info", **kw: Any):
    """A uvicorn.Config for `app` with the time-outs and limits of `settings.http`."""
    import uvicorn

    h = settings.http
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=partial(GuardedH11, limits=ConnectionLimits.of(h)),  # type: ignore[arg-type]
        timeout_keep_alive=h.keep_alive_s,
        h11_max_incomplete_event_size=h.max_header_bytes,
        limit_concurrency=h.max_connections,
        server_header=False,
        **kw,
    )
