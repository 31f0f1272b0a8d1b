"""The HTTP connection layer `ferkit serve` runs on: uvicorn's httptools protocol (llhttp, a C parser that
does not slow down on tiny chunks as h11's pure-Python one does), guarded against clients that would
starve the event loop or run the process out of file descriptors.

`guarded_protocol(config)` adds to it:
- a timeout on the request headers (`--header-timeout`: 408 and the connection closed; uvicorn times
  out only idle keep-alive connections, and each trickled byte would restart that timer);
- a floor on the size of a body's pieces: past `MAX_SMALL_PIECES` pieces, a body whose pieces average
  under `MIN_PIECE_BYTES` (one-byte chunks) gets 400 and its connection is closed;
- a bound on open connections (`--limit-concurrency`, and never within `FD_RESERVE` of the process's file
  limit): a new connection past it closes the longest-idle one that never sent a request (else the
  longest-idle keep-alive one), or is answered 503 and closed when none is idle, so accept() never fails
  for want of descriptors;
- the parser's refusals as the API's JSON 400, the connection closed: llhttp refuses ambiguous framing
  (Content-Length with Transfer-Encoding, a smuggling vector) among other malformed requests.

Importable without the serve extra; `guarded_protocol` then says which extra to install.
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

from .config import ServeConfig

try:  # the serve extra; without it this module still imports, and guarded_protocol says what is missing
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    httptools = None  # type: ignore[assignment]
    HttpToolsProtocol = object  # type: ignore[misc,assignment]

MAX_SMALL_PIECES = 1024
"""Pieces a body may arrive in before their average size is checked."""
MIN_PIECE_BYTES = 256
"""The average piece of a body in more than `MAX_SMALL_PIECES` pieces must hold this many bytes."""
FD_RESERVE = 256
"""File descriptors kept free of connections: for the log, the decode workers' pipes, spooled uploads, and the
connections accepted in one go (`BACKLOG`) before the longest idle ones are closed to make room."""
BACKLOG = 64
"""The listening socket's backlog: asyncio accepts up to this many connections at once."""


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (at most 65,536); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(config: ServeConfig) -> int:
    """The most connections held open at once: `--limit-concurrency`, kept `FD_RESERVE` under the file limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return config.limit_concurrency
    return max(8, min(config.limit_concurrency, soft - FD_RESERVE))


def json_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with the API's JSON error body, closing the connection."""
    body = json.dumps({"error": message, "status": status}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason.encode(), len(body), body))


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with this module's guards; `guarded_protocol` sets the limits below."""

    header_timeout: float = 5.0
    limit: int = 1000
    too_slow = tiny = busy = b""
    header_timer: asyncio.TimerHandle | None = None
    idle_since: float | None = None  # when its last request ended (or it opened); None while one runs
    pieces = 0
    body_bytes = 0
    served = 0  # requests answered on this connection

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        self._arm()
        if len(self.connections) > self.limit:
            self._make_room()

    def _make_room(self) -> None:
        # Connections that never sent a request go first, the longest idle of them; a keep-alive connection
        # between its requests (a client polling /healthz) only when there is no other.
        idle = [(getattr(c, "served", 0) > 0, since, c) for c in self.connections if c is not self
                and (since := getattr(c, "idle_since", None)) is not None and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda item: item[:2])[2].transport.close()
        else:
            self.transport.write(self.busy)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.idle_since = None
        self.pieces = self.body_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # nothing more is parsed on a connection being closed
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as err:
            # llhttp's refusals (Content-Length with Transfer-Encoding among them) as the API's JSON 400.
            reason = str(err).strip() or "invalid HTTP"
            self.transport.write(json_response(400, "Bad Request", f"malformed HTTP request: {reason}"))
            self._close()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.transport.is_closing():
            return
        self.pieces += 1
        self.body_bytes += len(body)
        if self.pieces > MAX_SMALL_PIECES and self.body_bytes < self.pieces * MIN_PIECE_BYTES:
            if not self.cycle.response_started:
                self.transport.write(self.tiny)
            self._close()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.transport.is_closing():
            super().on_message_complete()

    def on_response_complete(self) -> None:
        self.served += 1
        super().on_response_complete()
        if not self.transport.is_closing():
            self.idle_since = self.loop.time()
            self._arm()  # for the next request's headers on this connection

    def _close(self) -> None:
        """Close the connection; a request of it still running hears that its client left."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:  # between requests: nothing of ours half sent
                self.transport.write(self.too_slow)
            self.transport.close()


def guarded_protocol(config: ServeConfig) -> type:
    """`GuardedHttpTools` with `config`'s limits (the serve extra's httptools and uvicorn are needed)."""
    if httptools is None:
        raise ImportError("ferkit serve needs the serve extra: pip install 'ferkit[serve]'")
    limit = connection_limit(config)
    header_timeout = config.header_timeout_s
    too_slow = json_response(408, "Request Timeout", f"the request headers did not arrive within "
                                                     f"{header_timeout:g} s (--header-timeout)")
    tiny = json_response(400, "Bad Request", f"the request body came in more than {MAX_SMALL_PIECES} pieces of under "
                                             f"{MIN_PIECE_BYTES} bytes on average; send it in larger chunks")
    busy = json_response(503, "Service Unavailable", f"busy: {limit} connections are open, the most this server "
                                                     "holds (--limit-concurrency); retry soon")
    return type("GuardedHttpTools", (GuardedHttpTools,), {"header_timeout": header_timeout, "limit": limit,
                                                          "too_slow": too_slow, "tiny": tiny, "busy": busy})
