"""Every other provider through litellm (Anthropic, Gemini, Bedrock, Ollama, …)."""

from __future__ import annotations

import os
import time

from swirl_core.llm.base import ChatRequest, LLMError, RetryableError
from swirl_core.llm.limits import parse_retry_after
from swirl_core.records import LLMResponse


def import_litellm():
    # Without this, importing litellm fetches its price map from the internet.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    litellm.drop_params = True  # e.g. `seed` on providers that lack it: drop, don't fail
    return litellm


class LiteLLMBackend:
    name = "litellm"

    def __init__(self, model: str, *, api_base: str | None, api_key: str | None) -> None:
        self.litellm = import_litellm()
        self.model = model
        self.api_base = api_base
        self.api_key = api_key  # None: litellm reads the provider's usual environment variable

    async def complete(self, request: ChatRequest, timeout_s: float) -> LLMResponse:
        litellm = self.litellm
        started = time.perf_counter()
        kwargs = dict(request.extra_body)
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.stop:
            kwargs["stop"] = request.stop
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.tools:
            kwargs["tools"] = request.tools
        try:
            resp = await litellm.acompletion(
                model=self.model, messages=request.messages, temperature=request.temperature,
                max_tokens=request.max_tokens, api_base=self.api_base, api_key=self.api_key,
                timeout=timeout_s, num_retries=0, **kwargs,
            )
        except (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError,
                litellm.InternalServerError, litellm.ServiceUnavailableError) as exc:
            headers = getattr(getattr(exc, "response", None), "headers", None) or {}
            raise RetryableError(f"{exc.__class__.__name__}: {str(exc)[:300]}", parse_retry_after(headers.get("retry-after"))) from exc
        except litellm.exceptions.APIError as exc:
            status = getattr(exc, "status_code", 0) or 0
            if status >= 500 or status == 429:
                raise RetryableError(f"HTTP {status}: {str(exc)[:300]}") from exc
            raise LLMError(f"{exc.__class__.__name__}: {str(exc)[:300]}") from exc
        except litellm.exceptions.OpenAIError as exc:
            raise LLMError(f"{exc.__class__.__name__}: {str(exc)[:300]}") from exc
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        try:
            cost = litellm.completion_cost(completion_response=resp)
        except Exception:  # litellm raises many types for unmapped models; the price is unknown
            cost = None
        calls = getattr(choice.message, "tool_calls", None)
        return LLMResponse(
            text=choice.message.content or "",
            tool_calls=[c.model_dump() if hasattr(c, "model_dump") else dict(c) for c in calls] if calls else None,
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cost_usd=cost,
            latency_s=time.perf_counter() - started,
            model=request.model,
        )

    async def aclose(self) -> None:
        return None
