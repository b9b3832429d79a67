"""Rate limits (requests and tokens per minute) and retry backoff."""

from __future__ import annotations

import asyncio
import random
import time
from email.utils import parsedate_to_datetime


class TokenBucket:
    """A continuous-refill bucket; `acquire(n)` waits until n units are available."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
                self.updated = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


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
