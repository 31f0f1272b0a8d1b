"""`ferkit serve`: the HTTP API and the web page, a thin shell over one shared `EmotionRecognizer`.

The package owns the service: request parsing and limits, the API key, the micro-batcher that
gathers the faces of concurrent requests into one model call, readiness, Prometheus metrics, and
serving the page in `ferkit/static/`. It owns no inference: images are decoded with
`ferkit.images`, faces found with `EmotionRecognizer.find_faces` (or taken whole, like
`--no-detect`), their logits computed by `EmotionRecognizer.logits` and turned into results by
`EmotionRecognizer.results` with each request's own options (`?prior=`), and every record is made
by `ferkit.predict_files.json_record`, so the service's JSON for an image is `ferkit predict --json`'s.

Concurrency: decoding and detection run in `workers` worker processes (`decoding`, `decode_worker`), one for
each thread of a pool, each image under a memory limit of its share of the decode budget and killed at
`decode_timeout_s` or when its request is abandoned; the model runs on one thread of its own (one forward
pass at a time is what makes batching pay), fed by an asyncio queue that waits `batch_window_ms` for more
requests' faces, up to `max_batch`, whatever their priors. At most `max_pending` predict requests are
admitted at once; the next gets 503 with Retry-After rather than a place in an unbounded queue.

Budgets (issues 18 and 32): bodies being read count against `max_inflight_mb` as they arrive (503 past
it); a request's body must arrive within `body_timeout_s` (408), and only then takes a pending slot.
The HTTP layer is uvicorn's httptools protocol with guards (`protocol`): a header timeout, a floor on
body piece size, a bound on open connections that closes the longest idle one, malformed requests
refused with a JSON 400. Each image's size (and a JPEG's scans) is read from its header before anything
is decoded, on a thread: a request's images may hold `max_request_pixels` in all, and images being
decoded at once may take `max_decode_mb` in all (`DecodeBudget`). A file that cannot be read gets an
error record; a request none of whose files was read is refused. Without an API key only loopback names
and `allowed_hosts` are answered (DNS rebinding). Webcam streams are the client's own (`streams`). Logs
are rate-limited and hold no query strings (`logs`). Metric labels come from a closed set; a bug is a
JSON 500 whose error id is in the log.

Modules: `config` (settings), `limits` (what a request may cost), `uploads` (request bodies), `decoding` and
`decode_worker` (the worker processes), `protocol` (the HTTP layer), `logs`, `streams` (webcam streams),
`batching` (the micro-batcher), `service` (the state and `Service.predict`), `metrics`, `schemas`
(the documented shapes, the model list), `routes` (endpoints and error answers), `middleware`
(HEAD, Host allow-list), `app` (`create_app`, `serve`). All but `uploads`, `service`, `metrics`,
`schemas` and `routes` import without the serve extra, as `ferkit serve`'s argument parser needs.
"""

from __future__ import annotations

from ..inference import PRIORS
from .app import create_app, require_serve_extra, serve, uvicorn_options
from .batching import MicroBatcher
from .config import (
    API_KEY_ENV,
    DEFAULT_MAX_PIXELS,
    LOOPBACK_HOSTS,
    MAX_DIGITS,
    ServeConfig,
    make_recognizer,
    resolve_api_key,
)
from .limits import IMAGE_FORMATS, DecodeBudget, RequestError, decode_bytes, decode_image, decode_share
from .middleware import HeadAsGet, HostAllowList, allowed_hosts, host_name
from .protocol import guarded_protocol

__all__ = [
    "API_KEY_ENV", "DEFAULT_MAX_PIXELS", "IMAGE_FORMATS", "LOOPBACK_HOSTS", "MAX_DIGITS", "PRIORS", "DecodeBudget",
    "HeadAsGet", "HostAllowList", "MicroBatcher", "RequestError", "ServeConfig", "allowed_hosts", "create_app",
    "decode_bytes", "decode_image", "decode_share", "guarded_protocol", "host_name", "make_recognizer",
    "require_serve_extra", "resolve_api_key", "serve", "uvicorn_options",
]
