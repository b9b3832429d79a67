"""Typed records at the library's boundaries: seeds, steps, trajectories, LLM calls; the rows of the database's
tables (`TableRow`: each defines its Arrow schema, and the store writes any of them); the curated filters."""

from __future__ import annotations

import types
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import TypedDict, is_typeddict  # pydantic reads TypedDicts from here on Python < 3.12

from swirl_core.hashing import content_hash

if TYPE_CHECKING:
    import pyarrow as pa

TaskKind = Literal["qa", "math"]
ActionKind = Literal["search", "math", "answer", "invalid"]


class StepProtocol(StrEnum):
    """How a policy takes its actions: the paper's tags in the text, or native function calling."""

    TAGS = "tags"
    TOOLS = "tools"  # a `tools` list in the request, `tool_calls` in the reply, `tool` messages with results


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
    call_id: str | None = None  # under the tools protocol: the tool call's id, which its `tool` result names


class Step(BaseModel):
    """One agent step: the model's message, its parsed action and the tool observation."""

    step_index: int
    message: str  # the assistant message as it enters the conversation (tools protocol: its calls rendered in)
    action: Action
    observation: str | None = None  # tool result text (None for answers)
    tool_calls: list[dict[str, Any]] | None = None  # under the tools protocol: the message's calls as sent
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


class ChatTurn(TypedDict):
    """One message of a stored conversation (content None: a step that got no observation)."""

    role: str | None
    content: str | None


class Trajectory(BaseModel):
    """A full multi-step rollout for one question and sample index."""

    trajectory_id: str
    question_id: str
    sample_index: int
    model: str
    prompt_version: str
    prompt_messages: list[dict[str, Any]]
    steps: list[Step]
    status: TrajectoryStatus
    final_answer: str | None = None
    error: str | None = None
    protocol: StepProtocol = StepProtocol.TAGS

    @staticmethod
    def make_id(question_id: str, sample_index: int, policy_fingerprint: str) -> str:
        return content_hash("trajectory", question_id, sample_index, policy_fingerprint)

    def conversation(self) -> list[ChatTurn]:
        """The prompt, then each step's message and the observation it got: stored once per trajectory, and every
        sub-trajectory's state is a prefix of it (the `sub_trajectories` view)."""
        turns = [ChatTurn(role=m.get("role"), content=m.get("content")) for m in self.prompt_messages]
        for s in self.steps:
            turns += [ChatTurn(role="assistant", content=s.message), ChatTurn(role="user", content=s.observation)]
        return turns


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
    # Native function calling: the assistant message's `tool_calls` as the server sent them (arguments unparsed).
    tool_calls: list[dict[str, Any]] | None = None
    cached: bool = False
    key: str = ""


# --------------------------------------------------------------------------------------------------
# The curated filters
# --------------------------------------------------------------------------------------------------


class CuratedFilter(StrEnum):
    """The paper's four curated sets. The store makes each one's view `curated_<value>` and the
    `curation_retention` view from this enum, so the names and rules live here only."""

    NONE = "none"
    PROCESS = "process"
    OUTCOME = "outcome"
    PROCESS_OUTCOME = "process_outcome"

    @property
    def view(self) -> str:
        return f"curated_{self.value}"

    @property
    def tools_view(self) -> str:
        """The same set's tools-protocol steps in TRL's tool-calling format (`tool_sub_trajectories`)."""
        return f"{self.view}_tools"

    @property
    def keeps(self) -> str:
        """The SQL condition, over the `trajectory_labels` view, of a trajectory this set keeps."""
        return {"none": "true", "process": "process_pass", "outcome": "outcome_pass",
                "process_outcome": "process_pass AND outcome_pass"}[self.value]


# --------------------------------------------------------------------------------------------------
# Table rows
# --------------------------------------------------------------------------------------------------


def _arrow_type(annotation: Any) -> pa.DataType:
    import pyarrow as pa  # here, not at import: the CLI reads the records' names without paying for Arrow

    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):  # X | None: nullable X
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _arrow_type(inner)
    if origin is Literal:
        return _arrow_type(type(get_args(annotation)[0]))
    if origin is list:
        return pa.list_(_arrow_type(get_args(annotation)[0]))
    if is_typeddict(annotation):
        return pa.struct([(name, _arrow_type(hint)) for name, hint in get_type_hints(annotation).items()])
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return pa.string()
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
            datetime: pa.timestamp("us", tz="UTC")}[annotation]


class TableRow(BaseModel):
    """One row of the table `TABLE`: the fields are its columns (a subset: defaults such as `created_at` fill the
    rest), so its Arrow schema follows from the class and `Store.write` writes any row type. JSON columns are
    `str` fields holding JSON text. tests/test_store.py checks every row type against sql/schema.sql."""

    TABLE: ClassVar[str]

    @classmethod
    @cache
    def arrow_schema(cls) -> pa.Schema:
        import pyarrow as pa

        hints = get_type_hints(cls)
        return pa.schema([(name, _arrow_type(hints[name])) for name in cls.model_fields])

    @classmethod
    def arrow_table(cls, rows: list[dict[str, Any]]) -> pa.Table:
        """Rows given as dicts (a batch of thousands skips building a model per row); Arrow checks each value's type.
        Columns are gathered first: Arrow builds a table from lists 3× faster than from row dicts (measured)."""
        import pyarrow as pa

        schema = cls.arrow_schema()
        return pa.Table.from_pydict({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)


class QuestionRow(TableRow):
    TABLE: ClassVar[str] = "questions"
    question_id: str
    dataset: str
    split: str
    source_id: str
    task: TaskKind
    question: str
    answer: str
    answer_aliases: list[str]
    metadata: str  # JSON
    source: str
    first_run_id: str


class SeedErrorRow(TableRow):
    TABLE: ClassVar[str] = "seed_errors"
    run_id: str
    source: str
    error: str


class TrajectoryRow(TableRow):
    TABLE: ClassVar[str] = "trajectories"
    trajectory_id: str
    run_id: str
    question_id: str
    sample_index: int
    model: str
    prompt_version: str
    policy_fingerprint: str
    status: TrajectoryStatus
    final_answer: str | None
    num_steps: int
    num_invalid_steps: int
    prompt_tokens: int
    completion_tokens: int
    error: str | None
    prompt_messages: str  # JSON
    protocol: StepProtocol
    conversation: list[ChatTurn]
    prompt_turns: int


class StepRow(TableRow):
    TABLE: ClassVar[str] = "steps"
    trajectory_id: str
    step_index: int
    message: str
    reasoning: str
    action_kind: ActionKind
    action_input: str
    parse_error: str | None
    truncated: bool
    observation: str | None
    tool_error: bool
    call_key: str | None
    model: str
    prompt_version: str
    constraint: str | None
    tool_calls: str | None  # JSON: the message's tool calls as sent (tools protocol)
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float | None


class JudgmentRow(TableRow):
    TABLE: ClassVar[str] = "judgments"
    judgment_id: str
    run_id: str
    trajectory_id: str
    step_index: int
    sample_index: int
    judge_model: str
    judge_fingerprint: str
    prompt_version: str
    verdict: str
    reasoning: str
    attempts: int
    call_keys: list[str]
    p_good: float | None
    error: str | None  # the call failed for good: the next curation judges the step again


class GradeRow(TableRow):
    TABLE: ClassVar[str] = "grades"
    trajectory_id: str
    method: str
    correct: bool | None
    score: float | None
    detail: str | None
    grader_model: str | None
    prompt_version: str | None
    call_key: str | None
    run_id: str


class ProbeResultRow(TableRow):
    TABLE: ClassVar[str] = "judge_probe_results"
    probe_step_id: str
    judge_fingerprint: str
    probe_run_id: str
    judge_model: str
    probe_version: str
    dataset: str
    split: str
    question_id: str
    task: TaskKind
    action_kind: str
    corruption: str | None
    label: str
    verdict: str
    p_good: float | None
    threshold: float | None
    fold: str
    scored: bool
    good_votes: int
    bad_votes: int
    votes: int
    message: str
    state: str  # JSON
    reasoning: str
    error: str | None  # a sample's call failed for good: the next probe run judges the step again
    call_keys: list[str]


class ProbeMetricRow(TableRow):
    TABLE: ClassVar[str] = "judge_probe_metrics"
    judge_fingerprint: str
    dataset: str
    split: str
    grp: str
    metric: str
    n: int | None
    value: float | None
    ci_low: float | None
    ci_high: float | None
    probe_run_id: str


class LLMCallRow(TableRow):
    """One paid call, as the client journals it (`swirl_core/llm/client.py`) and `Store.ingest_journals` copies it."""

    TABLE: ClassVar[str] = "llm_calls"
    call_key: str
    run_id: str | None
    purpose: str | None
    model: str
    backend: str | None
    prompt_version: str | None
    sample_index: int | None
    temperature: float | None
    max_tokens: int | None
    constraint: str | None
    response_text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    latency_s: float | None
    attempts: int | None
    created_at: datetime | None


class Compaction(BaseModel):
    """What one compaction of a journal folder did (`Store.compact_journals`)."""

    folded: int  # finished journals (and older segments) folded into the new segment, then deleted; 0: nothing to do
    segment: str | None  # the new segment's file name
    segment_bytes: int
    journals_left: int  # journal files in the folder afterwards: the segments and journals still being written
