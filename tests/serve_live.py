"""A live `ferkit serve` app on uvicorn in a thread, on 127.0.0.1 and a free port; always shut down.

Shared by the service's API, schema and browser tests; nothing here is a test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


@contextmanager
def live_server(app: Any, ready_timeout: float = 60.0, config: Any = None) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL once /readyz says the model is warm.

    With `config` (a `ServeConfig`), uvicorn runs with the settings `ferkit serve` gives it (its header timeout).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options: dict[str, Any] = {}
    if config is not None:
        from ferkit.serve import uvicorn_options

        options = uvicorn_options(config)
    server = uvicorn.Server(uvicorn.Config(app, **{**options, "log_level": "warning", "lifespan": "on",
                                                   "timeout_graceful_shutdown": 2}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the test server at {url} did not get ready in {ready_timeout:g} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
