"""The request record, the backend interface and the errors every backend maps onto."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from swirl_core.hashing import content_hash
from swirl_core.records import LLMResponse


class Grammar(BaseModel):
    """The whole reply matches this Lark grammar (llguidance's dialect); `label` is what records name it by."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["grammar"] = "grammar"
    lark: str
    label: str


class Choice(BaseModel):
    """The whole reply is one of `options` (e.g. a judge's GOOD or BAD); in-process, each option's probability
    is reported too."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["choice"] = "choice"
    options: tuple[str, ...]

    @property
    def label(self) -> str:
        return "choice:" + "|".join(self.options)


class Served(BaseModel):
    """A constraint a server applies: sent in `extra_body` in the field its kind reads, verified by a probe."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["served"] = "served"
    label: str = "regex"


Constraint = Annotated[Grammar | Choice | Served, Field(discriminator="kind")]


class ChatRequest(BaseModel):
    """One chat request. Its `key` identifies it in the call cache: same key, same paid answer."""

    model: str
    messages: list[dict[str, Any]]
    # Function definitions (OpenAI's JSON-schema form) offered to the model under the tools protocol.
    tools: list[dict[str, Any]] | None = None
    temperature: float = 0.7
    top_p: float | None = None
    max_tokens: int = 256
    stop: list[str] | None = None
    # Distinguishes the K samples of one state: identical prompts at T>0 are different requests.
    sample_index: int = 0
    seed: int | None = None  # sent to servers that honour it, for reproducible samples
    prompt_version: str = ""
    # Decoding constraint: compiled in-process (Grammar, Choice), or carried to a server in `extra_body` (Served).
    constraint: Constraint | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    # Served models: ask for token logprobs and report each word's probability at the reply's final choice
    # (`LLMResponse.choice_probs`), e.g. ("GOOD", "BAD") for a judge's verdict.
    logprob_choices: tuple[str, ...] | None = None

    def key(self) -> str:
        # Fields added later join the key only when set, so journal entries written before keep their keys.
        later = [self.logprob_choices] if self.logprob_choices else []
        if self.tools:  # a different offer of tools is a different request
            later.append(self.tools)
        constraint = self.constraint.model_dump() if self.constraint else None  # unconstrained: None, as always
        return content_hash(
            "chat", self.model, self.messages, self.temperature, self.top_p, self.max_tokens,
            self.stop, self.sample_index, self.seed, self.prompt_version, constraint, self.extra_body, *later,
        )

    @property
    def constraint_label(self) -> str | None:
        return self.constraint.label if self.constraint else None


class LLMError(RuntimeError):
    """A call that failed for good (bad request, auth, retries exhausted)."""


class RetryableError(LLMError):
    """A transient failure (429, 5xx, timeout, malformed body): try again, after `retry_after` if given."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    """Sends one request to a model. Retries, caching and limits live in `LLMClient`, not here."""

    name: str

    async def complete(self, request: ChatRequest, timeout_s: float) -> LLMResponse: ...

    async def aclose(self) -> None: ...
