"""Cheap rule-based outcome graders: does a trajectory's final answer match the gold answer?

This is SWiRL's "outcome" filter without an LLM: numeric comparison for math (GSM8K) and
SQuAD/HotpotQA-style normalized exact match plus token F1 for QA. Model text is only ever
parsed with regexes and `fractions.Fraction`, never evaluated.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

__all__ = [
    "RuleGrade",
    "exact_match",
    "normalize_answer",
    "numeric_equal",
    "parse_number",
    "rule_grade",
    "token_f1",
]


@dataclass(frozen=True)
class RuleGrade:
    correct: bool
    score: float  # 1.0/0.0 for numeric; max token F1 over gold answers for QA
    method: str  # "numeric" or "exact_match"
    detail: str  # short human-readable reason


# --------------------------------------------------------------------------- QA

_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
# HotpotQA scores these only by exact identity: partial token overlap between "yes" and
# "no answer yet" must not earn credit on comparison questions.
_EXACT_ONLY = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA normalization: lowercase, drop punctuation and articles, squash whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in golds)


def _f1(pred: str, gold: str) -> float:
    if (pred in _EXACT_ONLY or gold in _EXACT_ONLY) and pred != gold:
        return 0.0
    common = Counter(pred.split()) & Counter(gold.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred.split())
    recall = same / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Max token F1 over the gold answers (HotpotQA convention for yes/no/noanswer)."""
    pred = normalize_answer(prediction)
    return max((_f1(pred, normalize_answer(g)) for g in golds), default=0.0)


# ------------------------------------------------------------------------- math

# The minus sign counts only when it is not glued to a preceding token, so "5-3" reads as
# 5 and 3 and "ages 5-10" does not produce -10. The lookbehind also stops us from starting
# a match in the middle of a word or number ("v2", "1.2.3").
_NUMBER_RE = re.compile(
    r"""
    (?<![\w.])
    (?P<sign>-)?
    (?:\$\s?)?
    (?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
    (?:/(?P<den>\d+(?:\.\d+)?))?
    """,
    re.VERBOSE,
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
# A decimal with this many fractional digits is treated as a truncated value (e.g.
# 0.3333333333 for 1/3) and compared with tolerance; shorter literals must match exactly so
# that "1000000" vs "1000001" or "3.5" vs "3.50001" are not waved through.
_APPROX_MIN_DIGITS = 4


@dataclass(frozen=True)
class _Number:
    value: Fraction
    approximate: bool  # written as a long decimal: eligible for the tolerance fallback


def _boxed_contents(text: str) -> str | None:
    """Contents of the last \\boxed{...} (brace-balanced, so \\boxed{\\frac{1}{2}} works)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]  # unclosed box (truncated generation): take what is there


def _last_number(text: str) -> _Number | None:
    text = text.replace("\u2212", "-").replace("{,}", ",")
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    found: _Number | None = None
    for m in _NUMBER_RE.finditer(text):
        num = m["num"].replace(",", "")
        value = Fraction(num)
        den = m["den"]
        if den is not None and Fraction(den) != 0:
            value /= Fraction(den)
        else:
            den = None  # "x/0" is not a fraction; keep the numerator
        if m["sign"]:
            value = -value
        approximate = den is None and "." in num and len(num.split(".")[1]) >= _APPROX_MIN_DIGITS
        found = _Number(value, approximate)
    return found


def _parse(text: str) -> _Number | None:
    # Priority: \boxed{} (the model's explicit final answer), then the text after a GSM8K
    # "####" marker (gold solutions, and models imitating them), then the last number overall
    # (models write "3 * 4 = 12").
    for part in (_boxed_contents(text), text.rsplit("####", 1)[1] if "####" in text else None):
        if part is not None and (num := _last_number(part)) is not None:
            return num
    return _last_number(text)


def parse_number(text: str) -> Fraction | None:
    """The number a math answer states ("$1,000.00", "50%", "\\boxed{25/2}", "... = 12")."""
    num = _parse(text)
    return None if num is None else num.value


def _equal(pred: _Number, gold: _Number, rel_tol: float) -> bool:
    if pred.value == gold.value:
        return True
    if pred.approximate or gold.approximate:
        return math.isclose(float(pred.value), float(gold.value), rel_tol=rel_tol)
    return False


def numeric_equal(prediction: str, gold: str, *, rel_tol: float = 1e-6) -> bool:
    """Exact Fraction equality; `rel_tol` applies only when a side is a long decimal (>= 4 places)."""
    pred, ref = _parse(prediction), _parse(gold)
    return pred is not None and ref is not None and _equal(pred, ref, rel_tol)


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


# ------------------------------------------------------------------------ entry


def rule_grade(
    task: Literal["qa", "math"],
    prediction: str | None,
    answer: str,
    aliases: Sequence[str] = (),
) -> RuleGrade:
    """Grade one final answer: numeric match for "math", normalized EM (+ token F1) for "qa"."""
    if task == "math":
        method = "numeric"
    elif task == "qa":
        method = "exact_match"
    else:
        raise ValueError(f"unknown task {task!r}; expected 'qa' or 'math'")
    if prediction is None or not prediction.strip():
        return RuleGrade(False, 0.0, method, "no answer")

    if task == "math":
        pred, ref = _parse(prediction), _parse(answer)
        if pred is None:
            return RuleGrade(False, 0.0, method, "no number in prediction")
        if ref is None:
            return RuleGrade(False, 0.0, method, "no number in gold")
        ok = _equal(pred, ref, 1e-6)
        op = ("==" if pred.value == ref.value else "~=") if ok else "!="
        return RuleGrade(ok, 1.0 if ok else 0.0, method, f"pred {_fmt(pred.value)} {op} gold {_fmt(ref.value)}")

    # A bare string is a Sequence[str] too; iterating it would turn "NYC" into aliases "N", "Y", "C".
    alias_list = [aliases] if isinstance(aliases, str) else list(aliases)
    if not normalize_answer(prediction):
        return RuleGrade(False, 0.0, method, "no answer")
    score = token_f1(prediction, [answer, *alias_list])
    if exact_match(prediction, [answer]):
        return RuleGrade(True, score, method, "EM with answer")
    for alias in alias_list:
        if exact_match(prediction, [alias]):
            return RuleGrade(True, score, method, f"EM with alias {alias!r}")
    return RuleGrade(False, score, method, f"F1 {score:.2f}")
