"""The API's endpoints, their checks (the API key, unknown query parameters) and its error answers, at
module level; `add_routes` registers them with the limits one app's schema documents.

Every endpoint finds the app's `Service` in `request.app.state.service`; a predict request's query
becomes `PredictOptions`, passed through to the one shared recognizer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference import PRIORS
from ..predict_files import PROBABILITY_DIGITS
from .config import API_KEY_ENV, MAX_DIGITS, ServeConfig
from .limits import RequestError
from .schemas import Health, ImageRecord, ModelRecord, Readiness, error_responses, list_models, predict_body
from .service import PredictOptions, Service
from .streams import NEW, SESSION_COOKIE, Client, StreamRegistry
from .uploads import Reservation, json_uploads, multipart_uploads, read_body

log = logging.getLogger("ferkit.serve")
CONTENT_TYPES = ("multipart/form-data", "application/json")
VALID_SESSION = re.compile(r"[A-Za-z0-9_-]{16,64}")


def get_service(request: Request) -> Service:
    """The app's service (set by `create_app`)."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
bearer = HTTPBearer(auto_error=False, description=f"the --api-key (or ${API_KEY_ENV}) when the server has one")


async def require_key(service: ServiceDep,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    api_key = service.config.api_key
    if api_key is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise RequestError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
        raise RequestError(401, "wrong API key", {"WWW-Authenticate": "Bearer"})


def query_names(dependant: Any) -> set[str]:
    """The query parameters a FastAPI endpoint takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return names


async def known_query(request: Request) -> None:
    """422 for a query parameter the endpoint does not take (`?detetc=false` is a typo, not a no-op)."""
    route = request.scope.get("route")
    if not getattr(route, "include_in_schema", False) or not hasattr(route, "dependant"):
        return  # the page and the docs: not the API
    known = query_names(getattr(route, "dependant", None))
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestError(422, f"unknown query parameter{'s' * (len(unknown) > 1)} "
                                f"{', '.join(map(repr, unknown))}; {request.url.path} takes "
                                f"{', '.join(sorted(known)) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Endpoints


async def predict(
    request: Request,
    service: ServiceDep,
    detect: Annotated[bool, Query(description="find faces; false: each image is one face crop")] = True,
    digits: Annotated[int, Query(ge=0, le=MAX_DIGITS, description="decimals of the probabilities")
                      ] = PROBABILITY_DIGITS,
    prior: Annotated[str | None, Query(description=f"one of {', '.join(PRIORS)}: train, as trained; uniform: the "
                                                    "training prior divided out (weights that carry one); default: "
                                                    "the server's")] = None,
    stream: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                        description="frames of a live stream (a webcam): one image, the stream's "
                                                    "next frame; faces get track ids and labels smoothed over time. "
                                                    "'new' opens one under a server-drawn id (the X-Stream-Id "
                                                    "header) to name in the next frames; another name is scoped "
                                                    "to the client's session cookie")] = None,
    frame_time: Annotated[float | None, Query(alias="time", ge=0, le=1e7,
                                              description="with stream: the frame's time in seconds (default: the "
                                                          "server's clock)")] = None,
) -> Response:
    """The emotions of the faces in one or more images: the records of `ferkit predict --json`.

    Send multipart files in the field `files` (repeatable), or JSON `{"images": [base64, ...]}`.
    """
    service.check_prior(prior)  # a prior the model cannot apply is refused before the upload is read
    if not service.ready:
        raise RequestError(503, "the model is still warming up", {"Retry-After": "1"})
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        raise RequestError(415, f"content type {content_type or 'none'!r}: send multipart/form-data with files in "
                                "the field 'files', or application/json with {\"images\": [base64, ...]}")
    config = service.config
    # The body is read before the request takes a pending slot, within a time of its own: a client
    # that sends slowly (or less than its Content-Length) holds a connection, never the queue.
    # Its bytes are counted against the inflight budget as they arrive (503 past it), and held until the answer.
    reservation = Reservation(service.inflight)
    try:
        try:
            body = await asyncio.wait_for(read_body(request, config.max_body_bytes, reservation),
                                          config.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {config.body_timeout_s:g} s "
                                    "(--body-timeout)", {"Connection": "close"}) from None
        if service.pending >= config.max_pending:
            raise RequestError(503, f"busy: {service.pending} requests in progress, the most it queues; retry soon",
                               {"Retry-After": "1"})
        service.pending += 1
        try:
            options = PredictOptions(detect, digits, prior, stream, frame_time, client_of(request, stream))
            records, headers = await asyncio.wait_for(_answer(request, service, content_type, body, options),
                                                      config.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than the {config.timeout_s:g} s limit") from None
        finally:
            service.pending -= 1
    finally:
        reservation.release()
    return JSONResponse(records, headers=headers)


async def _answer(request: Request, service: Service, content_type: str, body: bytes, options: PredictOptions
                  ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The records of a request whose body is in: its images read from the body, then predicted."""
    if content_type == "application/json":  # parsing and base64 on a thread: the event loop stays free
        uploads = await asyncio.to_thread(json_uploads, body, service.config)
    else:
        uploads = await multipart_uploads(request, body, service.config)
    if options.stream is not None and len(uploads) != 1:
        raise RequestError(422, f"stream: send one frame a request, not {len(uploads)} images")
    stream = service.stream_key(options)  # before the work: 404 for a stream that is not this client's
    records = await service.predict(uploads, options, stream)
    headers = {}
    if stream is not None and options.client is not None:
        if options.client.session != request.cookies.get(SESSION_COOKIE):
            headers["Set-Cookie"] = session_cookie(options.client.session)
        if options.stream == NEW:
            headers["X-Stream-Id"] = stream
    return records, headers


def client_of(request: Request, stream: str | None) -> Client:
    """Who sent the request: its address, and its session cookie (a new one drawn for a stream without one)."""
    session = request.cookies.get(SESSION_COOKIE)
    if stream is not None and (session is None or not VALID_SESSION.fullmatch(session)):
        session = StreamRegistry.new_session()
    host = request.client.host if request.client is not None else "unknown"
    return Client(host, session)


def session_cookie(session: str | None) -> str:
    return f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age=86400"


async def models(service: ServiceDep) -> Response:
    """The shipped models and the loaded one, with their metadata."""
    return JSONResponse(list_models(service.recognizer))


async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


async def readyz(service: ServiceDep) -> Response:
    """Ready: the model is loaded and warmed up (503 until then)."""
    body = {"ready": service.ready, "model": Path(service.recognizer.backend.path).name,
            "error": service.warmup_error}
    return JSONResponse(body, status_code=200 if service.ready else 503)


async def metrics(service: ServiceDep) -> Response:
    """Request counts, errors, latency histograms, batch sizes, in Prometheus' text format."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def static_folder() -> Path:
    """The page's files inside the package (`ferkit/static`)."""
    return Path(str(resources.files("ferkit") / "static"))


async def page(request: Request) -> HTMLResponse:
    """The page, with a session cookie of its own: its webcam stream is then this browser's alone."""
    response = HTMLResponse((static_folder() / "index.html").read_text(encoding="utf-8"))
    session = request.cookies.get(SESSION_COOKIE)
    if session is None or not VALID_SESSION.fullmatch(session):
        response.headers["Set-Cookie"] = session_cookie(StreamRegistry.new_session())
    return response


def add_routes(app: FastAPI, config: ServeConfig) -> None:
    """The routes of the API, health, metrics and the page, on the app itself (so that each request's
    `scope["route"]` is one of `app.routes`, the metrics' path labels), documenting `config`'s file limit."""
    keyed = [Depends(require_key)]
    app.add_api_route("/v1/predict", predict, methods=["POST"], tags=["api"], dependencies=keyed,
                      openapi_extra={"requestBody": predict_body(config.max_files)},
                      responses={200: {"model": list[ImageRecord], "description": "one record per image, in order"},
                                 **error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)})
    app.add_api_route("/v1/models", models, methods=["GET"], tags=["api"], dependencies=keyed,
                      responses={200: {"model": list[ModelRecord]}, **error_responses(401)})
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"], response_model=Health)
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["health"], response_model=Readiness,
                      responses={503: {"model": Readiness}})
    prometheus_text = {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                       "description": "Prometheus text format"}
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["health"], dependencies=keyed,
                      responses={200: prometheus_text, **error_responses(401)})
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)


# ---------------------------------------------------------------------------------------------
# Errors: every one a JSON body {"error": ..., "status": ...}


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON error; the connection is closed after it, since a refused request's body may still be coming
    (a client refused with 401 must not go on sending on that connection)."""
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status,
                        headers={**(headers or {}), "Connection": "close"})


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        location = [str(p) for p in error.get("loc", ())]
        where = f"{location[-1]} ({location[0]})" if len(location) > 1 else ".".join(location) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def on_request_error(_: Request, err: RequestError) -> Response:
    return error_response(err.status, err.message, err.headers)


async def on_validation_error(_: Request, err: RequestValidationError) -> Response:
    return error_response(422, _validation_message(err.errors()))


async def on_http_error(_: Request, err: StarletteHTTPException) -> Response:
    return error_response(err.status_code, str(err.detail), dict(err.headers or {}))


async def on_bug(request: Request, err: Exception) -> Response:
    # A bug, not the client's fault: a 500 whose id finds the traceback in the log, which the client never sees.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=err)
    return error_response(500, f"internal error {error_id}: a bug in the server; its log has the details",
                          error_id=error_id)


ERROR_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    RequestError: on_request_error, RequestValidationError: on_validation_error,
    StarletteHTTPException: on_http_error, Exception: on_bug,
}
"""The app's exception handlers: every error a JSON body {"error": ..., "status": ...}."""
