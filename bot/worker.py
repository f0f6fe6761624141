"""One worker thread for the anonymizer, fed by a bounded queue.

The models are not thread-safe and each call takes seconds of CPU, so calls run one at a
time, off the event loop, in arrival order. The bound turns overload into a polite refusal
instead of an ever-growing backlog of images in memory. KeyedLocks serialize the work of one
user, or the taps on one selection, without keeping a lock per user forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    pass


class Worker:
    def __init__(self, max_waiting: int) -> None:
        self.queue: asyncio.Queue[tuple[Callable[[], Any], asyncio.Future[Any]]] = asyncio.Queue(max_waiting)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonymizer")
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="anonymizer-worker")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while not self.queue.empty():
            _, future = self.queue.get_nowait()
            future.cancel()
        self.executor.shutdown(wait=True)

    @property
    def ahead(self) -> int:
        """Jobs a new submission would wait behind."""
        return self.queue.qsize() + int(self.busy)

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Queues ``job``; raises QueueFull at once rather than waiting for room."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((job, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job, future = await self.queue.get()
            if future.cancelled():
                continue
            self.busy = True
            try:
                result = await loop.run_in_executor(self.executor, job)
            except Exception as exc:  # the job's failure belongs to whoever awaits it
                if not future.cancelled():
                    future.set_exception(exc)
            else:
                if not future.cancelled():
                    future.set_result(result)
            finally:
                self.busy = False


class KeyedLocks:
    """One asyncio.Lock per key (a user, a session), kept only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def busy(self, key: Hashable) -> bool:
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
