"""Decoding constraints for served models: the action grammar compiled for each server kind, and the probe
that checks, before a run pays for anything, that the server enforces it.

Servers ignore request fields they do not know (vLLM dropped `guided_*` in v0.12, hosted APIs never had
them), so a constraint is only recorded on a step once a probe has seen it applied.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from swirl_core.llm.openai_compat import LOGPROB_FIELDS, error_text
from swirl_core.protocol import action_tags
from swirl_core.records import TaskKind

ServerKind = Literal["vllm", "sglang", "llamacpp", "tgi", "openai"]
SERVER_KINDS: tuple[ServerKind, ...] = ("vllm", "sglang", "llamacpp", "tgi", "openai")
# GET /models `owned_by` of servers that say what they are.
_OWNERS: dict[str, ServerKind] = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llamacpp"}
REASONING_MAX, CONTENT_MAX = 400, 300  # characters before the tag, and inside it
# Tokens a constrained step may need (about 4 characters a token, and the tags): a sampling budget below it cuts steps.
STEP_TOKENS = (REASONING_MAX + CONTENT_MAX) // 4 + 16
# In-process, the grammar also fits the token budget: reasoning gets at most this share of it, and the tags
# this many tokens each (their worst case on common tokenizers: "<", "math", "_", "exp", ">"). The share is 0:
# measured on the demo (benchmarks/constrained_decoding.py), SmolLM2 given a quarter for reasoning spends it on
# every step, for the same parse rate, and a tiny policy's reasoning is noise the judge then has to read.
REASONING_SHARE, TAG_TOKENS = 0.0, 6

# Characters allowed inside each tag. Math stays arithmetic (the calculator rejects prose anyway), a math
# answer is a number, QA text is one line.
_MATH_CHARS = "0123456789.+-*/()^%, $"
_NUMBER_CHARS = "0123456789.,-$ /"
_LINE = r"[^<>\n]"


def _char_class(chars: str) -> str:
    """A character class regexes (Python's, Rust's) and GBNF read alike: brackets and backslash escaped,
    '^' never first, '-' last."""
    body = "".join("\\" + c if c in "\\[]" else c for c in sorted(set(chars) - {"-"}, key=lambda c: (c == "^", c)))
    return f"[{body}{'-' if '-' in chars else ''}]"


@dataclass(frozen=True)
class ActionGrammar:
    """The one action grammar: up to REASONING_MAX characters of reasoning (no '<'), then exactly one
    `<tag>content</tag>`, its content from the tag's own characters. Compiled to a regex (vLLM, SGLang, TGI),
    GBNF (llama.cpp) and, with a token budget, a Lark grammar (the in-process backend, through llguidance)."""

    tags: tuple[str, ...]
    math: bool

    @classmethod
    def for_task(cls, task: TaskKind, tools: bool = True) -> ActionGrammar:
        return cls(action_tags(task, tools), task == "math")

    def content(self, tag: str) -> str:
        if tag == "math_exp":
            return _char_class(_MATH_CHARS)
        return _char_class(_NUMBER_CHARS) if tag == "answer" and self.math else _LINE

    def first(self, tag: str) -> str:
        """The content's first character: never blank, since the parser finds blank content invalid."""
        if tag == "math_exp":
            return _char_class(_MATH_CHARS.replace(" ", ""))
        return _char_class(_NUMBER_CHARS.replace(" ", "")) if tag == "answer" and self.math else r"[^<>\n\t\r ]"

    def body(self, tag: str) -> str:
        return f"{self.first(tag)}{self.content(tag)}{{0,{CONTENT_MAX - 1}}}"

    @property
    def label(self) -> str:
        """What a step's `constraint` column records for it in-process."""
        return "grammar:" + "|".join(self.tags)

    def regex(self) -> str:
        forms = "|".join(f"<{t}>{self.body(t)}</{t}>" for t in self.tags)
        return rf"[^<]{{0,{REASONING_MAX}}}({forms})"

    def gbnf(self) -> str:
        forms = " | ".join(f'"<{t}>" {self.body(t)} "</{t}>"' for t in self.tags)
        return f"root ::= [^<]{{0,{REASONING_MAX}}} ({forms})"

    def lark(self, max_tokens: int) -> str:
        """The same language, its reasoning and content given token budgets that leave room for the tags, so a
        step is never cut off before its closing tag."""
        reasoning = int(max_tokens * REASONING_SHARE)
        content = max(1, max_tokens - reasoning - 2 * TAG_TOKENS)
        forms = " | ".join(f'"<{t}>" c_{t} "</{t}>"' for t in self.tags)
        rules = "\n".join(f"c_{t}[max_tokens={content}]: /{self.body(t).replace('/', chr(92) + '/')}/" for t in self.tags)
        lead = f"reasoning[max_tokens={reasoning}]: /[^<]{{1,{REASONING_MAX}}}/\n" if reasoning else ""
        return f"start: {'reasoning? ' if reasoning else ''}({forms})\n{lead}{rules}\n"


def request_fields(kind: ServerKind, *, regex: str, gbnf: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The body fields that carry a constraint to a server of this kind; {} where it has none. `choices`:
    vLLM's own choice field (other kinds get the regex/GBNF of the alternatives)."""
    if kind == "vllm":
        return {"structured_outputs": {"choice": list(choices)} if choices else {"regex": regex}}
    if kind == "sglang":
        return {"regex": regex}
    if kind == "llamacpp":
        return {"grammar": gbnf}
    if kind == "tgi":
        return {"response_format": {"type": "regex", "value": regex}}
    return {}


def action_fields(kind: ServerKind, task: TaskKind, tools: bool = True) -> dict[str, Any]:
    grammar = ActionGrammar.for_task(task, tools)
    return request_fields(kind, regex=grammar.regex(), gbnf=grammar.gbnf())


def choice_fields(kind: ServerKind, choices: tuple[str, ...]) -> dict[str, Any]:
    """A served judge's verdict forced to one of `choices`."""
    gbnf = "root ::= " + " | ".join(orjson.dumps(c).decode() for c in choices)
    return request_fields(kind, regex="(" + "|".join(re.escape(c) for c in choices) + ")", gbnf=gbnf, choices=choices)


# The probe forces a reply the prompt asks against: only an enforcing server can give it.
PROBE_REPLY = "<answer>swirl-probe-7319</answer>"
PROBE_PROMPT = "Reply with one word: hello."


@dataclass(frozen=True)
class ProbeResult:
    endpoint: str
    kind: ServerKind
    enforced: bool
    reply: str
    latency_s: float
    completion_tokens: int | None
    choice: bool = False  # probed a judge's choice field
    logprobs: bool | None = None  # the server took the logprobs fields (False: it answered 4xx to them); None: not asked

    def refusal(self, option: str, opt_in: str = "pass --allow-unconstrained",
                outcome: str = "steps record constraint NULL") -> str:
        return (f"{self.endpoint} ({self.kind}) does not enforce decoding constraints: forced to reply "
                f"{PROBE_REPLY!r}, it said {self.reply[:60]!r}; drop {option}, or {opt_in} "
                f"to continue unconstrained ({outcome})")


def probe_fields(kind: ServerKind, choice: bool = False) -> dict[str, Any]:
    """A constraint that allows only PROBE_REPLY, in the field a run will use (`choice`: a judge's verdict)."""
    if choice:
        return choice_fields(kind, (PROBE_REPLY,))
    return request_fields(kind, regex=re.escape(PROBE_REPLY), gbnf=f'root ::= "{PROBE_REPLY}"')


async def detect_kind(session: aiohttp.ClientSession, endpoint: str, timeout_s: float) -> ServerKind:
    """What the server says it is (`owned_by` of GET /models), else plain OpenAI (no known constraint field)."""
    try:
        async with session.get(endpoint + "/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return "openai"
    owners = {str(m.get("owned_by", "")).lower() for m in (data.get("data") or []) if isinstance(m, dict)}
    return next((_OWNERS[o] for o in owners if o in _OWNERS), "openai")


async def probe_constraint(endpoint: str, model_name: str, kind: ServerKind | Literal["auto"], *,
                           api_key: str | None, timeout_s: float, choice: bool = False,
                           logprobs: bool = False) -> ProbeResult:
    """One greedy request under a constraint that allows exactly PROBE_REPLY; enforced when that came back.
    `logprobs`: the request also asks for token logprobs, and is sent again once without them when the
    server answers 4xx, which then records that the server refuses them."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        resolved: ServerKind = await detect_kind(session, endpoint, timeout_s) if kind == "auto" else kind
        body = {"model": model_name, "messages": [{"role": "user", "content": PROBE_PROMPT}], "temperature": 0.0,
                "max_tokens": 32, **probe_fields(resolved, choice)}

        async def post(fields: dict[str, Any]) -> tuple[int, bytes, float]:
            started = time.perf_counter()
            async with session.post(endpoint + "/chat/completions", json={**body, **fields},
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.read(), time.perf_counter() - started

        status, raw, latency = await post(LOGPROB_FIELDS if logprobs else {})
        took_logprobs = True if logprobs and status == 200 else None
        if logprobs and 400 <= status < 500 and status != 429:
            status, raw, latency = await post({})
            took_logprobs = False if status == 200 else None  # refused again: not the logprobs' fault
    result = functools.partial(ProbeResult, endpoint, resolved, choice=choice, logprobs=took_logprobs)
    if status != 200:  # e.g. a server that rejects fields it does not know
        return result(False, f"HTTP {status}: {error_text(raw)}", latency, None)
    try:
        data = orjson.loads(raw)
        reply = data["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        return result(False, f"malformed reply: {raw[:200]!r}", latency, None)
    return result(reply.strip() == PROBE_REPLY, reply, latency, (data.get("usage") or {}).get("completion_tokens"))
