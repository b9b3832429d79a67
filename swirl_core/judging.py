"""Process judging and outcome grading (arXiv 2504.04736; docs/architecture.md, "Curation").

The process judge rates one step — the last message of a sub-trajectory — GOOD or BAD from the
question and the conversation so far, never from the gold answer. The outcome grader asks "am I
correct?" of a final answer against the answer key. Both write their reasoning first and the
verdict last; the parsers below read the verdict back from messy real output, and an
unparseable reply is re-asked with a new sample index and seed (the call cache would otherwise
replay the same bad text) before it is recorded as UNKNOWN. Judging never raises on a failed
call: the record's typed `error` says what went wrong (verdict UNKNOWN), and the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from swirl_core.constraints import ServerKind, choice_fields, probe_constraint
from swirl_core.llm.base import ChatRequest, Choice, LLMError, Served
from swirl_core.llm.client import LLMClient
from swirl_core.llm.config import ModelConfig
from swirl_core.llm.factory import served_key
from swirl_core.progress import notify
from swirl_core.protocol import ARROW
from swirl_core.records import LLMResponse, TaskKind

log = logging.getLogger(__name__)

Verdict = Literal["GOOD", "BAD"]
VERDICTS: tuple[Verdict, ...] = ("GOOD", "BAD")
StepVerdict = Literal["GOOD", "BAD", "UNKNOWN"]

# Bump a version whenever its text changes: every stored judgment records the version that made it.
JUDGE_PROMPT_VERSION: dict[TaskKind, str] = {"qa": "judge-search-v1", "math": "judge-math-v1"}
GRADER_PROMPT_VERSION = "grader-v1"
# Small in-process judges answer with the verdict alone (a decoding constraint, recorded per call).
VERDICT_CONSTRAINT = Choice(options=VERDICTS)
GRADE_CONSTRAINT = Choice(options=("YES", "NO"))

# Calibration for judges that report choice probabilities (in-process ones). A small model leans to one
# verdict whatever the step: SmolLM2-135M gave every demo step P(GOOD) 0.11-0.34, so its argmax said BAD to
# all, and it gave hand-written good and bad reference steps the same mean P(GOOD). Such a judge can rank but
# not decide, so a step is GOOD when its P(GOOD) reaches the median over a sample of the steps being curated
# (batch calibration, Zhou et al., 2024). The sample is drawn by content hash from all steps in scope, so a
# verdict does not depend on sharding or on which steps a resumed run still had to judge.
CALIBRATION_SAMPLE = 64

# Re-asks of sample j use sample_index = seed = j + REASK_STRIDE * attempt: a new cache key, and
# no collision with the other samples of the same step as long as samples < REASK_STRIDE.
REASK_STRIDE = 1000

# --------------------------------------------------------------------------------------------------
# Prompts (the paper's elements, reworded)
# --------------------------------------------------------------------------------------------------

_JUDGE_QA = f"""\
You are reviewing one step of an AI assistant's attempt to answer a question with the help of a \
search engine. Answering may take a sequence of searches: the assistant sends a query as \
<search_query> QUERY </search_query>, each result comes back as QUERY {ARROW} RESULT, and the \
final answer is given as <answer> ANSWER </answer>.

Below are the question and the whole conversation so far. Evaluate ONLY the last message. Do not \
penalise or reward it for anything said in earlier messages; they are judged separately.

- If the last message is a search query, judge whether it is likely to help answer the question, \
given what the earlier results already show. A query that repeats an earlier one or looks for \
something irrelevant is BAD.
- If the last message is an answer, judge it only on whether it follows from the search results \
shown in the conversation, not on your own knowledge of the world. If the results do not contain \
enough information to support the answer, it is BAD, even if you believe the answer is true. Be \
careful with answers that only seem to be supported: check that the results actually say it.
- A message that neither searches nor answers, or that does both, is BAD.

Explain your reasoning briefly, then finish with a last line holding exactly one word: GOOD or BAD."""

_JUDGE_MATH = f"""\
You are reviewing one step of an AI assistant's attempt to solve a math problem with the help of \
a calculator. The assistant sends an expression as <math_exp> MATH EXP </math_exp>, each result \
comes back as EXP {ARROW} RESULT, and the final answer is given as <answer> ANSWER </answer>.

Below are the problem and the whole conversation so far. Evaluate ONLY the last message. Do not \
penalise or reward it for anything said in earlier messages; they are judged separately.

- If the last message is a calculator expression, judge whether it is a sensible and correct next \
step toward the answer: the numbers are taken correctly from the problem and from earlier \
results, and the operation is the right one. A step that repeats an earlier calculation or does \
not move toward the answer is BAD.
- If the last message is an answer, judge whether it is supported by the problem and the \
computations shown in the conversation. An answer that does not follow from those results, or \
that is a guess, is BAD.
- A message that neither calculates nor answers, or that does both, is BAD.

Explain your reasoning briefly, then finish with a last line holding exactly one word: GOOD or BAD."""

_JUDGE_INSTRUCTIONS: dict[TaskKind, str] = {"qa": _JUDGE_QA, "math": _JUDGE_MATH}
_OBSERVATION_LABEL: dict[TaskKind, str] = {"qa": "[Search result]", "math": "[Calculator result]"}

_GRADER_INTRO = """\
I was asked the question below and gave the answer shown. Here is the answer key. Am I correct?"""

_GRADER_RULES: dict[TaskKind, str] = {
    "qa": """\
Check only whether my answer is the answer in the key: the same entity, name, date or value, \
allowing differences of wording, spelling, abbreviation or extra detail that do not change it. \
Do not use your own knowledge of the world to decide whether the key or my answer is true.""",
    "math": """\
Check only whether my answer is numerically equal to the answer in the key. Formatting does not \
matter: 10, 10.00, $10 and $10.00 are all the same answer, as are 1,000 and 1000, and a number \
with or without its unit.""",
}

_GRADER_OUTRO = "Explain your reasoning briefly, then finish with a last line holding exactly one word: YES or NO."


def _label_turn(task: TaskKind, message: dict[str, str]) -> str:
    content = (message.get("content") or "").strip()
    if message.get("role") == "assistant":
        return f"[Assistant] {content}"
    # The agent answers an unparseable message with format feedback instead of a tool result.
    label = "[Format feedback]" if content.startswith("Format error") else _OBSERVATION_LABEL[task]
    return f"{label} {content}"


def render_transcript(task: TaskKind, question: str, turns: Sequence[dict[str, str]], action_message: str) -> str:
    """The question, the conversation before the step, and the step itself, as readable text."""
    # System messages (instructions, demonstrations) are the policy's set-up, not the conversation.
    shown = [_label_turn(task, m) for m in turns if m.get("role") != "system"]
    history = "\n".join(shown) if shown else "(nothing yet: the last message is the first one)"
    return (
        f"Question: {question.strip()}\n\n"
        f"Conversation so far:\n{history}\n\n"
        f"Last message to evaluate:\n[Assistant] {action_message.strip()}"
    )


def judge_messages(task: TaskKind, question: str, turns: Sequence[dict[str, str]], action_message: str) -> list[dict[str, str]]:
    """The process-judge request: one user message, instructions first, then the transcript.

    `turns` are the (assistant, tool-observation) messages after the policy's prompt; the prompt
    itself (instructions, few-shot demonstrations) is left out. A single user turn works with
    every chat template, including ones without a system role. The gold answer is never an input.
    """
    transcript = render_transcript(task, question, turns, action_message)
    return [{"role": "user", "content": f"{_JUDGE_INSTRUCTIONS[task]}\n\n{transcript}"}]


def grader_messages(task: TaskKind, question: str, answer: str, aliases: Sequence[str], prediction: str) -> list[dict[str, str]]:
    """The outcome-grader request: question, answer key (gold and aliases), the model's answer."""
    others = [a for a in dict.fromkeys(a.strip() for a in aliases) if a and a != answer.strip()]
    key = answer.strip() + (f" (also accepted: {'; '.join(others)})" if others else "")
    content = (
        f"{_GRADER_INTRO}\n\n{_GRADER_RULES[task]}\n\n"
        f"Question: {question.strip()}\n"
        f"Answer key: {key}\n"
        f"My answer: {prediction.strip()}\n\n"
        f"Am I correct? {_GRADER_OUTRO}"
    )
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------------------------------
# Parsing verdicts out of free text
# --------------------------------------------------------------------------------------------------

# A bare verdict line, optionally labelled ("Verdict:", "Final answer:") and wrapped in markdown.
_BARE_LINE = r"[\W_]*(?:[A-Za-z][A-Za-z ?']{{0,30}}[:\-]\s*)?[\W_]*({alt})[\W_]*"
_LABELS = r"(?:verdict|judge?ment|rating|decision|evaluation|grade|conclusion|final answer|am i correct\?)"


def _parse_choice(text: str, words: tuple[str, str], *, loose: bool) -> str | None:
    """The verdict a reply ends on, most explicit form first; None when it states none.

    Tiers: (1) a last line that is only the verdict; (2) the last labelled verdict anywhere
    ("Verdict: BAD", even with trailing remarks); (3) the last UPPERCASE word — models shout the
    verdict but write "good"/"no" in their reasoning; (4) a first or last line that opens with
    the word and punctuation ("No, it is …"); (5) if `loose`, the last word in any case.
    """
    if not text or not text.strip():
        return None
    alt = "|".join(words)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if m := re.fullmatch(_BARE_LINE.format(alt=alt), lines[-1], re.IGNORECASE):
        return m.group(1).upper()
    if labelled := re.findall(rf"\b{_LABELS}\W{{0,8}}({alt})\b", text, re.IGNORECASE):
        return labelled[-1].upper()
    if shouted := re.findall(rf"\b({alt})\b", text):
        return shouted[-1]
    for line in (lines[-1], lines[0]):
        if m := re.match(rf"[\W_]*({alt})\s*[,.;:!\u2014-]", line, re.IGNORECASE):
            return m.group(1).upper()
    if loose and (anywhere := re.findall(rf"\b({alt})\b", text, re.IGNORECASE)):
        return anywhere[-1].upper()
    return None


def parse_verdict(text: str) -> Verdict | None:
    """GOOD or BAD as the judge concluded, or None when the reply states neither."""
    found = _parse_choice(text, ("GOOD", "BAD"), loose=True)
    return "GOOD" if found == "GOOD" else "BAD" if found == "BAD" else None


def parse_yes_no(text: str) -> bool | None:
    """True for YES, False for NO, None when the reply states neither.

    No any-case fallback here: "no" is too common a word in reasoning ("no mention of …").
    """
    found = _parse_choice(text, ("YES", "NO"), loose=False)
    return None if found is None else found == "YES"


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class StepToJudge(BaseModel):
    """One sub-trajectory (s_k, a_k): the turns before step k and the message of step k."""

    trajectory_id: str
    step_index: int
    task: TaskKind
    question: str
    turns: list[dict[str, str]]  # assistant / tool-observation messages after the policy's prompt
    action_message: str


class Judgment(BaseModel):
    trajectory_id: str
    step_index: int
    sample_index: int  # which of the k judge samples (re-asks keep the sample's index)
    verdict: StepVerdict
    reasoning: str  # the judge's last reply ("" when no reply came back)
    attempts: int  # requests made for this sample, re-asks included
    call_keys: list[str]  # cache keys of every reply received, in order
    judge_model: str
    prompt_version: str
    p_good: float | None = None  # P(GOOD), from judges that report choice probabilities
    error: str | None = None  # why the call failed for good (retries exhausted, bad request); None: a reply came


class TrajectoryToGrade(BaseModel):
    trajectory_id: str
    task: TaskKind
    question: str
    answer: str
    aliases: list[str] = Field(default_factory=list)
    prediction: str | None  # the trajectory's final answer; None when it never answered


class LLMGrade(BaseModel):
    trajectory_id: str
    correct: bool | None  # None: the grader's reply stated neither YES nor NO, or the call failed
    reasoning: str
    call_key: str | None  # the last reply's cache key; None when no reply came back
    grader_model: str
    prompt_version: str
    error: str | None = None  # why the call failed for good; such a grade is not stored, so a rerun retries it


# --------------------------------------------------------------------------------------------------
# Asking with re-asks
# --------------------------------------------------------------------------------------------------


@dataclass
class _Asked:
    value: Any  # the parsed verdict, None if never parseable or the call failed
    text: str  # the last reply
    attempts: int = 0
    keys: list[str] = field(default_factory=list)
    p_good: float | None = None  # a calibrated judge's P(GOOD)
    error: str | None = None  # the call failed for good


async def _ask(
    client: LLMClient, make_request: Callable[[int], ChatRequest], parse: Callable[[str], Any], max_reasks: int
) -> _Asked:
    """Ask, and re-ask up to `max_reasks` times while the reply carries no verdict; never raises LLMError."""
    asked = _Asked(value=None, text="")
    for attempt in range(max_reasks + 1):
        asked.attempts += 1
        try:
            response = await client.complete(make_request(attempt))
        except LLMError as exc:  # retries already exhausted inside the client: re-asking won't help
            asked.error = str(exc)
            return asked
        asked.keys.append(response.key)
        asked.text = response.text
        if (value := parse(response.text)) is not None:
            asked.value = value
            if response.choice_probs:  # a served judge's P(GOOD) at its verdict token
                asked.p_good = response.choice_probs.get("GOOD")
            return asked
    return asked


class JudgeSpec(BaseModel):
    """How the process judge is asked. `temperature` defaults to 0.0 for one sample, 0.7 for k > 1."""

    model: str
    samples: int = Field(1, ge=1, lt=REASK_STRIDE)
    max_reasks: int = Field(2, ge=0)
    temperature: float = Field(0.0, ge=0, le=2)
    # Re-asks at T=0 would mostly reproduce the same unparseable reply, so they sample warmer.
    reask_temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    # In-process: the verdict word alone (Choice); served: the server's choice field (Served, of `server_kind`),
    # once a probe has seen the server enforce it.
    constraint: Choice | Served | None = None
    server_kind: ServerKind | None = None
    # Served judges: read P(GOOD) from the verdict token's logprobs; the RL reward is then P(GOOD), not the vote.
    served_probabilities: bool = False
    calibration: Literal["none", "median", "labelled"] = Field(
        "none", description="GOOD when P(GOOD) reaches a threshold (needs choice probabilities: in-process judges): "
                            "median: its median over a sample of the curated steps; labelled: the one with the best "
                            "balanced accuracy on the judge probe's labelled steps")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per task, the P(GOOD) a step needs "
                                                                           "(set by `calibrate_thresholds`)")

    @model_validator(mode="before")
    @classmethod
    def _default_temperature(cls, data: Any) -> Any:
        # Self-consistency needs distinct samples: k identical greedy replies would be one vote.
        if isinstance(data, dict) and data.get("temperature") is None:
            data = {k: v for k, v in data.items() if k != "temperature"}
            if (data.get("samples") or 1) > 1:
                data["temperature"] = 0.7
        return data

    @classmethod
    def for_model(cls, cfg: ModelConfig, samples: int = 1, max_reasks: int = 2) -> JudgeSpec:
        """The judge a `ModelConfig` names; curation and the RL reward share it so their verdicts agree."""
        return cls(
            model=cfg.resolved_identity, samples=samples, max_reasks=max_reasks,
            temperature=cfg.temperature if samples == 1 else max(cfg.temperature, 0.7),
            max_tokens=cfg.resolved_max_tokens, constraint=VERDICT_CONSTRAINT if cfg.is_local else None,
            calibration="median" if cfg.is_local else "none",
            served_probabilities=cfg.resolved_backend == "openai_compat",
        )


def verify_judge(cfg: ModelConfig, spec: JudgeSpec) -> tuple[JudgeSpec, dict[str, Any] | None]:
    """A served judge asked to answer under a constraint (`constraint: regex`): before anything is paid for, one
    probe checks that the server forces its choice field (the run stops, naming the server, unless
    `allow_unconstrained`), and, when P(GOOD) is read, that it takes the logprobs fields (refused: the judge
    goes without, p_good stays NULL). Returns the spec the server can serve and the probe's record."""
    if cfg.resolved_constraint != "regex" or cfg.served_endpoint is None:
        return spec, None
    result = asyncio.run(probe_constraint(cfg.served_endpoint, cfg.model.partition("/")[2], cfg.server_kind,
                                          api_key=served_key(cfg), timeout_s=cfg.timeout_s, choice=True,
                                          logprobs=spec.served_probabilities))
    update: dict[str, Any] = {}
    if result.logprobs is False:
        log.warning("%s refused the logprobs fields: judging without them (no P(GOOD): p_good stays NULL)", result.endpoint)
        update["served_probabilities"] = False
    if result.enforced:
        update.update(constraint=Served(label=VERDICT_CONSTRAINT.label), server_kind=result.kind)
    elif not cfg.allow_unconstrained:
        raise ValueError(result.refusal("the judge's `constraint: regex`", "set its `allow_unconstrained: true`",
                                        "the judge answers in free text"))
    return spec.model_copy(update=update), asdict(result)


def _request(model: str, messages: list[dict[str, str]], *, index: int, attempt: int, temperature: float,
             reask_temperature: float, max_tokens: int, prompt_version: str, constraint: Choice | Served | None,
             logprob_choices: tuple[str, ...] | None = None, extra_body: dict[str, Any] | None = None) -> ChatRequest:
    shifted = index + REASK_STRIDE * attempt
    return ChatRequest(
        model=model, messages=messages,
        temperature=temperature if attempt == 0 else max(temperature, reask_temperature),
        max_tokens=max_tokens, sample_index=shifted, seed=shifted,
        prompt_version=prompt_version, constraint=constraint, logprob_choices=logprob_choices,
        extra_body=extra_body or {},
    )


class StepJudge:
    """The process judge: k samples per step, each re-asked while its verdict is unparseable."""

    def __init__(self, client: LLMClient, spec: JudgeSpec) -> None:
        self.client = client
        self.spec = spec

    async def judge(self, item: StepToJudge) -> list[Judgment]:
        messages = judge_messages(item.task, item.question, item.turns, item.action_message)
        samples = (self._sample(item, messages, j) for j in range(self.spec.samples))
        return list(await asyncio.gather(*samples))

    async def judge_many(self, items: Iterable[StepToJudge], on_done: Callable[[list[Judgment]], None] | None = None,
                         ) -> list[Judgment]:
        """All samples of all items at once; the client's semaphore and rate limits bound the load. `on_done`
        sees each item's judgments as they are complete."""
        per_item = await asyncio.gather(*(notify(self.judge(item), on_done) for item in items))
        return [j for judgments in per_item for j in judgments]

    async def _sample(self, item: StepToJudge, messages: list[dict[str, str]], j: int) -> Judgment:
        spec, version = self.spec, JUDGE_PROMPT_VERSION[item.task]

        def make(attempt: int) -> ChatRequest:
            return _request(spec.model, messages, index=j, attempt=attempt, temperature=spec.temperature,
                            reask_temperature=spec.reask_temperature, max_tokens=spec.max_tokens,
                            prompt_version=version, constraint=spec.constraint,
                            logprob_choices=VERDICTS if spec.served_probabilities else None,
                            extra_body=choice_fields(spec.server_kind, VERDICTS) if spec.server_kind else None)

        if spec.calibration != "none":
            asked = await self._calibrated(item.task, make(0))
        else:
            asked = await _ask(self.client, make, parse_verdict, spec.max_reasks)
        return Judgment(
            trajectory_id=item.trajectory_id, step_index=item.step_index, sample_index=j,
            verdict=asked.value or "UNKNOWN", reasoning=asked.text, attempts=asked.attempts,
            call_keys=asked.keys, judge_model=spec.model, prompt_version=version, p_good=asked.p_good,
            error=asked.error,
        )


    async def _calibrated(self, task: TaskKind, request: ChatRequest) -> _Asked:
        """P(GOOD), and GOOD when it reaches the task's threshold (UNKNOWN without one: the RL reward uses
        the probability itself)."""
        asked = _Asked(value=None, text="", attempts=1)
        try:
            response = await self.client.complete(request)
        except LLMError as exc:
            asked.error = str(exc)
            return asked
        asked.keys.append(response.key)
        asked.p_good = _p_good(response, self.spec.model)
        threshold = self.spec.thresholds.get(task)
        if threshold is None:
            asked.text = f"P(GOOD) {asked.p_good:.4f}; no threshold"
            return asked
        asked.value = "GOOD" if asked.p_good >= threshold else "BAD"
        asked.text = f"P(GOOD) {asked.p_good:.4f}; threshold {threshold:.4f} ({self.spec.calibration})\n{asked.value}"
        return asked


async def calibrate_thresholds(client: LLMClient, spec: JudgeSpec, sample: Sequence[StepToJudge],
                               on_done: Callable[[list[Judgment]], None] | None = None) -> dict[str, float]:
    """Per task, the median P(GOOD) the judge gives the sampled steps. Their requests are the ones judging
    makes (sample 0, first attempt), so judging the same steps later replays them from the call journal."""
    judgments = await StepJudge(client, spec.model_copy(update={"thresholds": {}, "samples": 1})).judge_many(sample, on_done)
    scores: dict[str, list[float]] = {}
    for item, judgment in zip(sample, judgments, strict=True):
        if judgment.p_good is None:
            raise LLMError(f"judge calibration failed: {judgment.error or judgment.reasoning}")
        scores.setdefault(item.task, []).append(judgment.p_good)
    return {task: statistics.median(values) for task, values in sorted(scores.items())}


def _p_good(response: LLMResponse, model: str) -> float:
    if not response.choice_probs:
        raise ValueError(f"judge calibration needs choice probabilities, which {model} does not report")
    return response.choice_probs["GOOD"]


class OutcomeGrader:
    """The LLM outcome grader: "am I correct?" against the answer key, YES or NO."""

    def __init__(self, client: LLMClient, model: str, max_reasks: int = 2, *, temperature: float = 0.0,
                 reask_temperature: float = 0.7, max_tokens: int = 256, constraint: Choice | None = None) -> None:
        self.client = client
        self.model = model
        self.max_reasks = max_reasks
        self.temperature = temperature
        self.reask_temperature = reask_temperature
        self.max_tokens = max_tokens
        self.constraint = constraint

    async def grade(self, item: TrajectoryToGrade) -> LLMGrade:
        if item.prediction is None or not item.prediction.strip():
            # Nothing to grade, so nothing to pay for.
            return LLMGrade(trajectory_id=item.trajectory_id, correct=False, reasoning="no answer", call_key=None,
                            grader_model=self.model, prompt_version=GRADER_PROMPT_VERSION)
        messages = grader_messages(item.task, item.question, item.answer, item.aliases, item.prediction)

        def make(attempt: int) -> ChatRequest:
            return _request(self.model, messages, index=0, attempt=attempt, temperature=self.temperature,
                            reask_temperature=self.reask_temperature, max_tokens=self.max_tokens,
                            prompt_version=GRADER_PROMPT_VERSION, constraint=self.constraint)

        asked = await _ask(self.client, make, parse_yes_no, self.max_reasks)
        return LLMGrade(
            trajectory_id=item.trajectory_id, correct=asked.value, reasoning=asked.text,
            call_key=asked.keys[-1] if asked.keys else None, grader_model=self.model,
            prompt_version=GRADER_PROMPT_VERSION, error=asked.error,
        )

    async def grade_many(self, items: Iterable[TrajectoryToGrade], on_done: Callable[[LLMGrade], None] | None = None,
                         ) -> list[LLMGrade]:
        return list(await asyncio.gather(*(notify(self.grade(item), on_done) for item in items)))
