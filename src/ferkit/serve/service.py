"""The state behind the app: one recognizer, the detection pool, the model's thread and its batcher, the
decode budget, admission count, readiness, metrics and the webcam streams; and `Service.predict`, a
request's uploads -> `ferkit predict --json` records."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..faces import Face, whole_image_face
from ..images import ImageError, PixelLimitError
from ..predict import EmotionRecognizer, FaceResult
from ..predict_files import PROBABILITY_DIGITS, InputItem, InputResult, json_record
from .batching import MicroBatcher
from .config import ServeConfig
from .decoding import DecodeWorker, WorkerSettings, give_back_worker, take_worker
from .limits import IMAGE_FORMATS, DecodeBudget, RequestError, check_request_pixels, decode_share
from .metrics import Metrics
from .streams import Client, StreamRegistry
from .uploads import InflightBudget

Found = tuple[tuple[int, int], list[Face]]
"""A read upload: its (width, height) and its faces."""


@dataclass(frozen=True)
class FileError:
    """An upload that could not be read: its record's `error`, and the status it gets when no upload was read
    (413 for a limit, 422 for a file that is not a readable image)."""

    status: int
    message: str

    @classmethod
    def of(cls, err: ImageError) -> FileError:
        return cls(413 if isinstance(err, PixelLimitError) else 422, str(err))

    @staticmethod
    def refusal(errors: Sequence[FileError]) -> RequestError:
        """The answer to a request none of whose uploads was read: each one's error, 413 if all were limits."""
        status = 413 if all(e.status == 413 for e in errors) else 422
        if len(errors) == 1:
            return RequestError(status, errors[0].message)
        return RequestError(status, f"none of the {len(errors)} images could be read: "
                                    + "; ".join(e.message for e in errors))


@dataclass(frozen=True)
class PredictOptions:
    """One predict request's choices, from its query: passed through to the recognizer's calls.

    `prior`: None for the recognizer's own. `stream`: the id of a live stream whose next frame the
    one image is (its faces get track ids and smoothed labels); `frame_time`: that frame's time.
    """

    detect: bool = True
    digits: int = PROBABILITY_DIGITS
    prior: str | None = None
    stream: str | None = None
    frame_time: float | None = None
    client: Client | None = None


class Service:
    """One recognizer for every request, and what serving it takes.

    The recognizer is shared as it is: each request's options go into its calls (`prior=`), and each
    detection thread passes a detector of its own (`detector=`; OpenCV's detectors are not
    thread-safe, and two threads in one CascadeClassifier find faces that are not there).
    """

    def __init__(self, recognizer: EmotionRecognizer, config: ServeConfig) -> None:
        self.recognizer, self.config = recognizer, config
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ferkit-detect")
        settings = WorkerSettings(config.detector, config.min_face, config.detect_max_side, config.max_pixels,
                                  IMAGE_FORMATS)
        self.workers = [take_worker(settings) for _ in range(config.workers)]  # one process a pool thread
        self.idle_workers: queue.SimpleQueue[DecodeWorker] = queue.SimpleQueue()
        for worker in self.workers:
            self.idle_workers.put(worker)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="ferkit-model")
        self.pending = 0
        self.budget = DecodeBudget(config.max_decode_bytes)
        self.inflight = InflightBudget(config.max_inflight_bytes)
        self.ready = False
        self.warmup_error: str | None = None
        self.metrics = Metrics(lambda: self.pending)
        self.batcher = MicroBatcher(recognizer.logits, self.model_thread, config.batch_window_ms / 1000,
                                    config.max_batch, self.metrics.observe_batch)
        # The webcam pages' tracks and smoothing, by a key only their client can name.
        self.streams = StreamRegistry(recognizer.classes, per_client=config.max_streams_per_client)

    def warm_up(self) -> None:
        """One detection and one model call, so the first request pays for no lazy set-up."""
        blank = np.full((96, 96), 128, np.uint8)
        self.recognizer.find_faces(blank)
        self.recognizer.classify([whole_image_face(blank)])

    async def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()
        try:
            # The decode workers start beside the model's warm-up: ready means both.
            await asyncio.gather(loop.run_in_executor(self.model_thread, self.warm_up),
                                 *(loop.run_in_executor(self.pool, worker.start) for worker in self.workers))
            self.ready = True
        except Exception as err:  # reported by /readyz; the process stays up to say so
            self.warmup_error = f"{type(err).__name__}: {err}"

    async def stop(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        for worker in self.workers:
            give_back_worker(worker)

    def stream_key(self, options: PredictOptions) -> str | None:
        """The registry key of the request's stream (`StreamRegistry.resolve`); 404 before any work for a stream
        that is not this client's."""
        client = options.client or Client("unknown")
        return None if options.stream is None else self.streams.resolve(options.stream, client)

    def check_prior(self, prior: str | None) -> None:
        """422 for a prior the recognizer cannot apply (not one, or 'uniform' on weights without a class prior)."""
        try:
            self.recognizer.resolve_prior(prior)
        except ValueError as err:
            raise RequestError(422, str(err)) from None

    def faces_of(self, data: bytes, name: str, detect: bool, share: int, abandoned: threading.Event) -> Found:
        """Decode one upload and find its faces (on a pool thread, in its worker process): its (width, height)
        and faces. The decoded image never leaves the worker: faces are small."""
        worker = self.idle_workers.get()  # as many workers as pool threads: one is always free here
        try:
            decoded = worker.decode(data, name, detect and self.recognizer.detect, share,
                                    self.config.decode_timeout_s, abandoned)
        finally:
            self.idle_workers.put(worker)
        self.metrics.decode_peak.observe(decoded.peak_rss_bytes / 2**20)
        return decoded.size, decoded.faces

    async def faces_within_budget(self, name: str, data: bytes, detect: bool, share: int) -> Found:
        """`faces_of` on a pool thread once `share` bytes of the decode budget are free; they are given back
        when the worker is done with the image. A request that stops waiting (its timeout, its client gone)
        stops the worker too."""
        await self.budget.acquire(share)
        loop = asyncio.get_running_loop()
        abandoned = threading.Event()

        def give_back(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first: the server is stopping
                loop.call_soon_threadsafe(self.budget.release, share)

        try:
            job = self.pool.submit(self.faces_of, data, name, detect, share, abandoned)
        except BaseException:
            self.budget.release(share)
            raise
        job.add_done_callback(give_back)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            abandoned.set()
            job.cancel()
            raise

    async def find_all(self, uploads: Sequence[tuple[str, bytes]], detect: bool) -> list[Found | FileError]:
        """Each upload's (width, height) and faces, or what was wrong with it, in order.

        Headers are read first (a request over `max_request_pixels` is refused as a whole, 413); then
        the readable images are decoded and their faces found, each within its share of the budget.
        """
        shares = await asyncio.to_thread(self.shares_of, uploads)  # headers and JPEG scans: off the event loop
        check_request_pixels(sum(pixels for pixels, _ in shares), self.config)

        async def one(name: str, data: bytes, share: int | FileError) -> Found | FileError:
            if isinstance(share, FileError):
                return share
            try:
                return await self.faces_within_budget(name, data, detect, share)
            except ImageError as err:  # anything else is a bug, and a 500
                return FileError.of(err)

        return list(await asyncio.gather(*(one(name, data, share)
                                           for (name, data), (_, share) in zip(uploads, shares, strict=True))))

    def shares_of(self, uploads: Sequence[tuple[str, bytes]]) -> list[tuple[int, int | FileError]]:
        """(pixels, memory to decode) of each upload from its header, or (0, what was wrong with it)."""
        shares: list[tuple[int, int | FileError]] = []
        for name, data in uploads:
            try:
                shares.append(decode_share(name, data, self.config))
            except ImageError as err:
                shares.append((0, FileError.of(err)))
        return shares

    async def classify(self, faces: list[Face], prior: str | None) -> list[FaceResult]:
        """`recognizer.classify(faces, prior=prior)`, its model call shared with other requests' faces."""
        if not faces:
            return []
        logits = await self.batcher.submit(np.stack([face.crop for face in faces]))
        return self.recognizer.results(faces, logits, prior=prior)

    async def predict(self, uploads: Sequence[tuple[str, bytes]], options: PredictOptions,
                      stream: str | None = None) -> list[dict[str, Any]]:
        """`predict --json` records for named image bytes, one per upload in order: its faces, or its `error`.

        A request none of whose images could be read is refused (`FileError.refusal`: 413 when each was
        over a limit, else 422). With `options.stream`, the one image is the next frame of that stream:
        its faces get track ids and smoothed labels (`ferkit.tracking`, as `ferkit predict` gives a video's).
        """
        stream = self.stream_key(options) if stream is None else stream  # an unknown one is refused before any work
        found = await self.find_all(uploads, options.detect)
        failed = [outcome for outcome in found if isinstance(outcome, FileError)]
        if len(failed) == len(found):
            raise FileError.refusal(failed)
        read = [outcome for outcome in found if not isinstance(outcome, FileError)]
        results = await self.classify([face for _, faces in read for face in faces], options.prior)
        if stream is not None:
            results = self.streams.update(stream, options.client or Client("unknown"), results, options.frame_time)
        self.metrics.images.inc(len(read))
        records, start = [], 0
        for (name, _), outcome in zip(uploads, found, strict=True):
            # The same record `ferkit predict --json` writes for an image file of this name.
            item = InputItem(name, Path(name), "image")
            if isinstance(outcome, FileError):
                record = json_record(InputResult(item, error=outcome.message), options.digits)
                record["width"] = record["height"] = None  # the service's records keep one shape
            else:
                size, faces = outcome
                result = InputResult(item, results[start : start + len(faces)], size=size)
                start += len(faces)
                record = json_record(result, options.digits)
            records.append(record)
        return records
