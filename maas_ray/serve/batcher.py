"""Continuous batching for model replicas: each batch is what queued during the last one.

Ray Serve's ``@serve.batch`` (2.60) forms a batch once its wait timeout passes,
even while the previous batch still runs: its ``max_concurrent_batches``
semaphore holds formed batches back, not the forming. With a forward pass
longer than the timeout, the requests that arrive meanwhile are cut into
batches of one or two, which then run one after another (mean batch 1.16 with
64 requests inside the replica, issue 15). Here one loop runs one batch at a
time and forms the next only when the forward pass ends, from everything that
queued meanwhile; the wait applies only to a batch started from idle.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# One result per item, in order; an exception answers its own item only.
RunBatch = Callable[[list[T]], Awaitable[list[R | BaseException]]]


class ContinuousBatcher(Generic[T, R]):
    """Merge concurrent :meth:`submit` calls into calls of ``run`` on lists of items.

    Lives on one event loop (the replica's, where ``submit`` is awaited); ``run``
    should do its heavy work in a thread so that loop keeps taking requests.
    """

    def __init__(self, run: RunBatch[T, R], max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item``; its result, or its exception raised here."""
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            # A context of its own: not the first caller's request context (ids, model id).
            self._worker = asyncio.get_running_loop().create_task(
                self._loop(), context=contextvars.Context())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:  # idle: wait for a request, then briefly for company
                self._arrived.clear()
                await self._arrived.wait()
                if self.wait_s > 0 and len(self._queue) < self.max_batch_size:
                    await asyncio.sleep(self.wait_s)
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # cancelled (client gone, timed out): skip its work
                batch.append((item, future))
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} items gave {len(results)} results")
        except Exception as err:  # the whole batch failed: each caller gets the error
            logger.exception("batch of %d failed", len(batch))
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
