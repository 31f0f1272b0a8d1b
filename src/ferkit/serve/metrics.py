"""The service's Prometheus metrics: requests, errors and latency by route, faces per model call, model time,
pending requests; and the middleware that counts every request, with labels from a closed set."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""HTTP methods that get a metric label of their own; any other is counted as "other"."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One app's metrics in a registry of their own (apps in one process do not share counts).

    `pending`: the number of predict requests admitted and not yet answered, read at each scrape.
    `known_paths`: the app's route templates, the only `path` labels besides "other"; the app fills
    it in once its routes are defined.
    """

    def __init__(self, pending: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.known_paths: set[str] = set()
        self.requests = Counter("ferkit_http_requests", "HTTP requests by path template, method and status",
                                ["path", "method", "status"], registry=self.registry)
        self.errors = Counter("ferkit_http_request_errors", "HTTP requests answered 4xx or 5xx",
                              ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram("ferkit_http_request_duration_seconds", "HTTP request latency",
                                 ["path", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("ferkit_images", "Images read by /v1/predict", registry=self.registry)
        self.faces = Counter("ferkit_faces", "Faces classified", registry=self.registry)
        self.batch_faces = Histogram("ferkit_batch_faces", "Faces per model call",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.model_seconds = Histogram("ferkit_model_call_seconds", "Time of one model call on the model thread",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode_peak = Histogram("ferkit_decode_peak_mb", "Memory an image's decoding and face search took in "
                                     "its worker process, in MB", buckets=(8, 32, 64, 128, 256, 512, 1024),
                                     registry=self.registry)
        self.pending = Gauge("ferkit_pending_requests", "Predict requests admitted and not yet answered",
                             registry=self.registry)
        self.pending.set_function(pending)

    def observe_batch(self, faces: int, seconds: float) -> None:
        """One model call: its faces and the seconds it took."""
        self.batch_faces.observe(faces)
        self.model_seconds.observe(seconds)
        self.faces.inc(faces)

    async def measure(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """HTTP middleware: count and time every request but the page's static files."""
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # Labels from a closed set: made-up methods and paths must not each add a series.
            path = getattr(request.scope.get("route"), "path", None)
            path = path if path in self.known_paths else "other"
            method = request.method if request.method in METHODS else "other"
            if not request.url.path.startswith("/static/"):
                self.latency.labels(path, method).observe(time.perf_counter() - start)
                self.requests.labels(path, method, str(status)).inc()
                if status >= 400:
                    self.errors.labels(path, method, str(status)).inc()
