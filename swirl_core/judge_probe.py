"""The judge probe: labelled steps built from gold solutions, and how well a judge tells GOOD from BAD.

Labelled steps come from real seed rows through the seed loaders, deterministically (seeded by question):

- math (GSM8K schema): each `<<expr=value>>` annotation of the gold solution is a GOOD calculator step and
  the gold answer a GOOD answer step, each in the state curation would build (the question, then the earlier
  gold steps with their calculator observations). BAD steps corrupt them: a wrong operand, a wrong operator,
  a wrong final answer, the answer given before the computation it needs, a repeat of an earlier step.
- QA (HotpotQA / MuSiQue schema): a query for a supporting paragraph's title is GOOD, a query for another
  question's title or a repeated query is BAD; the gold answer after the supporting searches is GOOD, another
  question's answer BAD. Observations are the paragraphs as the search tool shows them.

The metrics follow ProcessBench in detecting BAD steps (precision, recall, F1 of the BAD class), with
accuracy, balanced accuracy and, when the judge reports P(GOOD), AUROC; every figure has a percentile
bootstrap CI over labelled steps. A judge whose balanced accuracy's CI reaches 0.5 is not better than chance.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from swirl_core.grading import normalize_answer, parse_number
from swirl_core.hashing import content_hash
from swirl_core.judging import StepToJudge, Verdict
from swirl_core.protocol import TAGS, observation_message
from swirl_core.records import ActionKind, Question, TaskKind
from swirl_core.tools.calculator import Calculator

# Bump whenever the builders change: every stored probe row records the steps it was built from by id.
PROBE_VERSION = "probe-v1"
Corruption = Literal["wrong_operand", "wrong_operator", "wrong_answer", "premature_answer", "repeat",
                     "unrelated_query", "repeated_query"]
Fold = Literal["calibration", "evaluation"]
# The metric that decides "better than chance", and the chance level of a balanced accuracy.
CHANCE_METRIC, CHANCE = "balanced_accuracy", 0.5
RELIABILITY_BINS = 10

_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
_OPERATORS = {"+": "-", "-": "+", "*": "/", "/": "*"}


class LabelledStep(BaseModel):
    """One step with a known verdict, in the state curation would give the judge."""

    probe_step_id: str
    dataset: str
    split: str
    question_id: str
    task: TaskKind
    question: str
    turns: list[dict[str, str]]
    action_message: str
    action_kind: ActionKind
    label: Verdict
    corruption: Corruption | None = None  # None for gold steps
    fold: Fold  # calibration: may set a calibrated judge's threshold; evaluation: scored only

    def to_judge(self) -> StepToJudge:
        return StepToJudge(trajectory_id=self.probe_step_id, step_index=0, task=self.task, question=self.question,
                           turns=self.turns, action_message=self.action_message)


def _tag(kind: ActionKind, content: str) -> str:
    return f"<{TAGS[kind]}>{content}</{TAGS[kind]}>"


class _Builder:
    """Collects the labelled steps of one question; drops exact duplicates and BAD twins of a GOOD step."""

    def __init__(self, q: Question) -> None:
        self.q, self.steps, self._seen = q, [], set()

    def add(self, turns: list[dict[str, str]], kind: ActionKind, content: str, corruption: Corruption | None) -> None:
        message = _tag(kind, content)
        state_key = content_hash(self.q.question_id, turns, message)
        if state_key in self._seen:
            return
        self._seen.add(state_key)
        label: Verdict = "GOOD" if corruption is None else "BAD"
        step_id = content_hash("probe-step", PROBE_VERSION, self.q.question_id, turns, message, label)[:16]
        self.steps.append(LabelledStep(
            probe_step_id=step_id, dataset=self.q.dataset, split=self.q.split, question_id=self.q.question_id,
            task=self.q.task, question=self.q.question, turns=[dict(t) for t in turns], action_message=message,
            action_kind=kind, label=label, corruption=corruption,
            fold="calibration" if int(step_id, 16) % 2 == 0 else "evaluation"))


def _number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{float(x):g}"


def _wrong_number(gold: Fraction, rng: random.Random) -> Fraction:
    return gold + rng.choice([1, 2, 3, 10]) if rng.random() < 0.7 or gold == 0 else gold * 2


def _corrupt_expression(expr: str, rng: random.Random) -> tuple[Corruption, str] | None:
    """A wrong operand or a wrong operator whose result differs from the gold expression's."""
    calc, gold = Calculator(), Calculator()(expr).output
    options: list[tuple[Corruption, str]] = []
    for m in _NUMBER.finditer(expr):
        changed = _number(_wrong_number(Fraction(m.group()), rng))
        options.append(("wrong_operand", expr[:m.start()] + changed + expr[m.end():]))
    for i, ch in enumerate(expr):
        if ch in _OPERATORS and i > 0 and expr[:i].strip() and expr[:i].strip()[-1] not in "+-*/(":
            options.append(("wrong_operator", expr[:i] + _OPERATORS[ch] + expr[i + 1:]))
    rng.shuffle(options)
    for kind, wrong in options:
        result = calc(wrong)
        if not result.error and result.output != gold:
            return kind, wrong
    return None


def math_steps(q: Question, rng: random.Random) -> list[LabelledStep]:
    """The labelled steps of one GSM8K-style question; none when its solution has no usable annotation."""
    exprs = [m.group(1).strip() for m in _ANNOTATION.finditer(str(q.metadata.get("solution") or ""))]
    gold = parse_number(q.answer)
    calc = Calculator()
    results = [calc(e) for e in exprs]
    if not exprs or gold is None or any(r.error for r in results):
        return []
    b, turns = _Builder(q), []
    for k, (expr, result) in enumerate(zip(exprs, results, strict=True)):
        b.add(turns, "math", expr, None)
        if (bad := _corrupt_expression(expr, rng)) is not None:
            b.add(turns, "math", bad[1], bad[0])
        if k > 0:
            b.add(turns, "math", exprs[rng.randrange(k)], "repeat")
        if k == len(exprs) - 1 and all(parse_number(r.output) != gold for r in results[:k]):
            b.add(turns, "answer", _number(gold), "premature_answer")  # the result it rests on is not computed yet
        turns = [*turns, {"role": "assistant", "content": _tag("math", expr)},
                 {"role": "user", "content": observation_message(expr, result.output)}]
    b.add(turns, "answer", q.answer.strip(), None)
    b.add(turns, "answer", _number(_wrong_number(gold, rng)), "wrong_answer")
    return b.steps


def _supporting_titles(q: Question) -> list[str]:
    facts = q.metadata.get("supporting_facts") or []
    titles = [f[0] for f in facts if isinstance(f, (list, tuple)) and f] or list(q.metadata.get("supporting_titles") or [])
    return list(dict.fromkeys(str(t) for t in titles))


def qa_steps(q: Question, others: Sequence[Question], rng: random.Random) -> list[LabelledStep]:
    """The labelled steps of one HotpotQA-style question; none without supporting paragraphs in its context."""
    paragraphs = {p.title: p for p in q.context}
    support = [t for t in _supporting_titles(q) if t in paragraphs]
    own = {p.title for p in q.context}
    foreign = sorted({p.title for o in others for p in o.context} - own)
    accepted = {normalize_answer(a) for a in (q.answer, *q.answer_aliases)}
    wrong = sorted({o.answer.strip() for o in others if normalize_answer(o.answer) not in accepted and o.answer.strip()})
    if not support:
        return []
    b, turns = _Builder(q), []
    for k, title in enumerate(support):
        b.add(turns, "search", title, None)
        if foreign:
            b.add(turns, "search", rng.choice(foreign), "unrelated_query")
        if k > 0:
            b.add(turns, "search", support[rng.randrange(k)], "repeated_query")
        p = paragraphs[title]
        turns = [*turns, {"role": "assistant", "content": _tag("search", title)},
                 {"role": "user", "content": observation_message(title, f"{p.title}: {p.text}")}]
    b.add(turns, "answer", q.answer.strip(), None)
    if wrong:
        b.add(turns, "answer", rng.choice(wrong), "wrong_answer")
    return b.steps


def labelled_steps(questions: Sequence[Question], seed: int = 0) -> list[LabelledStep]:
    """Every labelled step the questions allow, in question order; the same questions and seed give the same steps."""
    out: list[LabelledStep] = []
    for q in questions:
        rng = random.Random(f"{seed}:{q.question_id}")
        out += math_steps(q, rng) if q.task == "math" else qa_steps(q, [o for o in questions if o is not q], rng)
    return out


# --------------------------------------------------------------------------------------------------
# Thresholds and metrics
# --------------------------------------------------------------------------------------------------


def choose_threshold(p_good: Sequence[float], labels: Sequence[Verdict]) -> float | None:
    """The P(GOOD) a step needs to count GOOD that maximises balanced accuracy on these labelled steps
    (the lowest such one); None when they do not hold both labels."""
    p, good = np.asarray(p_good, dtype=float), np.asarray([label == "GOOD" for label in labels])
    if good.all() or not good.any():
        return None
    best, best_score = None, -1.0
    for t in np.unique(p):
        score = (np.mean(p[good] >= t) + np.mean(p[~good] < t)) / 2
        if score > best_score:
            best, best_score = float(t), score
    return best


def _auroc(p_bad: np.ndarray, bad: np.ndarray) -> float:
    """P(a BAD step scores above a GOOD one), ties counting half (Mann-Whitney)."""
    pos, neg = p_bad[bad], p_bad[~bad]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _classification(bad: np.ndarray, said_bad: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    tp = float((bad & said_bad).sum())
    precision = tp / said_bad.sum() if said_bad.sum() else float("nan")
    recall = tp / bad.sum() if bad.sum() else float("nan")
    f1 = 2 * tp / (said_bad.sum() + bad.sum()) if (said_bad.sum() + bad.sum()) else float("nan")
    tnr = correct[~bad].mean() if (~bad).any() else float("nan")
    tpr = correct[bad].mean() if bad.any() else float("nan")
    return {"accuracy": float(correct.mean()), "balanced_accuracy": float(np.nanmean([tpr, tnr])),
            "precision_bad": precision, "recall_bad": recall, "f1_bad": f1}


def _figures(rows: Sequence[dict[str, Any]]) -> Callable[[np.ndarray], dict[str, float]]:
    """A function of resampled row indices to every figure. UNKNOWN is never right and never flags BAD."""
    bad = np.asarray([r["label"] == "BAD" for r in rows])
    said_bad = np.asarray([r["verdict"] == "BAD" for r in rows])
    correct = np.asarray([r["verdict"] == r["label"] for r in rows])
    scored = all(r.get("p_good") is not None for r in rows)
    p_bad = np.asarray([1 - r["p_good"] for r in rows]) if scored else None
    votes = [r.get("votes") or 1 for r in rows]
    unanimous = np.asarray([max(r.get("good_votes") or 0, r.get("bad_votes") or 0) == v for r, v in zip(rows, votes)])
    sampled = max(votes) > 1

    def figures(idx: np.ndarray) -> dict[str, float]:
        out = _classification(bad[idx], said_bad[idx], correct[idx])
        if p_bad is not None:
            out["auroc"] = _auroc(p_bad[idx], bad[idx])
        if sampled:
            out["self_consistency"] = float(unanimous[idx].mean())
        return out

    return figures


def _bootstrap(rows: Sequence[dict[str, Any]], n_resamples: int, confidence: float, seed: int) -> dict[str, tuple]:
    figures = _figures(rows)
    n = len(rows)
    point = figures(np.arange(n))
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    for _ in range(n_resamples):
        for k, v in figures(rng.integers(0, n, n)).items():
            draws[k].append(v)
    alpha = (1 - confidence) / 2
    out = {}
    for k, v in point.items():
        d = np.asarray(draws[k], dtype=float)
        d = d[~np.isnan(d)]
        low, high = (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))) if len(d) else (None, None)
        out[k] = (None if np.isnan(v) else float(v), low, high)
    return out


def probe_metrics(rows: Sequence[dict[str, Any]], *, n_resamples: int = 2000, confidence: float = 0.95,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Every figure with its CI: over all scored rows (group 'all') and per action kind; per corruption kind
    (one label each) the share judged right only. `rows` carry label, verdict, p_good (or None), action_kind,
    corruption, votes, good_votes, bad_votes."""
    groups: list[tuple[str, list[dict[str, Any]], tuple[str, ...] | None]] = [("all", list(rows), None)]
    for key, prefix, only in (("action_kind", "action", None), ("corruption", "corruption", ("accuracy",))):
        for value in sorted({r[key] or "gold" for r in rows}):
            groups.append((f"{prefix}={value}", [r for r in rows if (r[key] or "gold") == value], only))
    out = []
    for group, members, only in groups:
        if not members:
            continue
        for metric, (value, low, high) in _bootstrap(members, n_resamples, confidence, seed).items():
            if only is None or metric in only:
                out.append({"grp": group, "metric": metric, "n": len(members), "value": value, "ci_low": low,
                            "ci_high": high})
    return out


def better_than_chance(metrics: Iterable[dict[str, Any]]) -> bool:
    """True when the balanced accuracy's whole CI lies above chance."""
    for m in metrics:
        if m["grp"] == "all" and m["metric"] == CHANCE_METRIC:
            return m["ci_low"] is not None and m["ci_low"] > CHANCE
    return False


def reliability(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per P(GOOD) bin: steps, mean P(GOOD), share labelled GOOD (a calibrated judge's points lie on the diagonal)."""
    bins: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("p_good") is not None:
            bins.setdefault(min(int(r["p_good"] * RELIABILITY_BINS), RELIABILITY_BINS - 1), []).append(r)
    return [{"bin": f"{b / RELIABILITY_BINS:.1f}-{(b + 1) / RELIABILITY_BINS:.1f}", "steps": len(rs),
             "mean_p_good": round(float(np.mean([r["p_good"] for r in rs])), 4),
             "good_share": round(float(np.mean([r["label"] == "GOOD" for r in rs])), 4)}
            for b, rs in sorted(bins.items())]


def headline(result: dict[str, Any]) -> str:
    """One plain line: the judge's figures on the probe, and whether it is better than chance."""
    figures = {m["metric"]: m for m in result["metrics"] if m["grp"] == "all"}

    def fig(name: str, label: str) -> str | None:
        m = figures.get(name)
        if m is None or m["value"] is None:
            return None
        ci = f" [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" if m["ci_low"] is not None else ""
        return f"{label} {m['value']:.2f}{ci}"

    parts = [p for p in (fig("balanced_accuracy", "balanced accuracy"), fig("f1_bad", "F1(BAD)"),
                         fig("accuracy", "accuracy"), fig("auroc", "AUROC"), fig("self_consistency", "self-consistency"))
             if p]
    verdict = ("better than chance" if result["better_than_chance"]
               else "NOT better than chance: its verdicts carry no measurable signal")
    return (f"judge {result['judge_model']} ({result['fingerprint']}) on {result['scored_steps']} labelled steps of "
            f"{result['dataset']}: {', '.join(parts)} (95% CIs) — {verdict}")
