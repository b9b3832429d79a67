"""Safe calculator for `<math_exp> EXPR </math_exp>` actions.

The paper used a SymPy calculator; we accept what it would accept for grade-school math, but model
text is never handed to eval/exec/sympify. We normalise the text, `ast.parse` it (parsing only),
walk the tree against an allow-list and evaluate it ourselves: exact `Fraction` arithmetic, float
only for irrational functions. Every size that could blow up (input, literals, nesting, node
count, integer bits, powers) is bounded before work is done, so hostile input fails fast.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
import threading
import warnings
from collections.abc import Callable
from fractions import Fraction

from swirl_core.tools import ToolResult

MAX_CHARS = 2_000
MAX_LITERAL_DIGITS = 100
MAX_SCI_EXPONENT = 300  # `1e999999` would otherwise make Fraction build 10**999999
MAX_DEPTH = 50  # deep nesting can crash/overflow CPython's parser, so it is checked before parsing
MAX_NODES = 200
MAX_BITS = 10_000  # cap on numerator/denominator size of any exact intermediate
MAX_ROUND_DIGITS = 100
DECIMALS = 10

Number = Fraction | float
Value = Fraction | float | bool

ALLOWED = "numbers, + - * / // % ** ^, parentheses, comparisons and sqrt, abs, round, floor, ceil, min, max, log, exp"


class CalculatorError(ValueError):
    """A readable error meant to be shown to the model as the observation."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Calculator error: {detail}")


def _unsupported(text: str, node: ast.AST) -> CalculatorError:
    seg = ast.get_source_segment(text, node) or type(node).__name__
    seg = seg if len(seg) <= 40 else seg[:37] + "..."
    return CalculatorError(f"unsupported syntax {seg!r} (only {ALLOWED})")


# --- normalisation --------------------------------------------------------------------------
_TRAILING_EQ = re.compile(r"(?<![=!<>])=\s*\??\s*$")
# `1,000` / `12,345.6`: a 1-3 digit group then groups of exactly 3 digits. Other commas are left for
# the parser: argument separators in calls, or a top-level tuple, which we report as an error.
_THOUSANDS = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?!\d)")
# `20%` is a percentage when no operand follows (end, `)`, `,`, or an operator); `50%3` is modulo.
_PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)%(?=\s*(?:$|[)\],+\-*/%^<>=!]))")
_NUMBER = re.compile(r"(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?(\d[\d_]*))?")  # Python allows 1e9_9
_SUBSCRIPT = re.compile(r"[A-Za-z_)\]]\s*\[")
_UNICODE = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "$": None, "[": "(", "]": ")"})


def _normalise(expression: str) -> str:
    if not isinstance(expression, str):
        raise CalculatorError("expression must be text")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression too long (over {MAX_CHARS} characters)")
    if _SUBSCRIPT.search(expression):  # brackets pass as parentheses below, but `sqrt[0]` is a subscript
        raise CalculatorError(f"subscripts are not arithmetic (only {ALLOWED})")
    text = " ".join(expression.translate(_UNICODE).split())  # also folds newlines away
    text = _TRAILING_EQ.sub("", text).strip()
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = _PERCENT.sub(r"(\1/100)", text).replace("^", "**")
    if not text:
        raise CalculatorError("empty expression")
    if "#" in text:  # the parser would drop a comment silently, and whatever rides in it with it
        raise CalculatorError(f"'#' is not arithmetic (only {ALLOWED})")
    for m in _NUMBER.finditer(text):
        if sum(c.isdigit() for c in m.group(1)) > MAX_LITERAL_DIGITS:
            raise CalculatorError(f"number too long (over {MAX_LITERAL_DIGITS} digits)")
        exponent = (m.group(2) or "").replace("_", "")
        if exponent and (len(exponent) > 4 or int(exponent) > MAX_SCI_EXPONENT):
            raise CalculatorError(f"number out of range (exponent over {MAX_SCI_EXPONENT})")
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested too deeply (over {MAX_DEPTH} levels)")
    return text


# --- arithmetic -----------------------------------------------------------------------------
def _check(v: Number) -> Number:
    if isinstance(v, Fraction):
        if max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_BITS:
            raise CalculatorError("number too large")
    elif not math.isfinite(v):
        raise CalculatorError("result is not a finite number")
    return v


def _pow(a: Number, b: Number) -> Number:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1:
        n = b.numerator
        if a == 0 and n < 0:
            raise CalculatorError("division by zero")
        if a in (0, 1, -1):  # exact and cheap for any exponent, so no size estimate needed
            return a ** (n % 2 if a == -1 else min(max(n, 0), 1))
        # Size estimate before computing: bits(base) * |exponent| bounds the bits of the result.
        if max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(n) > MAX_BITS:
            raise CalculatorError("result too large (power exceeds the size limit)")
        return a**n
    fa, fb = float(a), float(b)
    if fa == 0 and fb < 0:
        raise CalculatorError("division by zero")
    if fa < 0 and not fb.is_integer():
        raise CalculatorError("fractional power of a negative number")
    return math.pow(fa, fb)  # math.pow raises OverflowError instead of returning complex/inf


# Division/modulo by zero raises ZeroDivisionError (for floats too), which evaluate() reports.
_BINOPS: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow,
}
_CMPOPS: dict[type, Callable[[Number, Number], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne,
}


def _exact(x: Number) -> Fraction:
    # repr keeps the decimal a float was written as, so round(2.675, 2) gives 2.68 as on paper.
    return x if isinstance(x, Fraction) else Fraction(repr(x))


def _round(x: Number, nd: Number = Fraction(0)) -> Fraction:
    if not (isinstance(nd, Fraction) and nd.denominator == 1) or abs(nd) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round() digits must be an integer between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
    scale = Fraction(10) ** int(nd)
    q = math.floor(abs(_exact(x)) * scale + Fraction(1, 2))  # half away from zero, as taught in school
    return Fraction(q if x >= 0 else -q) / scale


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalculatorError("square root of a negative number")
    if isinstance(x, Fraction):
        rn, rd = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if rn * rn == x.numerator and rd * rd == x.denominator:
            return Fraction(rn, rd)
    return math.sqrt(x)


def _log(x: Number, base: Number | None = None) -> float:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalculatorError("log needs a positive number (and a positive base other than 1)")

    def ln(v: Number) -> float:  # math.log takes big ints directly, so huge exact values skip float()
        return math.log(v.numerator) - math.log(v.denominator) if isinstance(v, Fraction) else math.log(v)

    return ln(x) if base is None else ln(x) / ln(base)


def _minmax(fn: Callable[..., Number]) -> Callable[..., Number]:
    def call(*args: Number) -> Number:
        if len(args) < 2:  # also catches `min(3,400)` read as min(3400): better an error than a wrong answer
            raise CalculatorError(f"{fn.__name__}() needs at least 2 arguments separated by ', '")
        return fn(args)
    return call


# name -> (function, min args, max args)
_FUNCS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (_sqrt, 1, 1), "abs": (abs, 1, 1), "round": (_round, 1, 2),
    "floor": (lambda x: Fraction(math.floor(x)), 1, 1), "ceil": (lambda x: Fraction(math.ceil(x)), 1, 1),
    "min": (_minmax(min), 0, MAX_NODES), "max": (_minmax(max), 0, MAX_NODES),
    "log": (_log, 1, 2), "exp": (lambda x: math.exp(x), 1, 1),
}


def _eval(node: ast.AST, text: str) -> Value:
    def num(n: ast.AST) -> Number:
        v = _eval(n, text)
        if isinstance(v, bool):
            raise CalculatorError("a comparison result (True/False) cannot be used as a number")
        return v

    if isinstance(node, ast.Expression):
        return _eval(node.body, text)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if type(node.value) is int:
            return _check(Fraction(node.value))
        # Read floats from their source text so 0.1 is exactly 1/10, not the binary approximation.
        src = (ast.get_source_segment(text, node) or repr(node.value)).replace("_", "")
        return _check(Fraction(src))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _check(_BINOPS[type(node.op)](num(node.left), num(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = num(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        vals = [num(node.left)] + [num(c) for c in node.comparators]
        return all(_CMPOPS[type(op)](a, b) for op, a, b in zip(node.ops, vals, vals[1:]))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise _unsupported(text, node)
        fn, lo, hi = _FUNCS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise CalculatorError(f"{node.func.id}() takes {lo} to {hi} arguments, got {len(node.args)}")
        return _check(fn(*[num(a) for a in node.args]))
    if isinstance(node, ast.Tuple):
        raise CalculatorError("unexpected comma (write thousands as 1,000 and separate function arguments with ', ')")
    raise _unsupported(text, node)


def _format(v: Value) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and abs(v) >= 1e15:
        return f"{v:.15g}"  # beyond float precision: exact digits of the binary value would mislead
    x = _exact(v) if isinstance(v, float) else v
    if x.denominator == 1:
        return str(x.numerator)
    q = _round(x, Fraction(DECIMALS)) * 10**DECIMALS
    if q == 0:  # a tiny non-zero value should not print as 0
        return f"{float(x):.{DECIMALS}g}"
    sign, q = ("-" if q < 0 else ""), abs(int(q))
    whole, frac = divmod(q, 10**DECIMALS)
    return f"{sign}{whole}.{frac:0{DECIMALS}d}".rstrip("0").rstrip(".")


_WARN_LOCK = threading.Lock()


def evaluate(expression: str) -> str:
    """Evaluate a grade-school math expression and return the result as text.

    Raises CalculatorError (with a message suitable for the model) for anything else.
    """
    text = _normalise(expression)
    try:
        # Model garbage like `1if` should not spam SyntaxWarnings; catch_warnings mutates global
        # state, so the lock stops two threads from restoring each other's filters out of order.
        with _WARN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")  # parsing only; the tree is walked by _eval, never compiled
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        shown = repr(text)  # escapes can make it longer than the text, so cut after repr
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CalculatorError(f"could not parse {shown} (only {ALLOWED})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression too long (over {MAX_NODES} syntax nodes)")
    try:
        return _format(_eval(tree, text))
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression too complex") from None
    except CalculatorError:
        raise
    except (ValueError, TypeError, ArithmeticError):
        raise CalculatorError("math domain error") from None


class Calculator:
    """The `math` tool: evaluates the text of a `<math_exp>` action; never raises."""

    name = "math"

    def __call__(self, tool_input: str) -> ToolResult:
        # K samples of a question often send the same expressions: the result is a pure function.
        return _observe(tool_input) if isinstance(tool_input, str) else _observe_uncached(tool_input)


@functools.lru_cache(maxsize=8192)
def _observe(tool_input: str) -> ToolResult:
    return _observe_uncached(tool_input)


def _observe_uncached(tool_input: object) -> ToolResult:
    try:
        return ToolResult(evaluate(tool_input))
    except CalculatorError as err:
        return ToolResult(str(err), error=True)
    except (RecursionError, MemoryError, ArithmeticError, ValueError, TypeError):
        return ToolResult("Calculator error: expression could not be evaluated", error=True)
