"""`ferkit serve`: the HTTP API and the web page, a thin shell over `EmotionRecognizer`.

This module owns the service: request parsing and limits, the API key, the micro-batcher that
gathers the faces of concurrent requests into one model call, readiness, Prometheus metrics, and
serving the page in `ferkit/static/`. It owns no inference: images are decoded with
`ferkit.images.from_pil`, faces found with `EmotionRecognizer.find_faces` (or taken whole, like
`--no-detect`), classified with `EmotionRecognizer.classify`, and every record is made by
`ferkit.predict_files.json_record`, so the service's JSON for an image is `ferkit predict --json`'s.

Concurrency: decoding and detection run in a bounded thread pool (`workers`); the model runs on one
thread of its own (PyTorch's thread settings are process-wide, and one forward pass at a time is
what makes batching pay), fed by an asyncio queue that waits `batch_window_ms` for more requests'
faces, up to `max_batch`. At most `max_pending` predict requests are admitted at once; the next
gets 503 with Retry-After rather than a place in an unbounded queue.

Budgets (issue 18): a request's body must arrive within `body_timeout_s` (408), and only then takes a
pending slot, so slow senders cannot fill the queue; headers must arrive within `header_timeout_s`
(uvicorn's h11 protocol with a timer, `uvicorn_options`). Each image's size is read from its header
before anything is decoded: a request's images may hold `max_request_pixels` in all, and images
being decoded at once may take `max_decode_mb` of memory in all (`DecodeBudget`; the next waits for
room); a decoded image is dropped once its faces are cut. Without an API key only loopback names and
`allowed_hosts` are answered (DNS rebinding). Metric labels come from a closed set; a bug is a JSON 500
whose error id is in the log.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# they name classes imported inside create_app (FastAPI stays an optional dependency of ferkit).
import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import hmac
import importlib
import importlib.util
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .faces import DEFAULT_DETECT_MAX_SIDE, DEFAULT_DETECTOR, DEFAULT_MIN_FACE, Face, make_detector, whole_image_face
from .images import ImageError, PixelLimitError, decode_image_bytes, read_image_header
from .predict import EmotionRecognizer, FaceResult
from .predict_files import PROBABILITY_DIGITS, InputItem, InputResult, json_record
from .tracking import Streams

API_KEY_ENV = "FERKIT_API_KEY"
"""Environment variable read for the API key when `--api-key` is not given."""
DEFAULT_MAX_PIXELS = 50_000_000
"""Pixels an uploaded image may have (a 50 MP photo); larger ones are refused from their header."""
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
"""Decoders tried on uploads; Pillow's others (EPS via Ghostscript, exotic formats) are not exposed."""
MAX_DIGITS = 15
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names every server answers; others only with an API key or in `allowed_hosts`."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""HTTP methods that get a metric label of their own; any other is counted as "other"."""
log = logging.getLogger("ferkit.serve")


def _priors() -> tuple[str, ...]:
    try:
        return tuple(importlib.import_module("ferkit.inference").PRIORS)
    except (ImportError, AttributeError):  # a ferkit without class priors
        return ()


PRIORS = _priors()
"""The `prior` options of `EmotionRecognizer` in this version (none where it has no such option)."""


@dataclass
class ServeConfig:
    """The service's settings; `ferkit serve`'s flags map onto these one to one."""

    weights: str | None = None
    device: str = "auto"
    detector: str = DEFAULT_DETECTOR
    min_face: int = DEFAULT_MIN_FACE
    detect_max_side: int | None = DEFAULT_DETECT_MAX_SIDE
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    api_key: str | None = None
    max_file_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 16
    batch_window_ms: float = 5.0
    max_batch: int = 64
    max_pending: int = 64
    timeout_s: float = 30.0
    max_request_pixels: int = 100_000_000
    max_decode_mb: float = 768.0
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        for name in ("workers", "max_file_bytes", "max_pixels", "max_files", "max_batch", "max_pending",
                     "max_request_pixels"):
            if getattr(self, name) < 1:
                return f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}"
        for name in ("max_decode_mb", "body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                return f"{name.removesuffix('_s').replace('_', '-')} must be positive, not {value}"
        if not (self.batch_window_ms >= 0 and math.isfinite(self.batch_window_ms)):
            return f"batch-window-ms must be 0 (no batching) or more, not {self.batch_window_ms}"
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            return f"timeout must be positive, not {self.timeout_s}"
        if not 0 <= self.port <= 65535:
            return f"port {self.port} is not a TCP port"
        return None

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: every file at its limit, base64-encoded, plus room for framing."""
        return self.max_files * (self.max_file_bytes * 4 // 3 + 4) + 64 * 1024


class RequestError(Exception):
    """A request the service refuses: a 4xx status and a message saying what was wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_bytes(width: int, height: int, mode: str) -> int:
    """The memory decoding an image takes at its peak: measured 4 bytes a pixel for gray, 10 for RGB
    (Pillow's 4, a copy, the array); 14 covers RGBA, palette and 16-bit images, which are converted."""
    return width * height * (4 if mode in ("L", "1") else 14)


class DecodeBudget:
    """The memory that images being decoded at once may take, shared by all requests (on the event loop).

    An image waits until its share fits beside the others'; one larger than the whole budget is
    refused (413) before it waits.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0
        self.waiters: list[asyncio.Future[None]] = []

    async def acquire(self, size: int) -> None:
        while self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Bytes of an image file -> upright gray or RGB uint8, decoded by `ferkit.images` as `predict` reads a file.

    The pixel count is checked from the header before anything is decoded (`PixelLimitError`); then
    the whole image is decoded, so a file is an image because it decodes, whatever its name says.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return decode_image_bytes(data, name, max_pixels, IMAGE_FORMATS)[0]


def views_per_face(meta: Any) -> int:
    """How many views of each face the model averages (test-time augmentation)."""
    views = getattr(getattr(meta, "preprocessing", None), "views", None)
    if isinstance(views, int):
        return views
    return {"none": 1, "flip": 2, "crops": 10}.get(str(getattr(meta, "tta", "none")), 1)


def _json_safe(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def model_info(name: str, path: Path, meta: Any, *, loaded: bool, default: bool) -> dict[str, Any]:
    """One model as GET /v1/models lists it: name, architecture, classes, accuracy, views per face, metadata."""
    metadata = _json_safe(meta)
    metrics = metadata.get("metrics") or {}
    return {
        "name": name, "file": path.name, "loaded": loaded, "default": default,
        "arch": metadata.get("arch"), "classes": list(metadata.get("classes") or []),
        "views_per_face": views_per_face(meta),
        "accuracy": {"val": metrics.get("val_acc"), "test": metrics.get("test_acc")},
        "metadata": metadata,
    }


def list_models(recognizer: EmotionRecognizer) -> list[dict[str, Any]]:
    """The shipped models and the loaded one (listed once if it is a shipped one)."""
    from .weights import DEFAULT_MODEL, WeightsError, read_meta, shipped_models

    loaded_path = Path(recognizer.backend.path).resolve()
    models, seen = [], False
    for name, path in sorted(shipped_models().items()):
        loaded = path.resolve() == loaded_path
        seen |= loaded
        try:
            meta = recognizer.meta if loaded else read_meta(path)
        except WeightsError:
            continue
        models.append(model_info(name, path, meta, loaded=loaded, default=name == DEFAULT_MODEL))
    if not seen:
        models.append(model_info(loaded_path.stem, loaded_path, recognizer.meta, loaded=True, default=False))
    return models


# ---------------------------------------------------------------------------------------------
# Running the model


class MicroBatcher:
    """Gathers the faces of concurrent requests into one `classify` call on the model's thread.

    The first request to arrive opens a window of `window_s`; requests that arrive within it, or
    queue up while the model is busy, join the batch until it holds `max_batch` faces. A window
    of 0 turns batching off: each request's faces go through the model on their own. Requests
    for different recognizers (the same model with another prior) share a batch but not a call.
    """

    def __init__(self, executor: ThreadPoolExecutor, window_s: float, max_batch: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.executor = executor
        self.window_s, self.max_batch = window_s, max_batch
        self.on_batch = on_batch or (lambda faces, seconds: None)
        self.queue: asyncio.Queue[tuple[EmotionRecognizer, list[Face], asyncio.Future[list[FaceResult]]]] = (
            asyncio.Queue())
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.window_s > 0 and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def submit(self, recognizer: EmotionRecognizer, faces: list[Face]) -> list[FaceResult]:
        """`recognizer.classify(faces)`, from a model call shared with other requests' faces."""
        if not faces:
            return []
        if self.task is None:
            return await self._call(recognizer, faces)
        future: asyncio.Future[list[FaceResult]] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((recognizer, faces, future))
        return await future

    async def _call(self, recognizer: EmotionRecognizer, faces: list[Face]) -> list[FaceResult]:
        def classify() -> tuple[list[FaceResult], float]:
            # Timed on the model's thread: the call itself, not its wait for the thread.
            start = time.perf_counter()
            results = recognizer.classify(faces)
            return results, time.perf_counter() - start

        results, seconds = await asyncio.get_running_loop().run_in_executor(self.executor, classify)
        self.on_batch(len(faces), seconds)
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count, deadline = len(batch[0][1]), loop.time() + self.window_s
            while count < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                count += len(item[1])
            for recognizer in dict.fromkeys(r for r, _, _ in batch):  # each once, in order of arrival
                await self._serve([(faces, future) for r, faces, future in batch if r is recognizer], recognizer)

    async def _serve(self, batch: list[tuple[list[Face], asyncio.Future[list[FaceResult]]]],
                     recognizer: EmotionRecognizer) -> None:
        batch = [(faces, future) for faces, future in batch if not future.done()]  # skip timed-out requests
        if not batch:
            return
        try:
            results = await self._call(recognizer, [face for faces, _ in batch for face in faces])
        except Exception as err:  # the model failed: every waiting request hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for faces, future in batch:
            if not future.done():
                future.set_result(results[start : start + len(faces)])
            start += len(faces)


class Service:
    """The state behind the app: recognizer, pools, batcher, admission count, readiness, metrics."""

    def __init__(self, recognizer: EmotionRecognizer, config: ServeConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.recognizer, self.config = recognizer, config
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ferkit-detect")
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="ferkit-model")
        self.pending = 0
        self.budget = DecodeBudget(round(config.max_decode_mb * 2**20))
        self.ready = False
        self.warmup_error: str | None = None
        # One recognizer per prior, all sharing the loaded model (`prior` only changes how logits
        # become probabilities); none but the loaded one where this ferkit has no prior option.
        self.views: dict[str, EmotionRecognizer] = {}
        if hasattr(recognizer, "prior"):
            for prior in PRIORS:
                view = copy.copy(recognizer)
                vars(view)["prior"] = prior
                self.views[prior] = recognizer if prior == vars(recognizer)["prior"] else view
        self.registry = CollectorRegistry()
        latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.requests = Counter("ferkit_http_requests", "HTTP requests by path template, method and status",
                                ["path", "method", "status"], registry=self.registry)
        self.errors = Counter("ferkit_http_request_errors", "HTTP requests answered 4xx or 5xx",
                              ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram("ferkit_http_request_duration_seconds", "HTTP request latency",
                                 ["path", "method"], buckets=latency_buckets, registry=self.registry)
        self.images = Counter("ferkit_images", "Images read by /v1/predict", registry=self.registry)
        self.faces = Counter("ferkit_faces", "Faces classified", registry=self.registry)
        self.batch_faces = Histogram("ferkit_batch_faces", "Faces per model call",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.model_seconds = Histogram("ferkit_model_call_seconds", "Time of one model call on the model thread",
                                       buckets=latency_buckets, registry=self.registry)
        self.pending_gauge = Gauge("ferkit_pending_requests", "Predict requests admitted and not yet answered",
                                   registry=self.registry)
        self.pending_gauge.set_function(lambda: self.pending)
        self.batcher = MicroBatcher(self.model_thread, config.batch_window_ms / 1000, config.max_batch,
                                    self._observe_batch)
        self.streams = Streams(recognizer.classes)  # the webcam pages' tracks and smoothing, by stream id

    def recognizer_for(self, prior: str | None) -> EmotionRecognizer:
        """The recognizer for a request's prior (None: the one the server was started with)."""
        if prior is None:
            return self.recognizer
        if prior not in self.views:
            raise RequestError(422, f"prior: {prior!r} is not an option of this ferkit "
                                    f"(options: {', '.join(self.views) or 'none'})")
        pre = getattr(self.recognizer.meta, "preprocessing", None)
        if prior == "uniform" and getattr(pre, "class_prior", None) is None:
            raise RequestError(422, "prior: these weights carry no training class prior, so 'uniform' cannot be "
                                    "applied")
        return self.views[prior]

    def _observe_batch(self, faces: int, seconds: float) -> None:
        self.batch_faces.observe(faces)
        self.model_seconds.observe(seconds)
        self.faces.inc(faces)

    def warm_up(self) -> None:
        """One detection and one model call, so the first request pays for no lazy set-up."""
        blank = np.full((96, 96), 128, np.uint8)
        self.recognizer.find_faces(blank)
        self.recognizer.classify([whole_image_face(blank)])

    async def start(self) -> None:
        self.batcher.start()
        try:
            await asyncio.get_running_loop().run_in_executor(self.model_thread, self.warm_up)
            self.ready = True
        except Exception as err:  # reported by /readyz; the process stays up to say so
            self.warmup_error = f"{type(err).__name__}: {err}"

    async def stop(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    def detecting(self) -> EmotionRecognizer:
        """This pool thread's recognizer: the shared model, and a face detector of its own.

        OpenCV's detectors are not thread-safe: two threads in one CascadeClassifier find faces
        that are not there.
        """
        view: EmotionRecognizer | None = getattr(self.local, "recognizer", None)
        if view is None:
            view = copy.copy(self.recognizer)
            if self.recognizer.detector is not None:
                vars(view)["detector"] = make_detector(self.config.detector, self.config.min_face,
                                                       self.config.detect_max_side)
                vars(view)["_detect_lock"] = threading.Lock()  # its own detector: no need to wait for the others
            self.local.recognizer = view
        return view

    def faces_of(self, data: bytes, name: str, detect: bool) -> tuple[tuple[int, int], list[Face]]:
        """Decode one upload and find its faces (on a pool thread): its (width, height) and faces.

        The decoded image is dropped here, not kept until the request's answer: faces are small.
        """
        image = decode_image(data, name, self.config.max_pixels)
        return (image.shape[1], image.shape[0]), (self.detecting().find_faces(image) if detect
                                                  else [whole_image_face(image)])

    def budget_shares(self, uploads: Sequence[tuple[str, bytes]]) -> list[int]:
        """The memory each upload takes to decode, from its header; 413 past the request's or server's budget."""
        shares, pixels = [], 0
        for name, data in uploads:
            if not data:
                raise ImageError(f"{name}: empty file")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height, mode = read_image_header(data, name, self.config.max_pixels, IMAGE_FORMATS)
            pixels += width * height
            shares.append(decode_bytes(width, height, mode))
            if shares[-1] > self.budget.limit:
                raise RequestError(413, f"{name}: {width}x{height} ({mode}) takes about {shares[-1] / 2**20:,.0f} MB "
                                        f"to decode, over the server's memory budget of "
                                        f"{self.config.max_decode_mb:g} MB (--max-decode-mb)")
        if pixels > self.config.max_request_pixels:
            raise RequestError(413, f"the request's images hold {pixels:,} pixels, over the limit of "
                                    f"{self.config.max_request_pixels:,} a request (--max-request-pixels)")
        return shares

    async def faces_within_budget(self, name: str, data: bytes, detect: bool,
                                  share: int) -> tuple[tuple[int, int], list[Face]]:
        """`faces_of` on a pool thread once `share` bytes of the decode budget are free; they are given back
        when the thread is done with the image (not when a timed-out request stops waiting for it)."""
        await self.budget.acquire(share)
        loop = asyncio.get_running_loop()

        def give_back(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first: the server is stopping
                loop.call_soon_threadsafe(self.budget.release, share)

        try:
            job = self.pool.submit(self.faces_of, data, name, detect)
        except BaseException:
            self.budget.release(share)
            raise
        job.add_done_callback(give_back)
        return await asyncio.wrap_future(job)

    async def predict(self, uploads: Sequence[tuple[str, bytes]], detect: bool, digits: int,
                      prior: str | None, stream: str | None = None, frame_time: float | None = None
                      ) -> list[dict[str, Any]]:
        """`predict --json` records for named image bytes; a bad image refuses the whole request.

        With `stream`, the one image is the next frame of that stream: its faces get track ids and
        smoothed labels (`ferkit.tracking`, as `ferkit predict` gives a video's).
        """
        try:
            shares = self.budget_shares(uploads)
            jobs = [self.faces_within_budget(name, data, detect, share)
                    for (name, data), share in zip(uploads, shares, strict=True)]
            found = await asyncio.gather(*jobs, return_exceptions=True)
            for outcome in found:  # the first failure in upload order; anything but an ImageError is a bug
                if isinstance(outcome, BaseException):
                    raise outcome
        except PixelLimitError as err:
            raise RequestError(413, str(err)) from None
        except ImageError as err:
            raise RequestError(422, str(err)) from None
        decoded = [outcome for outcome in found if not isinstance(outcome, BaseException)]
        faces = [face for _, image_faces in decoded for face in image_faces]
        results = await self.batcher.submit(self.recognizer_for(prior), faces)
        if stream is not None:
            results = self.streams.update(stream, results, frame_time)
        self.images.inc(len(uploads))
        records, start = [], 0
        for (name, _), (size, image_faces) in zip(uploads, decoded, strict=True):
            # The same record `ferkit predict --json` writes for an image file of this name.
            result = InputResult(InputItem(name, Path(name), "image"), results[start : start + len(image_faces)],
                                 size=size)
            start += len(image_faces)
            records.append(json_record(result, digits))
        return records


# ---------------------------------------------------------------------------------------------
# Request bodies


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left halfway: no one to answer, and not a bug of ours
        raise RequestError(400, "the client disconnected before its request body was complete") from None
    return b"".join(chunks)


async def multipart_uploads(request: Any, body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in the multipart field `files`."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=config.max_files + 1, max_fields=100,
                                                         max_part_size=64 * 1024)
    except Exception as err:  # the parser's own errors (starlette wraps them differently by version)
        text = str(getattr(err, "detail", None) or getattr(err, "message", None) or err)
        if "too many files" in text.lower():
            raise RequestError(400, f"too many files: at most {config.max_files} a request") from None
        raise RequestError(400, f"malformed multipart body: {text}") from None
    try:
        entries = form.getlist("files")
        if not entries:
            others = sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)})
            hint = f" (files came in {', '.join(map(repr, others))})" if others else ""
            raise RequestError(400, f"no images: send them as multipart files in the field 'files'{hint}")
        if len(entries) > config.max_files:
            raise RequestError(400, f"too many files: {len(entries)}, at most {config.max_files} a request")
        uploads = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, UploadFile):
                raise RequestError(400, f"files[{i}]: a text field, not a file upload")
            name = entry.filename or f"files[{i}]"
            if entry.size is not None and entry.size > config.max_file_bytes:
                raise RequestError(413, f"{name}: {entry.size:,} bytes, over the limit of "
                                        f"{config.max_file_bytes:,} a file")
            data = await entry.read(config.max_file_bytes + 1)
            if len(data) > config.max_file_bytes:
                raise RequestError(413, f"{name}: over the limit of {config.max_file_bytes:,} bytes a file")
            uploads.append((name, data))
        return uploads
    finally:
        await form.close()


BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")
URL_SAFE = str.maketrans("-_", "+/")


def decode_base64(text: str, name: str) -> bytes:
    """Standard or URL-safe base64, line-wrapped or not, padded or not; 400 naming the first bad character."""
    text = text.translate(BASE64_WHITESPACE).translate(URL_SAFE)
    bad = next((c for c in text.rstrip("=") if not (c.isascii() and (c.isalnum() or c in "+/"))), None)
    if bad is not None:
        raise RequestError(400, f"{name}: not valid base64: {bad!r} is not a base64 character (standard or "
                                "URL-safe alphabet; line breaks are fine)")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{name}: not valid base64 ({err})") from None


def json_uploads(body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the base64 images of a JSON body {"images": [...]} (data: URLs welcome)."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise RequestError(400, 'no images: send a JSON object {"images": [base64, ...]} with at least one')
    if len(images) > config.max_files:
        raise RequestError(400, f"too many images: {len(images)}, at most {config.max_files} a request")
    uploads = []
    for i, text in enumerate(images):
        name = f"images[{i}]"
        if not isinstance(text, str):
            raise RequestError(400, f"{name}: expected a base64 string, got {type(text).__name__}")
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        if len(text) > ((config.max_file_bytes + 2) // 3 * 4 + 4) * 78 // 76:  # room for line breaks
            raise RequestError(413, f"{name}: over the limit of {config.max_file_bytes:,} bytes a file")
        data = decode_base64(text, name)
        if len(data) > config.max_file_bytes:
            raise RequestError(413, f"{name}: {len(data):,} bytes, over the limit of {config.max_file_bytes:,}")
        uploads.append((name, data))
    return uploads


# ---------------------------------------------------------------------------------------------
# The app


def static_folder() -> Path:
    """The page's files inside the package."""
    return Path(str(resources.files("ferkit") / "static"))


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        location = [str(p) for p in error.get("loc", ())]
        where = f"{location[-1]} ({location[0]})" if len(location) > 1 else ".".join(location) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def query_names(dependant: Any) -> set[str]:
    """The query parameters a FastAPI endpoint takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return names


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
    comes to point at 127.0.0.1 would otherwise drive a keyless server on this machine)."""

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


def create_app(config: ServeConfig | None = None, recognizer: EmotionRecognizer | None = None) -> Any:
    """The FastAPI app: the API under /v1, health, metrics, docs and the page at /.

    `recognizer` defaults to one built from `config`; pass one to share a loaded model (its model is
    shared; each detection thread makes its own detector from `config.detector`, `min_face` and
    `detect_max_side`).
    """
    # python-multipart is imported by starlette only at the first upload: check it here.
    missing = [name for name, modules in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                          ("fastapi-offline", ["fastapi_offline"]),
                                          ("prometheus-client", ["prometheus_client"]),
                                          ("python-multipart", ["python_multipart", "multipart"]))
               if not any(importlib.util.find_spec(m) for m in modules)]
    if missing:
        raise ValueError(f"ferkit serve needs the serve extra ({', '.join(missing)} missing): "
                         "pip install 'ferkit[serve]'")
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from fastapi_offline import FastAPIOffline
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Mount

    from . import __version__

    config = config or ServeConfig()
    problem = config.problem()
    if problem:
        raise ValueError(problem)
    if recognizer is None:
        recognizer = make_recognizer(config)
    service = Service(recognizer, config)

    class ErrorBody(BaseModel):
        error: str = Field(description="what was wrong")
        status: int

    class FaceRecord(BaseModel):
        box: list[int] = Field(min_length=4, max_length=4, description="[x, y, w, h] in the image's pixels")
        label: str
        probabilities: dict[str, float]
        score: float | None = Field(description="the face detector's score; null without detection")
        track: int | None = Field(None, description="with ?stream=: the face's track id in that stream")
        raw_probabilities: dict[str, float] | None = Field(
            None, description="with ?stream=: this frame's own probabilities (`probabilities` are smoothed)")

    class ImageRecord(BaseModel):
        path: str = Field(description="the upload's file name, or images[i] for base64 images")
        faces: list[FaceRecord]
        error: str | None
        type: str | None
        width: int
        height: int

    class ModelRecord(BaseModel):
        name: str
        file: str
        loaded: bool
        default: bool
        arch: str | None
        classes: list[str]
        views_per_face: int
        accuracy: dict[str, float | None]
        metadata: dict[str, Any]

    class Health(BaseModel):
        status: str

    class Readiness(BaseModel):
        ready: bool
        model: str
        error: str | None = None

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {code: {"model": ErrorBody} for code in codes}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warm = asyncio.create_task(service.start())
        try:
            yield
        finally:
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm
            await service.stop()

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

    # FastAPIOffline is FastAPI with /docs and /redoc served from files in its package, not a CDN.
    app = FastAPIOffline(title="ferkit", version=__version__, lifespan=lifespan, dependencies=[Depends(known_query)],
                         description="Facial expression recognition: the emotions of the faces in images. "
                                     "Records are those of `ferkit predict --json`.")
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description=f"the --api-key (or ${API_KEY_ENV}) when the server has one")
    api_key = config.api_key

    def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                       **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if api_key is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise RequestError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                               {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise RequestError(401, "wrong API key", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception) -> JSONResponse:
        # A bug, not the client's fault: a 500 whose id finds the traceback in the log, which the client never sees.
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=err)
        return error_response(500, f"internal error {error_id}: a bug in the server; its log has the details",
                              error_id=error_id)

    app.add_middleware(HeadAsGet)
    if api_key is None and "*" not in config.allowed_hosts:
        app.add_middleware(HostAllowList, hosts=allowed_hosts(config), error=error_response)
    known_paths: set[str] = set()  # filled in below, once every route is defined

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # Labels from a closed set: made-up methods and paths must not each add a series.
            path = getattr(request.scope.get("route"), "path", None)
            path = path if path in known_paths else "other"
            method = request.method if request.method in METHODS else "other"
            if not request.url.path.startswith("/static/"):
                service.latency.labels(path, method).observe(time.perf_counter() - start)
                service.requests.labels(path, method, str(status)).inc()
                if status >= 400:
                    service.errors.labels(path, method, str(status)).inc()

    predict_body = {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1, "maxItems": config.max_files,
                                     "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "minItems": 1, "maxItems": config.max_files,
                                      "items": {"type": "string", "contentEncoding": "base64",
                                                "description": "an image file, base64 (a data: URL is fine)"}}}}},
    }}

    @app.post("/v1/predict", tags=["api"], dependencies=[Depends(require_key)],
              openapi_extra={"requestBody": predict_body},
              responses={200: {"model": list[ImageRecord], "description": "one record per image, in order"},
                         **errors(400, 401, 408, 413, 415, 422, 500, 503, 504)})
    async def predict(
        request: Request,
        detect: bool = Query(True, description="find faces; false: each image is one face crop"),
        digits: int = Query(PROBABILITY_DIGITS, ge=0, le=MAX_DIGITS, description="decimals of the probabilities"),
        prior: str | None = Query(None, description=f"one of {', '.join(PRIORS) or 'none in this version'}: train, "
                                                    "as trained; uniform: the training prior divided out "
                                              "(weights that carry one)"),
        stream: str | None = Query(None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                   description="frames of a live stream (a webcam): one image, the stream's next "
                                               "frame; faces get track ids and labels smoothed over time"),
        frame_time: float | None = Query(None, alias="time", ge=0, le=1e7,
                                         description="with stream: the frame's time in seconds (default: the "
                                                     "server's clock)"),
    ) -> Response:
        """The emotions of the faces in one or more images: the records of `ferkit predict --json`.

        Send multipart files in the field `files` (repeatable), or JSON `{"images": [base64, ...]}`.
        """
        service.recognizer_for(prior)  # an unknown prior is refused before the upload is read
        if not service.ready:
            raise RequestError(503, "the model is still warming up", {"Retry-After": "1"})
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("multipart/form-data", "application/json"):
            raise RequestError(415, f"content type {content_type or 'none'!r}: send multipart/form-data "
                                    "with files in the field 'files', or application/json with "
                                    '{"images": [base64, ...]}')
        # The body is read before the request takes a pending slot, within a time of its own: a client
        # that sends slowly (or less than its Content-Length) holds a connection, never the queue.
        try:
            body = await asyncio.wait_for(read_body(request, config.max_body_bytes), config.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {config.body_timeout_s:g} s "
                                    "(--body-timeout)", {"Connection": "close"}) from None
        if service.pending >= config.max_pending:
            raise RequestError(503, f"busy: {service.pending} requests in progress, the most it queues; retry soon",
                               {"Retry-After": "1"})

        async def answer() -> list[dict[str, Any]]:
            if content_type == "application/json":
                uploads = json_uploads(body, config)
            else:
                uploads = await multipart_uploads(request, body, config)
            if stream is not None and len(uploads) != 1:
                raise RequestError(422, f"stream: send one frame a request, not {len(uploads)} images")
            return await service.predict(uploads, detect, digits, prior, stream, frame_time)

        service.pending += 1
        try:
            records = await asyncio.wait_for(answer(), config.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than the {config.timeout_s:g} s limit") from None
        finally:
            service.pending -= 1
        return JSONResponse(records)

    @app.get("/v1/models", tags=["api"], dependencies=[Depends(require_key)],
             responses={200: {"model": list[ModelRecord]}, **errors(401)})
    async def models() -> Response:
        """The shipped models and the loaded one, with their metadata."""
        return JSONResponse(list_models(service.recognizer))

    @app.get("/healthz", tags=["health"], response_model=Health)
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> Response:
        """Ready: the model is loaded and warmed up (503 until then)."""
        body = {"ready": service.ready, "model": Path(service.recognizer.backend.path).name,
                "error": service.warmup_error}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(require_key)],
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **errors(401)})
    async def metrics() -> Response:
        """Request counts, errors, latency histograms, batch sizes, in Prometheus' text format."""
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    folder = static_folder()

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((folder / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=folder), name="static")
    known_paths.update(getattr(route, "path", "other") for route in app.routes if not isinstance(route, Mount))
    return app


def make_recognizer(config: ServeConfig) -> EmotionRecognizer:
    """The recognizer `config` describes: its weights, device and face detection."""
    return EmotionRecognizer(config.weights, device=config.device, detector=config.detector, min_face=config.min_face,
                             detect_max_side=config.detect_max_side, max_pixels=config.max_pixels)


def resolve_api_key(given: str | None) -> str | None:
    """The API key from the flag, else from $FERKIT_API_KEY; None (no key) when neither is set or empty."""
    key = given if given is not None else os.environ.get(API_KEY_ENV)
    return key or None


def serve(config: ServeConfig, recognizer: EmotionRecognizer | None = None, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted."""
    app = create_app(config, recognizer)
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5,
                **uvicorn_options(config))


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn's settings for `ferkit serve`: its h11 protocol with a timeout on the request headers."""
    return {"http": header_timeout_protocol(config.header_timeout_s), "timeout_keep_alive": 5}


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, answering 408 and closing a connection whose request headers take longer than
    `seconds` (uvicorn times out idle connections only, and each byte that trickles in restarts that timer)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": f"the request headers did not arrive within {seconds:g} s (--header-timeout)",
                       "status": 408}).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))

    class HeaderTimeoutH11(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # for the next request's headers on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.conn.our_state is h11.IDLE:  # between requests: nothing of ours is half sent
                    self.transport.write(timeout_response)
                self.transport.close()

    return HeaderTimeoutH11
