"""Rule-based outcome graders: numeric matching for math, normalized EM / token F1 for QA."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from swirl_core.grading import (
    RuleGrade,
    exact_match,
    normalize_answer,
    numeric_equal,
    parse_number,
    rule_grade,
    token_f1,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "fixtures"

# ------------------------------------------------------------------------- math

MATH_MATCHES = [
    ("10", "10"),
    ("10.00", "10"),
    ("$10", "10"),
    ("$10.00", "10"),
    ("10 dollars", "10"),
    ("The answer is 10.", "10"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("-3", "-3"),
    ("It drops to -3 degrees", "-3"),
    ("3.50", "3.5"),
    ("1/2", "0.5"),
    ("50%", "50"),
    ("12.5", "25/2"),
    ("\\boxed{10}", "10"),
    ("10 apples", "10"),
    ("3 * 4 = 12", "12"),
    ("0.3333333333", "1/3"),
    ("So the answer is \\boxed{10}. Check: 2 + 3 = 5", "10"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("$1,234.50 in total", "1234.5"),
    ("#### 72", "She sold 48/2 = 24 clips in May.\n#### 72"),
    ("−7", "-7"),  # unicode minus sign
]

MATH_MISMATCHES = [
    ("11", "10"),
    ("1000", "100"),
    ("no idea", "10"),
    ("3 * 4 = 12", "3"),  # last number wins, not the first
    ("\\boxed{7} but maybe 10", "10"),  # the boxed answer wins
    ("1000001", "1000000"),  # no tolerance for integers
    ("0.33", "1/3"),  # short decimals must match exactly
    ("ages 5-10", "-10"),  # a hyphen between numbers is not a minus sign
    ("", "10"),
]


@pytest.mark.parametrize(("pred", "gold"), MATH_MATCHES)
def test_numeric_equal_accepts(pred: str, gold: str) -> None:
    assert numeric_equal(pred, gold)
    grade = rule_grade("math", pred, gold)
    assert grade == RuleGrade(True, 1.0, "numeric", grade.detail)


@pytest.mark.parametrize(("pred", "gold"), MATH_MISMATCHES)
def test_numeric_equal_rejects(pred: str, gold: str) -> None:
    assert not numeric_equal(pred, gold)
    grade = rule_grade("math", pred, gold)
    assert not grade.correct and grade.score == 0.0 and grade.method == "numeric"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$1,000.00", Fraction(1000)),
        ("25/2", Fraction(25, 2)),
        ("-$4", Fraction(-4)),
        (".5", Fraction(1, 2)),
        ("7/0", Fraction(7)),  # a zero denominator is not a fraction
        ("1.2.3", Fraction(6, 5)),  # never reads "2.3" out of a version-like string
        ("nothing here", None),
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


def test_math_details() -> None:
    assert rule_grade("math", "10", "10").detail == "pred 10 == gold 10"
    assert rule_grade("math", "11", "10").detail == "pred 11 != gold 10"
    assert rule_grade("math", None, "10") == RuleGrade(False, 0.0, "numeric", "no answer")
    assert rule_grade("math", "   ", "10").detail == "no answer"
    assert rule_grade("math", "no idea", "10").detail == "no number in prediction"
    assert rule_grade("math", "10", "unknown").detail == "no number in gold"


def test_rel_tol_is_configurable() -> None:
    assert not numeric_equal("0.3333", "1/3")
    assert numeric_equal("0.3333", "1/3", rel_tol=1e-3)


def test_unknown_task_rejected() -> None:
    with pytest.raises(ValueError):
        rule_grade("code", "1", "1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- QA


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize(
    ("pred", "answer", "aliases"),
    [
        ("new york city", "New York City", ()),
        ("The Beatles.", "Beatles", ()),
        ("  LONDON ", "london", ()),
        ("NYC", "New York City", ("NYC", "Big Apple")),
        ("the big apple", "New York City", ["NYC", "Big Apple"]),
    ],
)
def test_qa_exact_match(pred: str, answer: str, aliases: tuple[str, ...]) -> None:
    assert exact_match(pred, [answer, *aliases])
    grade = rule_grade("qa", pred, answer, aliases)
    assert grade.correct and grade.method == "exact_match" and grade.score == 1.0


def test_qa_alias_detail() -> None:
    assert rule_grade("qa", "nyc", "New York City", ["NYC"]).detail == "EM with alias 'NYC'"
    assert rule_grade("qa", "nyc", "New York City", "NYC").correct  # bare string alias is one alias


def test_qa_partial_answer() -> None:
    grade = rule_grade("qa", "New York", "New York City")
    assert not grade.correct
    assert 0.0 < grade.score < 1.0
    assert grade.score == pytest.approx(0.8)
    assert grade.detail == "F1 0.80"


def test_qa_yes_no_only_match_exactly() -> None:
    assert token_f1("yes", ["no"]) == 0.0
    assert token_f1("no", ["no answer given"]) == 0.0
    assert token_f1("Yes.", ["yes"]) == 1.0
    assert not rule_grade("qa", "yes", "no").correct


def test_token_f1_max_over_golds() -> None:
    assert token_f1("Paris France", ["London", "Paris"]) == pytest.approx(2 / 3)
    assert token_f1("anything", []) == 0.0


def test_qa_no_answer() -> None:
    assert rule_grade("qa", None, "x") == RuleGrade(False, 0.0, "exact_match", "no answer")
    assert rule_grade("qa", "?!", "x").detail == "no answer"


# --------------------------------------------------------------------- fixtures


def _gsm8k_rows() -> list[dict[str, str]]:
    with open(FIXTURES / "gsm8k_test20.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hotpot_rows() -> list[dict[str, str]]:
    return json.loads((FIXTURES / "hotpotqa_dev20.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("row", _gsm8k_rows(), ids=lambda r: r["question"][:30])
def test_gsm8k_fixture_rows(row: dict[str, str]) -> None:
    gold = row["answer"].split("####")[-1].strip()
    # The full solution (with intermediate <<a*b=c>> numbers) still grades by the #### number.
    assert rule_grade("math", f"The answer is {gold}.", row["answer"]).correct
    assert rule_grade("math", f"\\boxed{{{gold}}}", gold).correct
    wrong = str(parse_number(gold) + 1)
    assert not rule_grade("math", f"The answer is {wrong}.", row["answer"]).correct


@pytest.mark.parametrize("row", _hotpot_rows(), ids=lambda r: r["_id"])
def test_hotpot_fixture_rows(row: dict[str, str]) -> None:
    answer = row["answer"]
    assert rule_grade("qa", answer, answer) == RuleGrade(True, 1.0, "exact_match", "EM with answer")
    assert rule_grade("qa", answer.upper() + ".", answer).correct
    assert not rule_grade("qa", "Zanzibar Quasar", answer).correct
