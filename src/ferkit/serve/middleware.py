"""ASGI middleware around the app: HEAD answered as GET, and the Host allow-list of a server without an
API key (against DNS rebinding). Plain ASGI, importable without the serve extra."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import LOOPBACK_HOSTS, ServeConfig


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET is (uvicorn leaves out the body), on every GET route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def allowed_hosts(config: ServeConfig) -> set[str]:
    """The Host names a server without an API key answers: loopback, its own address, `allowed_hosts`."""
    bound = {config.host.strip("[]").lower()} - {"0.0.0.0", "::", ""}
    return {*LOOPBACK_HOSTS, *bound, *(h.strip("[]").lower() for h in config.allowed_hosts)}


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostAllowList:
    """ASGI middleware: 400 for a Host header not in `hosts`, against DNS rebinding (a web page whose name
    comes to point at 127.0.0.1 would otherwise drive a keyless server on this machine).

    `error(status, message)` makes the response (the API's JSON error).
    """

    def __init__(self, app: Any, hosts: set[str], error: Callable[..., Any]) -> None:
        self.app, self.hosts, self.error = app, hosts, error

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if header is not None and host_name(header) not in self.hosts:
                response = self.error(400, f"Host {header!r} is not a name this server answers without an API key "
                                           "(a DNS-rebinding guard): add it with --allowed-hosts, or set an API key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
