"""Webcam streams held by the server, each its tracks and smoothing (`ferkit.tracking.Tracking`), that only the
client that opened one can write to or read.

A stream is found by a key the client cannot guess for another client:
- `?stream=new` opens one under an id the server draws (`secrets.token_urlsafe`, 128 bits), sent back in the
  `X-Stream-Id` header; the next frames name it. It is bound to the client's address as well.
- `?stream=NAME` (the page's own name for its webcam) is scoped to the client's session cookie
  (`SESSION_COOKIE`, drawn by the server, HttpOnly, SameSite=Strict, set with the page): the same NAME from
  another client is another stream. A client without the cookie is given one with the answer.

Bounded: at most `per_client` streams a client (opening another closes its least recently used one),
`capacity` in all (when full, streams idle for `idle` seconds are closed, and a new one is refused with 503
rather than closing someone's live stream); a stream's clock moves at least `MIN_FRAME_STEP` a frame, so its
smoothing window and tracks hold a bounded number of frames whatever times a client sends.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..predict import FaceResult
from ..tracking import Tracking
from .limits import RequestError

SESSION_COOKIE = "ferkit_session"
NEW = "new"
"""`?stream=new`: open a stream under a server-drawn id."""
MIN_FRAME_STEP = 1 / 120
"""A stream's clock moves at least this far a frame (120 frames a second at most)."""


@dataclass(frozen=True)
class Client:
    """Who sends a request: its address, and its session cookie when it has one."""

    host: str
    session: str | None = None


@dataclass
class Stream:
    owner: Client
    tracking: Tracking
    started: float
    last_used: float
    last_time: float = field(default=-1.0)


class StreamRegistry:
    """The open streams by key, least recently used first."""

    def __init__(self, classes: Sequence[str], per_client: int = 4, capacity: int = 256, idle: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.classes, self.per_client, self.capacity, self.idle, self.clock = (classes, per_client, capacity, idle,
                                                                                clock)
        self.streams: OrderedDict[str, Stream] = OrderedDict()

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(16)

    def key(self, name: str, client: Client) -> str:
        """The registry's key for a stream the client names: a server-drawn id as it is, a client's own name
        scoped to its session."""
        if client.session is None or name.startswith("s-"):
            return name
        return "c-" + hashlib.sha256(f"{client.session}\0{name}".encode()).hexdigest()[:32]

    def resolve(self, name: str, client: Client) -> str:
        """The key of the stream a request names: a new one for `new`, the client's own name's (opened on its
        first frame), a drawn id of the client's open stream; 404 for anything else."""
        if name == NEW:
            return self.open(client)
        key = self.key(name, client)
        stream = self.streams.get(key)
        if stream is None and key != name:
            return self.open(client, key)
        if stream is None or not self._owned(stream, client):
            raise self.unknown()
        return key

    def unknown(self) -> RequestError:
        return RequestError(404, f"no such webcam stream of this client (closed after {self.idle:g} s unused, or "
                                 "never opened): open one with ?stream=new")

    def open(self, client: Client, key: str | None = None) -> str:
        """A new stream for `client` (under `key`, else a drawn id): its key."""
        now = self.clock()
        self._close_idle(now)
        mine = [k for k, s in self.streams.items() if self._owned(s, client)]
        if len(mine) >= self.per_client:
            del self.streams[mine[0]]  # the client's least recently used
        elif len(self.streams) >= self.capacity:
            raise RequestError(503, f"busy: {len(self.streams)} webcam streams are open, the most this server holds; "
                                    "retry soon", {"Retry-After": "5"})
        key = key or "s-" + secrets.token_urlsafe(16)
        self.streams[key] = Stream(client, Tracking(self.classes), now, now)
        return key

    def update(self, key: str, client: Client, faces: Sequence[FaceResult], frame_time: float | None
               ) -> list[FaceResult]:
        """One frame's faces of the client's stream `key`, tracked and smoothed."""
        stream = self.streams.get(key)
        if stream is None or not self._owned(stream, client):
            raise self.unknown()
        now = self.clock()
        self.streams.move_to_end(key)
        stream.last_used = now
        seconds = now - stream.started if frame_time is None else frame_time
        seconds = max(seconds, stream.last_time + MIN_FRAME_STEP)
        stream.last_time = seconds
        return stream.tracking.update(seconds, faces)

    def _owned(self, stream: Stream, client: Client) -> bool:
        return stream.owner == client if stream.owner.session is None else stream.owner.session == client.session

    def _close_idle(self, now: float) -> None:
        while self.streams and next(iter(self.streams.values())).last_used < now - self.idle:
            self.streams.popitem(last=False)
