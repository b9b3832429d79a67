"""A model's configuration in three small parts (endpoint, sampling, limits) composed into `ModelConfig`.

The LLM layer's own config: it imports nothing above llm/, so the client factory, the judge reward and the
flow configs all read the same fields.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from swirl_core.config_base import StrictConfig
from swirl_core.constraints import ServerKind
from swirl_core.llm.local_models import DEFAULT_LOCAL_MODEL, is_local_model, model_identity

# litellm providers that speak the OpenAI protocol: with an api_base (Ollama: by default) they take the fast path.
OLLAMA_PROVIDERS = ("ollama", "ollama_chat")
OPENAI_COMPATIBLE_PROVIDERS = ("openai", "hosted_vllm", "vllm", "openai_compat", "llamacpp", "lm_studio", *OLLAMA_PROVIDERS)
OLLAMA_DEFAULT_BASE = "http://localhost:11434"  # litellm's default; Ollama's OpenAI API is under /v1 of it


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """`MODEL[@API_BASE]` → (MODEL, API_BASE): the one spelling of a model and its endpoint, on the command
    line, in YAML and in deployment forms. An `@` not followed by an http(s) URL belongs to the name."""
    spec = spec.strip()
    model, sep, api_base = spec.rpartition("@")
    if not sep or not api_base.startswith(("http://", "https://")):
        model, api_base = spec, None
    if not model:
        raise ValueError(f"model spec {spec!r} names no model")
    return model, api_base


class EndpointConfig(StrictConfig):
    """Which model, where, and under which name its results are stored."""

    model: str = Field(DEFAULT_LOCAL_MODEL, description="MODEL[@API_BASE]: a litellm name (openai/gpt-4o-mini, hosted_vllm/NAME, …) "
                                                        "with an optional endpoint, 'smollm2', or a local checkpoint folder")
    api_base: str | None = Field(None, description="endpoint of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key (default: the provider's usual one); the key itself is never stored")
    api_key_secret: str | None = Field(None, description="NAME of a Prefect Secret block holding the key, read by the process that makes the calls (instead of api_key_env)")
    identity: str | None = Field(None, min_length=1, description="the name its calls, trajectories and results are stored under; "
                                 "default MODEL@API_BASE, so two endpoints are two models: give one model served on several hosts one identity")
    backend: Literal["auto", "openai_compat", "litellm", "transformers"] = "auto"
    server_kind: Literal["auto"] | ServerKind = Field(
        "auto", description="how a served constraint is sent: vLLM structured_outputs, SGLang regex, llama.cpp GBNF "
                            "grammar, TGI regex response_format; auto = what the server's /models says, else openai (none)")
    input_price_per_mtok: float | None = Field(None, ge=0, description="USD per 1M input tokens, for models litellm does not price")
    output_price_per_mtok: float | None = Field(None, ge=0)


class SamplingConfig(StrictConfig):
    """How each reply is decoded."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="per step; default 256 for API models, 64 in-process")
    few_shot: bool | None = Field(None, description="demonstrations as chat turns; default on for in-process models")
    constraint: Literal["auto", "none", "grammar", "regex"] = Field(
        "auto", description="decoding constraint: grammar (in-process), regex (served: verified by a probe first); "
                            "auto = grammar in-process, none otherwise"
    )
    allow_unconstrained: bool = Field(False, description="when the probe finds the server ignores the constraint, "
                                                         "continue without it (steps record constraint NULL) instead of stopping")


class LimitsConfig(StrictConfig):
    """How hard the model is driven: requests in flight, rate limits, timeouts, retries, in-process batches."""

    concurrency: int = Field(64, ge=1, le=4096, description="max requests in flight for the whole run, across its workers "
                                                             "(at least one per worker)")
    requests_per_minute: float | None = Field(None, gt=0, description="for the whole run, across its workers")
    tokens_per_minute: float | None = Field(None, gt=0, description="for the whole run, across its workers (estimated: prompt characters / 4 + max tokens)")
    timeout_s: float = Field(120.0, gt=0, description="seconds per request attempt")
    max_retries: int = Field(6, ge=0, le=50, description="retries on 429/5xx/timeouts")
    local_batch_size: int = Field(16, ge=1)

    def shared_by(self, processes: int) -> Self:
        """One process's share when `processes` run a stage's shards at once: the run's limits split evenly."""
        if processes <= 1:
            return self
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        return self.model_copy(update={"concurrency": max(1, self.concurrency // processes),
                                       "requests_per_minute": rpm / processes if rpm else None,
                                       "tokens_per_minute": tpm / processes if tpm else None})


class ModelConfig(LimitsConfig, SamplingConfig, EndpointConfig):
    """A policy or judge model: an API model via litellm, a served model, or an in-process one. The parts are
    flat fields here (`config.policy.temperature`), as configs, deployments and stored runs spell them."""

    @model_validator(mode="before")
    @classmethod
    def _spec(cls, data: Any) -> Any:
        """A bare string is a `MODEL[@API_BASE]` spec; so is a `model` carrying its endpoint. Another kind of
        model config (a plain one where a greedy one is expected) is taken as it is, every field included."""
        if isinstance(data, ModelConfig) and not isinstance(data, cls):
            return data.model_dump()
        if isinstance(data, str):
            data = {"model": data}
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            model, api_base = split_model_spec(data["model"])
            if api_base:
                if data.get("api_base") not in (None, api_base):
                    raise ValueError(f"model {data['model']!r} names an endpoint and api_base names {data['api_base']!r}")
                data = {**data, "model": model, "api_base": api_base}
        return data

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        if is_local_model(self.model):
            return "transformers"
        return "openai_compat" if self.served_endpoint else "litellm"

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else ""

    @property
    def served_endpoint(self) -> str | None:
        """The OpenAI-compatible base URL of a served model (OpenAI-protocol providers only), without a trailing
        slash; Ollama's is /v1 of the address litellm names, so `ollama/NAME` with litellm's api_base works."""
        if self.provider in OLLAMA_PROVIDERS:
            base = (self.api_base or OLLAMA_DEFAULT_BASE).rstrip("/")
            return base if base.endswith("/v1") else base + "/v1"
        if self.api_base and self.provider in OPENAI_COMPATIBLE_PROVIDERS:
            return self.api_base.rstrip("/")
        return None

    @property
    def resolved_identity(self) -> str:
        """The model as calls are cached and results stored: a checkpoint with its weights hash, a served
        model with its endpoint (a model without one keeps its bare name, as journals written before have it)."""
        if self.is_local:
            return model_identity(self.model)
        if self.identity:
            return self.identity
        endpoint = self.served_endpoint or (self.api_base.rstrip("/") if self.api_base else None)
        return f"{self.model}@{endpoint}" if endpoint else self.model

    @property
    def is_local(self) -> bool:
        return self.resolved_backend == "transformers"

    @property
    def resolved_few_shot(self) -> bool:
        return self.is_local if self.few_shot is None else self.few_shot

    @property
    def resolved_constraint(self) -> str | None:
        if self.constraint == "auto":
            return "grammar" if self.is_local else None
        return None if self.constraint == "none" else self.constraint

    @property
    def resolved_max_tokens(self) -> int:
        return self.max_tokens or (64 if self.is_local else 256)

    @property
    def prices(self) -> tuple[float, float] | None:
        if self.input_price_per_mtok is None or self.output_price_per_mtok is None:
            return None
        return self.input_price_per_mtok / 1e6, self.output_price_per_mtok / 1e6

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.model.startswith(("/", "./", "../", "~")) and not is_local_model(self.model):
            raise ValueError(f"no checkpoint folder at {self.model}")
        if self.constraint == "grammar" and not self.is_local:
            raise ValueError("constraint 'grammar' needs an in-process model; use 'regex' for a served model")
        if self.constraint == "regex" and self.is_local:
            raise ValueError("constraint 'regex' is for served models; in-process models use 'grammar'")
        if self.identity and self.is_local:
            raise ValueError("identity is for served models; an in-process checkpoint is known by its weights hash")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("name the API key's environment variable or its Secret block, not both")
        return self


class GreedyModelConfig(ModelConfig):
    """A model that decodes greedily unless told otherwise: judges, graders and models under evaluation
    (generation's policy samples at 0.7)."""

    temperature: float = Field(0.0, ge=0, le=2)


def parse_model_spec(spec: str, **overrides: Any) -> ModelConfig:
    """`MODEL[@API_BASE]`: a litellm name with an optional OpenAI-compatible endpoint, 'smollm2',
    or a local checkpoint folder, e.g. `openai/sft@http://127.0.0.1:8000/v1` or `./out/swirl`."""
    model, api_base = split_model_spec(spec)
    return ModelConfig(model=model, api_base=api_base, **overrides)
