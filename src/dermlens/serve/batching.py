"""Dynamic batching: concurrent requests' images run as one onnxruntime call, within a small wait budget.

Requests decode and resize their image in their own threads, then `submit` it; one worker thread takes
whatever is queued (up to `max_batch`), waits at most `max_wait_ms` for more only while other requests
are still decoding, and scores the batch with `Predictor.predict_arrays`. The queue is bounded: when it
is full, `submit` raises QueueFull at once (the API answers 503).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermlens.errors import QueueFull  # noqa: F401 (re-exported)
from dermlens.infer.prediction import Prediction
from dermlens.infer.predictor import Predictor


@dataclass
class _Job:
    image: np.ndarray  # uint8 HxWx3 at the model size
    meta: dict[str, Any]
    size: tuple[int, int]  # (width, height) of the original image
    queued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """A bounded queue of images and one worker thread that scores them in batches."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float, max_queue: int) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._arriving, self._lock = 0, threading.Lock()
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._loop, name="dermlens-batcher", daemon=True)
        self._thread.start()

    def arriving(self, delta: int) -> None:
        """Requests announce a decode in progress (+1) and its end (-1): the worker waits only for these."""
        with self._lock:
            self._arriving += delta

    def submit(self, image: np.ndarray, meta: dict[str, Any], size: tuple[int, int]) -> Future:
        """Queue one model-size image; the Future resolves to its Prediction. Raises QueueFull."""
        job = _Job(image, meta, size)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull("the prediction queue is full") from None
        return job.future

    async def predict(self, image: np.ndarray, meta: dict[str, Any], size: tuple[int, int]) -> Prediction:
        return await asyncio.wrap_future(self.submit(image, meta, size))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self, first: _Job) -> list[_Job]:
        jobs, deadline = [first], time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if self._arriving <= 0 or remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs = self._collect(first)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            r = self.predictor.predict_arrays([j.image for j in jobs], [j.meta for j in jobs])
        except Exception as e:  # noqa: BLE001 - the requests get the error; the worker keeps serving
            for j in jobs:
                j.future.set_exception(e)
            return
        model_ms = (time.perf_counter() - t0) * 1000.0
        self.batches, self.images = self.batches + 1, self.images + len(jobs)
        for i, j in enumerate(jobs):
            timing = {"queue": (t0 - j.queued) * 1000.0, "model": model_ms, "batch": float(len(jobs))}
            j.future.set_result(self.predictor.result_at(r, i, j.size, timing))
