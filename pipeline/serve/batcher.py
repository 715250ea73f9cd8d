"""Dynamic batching: concurrent requests' images share forward passes of the one model.

Requests put jobs (their decoded images and crops) into a queue bounded in images; one worker task takes the
first job, waits up to ``max_wait`` seconds for more until ``batch_size`` images are waiting, and scores the
jobs it took as one batch in the model's thread (one model, one forward pass at a time). A full queue refuses
a job (:class:`QueueFull`, answered 503 with Retry-After); a cancelled job leaves the queue at once.
:class:`Counters` are what ``GET /v1/stats`` shows.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import PipelineError

ScoreBatch = Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]  # (images, crops) -> scores


class QueueFull(PipelineError):
    """The queue holds too many images to take this job; ``retry_after`` seconds is a fair wait."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    images: Sequence[np.ndarray]
    crops: Sequence[str]
    future: asyncio.Future = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass
class Counters:
    """Since the start: jobs accepted, refused and cancelled, images scored, batches (model calls) run."""

    requests: int = 0  # jobs accepted into the queue
    rejected: int = 0  # jobs refused with 503 (queue full)
    cancelled: int = 0  # jobs taken out of the queue because their client went away
    images: int = 0  # images scored (re-encoded copies of robust requests included)
    batches: int = 0  # model calls; fewer than requests when requests shared batches
    largest_batch: int = 0  # images of the largest batch
    queued: int = 0  # images waiting now
    in_batch: int = 0  # images being scored now

    def as_json(self) -> dict[str, int]:
        return asdict(self)


class Batcher:
    """The queue and its worker; create and :meth:`start` it inside the server's event loop."""

    def __init__(self, score: ScoreBatch, batch_size: int, max_wait_s: float, max_queue: int) -> None:
        self.score = score
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.counters = Counters()
        self._jobs: deque[Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._batch_seconds = 1.0  # the last batch's duration, for Retry-After

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop the worker (after the server has answered its requests) and the model's thread."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._model.shutdown(wait=True)

    def submit(self, images: Sequence[np.ndarray], crops: Sequence[str]) -> Job:
        """Queue a job; its future gets the scores in order. Raises :class:`QueueFull`."""
        if self.counters.queued + len(images) > self.max_queue:
            self.counters.rejected += 1
            waiting = self.counters.queued + self.counters.in_batch
            raise QueueFull(max(1, math.ceil(self._batch_seconds * math.ceil(waiting / self.batch_size))))
        job = Job(images, crops, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self.counters.requests += 1
        self.counters.queued += job.size
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: take the job out of the queue (a job being scored finishes unseen)."""
        if job in self._jobs:
            self._jobs.remove(job)
            self.counters.queued -= job.size
            self.counters.cancelled += 1
        job.future.cancel()

    async def _wait_for(self, timeout: float | None) -> None:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            pass

    def _take(self) -> list[Job]:
        """Jobs from the front while they fit a batch (the first always, however large)."""
        taken = [self._jobs.popleft()]
        size = taken[0].size
        while self._jobs and size + self._jobs[0].size <= self.batch_size:
            size += self._jobs[0].size
            taken.append(self._jobs.popleft())
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                await self._wait_for(None)
            deadline = loop.time() + self.max_wait_s
            while self.counters.queued < self.batch_size and (left := deadline - loop.time()) > 0:
                await self._wait_for(left)
            if not self._jobs:  # every waiting job was cancelled
                continue
            jobs = self._take()
            images = [image for job in jobs for image in job.images]
            crops = [crop for job in jobs for crop in job.crops]
            self.counters.queued -= len(images)
            self.counters.in_batch = len(images)
            start = time.perf_counter()
            try:
                scores = await loop.run_in_executor(self._model, self.score, images, crops)
            except Exception as error:  # a bug or an out-of-memory: every job of the batch answers 500
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            finally:
                self.counters.in_batch = 0
                self._batch_seconds = time.perf_counter() - start
            self.counters.batches += 1
            self.counters.images += len(images)
            self.counters.largest_batch = max(self.counters.largest_batch, len(images))
            offset = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(scores[offset : offset + job.size])
                offset += job.size
