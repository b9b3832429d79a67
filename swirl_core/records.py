"""Typed records at the library's boundaries: seeds, steps, trajectories, LLM calls."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swirl_core.hashing import content_hash

TaskKind = Literal["qa", "math"]
ActionKind = Literal["search", "math", "answer", "invalid"]


class Paragraph(BaseModel):
    """One searchable paragraph: a title and its text."""

    model_config = ConfigDict(frozen=True)

    title: str
    text: str


class Question(BaseModel):
    """A validated seed question. `question_id` is a content hash, stable across reruns."""

    model_config = ConfigDict(frozen=True)

    question_id: str
    dataset: str
    split: str
    source_id: str
    task: TaskKind
    question: str = Field(min_length=1)
    answer: str
    answer_aliases: tuple[str, ...] = ()
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Context paragraphs shipped with the question (HotpotQA/MuSiQue/BeerQA): a search corpus can
    # be built from them. Not stored per question in DuckDB.
    context: tuple[Paragraph, ...] = ()
    source: str = ""  # file:row or hub:name/config/split:row, for error messages and lineage

    @field_validator("question")
    @classmethod
    def _strip_question(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("question is empty")
        return v

    @staticmethod
    def make_id(dataset: str, split: str, source_id: str, question: str) -> str:
        return content_hash("question", dataset, split, source_id, question.strip())


class InvalidRow(BaseModel):
    """A seed row that failed validation (recorded when skipping invalid rows)."""

    source: str
    error: str


class Action(BaseModel):
    """The parsed action of one model message."""

    kind: ActionKind
    reasoning: str = ""
    content: str = ""  # query / expression / answer; for `invalid`, what was seen
    error: str | None = None  # why the message did not parse as exactly one action
    truncated: bool = False  # text after the first action was cut off


class Step(BaseModel):
    """One agent step: the model's message, its parsed action and the tool observation."""

    step_index: int
    message: str  # the assistant message as it enters the conversation
    action: Action
    observation: str | None = None  # tool result text (None for answers)
    tool_error: bool = False
    call_key: str | None = None
    model: str
    prompt_version: str
    constraint: str | None = None  # decoding constraint that shaped this message, if any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    cached: bool = False


TrajectoryStatus = Literal["answered", "step_cap", "error"]


class Trajectory(BaseModel):
    """A full multi-step rollout for one question and sample index."""

    trajectory_id: str
    question_id: str
    sample_index: int
    model: str
    prompt_version: str
    prompt_messages: list[dict[str, str]]
    steps: list[Step]
    status: TrajectoryStatus
    final_answer: str | None = None
    error: str | None = None

    @staticmethod
    def make_id(question_id: str, sample_index: int, policy_fingerprint: str) -> str:
        return content_hash("trajectory", question_id, sample_index, policy_fingerprint)


class LLMResponse(BaseModel):
    """What a backend returns for one chat request."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None  # None = unknown price, never 0 by default
    latency_s: float = 0.0
    model: str
    # Under a `choice:` constraint (in-process): the probability of each choice at the first generated
    # token; served with `logprob_choices`: at the token where the reply's last choice word starts.
    # Renormalised over the choices. A judge calibrates on these instead of the argmax.
    choice_probs: dict[str, float] | None = None
    cached: bool = False
    key: str = ""
