"""Fast path for OpenAI-compatible endpoints (vLLM, llama.cpp, Ollama, OpenAI itself).

Plain aiohttp with one pooled session: measured here, litellm's per-call overhead halves
throughput at zero latency and the openai SDK's httpx transport is slower still.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from typing import Any

import aiohttp
import orjson

from swirl_core.llm.base import ChatRequest, LLMError, RetryableError
from swirl_core.llm.limits import parse_retry_after
from swirl_core.records import LLMResponse

TOP_LOGPROBS = 5  # alternatives per token asked for with `logprob_choices`: both verdicts' first tokens fit
LOGPROB_FIELDS = {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
_LEADING_WORD = re.compile(r"[^A-Za-z]*([A-Za-z]*)")
log = logging.getLogger(__name__)


class OpenAICompatBackend:
    name = "openai_compat"

    def __init__(self, api_base: str, *, model_name: str, api_key: str | None, concurrency: int) -> None:
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model_name = model_name  # the provider prefix stripped: what the server knows
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        # Set when the server answered 4xx to the logprobs fields: later requests go without (no P(GOOD)).
        self.logprobs_refused = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.tools:
            body["tools"] = request.tools
        if request.logprob_choices and not self.logprobs_refused:
            body.update(LOGPROB_FIELDS)
        body.update(request.extra_body)
        return body

    async def complete(self, request: ChatRequest, timeout_s: float) -> LLMResponse:
        with_logprobs = bool(request.logprob_choices) and not self.logprobs_refused
        try:
            return await self._complete(request, timeout_s)
        except _Refused as exc:
            if not with_logprobs:
                raise
            if not self.logprobs_refused:  # once: requests in flight meanwhile are asked again quietly
                log.warning("%s answered %s to a request with logprobs: asking without them for the rest of this run "
                            "(no P(GOOD): p_good stays NULL)", self.url, exc)
            self.logprobs_refused = True
            return await self._complete(request, timeout_s)

    async def _complete(self, request: ChatRequest, timeout_s: float) -> LLMResponse:
        started = time.perf_counter()
        try:
            async with self._get_session().post(
                self.url, data=orjson.dumps(self.payload(request)), timeout=_timeout(timeout_s)
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise RetryableError(f"timeout after {timeout_s:.0f}s") from exc
        except aiohttp.ClientError as exc:
            raise RetryableError(f"connection error: {exc.__class__.__name__}") from exc
        if status == 429 or status >= 500:
            raise RetryableError(f"HTTP {status}: {error_text(raw)}", retry_after)
        if status != 200:
            raise _Refused(f"HTTP {status}: {error_text(raw)}")
        try:
            data = orjson.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            tool_calls = choice["message"].get("tool_calls") or None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RetryableError("malformed response body") from exc
        usage = data.get("usage") or {}
        asked = request.logprob_choices if not self.logprobs_refused else None
        return LLMResponse(
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=time.perf_counter() - started,
            choice_probs=choice_probs(choice.get("logprobs"), asked) if asked else None,
            tool_calls=tool_calls,
            model=request.model,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Refused(LLMError):
    """A 4xx other than 429: the request itself was refused."""


def choice_probs(logprobs: dict[str, Any] | None, choices: tuple[str, ...]) -> dict[str, float] | None:
    """Each choice's probability, renormalised over the choices, at the token where the reply's last choice
    word starts (a whole word, possibly split over tokens): read from that token's top alternatives. None
    when the server sent no logprobs or the reply states no choice."""
    tokens = (logprobs or {}).get("content") or []
    upper = [c.upper() for c in choices]
    for i in range(len(tokens) - 1, -1, -1):
        word = _LEADING_WORD.match(tokens[i].get("token") or "").group(1).upper()
        rest = "".join(t.get("token") or "" for t in tokens[i:]).lstrip()
        rest = re.sub(r"^[^A-Za-z]*", "", rest).upper()
        if not word or not any(rest.startswith(c) and not rest[len(c):len(c) + 1].isalpha() for c in upper):
            continue
        mass = dict.fromkeys(choices, 0.0)
        for alt in tokens[i].get("top_logprobs") or [tokens[i]]:
            alt_word = _LEADING_WORD.match(alt.get("token") or "").group(1).upper()
            for choice, c in zip(choices, upper, strict=True):
                if alt_word and c.startswith(alt_word):
                    mass[choice] += math.exp(alt["logprob"])
        total = sum(mass.values())
        return {c: m / total for c, m in mass.items()} if total > 0 else None
    return None


@functools.lru_cache(maxsize=16)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def error_text(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
        err = body.get("error") or body.get("detail")  # FastAPI servers (transformers serve) say `detail`
        return str(err.get("message") if isinstance(err, dict) else err)[:300]
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:300].decode("utf-8", "replace")
