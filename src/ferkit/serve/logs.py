"""What the service writes to its log, guarded: no log line repeated more than a few times a window (a client
that makes the server fail the same way thousands of times a second must not fill the disk), and no query
string in the access log (an API key sent as `?api_key=` is refused, and must not be written down either).

`guard_logs()` installs both, once, on uvicorn's, asyncio's and the service's loggers.
"""

from __future__ import annotations

import logging
import time

RATE_LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio", "ferkit.serve")
"""Loggers whose repeated records are rate-limited."""
BURST, WINDOW_S = 5, 10.0
"""At most `BURST` records of one kind (logger, message template) every `WINDOW_S` seconds."""


class RateLimit(logging.Filter):
    """Lets through `BURST` records of a kind per window; then one note of how many were left out."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # Some messages come formatted already (asyncio's "Exception in callback <handle>"): their start is the kind.
        key = (record.name, str(record.msg)[:40])
        now = time.monotonic()
        start, count = self.windows.get(key, (now, 0))
        if now - start > WINDOW_S:
            if count > BURST:
                record.msg = f"{record.msg} (and {count - BURST} more like it in the last {WINDOW_S:g} s, not logged)"
            start, count = now, 0
        self.windows[key] = (start, count + 1)
        if len(self.windows) > 10_000:  # kinds come from the code's own messages; bounded all the same
            self.windows.clear()
        return count < BURST


class NoQueryString(logging.Filter):
    """uvicorn's access lines with the query string replaced by `?...`: a key or token in a URL is not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?...", *args[3:])
        return True


_installed: set[str] = set()


def guard_logs() -> None:
    """Install the rate limit and the access log's query redaction (once per process)."""
    for name in RATE_LOGGERS:
        if name not in _installed:
            logger = logging.getLogger(name)
            if name == "uvicorn.access":
                logger.addFilter(NoQueryString())
            logger.addFilter(RateLimit())
            _installed.add(name)
