"""Rate limits (requests and tokens per minute), requests in flight, and retry backoff.

The limits hold for a whole run: a stage's flow splits the model's budget evenly across the processes that run
its shards at once (`LimitsConfig.shared_by`), and each process keeps one limiter per model and share for its
lifetime (`process_limits`), used by every shard, event loop and thread in it. Splitting was chosen over one
limiter served through the Dask scheduler: the bound holds by construction (the shares sum to the limit), a
request costs no round trip to another process, and it works the same on any executor (Dask, threads, the
flow itself). Its price: a worker that is idle leaves its share unused (e.g. the last shard of a stage).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# A fresh limiter may send one second's worth at once, not a minute's: a process (a Dask worker started for a
# run, or a shard retried elsewhere) never bursts past the limit, so any 60 s window sees at most 61/60 of it.
BURST_S = 1.0


class RateLimiter:
    """Units per minute for every event loop and thread of this process: a token bucket whose level may go
    below zero, so each `acquire` reserves its units at once and sleeps until they are earned (a request larger
    than the burst just waits longer; a waiter never lets a later one pass)."""

    def __init__(self, per_minute: float, burst_s: float = BURST_S) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, amount: float = 1.0) -> float:
        """Take `amount` units now; return the seconds until they are earned."""
        with self._lock:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate) - amount
            self.updated = now
            return max(0.0, -self.level / self.rate)

    async def acquire(self, amount: float = 1.0) -> None:
        if (wait := self.reserve(amount)) > 0:
            await asyncio.sleep(wait)


class ProcessSemaphore:
    """An asyncio semaphore for every event loop and thread of this process (asyncio's own is bound to one
    loop, and each shard runs its own): a released slot goes straight to the oldest waiter, on its loop."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._lock = threading.Lock()

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                queued = waiter in self._waiters
                if queued:
                    self._waiters.remove(waiter)
            # Granted, then cancelled before it resumed: the slot goes on (a grant still on its way to a
            # cancelled future is passed on by `_grant`).
            if not queued and waiter[1].done() and not waiter[1].cancelled():
                self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                try:
                    if asyncio.get_running_loop() is loop:  # the common case: no wake-up through the loop's pipe
                        loop.call_soon(self._grant, future)
                    else:
                        loop.call_soon_threadsafe(self._grant, future)
                    return
                except RuntimeError:  # its loop has closed: the next waiter
                    continue
            self._free += 1

    def _grant(self, future: asyncio.Future[None]) -> None:
        if future.done():  # its waiter was cancelled meanwhile
            self._release()
        else:
            future.set_result(None)


@dataclass(frozen=True)
class ProcessLimits:
    """One process's share of a model's limits."""

    in_flight: ProcessSemaphore
    requests: RateLimiter | None
    tokens: RateLimiter | None


_process_limits: dict[tuple[str, int, float | None, float | None], ProcessLimits] = {}
_process_limits_lock = threading.Lock()


def process_limits(model: str, concurrency: int, requests_per_minute: float | None,
                   tokens_per_minute: float | None) -> ProcessLimits:
    """This process's one set of limiters for a model and share: every client built for them uses it."""
    key = (model, concurrency, requests_per_minute, tokens_per_minute)
    with _process_limits_lock:
        if key not in _process_limits:
            _process_limits[key] = ProcessLimits(
                ProcessSemaphore(concurrency),
                RateLimiter(requests_per_minute) if requests_per_minute else None,
                RateLimiter(tokens_per_minute) if tokens_per_minute else None)
        return _process_limits[key]


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` is seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, retry_after: float | None, base: float = 0.5, cap: float = 30.0) -> float:
    """The server's Retry-After wins when given; otherwise exponential backoff with full jitter."""
    if retry_after is not None:
        return min(retry_after, cap * 4)
    return random.uniform(0, min(cap, base * 2**attempt))
