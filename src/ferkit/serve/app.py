"""`create_app`: the service assembled from its parts (routes, error handlers, middleware, the page, the
`Service`); `serve`: run it on uvicorn with a timeout on request headers.

The serve extra (FastAPI, uvicorn, ...) is optional: this module imports it only when an app is made,
after saying which of its packages are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..predict import EmotionRecognizer
from .config import ServeConfig, make_recognizer
from .logs import guard_logs
from .middleware import HeadAsGet, HostAllowList, allowed_hosts
from .protocol import BACKLOG, guarded_protocol, raise_file_limit

if TYPE_CHECKING:
    from fastapi import FastAPI

SERVE_EXTRA = (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)), ("fastapi-offline", ("fastapi_offline",)),
               ("prometheus-client", ("prometheus_client",)), ("python-multipart", ("python_multipart", "multipart")))
"""The serve extra's packages and the modules each may be imported as."""


def require_serve_extra() -> None:
    """ValueError naming the serve extra's missing packages (python-multipart too, which starlette imports
    only at the first upload)."""
    missing = [name for name, modules in SERVE_EXTRA if not any(importlib.util.find_spec(m) for m in modules)]
    if missing:
        raise UsageError(f"ferkit serve needs the serve extra ({', '.join(missing)} missing): "
                         "pip install 'ferkit[serve]'")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's life: the model warms up in the background (/readyz says when), the threads stop at the end."""
    service = app.state.service
    guard_logs()
    warm = asyncio.create_task(service.start())
    try:
        yield
    finally:
        warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm
        await service.stop()


def create_app(config: ServeConfig | None = None, recognizer: EmotionRecognizer | None = None) -> FastAPI:
    """The FastAPI app: the API under /v1, health, metrics, docs and the page at /.

    `recognizer` defaults to one built from `config`; pass one to share a loaded model. The app keeps
    that one recognizer for every request and passes each request's options to its calls; each
    detection thread passes it a detector of its own, made from `config.detector`, `min_face` and
    `detect_max_side`.
    """
    require_serve_extra()
    from fastapi import Depends
    from fastapi.staticfiles import StaticFiles
    from fastapi_offline import FastAPIOffline  # FastAPI with /docs and /redoc from its package, not a CDN
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.routing import Mount

    from .. import __version__
    from .routes import ERROR_HANDLERS, add_routes, error_response, known_query, static_folder
    from .service import Service

    config = config or ServeConfig()
    problem = config.problem()
    if problem:
        raise UsageError(problem)
    service = Service(recognizer if recognizer is not None else make_recognizer(config), config)
    app = FastAPIOffline(title="ferkit", version=__version__, lifespan=lifespan, dependencies=[Depends(known_query)],
                         exception_handlers=ERROR_HANDLERS,
                         description="Facial expression recognition: the emotions of the faces in images. "
                                     "Records are those of `ferkit predict --json`.")
    app.state.service = service
    add_routes(app, config)
    app.mount("/static", StaticFiles(directory=static_folder()), name="static")
    # Middleware added last runs first: metrics see every answer, the Host guard's 400s included.
    app.add_middleware(HeadAsGet)
    if config.api_key is None and "*" not in config.allowed_hosts:
        app.add_middleware(HostAllowList, hosts=allowed_hosts(config), error=error_response)
    app.add_middleware(BaseHTTPMiddleware, dispatch=service.metrics.measure)
    service.metrics.known_paths.update(getattr(route, "path", "other") for route in app.routes
                                       if not isinstance(route, Mount))
    return app


def serve(config: ServeConfig, recognizer: EmotionRecognizer | None = None, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted."""
    app = create_app(config, recognizer)
    import uvicorn

    raise_file_limit()
    guard_logs()

    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5,
                **uvicorn_options(config))


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn's settings for `ferkit serve`: the guarded httptools protocol (`protocol.guarded_protocol`), short
    keep-alive, and proxy headers (`X-Forwarded-For`) believed only from `--forwarded-allow-ips` (none by default)."""
    return {"http": guarded_protocol(config), "timeout_keep_alive": 5, "backlog": BACKLOG,
            "proxy_headers": bool(config.forwarded_allow_ips),
            "forwarded_allow_ips": list(config.forwarded_allow_ips), "ws": "none"}
