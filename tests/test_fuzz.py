"""Hostile input: property-based fuzzing (hypothesis) of the calculator and the action parser.

Every generated input must (1) run no code: no audited code-execution, process, file or network event
fires while the library handles it, and a canary file that the injection payloads try to create never
appears; (2) raise nothing but the library's documented error (`CalculatorError` from `evaluate`, and
nothing at all from `Calculator()` or `parse_action`); (3) finish within `MAX_SECONDS` of CPU. The runs
are derandomized (same inputs every time), keep no example database and write nothing into the repo.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

# Hypothesis keeps caches under ./.hypothesis by default: keep them out of the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="swirl-hypothesis-"))

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swirl_core.protocol import TAGS, TASK_ACTIONS, parse_action
from swirl_core.tools import ToolResult
from swirl_core.tools.calculator import MAX_CHARS, Calculator, CalculatorError, evaluate

MAX_SECONDS = 0.5  # per input, CPU time of the calling thread (wall time is re-measured once before failing)
CANARY_DIR = Path(tempfile.mkdtemp(prefix="swirl-fuzz-canary-"))
CANARY = CANARY_DIR / "CANARY"
CMD = f"touch {CANARY}"

# Audit events (PEP 578) that mean code ran or the outside world was touched. `compile` is not here:
# ast.parse raises it, and parsing (never compiling to bytecode) is how the calculator reads input.
FORBIDDEN_EVENTS = ("exec", "import", "open", "os.", "subprocess.", "shutil.", "socket.", "ctypes.", "builtins.input",
                    "code.__new__", "function.__new__", "sys._getframe", "pty.", "webbrowser.", "urllib.")
_watch = threading.local()
_seen_events: list[tuple[str, str]] = []


def _audit(event: str, args: tuple) -> None:
    if getattr(_watch, "on", False) and event.startswith(FORBIDDEN_EVENTS):
        _seen_events.append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # process-wide and permanent, but a no-op unless this thread is watching

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                       HealthCheck.large_base_example])


@dataclass
class Meter:
    """Counts inputs and keeps the slowest one (CPU and wall time) of a fuzz run."""

    n: int = 0
    max_cpu: float = 0.0
    max_wall: float = 0.0
    slowest: str = ""
    kinds: dict[str, int] = field(default_factory=dict)

    def time(self, fn, *args):
        # A full collection of a suite's worth of objects (torch, Prefect, ...) is not the input's cost.
        gc.disable()
        _watch.on = True
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args)
        finally:
            cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
            _watch.on = False
            gc.enable()
            self.n += 1
            if cpu > self.max_cpu:
                self.max_cpu, self.slowest = cpu, repr(args[0])[:80]
            self.max_wall = max(self.max_wall, wall)
            if wall > MAX_SECONDS:  # shared CPU can stall any call: re-time once before calling it slow
                w0 = time.perf_counter()
                try:
                    fn(*args)
                except Exception:
                    pass
                assert time.perf_counter() - w0 < MAX_SECONDS, f"{args[0]!r:.200} took {wall:.2f}s twice"
            assert cpu < MAX_SECONDS, f"{args[0]!r:.200} took {cpu:.2f}s of CPU"

    def report(self, name: str) -> None:
        assert not _seen_events, f"audited events while handling model text: {_seen_events[:5]}"
        assert not CANARY.exists(), "an injected command ran: the canary file exists"
        print(f"\n{name}: {self.n} inputs, max {self.max_cpu * 1000:.1f} ms CPU ({self.slowest}), "
              f"max wall {self.max_wall * 1000:.1f} ms")


# --------------------------------------------------------------------------- hostile corpus
# "@C" is the canary path and "@CMD" a shell command creating it.
INJECTIONS = [
    "__import__('os').system('@CMD')",
    "__import__('subprocess').call(['touch', '@C'])",
    "__import__('os').popen('@CMD').read()",
    "exec(\"open('@C', 'w')\")",
    "eval(\"__import__('os').system('@CMD')\")",
    "open('@C', 'w').write('x')",
    "compile(\"open('@C', 'w')\", 'x', 'exec')",
    "().__class__.__base__.__subclasses__()",
    "().__class__.__bases__[0].__subclasses__()[0].__init__.__globals__['sys'].modules['os'].system('@CMD')",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()._module"
    ".__builtins__['__import__']('os').system('@CMD')",
    "(1).__class__.__mro__[-1].__subclasses__()",
    "sqrt.__globals__['__builtins__']['exec'](\"open('@C', 'w')\")",
    "round.__globals__['math'].__loader__",
    "abs.__self__.__import__('os').system('@CMD')",
    "getattr(abs.__self__, 'exec')(\"open('@C', 'w')\")",
    "min.__self__.open('@C', 'w')",
    "(lambda: __import__('os').system('@CMD'))()",
    "(lambda f: f(f))(lambda f: f(f))",
    "lambda: 1",
    "[__import__('os').system('@CMD') for _ in (1,)]",
    "{__import__('os').system('@CMD') for _ in (1,)}",
    "{k: __import__('os').system('@CMD') for k in (1,)}",
    "(__import__('os').system('@CMD') for _ in (1,))",
    "f\"{__import__('os').system('@CMD')}\"",
    "f'{1+1}'",
    "f'{sqrt.__globals__}'",
    "(y := __import__('os')).system('@CMD')",
    "(x := 5) * x",
    "x := 1",
    "'{0.__class__.__mro__}'.format(1)",
    "'{.__globals__}'.format(sqrt)",
    "'%s' % __import__('os').system('@CMD')",
    "'%d' % 1",
    "b'\\x00'",
    "r'\\d'",
    "'''@CMD'''",
    "breakpoint()",
    "input()",
    "globals()",
    "locals()['__builtins__']",
    "vars()",
    "dir()",
    "help()",
    "print(1)",
    "exit()",
    "__builtins__",
    "__loader__.load_module('os')",
    "__spec__",
    "import os",
    "from os import system",
    "1; __import__('os').system('@CMD')",
    "1\n__import__('os').system('@CMD')",
    "2+2 # __import__('os').system('@CMD')",
    "__import__('os').system('@CMD') # 2+2",
    "ｅｘｅｃ(\"open('@C', 'w')\")",  # fullwidth letters: NFKC-normalised to `exec` by the parser
    "ｅｖａｌ('1+1')",
    "𝐞𝐱𝐞𝐜(\"open('@C', 'w')\")",  # mathematical bold
    "__import__('ctypes').CDLL(None)",
    "type('X', (), {})",
    "sqrt(__import__('os').system('@CMD'))",
    "max(1, (lambda: 1)())",
    "max(1, 2, key=eval)",
    "sqrt(*[4])",
    "sqrt(**{'x': 4})",
    "[*map(eval, ['1'])]",
    "1 if __import__('os').system('@CMD') else 2",
    "sqrt(16) if True else 0",
    "1 .real",
    "(1).__add__(2)",
    "(2).bit_length()",
    "1 .__class__.__subclasses__",
    "sqrt[0]",
    "x[1:2]",
    "await x",
    "yield 1",
    "del x",
    "assert 0",
    "...",
    "None",
    "True",
    "not 1",
    "~1",
    "1 << 100000",
    "1 @ 2",
    "1 is 1",
    "1 in (1,)",
    "sqrt.__call__(4)",
    "sqrt.__code__.co_consts",
    "__import__",
    "__name__",
    "\x00__import__('os')",
    "1\x00",
    "\ud800",
    "\u202e1+1",
    "1\u200b+1",
]
HUGE = [
    "9**9**9", "10**10**10", "2**2**2**2**2**2", "(10**100)**(10**100)", "9^9^9", "2**-100000", "(-2)**100001",
    "1e9_9_9_9_9_9_9_9_9_9_9_9", "9.9e9_9_9_9_9_9_9", "1_0e9_9", "1e-9_9_9_9_9_9_9_9", "1E+9_9_9_9_9_9_9",
    "1e999999999", "1e-999999999", "0x" + "f" * 1990, "0b" + "1" * 1990, "0o" + "7" * 1990, "1_" * 999 + "1",
    "round(1, 10**100)", "round(10**3000, 100)", "exp(exp(exp(exp(10))))", "log(10**3000)", "sqrt(10**3000)",
    "sqrt(2**9999)", "2.5 ** 9000", "1e300 * 1e300", "factorial(10**9)", "max(" + "9**999, " * 60 + "1)",
    "min(" + ", ".join(["0x" + "f" * 30] * 60) + ")", "(" + "9**999*" * 5 + "1)", "10**300 * 10**300 * 10**300",
    "1/3**9999", "(1/3)**9999", "1/(10**3000)", "round(1/7, 100)", "floor(10**3000 / 7)", "ceil(1e300)",
    "2**9999 % 7", "2**9999 // 3", "(2**9999 + 1) / (2**9998 + 1)", "abs(-10**3000)",
    "(" * 60 + "1" + ")" * 60, "(" * 5000 + "1" + ")" * 5000, "[" * 300 + "1" + "]" * 300, "{" * 300,
    "-" * 1999 + "1", "+-" * 999 + "1", "~" * 1000 + "1", "not " * 400 + "1", "sqrt(" * 60 + "4" + ")" * 60,
    "1" * 10**6, "1+" * 999 + "1", "(1)*" * 400 + "1", "1" * 101, "9" * 100 + "." + "9" * 100,
    "١ + ٢", "٣×٤", "１２３ + ４", "²", "½ + ½", "Ⅻ", "𝟗 * 𝟗", "৩", "߁+߁", "1٫5", "3,000,000 × 2", "20% of 50",
]


def _fill(template: str) -> str:
    return template.replace("@CMD", CMD).replace("@C", str(CANARY))


CORPUS = [_fill(t) for t in INJECTIONS + HUGE]

# --------------------------------------------------------------------------- strategies
_digits = st.text("0123456789", min_size=1, max_size=6)
_unicode_digit = st.characters(categories=["Nd", "No", "Nl"])
_number = st.one_of(
    _digits,
    st.builds("{}.{}".format, _digits, _digits),
    st.builds("{}e{}{}".format, _digits, st.sampled_from(["", "+", "-"]), st.text("0123456789_", min_size=1, max_size=12)),
    st.builds("{}_{}".format, _digits, _digits),
    st.builds("{}%".format, _digits),
    st.builds("{},{:03d}".format, st.integers(1, 999), st.integers(0, 999)),
    st.builds("0x{}".format, st.text("0123456789abcdef", min_size=1, max_size=40)),
    st.text(_unicode_digit, min_size=1, max_size=4),
    st.integers(0, 10**120).map(str),
)
_binop = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^", " × ", " ÷ ", " − ", "<", "<=", "==", "!=", ">", ">=",
                          ",", " and ", " or ", " if 1 else ", "@", "<<", ">>", "&", "|", ".", ":=", " in ", " is "])
_func = st.sampled_from(["sqrt", "abs", "round", "floor", "ceil", "min", "max", "log", "exp", "factorial", "eval",
                         "exec", "__import__", "open", "getattr", "print", "sqrt.__globals__", "abs.__self__.exec"])


def _expr_tree(children):
    return st.one_of(
        st.tuples(children, _binop, children).map("".join),
        st.tuples(st.sampled_from(["-", "+", "~", "not "]), children).map("".join),
        children.map("({})".format),
        children.map("[{}]".format),
        st.tuples(_func, st.lists(children, min_size=0, max_size=4)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(children, st.sampled_from(["**", "^"]), children).map(lambda t: f"{t[0]}{t[1]}({t[2]})"),
        st.tuples(children, st.sampled_from([".__class__", ".__globals__", ".real", "[0]", "()", "(1)"])).map("".join),
    )


_expressions = st.recursive(_number | st.sampled_from(["x", "e", "pi", "True", "None", "''", "_"]), _expr_tree,
                            max_leaves=40)
_injection = st.sampled_from(CORPUS)


def _nest(t: tuple[int, int, str, str]) -> str:
    opens, closes, opener, body = t
    return opener * opens + body + ")" * closes


_hostile = st.one_of(
    _injection,
    _expressions,
    # a payload inside ordinary arithmetic, or arithmetic inside a payload
    st.tuples(_expressions, _binop, _injection, _binop, _expressions).map("".join),
    st.tuples(_injection, st.sampled_from([" + 1", "*2", ")", "(", " = ?", "%", "**9**9"])).map("".join),
    # deep and unbalanced nesting
    st.tuples(st.integers(0, 260), st.integers(0, 260), st.sampled_from(["(", "[", "sqrt(", "-(", "abs(", "max(1,"]),
              st.one_of(_number, _injection)).map(_nest),
    st.tuples(st.sampled_from(["-", "+", "~", "not ", "+-", "- "]), st.integers(1, 2100)).map(lambda t: t[0] * t[1] + "1"),
    # power towers and long inputs around the length limit
    st.lists(st.one_of(_digits, st.sampled_from(["9", "10", "2", "0.5", "-1", "1e300", "1e9_9_9"])), min_size=2,
             max_size=12).map("**".join),
    st.tuples(st.sampled_from(["1+", "(1)*", "9**", "1e9_9", "1_", "0x" + "f" * 8 + "*", "sqrt(", "1,000,", "a."]),
              st.integers(MAX_CHARS // 10, MAX_CHARS // 2 + 5)).map(lambda t: t[0] * t[1] + "1"),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.text("0123456789.,+-*/%^()[] <>=!$×÷−eE_xsqrtlogminab'\"\\{}:@;\n\t#fjx", max_size=200),
    st.text(st.characters(codec="utf-8"), min_size=MAX_CHARS - 5, max_size=MAX_CHARS + 5),
)


def _check_calculator(meter: Meter, text: str) -> None:
    try:
        out = meter.time(evaluate, text)
    except CalculatorError as err:
        assert str(err).startswith("Calculator error: ") and len(str(err)) < 300
    else:
        assert isinstance(out, str) and out
    result = Calculator()(text)  # the tool itself: never raises, always an observation
    assert isinstance(result, ToolResult) and isinstance(result.output, str) and result.output
    if result.error:
        assert result.output.startswith("Calculator error: ") and len(result.output) < 300


# --------------------------------------------------------------------------- calculator


def test_hostile_corpus_runs_no_code_and_fails_cleanly():
    """The hand-written injection and blow-up corpus, each input once (fast: no generation)."""
    meter = Meter()
    for text in CORPUS:
        _check_calculator(meter, text)
    for text in [_fill(t) for t in INJECTIONS]:
        assert Calculator()(text).error, text  # no injection is ever accepted as arithmetic
    meter.report("hostile corpus")
    assert meter.n == len(CORPUS)


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")  # a real hang sits in C code, where a signal cannot interrupt it
def test_calculator_fuzz_hostile_inputs():
    meter = Meter()

    @settings(FUZZ, max_examples=6000)
    @given(_hostile)
    def run(text: str) -> None:
        _check_calculator(meter, text)
        assert not CANARY.exists()

    run()
    meter.report("calculator fuzz")
    assert meter.n >= 6000


def _arith(draw_leaf):
    """(text, exact value or None for a division by zero) pairs for + - * / trees."""

    def combine(children):
        def join(t):
            (a, va), op, (b, vb) = t
            if va is None or vb is None:
                return f"({a}){op}({b})", None
            if op == "/":
                return f"({a}){op}({b})", None if vb == 0 else va / vb
            return f"({a}){op}({b})", {"+": va + vb, "-": va - vb, "*": va * vb}[op]
        return st.tuples(children, st.sampled_from(["+", "-", "*", "/"]), children).map(join)

    return st.recursive(draw_leaf, combine, max_leaves=12)


_leaf = st.integers(0, 10**6).map(lambda n: (str(n), Fraction(n))) | st.integers(0, 999).map(
    lambda n: (f"{n / 8}", Fraction(n, 8)))


@pytest.mark.slow
def test_calculator_fuzz_arithmetic_is_exact():
    """Valid-looking input too: + - * / trees agree with exact rational arithmetic (never a wrong answer)."""
    meter = Meter()

    @settings(FUZZ, max_examples=1500)
    @given(_arith(_leaf))
    def run(pair) -> None:
        text, value = pair
        try:
            out = meter.time(evaluate, text)
        except CalculatorError as err:
            assert value is None or "too large" in str(err), (text, err)
            return
        assert value is not None, (text, out)
        if value.denominator == 1:
            assert out == str(value.numerator), (text, out, value)
        else:
            assert abs(Fraction(out) - value) <= Fraction(1, 10**10), (text, out, value)

    run()
    meter.report("calculator arithmetic")
    assert meter.n >= 1500


# --------------------------------------------------------------------------- action parser
_TAG_NAMES = [*TAGS.values(), "search", "math", "answers", "math-exp", "ſearch_query", "anſwer", "ANSWER", "Math_Exp",
              "MATH_EXP", "Search_Query", "answer ", "ａｎｓｗｅｒ", "math_exp\x00"]
_ws = st.sampled_from(["", " ", "  ", "\n", "\t", "\u00a0", "\u3000"])
_open_tag = st.tuples(_ws, st.sampled_from(_TAG_NAMES), _ws).map(lambda t: f"<{t[0]}{t[1]}{t[2]}>")
_close_tag = st.tuples(_ws, _ws, st.sampled_from(_TAG_NAMES), _ws).map(lambda t: f"<{t[0]}/{t[1]}{t[2]}{t[3]}>")
_part = st.one_of(
    _open_tag, _close_tag, _injection, _expressions,
    st.text(st.characters(codec="utf-8"), max_size=80),
    st.sampled_from(["<", ">", "</", "/>", "<<", ">>", "<answer", "answer>", "</answer", "<!-- ", " -->", "→", "\x00"]),
    st.tuples(st.sampled_from(["think ", "<", "</answer>", "<answer>", "x" * 50]), st.integers(10, 400)).map(
        lambda t: t[0] * t[1]),
)
_messages = st.lists(_part, max_size=12).map("".join)


def _check_parse(meter: Meter, text: str, task: str) -> None:
    parsed = meter.time(parse_action, text, task)
    action = parsed.action
    assert action.kind in ("search", "math", "answer", "invalid")
    if action.kind == "invalid":
        assert action.error
    else:
        assert action.kind in TASK_ACTIONS[task] and action.error is None
        assert action.content and action.content == action.content.strip() and action.content in text
    # The stored message is the text cut after the first action (closed if the model never closed it) ...
    if not text.startswith(parsed.message):
        head, _, closing = parsed.message.rpartition("</")
        assert text.startswith(head) and closing in {f"{tag}>" for tag in TAGS.values()}, (text, parsed.message)
    # ... and reading it back gives the same action, no longer truncated.
    again = meter.time(parse_action, parsed.message, task).action
    assert again == action.model_copy(update={"truncated": False}), (text, action, again)
    if action.kind == "math":  # what the agent does next: the tool sees the model's text
        result = meter.time(Calculator(), action.content)
        assert isinstance(result, ToolResult) and result.output


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_parser_fuzz_never_raises_and_cuts_one_action():
    meter = Meter()

    @settings(FUZZ, max_examples=4500)
    @given(_messages, st.sampled_from(["qa", "math"]))
    def run(text: str, task: str) -> None:
        _check_parse(meter, text, task)
        assert not CANARY.exists()

    run()
    meter.report("parser fuzz")
    assert meter.n >= 2 * 4500


def test_parser_unicode_case_folding_never_raises():
    """`ſ` (long s) and `K` (Kelvin) fold to ASCII letters under re.IGNORECASE: never a tag, never a crash."""
    meter = Meter()
    for text in ["<ſearch_query>x</search_query>", "<anſwer>4</answer>", "<ANſWER>4</ANSWER>", "<answer>4</anſwer>",
                 "<ſearch_query>x</ſearch_query> <answer>y</answer>"]:
        for task in ("qa", "math"):
            _check_parse(meter, text, task)
    assert parse_action("<anſwer>4</anſwer> <answer>5</answer>", "math").action.content == "5"
    meter.report("parser unicode")
