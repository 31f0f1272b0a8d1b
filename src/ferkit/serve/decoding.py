"""Untrusted images decoded where a bomb can be stopped: `DecodeWorker`, one `decode_worker.py` process driven by
one of the service's pool threads.

Each upload goes to the worker with its share of the decode budget; the worker sets that (plus a margin) as
its address-space limit for the image, so a file whose decoding costs more than its header said fails with
a memory error instead of taking the machine's memory. The thread waits at most `--decode-timeout`; at the
deadline, or when the request that asked is abandoned (its client got 504 or left), the worker is killed
and a new one started for the next image: the work truly stops, which a thread cannot do.

Importable without the serve extra.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ..faces import Face
from ..images import ImageError, PixelLimitError
from ..labels import IMAGE_SIZE

WORKER_SCRIPT = Path(__file__).with_name("decode_worker.py")
START_TIMEOUT_S = 60.0
"""How long a new worker may take to start (a Python start, Pillow and OpenCV imported, the detector warmed)."""
POLL_S = 0.02


class DecodeTimeout(PixelLimitError):
    """An image that took longer than `--decode-timeout` to decode and search: a limit, answered 413."""


class Abandoned(Exception):
    """The request that asked for the image no longer waits for it: the worker was stopped."""


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker is started with: the face detector's settings, the pixel limit and the formats read."""

    detector: str
    min_face: int
    detect_max_side: int | None
    max_pixels: int
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Decoded:
    """A worker's answer for a read image: its (width, height), its faces, and the memory its decoding took."""

    size: tuple[int, int]
    faces: list[Face]
    peak_rss_bytes: int


def _tuples(value: Any) -> Any:
    """JSON lists back into the tuples `Face` holds (boxes, landmarks)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class DecodeWorker:
    """One worker process, started on first use and again after it is killed; used by one thread at a time."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.jobs: Connection | None = None
        self.answers: Connection | None = None
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        """Start the process now (the service does at warm-up, so that no request waits for one)."""
        with self.lock:
            if self.process is None and not self.closed:
                self._start()

    def _start(self) -> None:
        process = subprocess.Popen([sys.executable, str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, close_fds=True)
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        # The connections own copies of the pipes' descriptors; the Popen's own are closed now.
        self.jobs = Connection(os.dup(process.stdin.fileno()), readable=False)
        self.answers = Connection(os.dup(process.stdout.fileno()), writable=False)
        process.stdin.close()
        process.stdout.close()
        settings = self.settings
        self.jobs.send_bytes(json.dumps({"detector": settings.detector, "min_face": settings.min_face,
                                         "detect_max_side": settings.detect_max_side,
                                         "max_pixels": settings.max_pixels,
                                         "formats": list(settings.formats)}).encode())
        if not self.answers.poll(START_TIMEOUT_S) or self.answers.recv_bytes() != b"ready":
            self.stop()
            raise RuntimeError(f"the decode worker did not start within {START_TIMEOUT_S:g} s")

    def close(self) -> None:
        """Kill the process for good (the service is stopping)."""
        self.closed = True
        self.stop()

    def _replace(self) -> None:
        """Kill the process and start its replacement in the background, to be ready for the next image."""
        self.stop()
        threading.Thread(target=self.start, daemon=True, name="ferkit-decode-restart").start()

    def stop(self) -> None:
        """Kill the process (if any); the next image starts a new one."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
        for connection in (self.jobs, self.answers):
            if connection is not None:
                connection.close()
        self.jobs = self.answers = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def decode(self, data: bytes, name: str, detect: bool, memory: int, timeout_s: float,
               abandoned: threading.Event) -> Decoded:
        """Decode `data` and find its faces (or take it whole) in the worker, within `memory` bytes and `timeout_s`.

        Raises `ImageError` (422), `PixelLimitError` (413: over a limit, `DecodeTimeout` among them) or
        `Abandoned` when `abandoned` is set before the answer comes.
        """
        with self.lock:
            if self.closed:
                raise Abandoned(name)
            if self.process is None or self.process.poll() is not None:
                self.stop()
                self._start()
            assert self.jobs is not None and self.answers is not None
            try:
                self.jobs.send_bytes(json.dumps({"name": name, "detect": detect, "memory": memory}).encode())
                self.jobs.send_bytes(data)
            except OSError:
                self.stop()
                raise ImageError(f"{name}: the decoder stopped before it read the file") from None
            deadline = time.monotonic() + timeout_s
            while not self.answers.poll(POLL_S):
                if abandoned.is_set():
                    self._replace()
                    raise Abandoned(name)
                if time.monotonic() > deadline:
                    self._replace()
                    raise DecodeTimeout(f"{name}: took longer than {timeout_s:g} s to decode and search for faces "
                                        "(--decode-timeout); stopped")
            try:
                reply = json.loads(self.answers.recv_bytes())
                crops = self.answers.recv_bytes()
            except (EOFError, OSError):
                self._replace()
                raise ImageError(f"{name}: the decoder crashed on this file") from None
            if reply.get("exit"):  # it exits after a memory error: a new one is started for the next image
                self._replace()
            if reply["status"] != 200:
                error = PixelLimitError if reply["status"] == 413 else ImageError
                raise error(reply["error"])
        pixels = IMAGE_SIZE * IMAGE_SIZE
        faces = [Face(**{key: _tuples(value) for key, value in fields.items()},
                      crop=np.frombuffer(crops, np.uint8, pixels, i * pixels).reshape(IMAGE_SIZE, IMAGE_SIZE).copy())
                 for i, fields in enumerate(reply["faces"])]
        return Decoded(tuple(reply["size"]), faces, int(reply.get("peak_rss_bytes", 0)))


_spares: dict[WorkerSettings, list[DecodeWorker]] = {}
_spares_lock = threading.Lock()


def take_worker(settings: WorkerSettings) -> DecodeWorker:
    """A worker with these settings: one a stopped service gave back (still running), else a new one.

    One `ferkit serve` makes its workers once; a process that makes many apps (the tests) reuses them
    rather than starting processes for each.
    """
    with _spares_lock:
        spares = _spares.get(settings)
        if spares:
            return spares.pop()
    return DecodeWorker(settings)


def give_back_worker(worker: DecodeWorker) -> None:
    """Keep a service's worker for the next service with the same settings (it is killed at exit)."""
    if worker.closed:
        return
    with _spares_lock:
        _spares.setdefault(worker.settings, []).append(worker)


@atexit.register
def _close_spares() -> None:
    with _spares_lock:
        for spares in _spares.values():
            for worker in spares:
                worker.close()
        _spares.clear()
