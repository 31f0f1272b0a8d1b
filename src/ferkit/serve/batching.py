"""The micro-batcher: the face crops of concurrent requests gathered into one model call on the model's thread.

Importable without the serve extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]
"""uint8 face crops (N, 48, 48) -> logits (N, classes): `EmotionRecognizer.logits`."""


class MicroBatcher:
    """Gathers the face crops of concurrent requests into one `model` call on the model's thread.

    The first request to arrive opens a window of `window_s`; requests that arrive within it, or
    queue up while the model is busy, join the batch until it holds `max_batch` faces. A window
    of 0 turns batching off: each request's crops go through the model on their own. Each request
    gets its own rows of the logits back and makes its results from them with its own options
    (`EmotionRecognizer.results`), so requests with different priors share one call. `on_batch`
    hears of each call: its faces, and the seconds it took on the model's thread.
    """

    def __init__(self, model: Model, executor: ThreadPoolExecutor, window_s: float, max_batch: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.model, self.executor = model, executor
        self.window_s, self.max_batch = window_s, max_batch
        self.on_batch = on_batch or (lambda faces, seconds: None)
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = asyncio.Queue()
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

    async def submit(self, crops: np.ndarray) -> np.ndarray:
        """`model(crops)` for at least one crop, from a model call shared with other requests' crops."""
        if self.task is None:
            return await self._call(crops)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((crops, future))
        return await future

    async def _call(self, crops: np.ndarray) -> np.ndarray:
        def run() -> tuple[np.ndarray, float]:
            # Timed on the model's thread: the call itself, not its wait for the thread.
            start = time.perf_counter()
            logits = self.model(crops)
            return logits, time.perf_counter() - start

        logits, seconds = await asyncio.get_running_loop().run_in_executor(self.executor, run)
        self.on_batch(len(crops), seconds)
        return logits

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count, deadline = len(batch[0][0]), loop.time() + self.window_s
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
                count += len(item[0])
            await self._serve(batch)

    async def _serve(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        batch = [(crops, future) for crops, future in batch if not future.done()]  # skip timed-out requests
        if not batch:
            return
        try:
            logits = await self._call(np.concatenate([crops for crops, _ in batch]))
        except Exception as err:  # the model failed: every waiting request hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for crops, future in batch:
            if not future.done():
                future.set_result(logits[start : start + len(crops)])
            start += len(crops)
