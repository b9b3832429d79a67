"""Tests for the safe calculator tool (no network, fast)."""

from __future__ import annotations

import builtins
import random
import time

import pytest

from swirl_core.tools import ToolResult
from swirl_core.tools.calculator import Calculator, CalculatorError, evaluate

CORRECT = [
    ("48/2", "24"),
    ("48+24", "72"),
    ("(5*3)+(2*4)", "23"),
    ("12*0.75", "9"),
    ("1,200 - 350", "850"),
    ("12,345.6 + 0.4", "12346"),
    ("$15 * 4", "60"),
    ("15$ * 4", "60"),
    ("2^10", "1024"),
    ("20% * 50", "10"),
    ("15%", "0.15"),
    ("(50%)", "0.5"),
    ("50 % 3", "2"),
    ("50%3", "2"),
    ("1/3 + 1/6", "0.5"),
    ("1/3", "0.3333333333"),
    ("2/3", "0.6666666667"),
    ("0.1 + 0.2", "0.3"),
    (".5 * 4", "2"),
    ("sqrt(16)", "4"),
    ("sqrt(2)", "1.4142135624"),
    ("sqrt(1/4)", "0.5"),
    ("round(2.567, 2)", "2.57"),
    ("round(2.5)", "3"),
    ("round(1234, -2)", "1200"),
    ("floor(7/2) + ceil(7/2)", "7"),
    ("abs(-12)", "12"),
    ("min(3, 4)", "3"),
    ("max(3, 4, 2.5)", "4"),
    ("log(8, 2)", "3"),
    ("exp(0)", "1"),
    ("log(exp(2))", "2"),
    ("10 > 5", "True"),
    ("5 == 5.0", "True"),
    ("3 != 3", "False"),
    ("1 < 2 <= 2 < 1", "False"),
    ("(3+4)*2 =", "14"),
    ("(3+4)*2 = ?", "14"),
    ("  \n 6*7 \n", "42"),
    ("-3**2", "-9"),
    ("-12", "-12"),
    ("+5", "5"),
    ("1000*1000", "1000000"),
    ("7//2", "3"),
    ("4**0.5", "2"),
    ("2**-2", "0.25"),
    ("[2+3]*2", "10"),
    ("3 × 4 − 2 ÷ 4", "11.5"),
    ("12*1.5", "18"),
    ("round(2.675, 2)", "2.68"),
    ("max(1,200, 5)", "1200"),
    ("1e-12", "1e-12"),
    ("2**100", "1267650600228229401496703205376"),
    ("-7/2", "-3.5"),
    ("20% - 5", "-4.8"),
    ("min(20%, 0.3)", "0.2"),
]


@pytest.mark.parametrize(("expr", "expected"), CORRECT)
def test_correct(expr: str, expected: str) -> None:
    assert evaluate(expr) == expected
    assert Calculator()(expr) == ToolResult(expected)


HOSTILE = [
    "__import__('os').system('echo hi')",
    "().__class__",
    "(1).__class__.__bases__",
    "9**9**9",
    "10**10**10",
    "10**100000",
    "2**-100000",
    "'a'*10**9",
    "(" * 100000 + "1" + ")" * 100000,
    "(" * 60 + "1" + ")" * 60,
    "-" * 1999 + "1",
    "+".join(["1"] * 150),
    "1" * 10**6,
    "1" * 101,
    "1e999999999",
    "1/0",
    "5 // 0",
    "5 % 0",
    "0**-1",
    "lambda: 1",
    "[x for x in range(10)]",
    "open('/etc/passwd')",
    "exp(1000000)",
    "",
    "   ",
    "=",
    "2**0.5**2**100",
    "max(*[1])",
    "round(2.5, ndigits=1)",
    "round(2.5, 10**9)",
    "min(3)",
    "x",
    "os",
    "5!",
    "factorial(5)",
    "sqrt(-1)",
    "log(0)",
    "log(8, 1)",
    "(-8)**(1/3)",
    "1,2",
    "1234,56",
    "f'{1}'",
    "b'1'",
    "1j",
    "True + 1",
    "(1 < 2) + 1",
    "1 if 1 else 2",
    "1 and 2",
    "not 1",
    "~1",
    "1 << 10000",
    "1 @ 2",
    "a.b",
    "sqrt.__class__",
    "sqrt(2) * 10**300 * 10**300",
    "[1][0]",
    "{1: 2}",
    "x := 1",
    "1e308 * 10",
    "2.5 ** 9000",
    "((2**5000) * (2**5000)) * 2**5000",
    "9**4000 * 9**4000",
    "1\x00",
    "\ud800",
    "1;import os",
]


@pytest.mark.parametrize("expr", HOSTILE, ids=lambda e: repr(e[:30]))
def test_hostile(expr: str) -> None:
    start = time.perf_counter()
    result = Calculator()(expr)
    elapsed = time.perf_counter() - start
    assert result.error, result
    assert result.output.startswith("Calculator error: ")
    assert len(result.output) < 300
    assert elapsed < 0.5
    with pytest.raises(CalculatorError):
        evaluate(expr)


def test_error_messages_are_readable() -> None:
    assert Calculator()("1/0").output == "Calculator error: division by zero"
    msg = Calculator()("x").output
    assert msg.startswith("Calculator error: unsupported syntax 'x' (only numbers")
    assert "sqrt" in msg and "^" in msg
    assert "too long" in Calculator()("1" * 3000).output
    assert "nested too deeply" in Calculator()("(" * 60 + "1" + ")" * 60).output


def test_ambiguous_comma_in_call_is_an_error_not_a_wrong_answer() -> None:
    # `min(3,400)` reads as min(3400) (thousands separator); one argument is refused, not answered.
    assert "at least 2 arguments" in Calculator()("min(3,400)").output


def test_non_string_input_never_raises() -> None:
    result = Calculator()(None)  # type: ignore[arg-type]
    assert result.error


def test_never_raises_on_random_input() -> None:
    rng = random.Random(1234)
    alphabet = "0123456789.,+-*/%^()[] <>=!$×÷−eEsqrtlogxpminab_'\"\n"
    calc = Calculator()
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        result = calc(text)
        assert isinstance(result, ToolResult)
        assert isinstance(result.output, str) and result.output


def test_does_not_use_eval_or_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    calc = Calculator()
    assert calc("(5*3)+(2*4)") == ToolResult("23")
    assert calc("sqrt(2) > 1.41") == ToolResult("True")
    assert calc("__import__('os')").error


def test_tool_protocol() -> None:
    calc = Calculator()
    assert calc.name == "math"
    assert issubclass(CalculatorError, ValueError)
