"""Build an `LLMClient` from a `ModelConfig`: the one place that picks a backend."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from swirl_core.llm.cache import shared_journal
from swirl_core.llm.client import LLMClient
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
    """Run one shard's `work(client)` to completion in this process (a Dask worker, or the flow itself)."""
    tune_gc()

    async def main() -> T:
        client = build_client(cfg, journal_dir, fsync=fsync, tags=tags, meter=meter)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def build_client(cfg: ModelConfig, journal_dir: str | Path | None, *, fsync: bool = False, tags: dict[str, Any] | None = None,
                 meter: ShardMeter | None = None) -> LLMClient:
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
    return LLMClient(backend, journal, limits, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, prices=prices, tags=tags,
                     meter=meter)
