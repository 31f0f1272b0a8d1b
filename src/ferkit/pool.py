"""The workers that decode photos and frames and find their faces, while the caller runs the model.

Threads, not processes: decoding (Pillow, OpenCV) and detection (onnxruntime) release the GIL, so N
threads keep N cores busy without pickling images or loading the models again in every process; what
was measured is in docs/results/corpus/. `ordered_map` keeps a bounded window of work in flight and gives
results in input order; `prefetch` runs an iterator (a video's frames) ahead in a thread of its own.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .faces import FaceDetector, YuNetDetector
from .predict import EmotionRecognizer

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def shared_detector(recognizer: EmotionRecognizer) -> Callable[[], FaceDetector | None]:
    """Each worker's detector: the recognizer's YuNet (`Workers` gives each worker a session of its own), or None
    for another kind (the recognizer's own, under its lock: OpenCV's detectors keep state between calls)."""
    detector = recognizer.detector
    return (lambda: detector) if isinstance(detector, YuNetDetector) else (lambda: None)


def single_threaded(detector: FaceDetector | None) -> FaceDetector | None:
    """`detector` for one worker of many: a YuNet detector gets its own onnxruntime session on one intra-op thread
    (N workers, N sessions, N cores: a session's own threads would only wait for each other and for the other
    workers'); any other detector is returned as it is."""
    model = getattr(getattr(detector, "session", None), "_model_bytes", None)  # the graph YuNetDetector built
    if not isinstance(detector, YuNetDetector) or not isinstance(model, bytes):
        return detector
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    single = copy.copy(detector)
    single.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return single


class Workers:
    """A pool of `count` threads, each with its own detector from `make_detector` (made once, in the thread; with
    several workers, `single_threaded`)."""

    def __init__(self, count: int, make_detector: Callable[[], FaceDetector | None]) -> None:
        self.count = max(1, count)
        self.local = threading.local()
        self.make_detector = make_detector
        self.executor = ThreadPoolExecutor(self.count, thread_name_prefix="ferkit-worker")

    def detector(self) -> FaceDetector | None:
        """The calling worker's detector."""
        if not hasattr(self.local, "detector"):
            made = self.make_detector()
            self.local.detector = single_threaded(made) if self.count > 1 else made
        detector: FaceDetector | None = self.local.detector
        return detector

    def ordered_map(self, fn: Callable[[T], R], items: Iterable[T], window: int | None = None) -> Iterator[R]:
        """`fn` over `items` in the workers, results in order, at most `window` items in flight."""
        window = window or 4 * self.count
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(self.executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


def prefetch(items: Iterable[T], size: int = 8) -> Iterator[T]:
    """`items` produced ahead in a thread of their own, at most `size` waiting; its exceptions are raised here."""
    waiting: queue.Queue[object] = queue.Queue(size)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=produce, name="ferkit-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = waiting.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
