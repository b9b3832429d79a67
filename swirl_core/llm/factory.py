"""Build an `LLMClient` from a `ModelConfig`: the one place that picks a backend."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from swirl_core.llm.cache import shared_journal
from swirl_core.llm.client import LLMClient, metered
from swirl_core.llm.config import ModelConfig
from swirl_core.llm.cost import price_per_token
from swirl_core.llm.limits import process_limits
from swirl_core.progress import ShardMeter

# Reads a named secret (a Prefect Secret block): plugged in by the orchestration layer (tasks/), because
# this library imports no orchestrator. Keys are looked up where the client is built: on the Dask worker.
_secret_reader: Callable[[str], str] | None = None


def use_secret_reader(read: Callable[[str], str]) -> None:
    global _secret_reader
    _secret_reader = read


def _api_key(cfg: ModelConfig) -> str | None:
    if cfg.api_key_secret:
        if _secret_reader is None:
            raise ValueError(f"api_key_secret {cfg.api_key_secret!r} needs a secret store: run through the flows")
        return _secret_reader(cfg.api_key_secret)
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"environment variable {cfg.api_key_env} is not set")
        return key
    return None


T = TypeVar("T")
NO_KEY = "no-key"  # sent to a served model that needs none, where a client insists on one


def served_key(cfg: ModelConfig) -> str | None:
    """The key of an OpenAI-protocol server: the configured one; OpenAI's own usual variable only for openai/."""
    return _api_key(cfg) or (os.environ.get("OPENAI_API_KEY") if cfg.provider == "openai" else None)


def tune_gc() -> None:
    """Finished trajectories and journal entries stay alive until a shard returns; default GC
    thresholds rescan them thousands of times (measured ~30 µs per call at high throughput)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_with_client(cfg: ModelConfig, journal_dir: str | Path | None, work: Callable[[LLMClient], Awaitable[T]], *,
                    fsync: bool = False, tags: dict[str, Any] | None = None, meter: ShardMeter | None = None) -> T:
    """Run one shard's `work(client)` to completion in this process (a Dask worker, or the flow itself), on the
    process's one event loop with the client it keeps for these settings; `meter` counts this shard's calls."""
    tune_gc()
    key = orjson.dumps([cfg.model_dump(mode="json"), str(journal_dir), fsync, tags], option=orjson.OPT_SORT_KEYS)
    return _ProcessLoop.get().run(key, lambda: build_client(cfg, journal_dir, fsync=fsync, tags=tags), work, meter)


@dataclass
class _Held:
    client: LLMClient
    users: int = 0


class _ProcessLoop:
    """One event loop for every shard of this process, in a thread of its own, and the clients built on it.

    No barrier at a shard's end: the shards that overlap on a worker (its threads) put their trajectories on one
    loop and one client, so a slot a finished shard frees goes at once to another's next call, the connection
    pool stays warm across shards (a client per shard reconnected every slot), and no wake-up crosses threads.
    A kept client reads what other processes journaled since before each shard it runs, as a new one would. One
    left idle is closed after `IDLE_S`: that finishes its journal file (compaction may fold it) and frees an
    in-process model once its stage is over."""

    IDLE_S = 1.0  # longer than the gap between one shard's end and the next one's start on a worker
    _instance: _ProcessLoop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._clients: dict[bytes, _Held] = {}  # touched on the loop only
        threading.Thread(target=self.loop.run_forever, name="swirl-llm-loop", daemon=True).start()
        atexit.register(self.close)

    @classmethod
    def get(cls) -> _ProcessLoop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, key: bytes, build: Callable[[], LLMClient], work: Callable[[LLMClient], Awaitable[T]],
            meter: ShardMeter | None) -> T:
        return asyncio.run_coroutine_threadsafe(self._run(key, build, work, meter), self.loop).result()

    async def _run(self, key: bytes, build: Callable[[], LLMClient], work: Callable[[LLMClient], Awaitable[T]],
                   meter: ShardMeter | None) -> T:
        held = self._clients.get(key)
        if held is None:
            held = self._clients[key] = _Held(build())
        elif held.client.journal is not None:
            held.client.journal.refresh()
        held.users += 1
        try:
            with metered(meter):  # this shard's task and the ones it spawns: overlapping shards share the client
                return await work(held.client)
        finally:
            held.users -= 1
            if not held.users:
                self.loop.call_later(self.IDLE_S, lambda: self.loop.create_task(self._close_if_idle(key, held)))

    async def _close_if_idle(self, key: bytes, held: _Held) -> None:
        if not held.users and self._clients.get(key) is held:
            del self._clients[key]
            await held.client.aclose()

    def close(self) -> None:
        async def close_all() -> None:
            while self._clients:
                await self._clients.popitem()[1].client.aclose()

        with contextlib.suppress(Exception):  # at exit: a client that fails to close loses nothing journaled
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def build_client(cfg: ModelConfig, journal_dir: str | Path | None, *, fsync: bool = False, tags: dict[str, Any] | None = None) -> LLMClient:
    backend_name = cfg.resolved_backend
    prices = cfg.prices
    if backend_name == "transformers":
        from swirl_core.llm.local_models import resolve_local_model
        from swirl_core.llm.transformers_backend import TransformersBackend

        backend = TransformersBackend(resolve_local_model(cfg.model), max_batch=cfg.local_batch_size)
    elif backend_name == "openai_compat":
        from swirl_core.llm.openai_compat import OpenAICompatBackend

        endpoint = cfg.served_endpoint or cfg.api_base
        if endpoint is None:
            raise ValueError(f"{cfg.model}: backend openai_compat needs an api_base")
        backend = OpenAICompatBackend(endpoint, model_name=cfg.model.partition("/")[2], api_key=served_key(cfg),
                                      concurrency=cfg.concurrency)
        prices = prices or price_per_token(cfg.model)
    elif cfg.served_endpoint:
        from swirl_core.llm.litellm_backend import LiteLLMBackend

        # The same request to the same URL as the fast path: litellm's OpenAI client, whatever the provider
        # prefix (its own Ollama client would speak Ollama's native API instead). It insists on a key, and
        # must not fall back to OPENAI_API_KEY for a server that is not OpenAI's.
        backend = LiteLLMBackend("openai/" + cfg.model.partition("/")[2], api_base=cfg.served_endpoint,
                                 api_key=served_key(cfg) or NO_KEY)
    else:
        from swirl_core.llm.litellm_backend import LiteLLMBackend

        backend = LiteLLMBackend(cfg.model, api_base=cfg.api_base, api_key=_api_key(cfg))
    journal = shared_journal(journal_dir, fsync=fsync) if journal_dir is not None else None
    limits = process_limits(cfg.resolved_identity, cfg.concurrency, cfg.requests_per_minute, cfg.tokens_per_minute)
    return LLMClient(backend, journal, limits, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, prices=prices, tags=tags)
