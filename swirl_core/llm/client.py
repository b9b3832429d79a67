"""One async client for policy and judge: cache → limits → backend, with retries and a cost ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from swirl_core.llm.base import Backend, ChatRequest, LLMError, RetryableError
from swirl_core.llm.cache import CallJournal
from swirl_core.llm.cost import call_cost
from swirl_core.llm.limits import ProcessLimits, backoff_delay
from swirl_core.progress import ShardMeter
from swirl_core.records import LLMResponse

# The meter of the shard running in this asyncio task (tasks copy it to the tasks they spawn).
_SHARD_METER: ContextVar[ShardMeter | None] = ContextVar("swirl_shard_meter", default=None)


@contextmanager
def metered(meter: ShardMeter | None) -> Iterator[None]:
    """Count the calls made inside the block (and in the tasks it spawns) on `meter`."""
    token = _SHARD_METER.set(meter)
    try:
        yield
    finally:
        _SHARD_METER.reset(token)


class LLMClient:
    def __init__(
        self,
        backend: Backend,
        journal: CallJournal | None,
        limits: ProcessLimits,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        prices: tuple[float, float] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.journal = journal
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.prices = prices
        self.tags = dict(tags or {})  # e.g. run_id, purpose: copied into every ledger row
        self.limits = limits  # this process's, shared with every other client of the model in it
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats = {"sent": 0, "cache_hits": 0, "retries": 0, "failures": 0}
        self._meter = ShardMeter()  # for calls made outside any shard's `metered` block

    @property
    def meter(self) -> ShardMeter:
        """The meter of the shard whose task makes this call (calls paid and replayed, the units it finished):
        overlapping shards share one client, each counts its own."""
        return _SHARD_METER.get() or self._meter

    async def complete(self, request: ChatRequest) -> LLMResponse:
        key = request.key()
        if self.journal is not None and (hit := self.journal.get(key)) is not None:
            self.stats["cache_hits"] += 1
            self.meter.replayed(hit["cost_usd"])
            return _from_record(hit, request.model)
        # The same request twice at once (e.g. two judges of one step) is paid once.
        if key in self._inflight:
            shared = await asyncio.shield(self._inflight[key])
            self.meter.replayed(shared.cost_usd)
            return shared.model_copy(update={"cached": True})
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            response = await self._send(request, key)
            future.set_result(response)
            return response
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    async def _send(self, request: ChatRequest, key: str) -> LLMResponse:
        limits = self.limits
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                # A slot first, then the rate: a request that waited for a slot cannot spend a token earned
                # long before, so requests leave at the limiter's pace, never in a burst of saved-up tokens.
                async with limits.in_flight:
                    if limits.requests:
                        await limits.requests.acquire(1)
                    if limits.tokens:
                        await limits.tokens.acquire(_estimate_tokens(request))
                    self.stats["sent"] += 1
                    response = await self.backend.complete(request, self.timeout_s)
            except RetryableError as exc:
                last_error = exc
                if attempt == self.max_retries:
                    break
                self.stats["retries"] += 1
                await asyncio.sleep(backoff_delay(attempt, exc.retry_after))
                continue
            if response.cost_usd is None:
                response.cost_usd = call_cost(self.prices, response.prompt_tokens, response.completion_tokens)
            response.key = key
            if self.journal is not None:
                # Durable before use: a crash after this line never pays for this call again.
                self.journal.append(_to_record(request, key, response, attempt + 1, self.backend.name, self.tags))
            self.meter.paid(response.prompt_tokens, response.completion_tokens, response.cost_usd)
            return response
        self.stats["failures"] += 1
        raise LLMError(f"{request.model}: gave up after {self.max_retries + 1} attempts: {last_error}")

    async def aclose(self) -> None:
        await self.backend.aclose()
        if self.journal is not None:
            self.journal.release()


def _estimate_tokens(request: ChatRequest) -> int:
    return sum(len(m.get("content") or "") for m in request.messages) // 4 + request.max_tokens


def _to_record(request: ChatRequest, key: str, r: LLMResponse, attempts: int, backend: str, tags: dict) -> dict[str, Any]:
    return {
        "key": key,
        "model": request.model,
        "backend": backend,
        "prompt_version": request.prompt_version,
        "sample_index": request.sample_index,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "constraint": request.constraint_label,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cost_usd": r.cost_usd,
        "latency_s": round(r.latency_s, 6),
        "choice_probs": r.choice_probs,
        "tool_calls": r.tool_calls,
        "attempts": attempts,
        "created_at": datetime.now(UTC).isoformat(),
        **tags,
    }


def _from_record(record: dict[str, Any], model: str) -> LLMResponse:
    return LLMResponse(
        text=record["text"],
        finish_reason=record.get("finish_reason"),
        prompt_tokens=record.get("prompt_tokens"),
        completion_tokens=record.get("completion_tokens"),
        cost_usd=record.get("cost_usd"),
        latency_s=record.get("latency_s") or 0.0,
        choice_probs=record.get("choice_probs"),
        tool_calls=record.get("tool_calls"),
        model=model,
        cached=True,
        key=record["key"],
    )
