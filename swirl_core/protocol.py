"""The SWiRL step protocol: versioned prompts, action tags, observation format and the parser.

One step = optional reasoning, then exactly one action tag. Tool results come back in the next
user turn as `INPUT → RESULT` (arXiv 2504.04736, Appendix prompts; reworded here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from swirl_core.llm.chat_templates import ToolTemplate
from swirl_core.records import Action, ActionKind, StepProtocol, TaskKind

ARROW = "→"
TAGS: dict[ActionKind, str] = {"search": "search_query", "math": "math_exp", "answer": "answer"}
KIND_OF_TAG = {tag: kind for kind, tag in TAGS.items()}
TASK_ACTIONS: dict[TaskKind, tuple[ActionKind, ...]] = {
    "qa": ("search", "answer"),
    "math": ("math", "answer"),
}
DEFAULT_STEP_CAP: dict[TaskKind, int] = {"qa": 5, "math": 10}

# Bump a version whenever its text changes: every stored row records the version that made it.
POLICY_PROMPT_VERSION: dict[TaskKind, str] = {"qa": "policy-qa-v1", "math": "policy-math-v1"}
# No-tool mode (the paper's Figure 6): the same task answered in one message, without tools.
NO_TOOL_PROMPT_VERSION: dict[TaskKind, str] = {"qa": "policy-qa-notool-v1", "math": "policy-math-notool-v1"}
FEW_SHOT_SUFFIX = "+fewshot-v2"

_QA_INSTRUCTIONS = """\
Answer the question below in just a few words. A search engine is available and may help: \
to use it, write <search_query> QUERY </search_query>. Some questions need several searches \
in a row to find every fact the answer depends on. You may send at most {max_steps} queries, \
one after another; never repeat a query you already sent. Each result comes back to you as \
QUERY {arrow} RESULT. As soon as you have enough information, give the final answer as \
<answer>ANSWER</answer>. In each message you may think briefly first, but then you must \
EITHER search OR answer, never both in the same message."""

_MATH_INSTRUCTIONS = """\
Solve the math problem below. A calculator is available: to use it, write \
<math_exp> MATH EXP </math_exp> with a plain arithmetic expression (numbers, + - * / ^, \
parentheses, sqrt). Each result comes back to you as EXP {arrow} RESULT. You may use the \
calculator at most {max_steps} times, one expression per message; never repeat an expression \
you already sent. When you know the result, give the final answer as a number in \
<answer>ANSWER</answer>. In each message you may think briefly first, but then you must \
EITHER calculate OR answer, never both in the same message."""

_NO_TOOL_INSTRUCTIONS: dict[TaskKind, str] = {
    "qa": """\
Answer the question below in just a few words. No search engine is available: answer from what \
you know. You may think briefly first, then give the final answer as <answer>ANSWER</answer>.""",
    "math": """\
Solve the math problem below. No calculator is available: work the arithmetic out yourself. You \
may think briefly first, then give the final answer as a number in <answer>ANSWER</answer>.""",
}

# Demonstrations given as earlier chat turns: small local models follow the protocol only
# when they have seen it done (measured: 0/8 tagged steps zero-shot, 3/8 with chat-turn demos).
_DEMOS: dict[TaskKind, list[tuple[str, list[tuple[str, str | None]]]]] = {
    "math": [
        (
            "A baker makes 24 muffins and sells them in boxes of 4 for $3 per box. "
            "How much money does she make?",
            [
                ("First find the number of boxes. <math_exp>24 / 4</math_exp>", "24 / 4 → 6"),
                ("Each box sells for $3. <math_exp>6 * 3</math_exp>", "6 * 3 → 18"),
                ("<answer>18</answer>", None),
            ],
        ),
        (
            "A shop sells pens in packs of 5. How many pens are in 7 packs?",
            [
                ("Multiply the packs by the pens in each. <math_exp>7 * 5</math_exp>", "7 * 5 → 35"),
                ("<answer>35</answer>", None),
            ],
        ),
    ],
    "qa": [
        (
            "Which country is the birthplace of the composer of the opera Rusalka?",
            [
                (
                    "I need the composer of Rusalka first. <search_query>Rusalka opera composer"
                    "</search_query>",
                    "Rusalka opera composer → Rusalka: Rusalka is an opera by Antonín Dvořák, "
                    "first performed in Prague in 1901.",
                ),
                (
                    "Now find where Dvořák was born. <search_query>Antonín Dvořák birthplace"
                    "</search_query>",
                    "Antonín Dvořák birthplace → Antonín Dvořák: Antonín Dvořák was a Czech "
                    "composer, born in Nelahozeves, Bohemia (now the Czech Republic).",
                ),
                ("<answer>Czech Republic</answer>", None),
            ],
        )
    ],
}

_NO_TOOL_DEMOS: dict[TaskKind, list[tuple[str, list[tuple[str, str | None]]]]] = {
    "math": [(_DEMOS["math"][0][0], [("24 / 4 = 6 boxes, and 6 * 3 = 18 dollars. <answer>18</answer>", None)])],
    "qa": [(_DEMOS["qa"][0][0], [("Rusalka is by Antonín Dvořák, who was born in Bohemia. <answer>Czech Republic</answer>", None)])],
}


def actions(task: TaskKind, tools: bool = True) -> tuple[ActionKind, ...]:
    """The actions a policy may take: its task's tool and the answer, or only the answer."""
    return TASK_ACTIONS[task] if tools else ("answer",)


def prompt_version(task: TaskKind, few_shot: bool, tools: bool = True, protocol: StepProtocol = StepProtocol.TAGS,
                   tool_template: ToolTemplate | None = None) -> str:
    if protocol == StepProtocol.TOOLS:  # a prompt rendered by swirl's own tool template says so in every row
        shipped = f"+{ToolTemplate.SWIRL}" if tool_template == ToolTemplate.SWIRL else ""
        return POLICY_PROMPT_VERSION[task] + TOOLS_PROMPT_SUFFIX + shipped
    base = POLICY_PROMPT_VERSION if tools else NO_TOOL_PROMPT_VERSION
    return base[task] + (FEW_SHOT_SUFFIX if few_shot else "")


def instructions(task: TaskKind, max_steps: int, tools: bool = True) -> str:
    if not tools:
        return _NO_TOOL_INSTRUCTIONS[task]
    template = _QA_INSTRUCTIONS if task == "qa" else _MATH_INSTRUCTIONS
    return template.format(max_steps=max_steps, arrow=ARROW)


def policy_messages(task: TaskKind, question: str, max_steps: int, few_shot: bool = False,
                    tools: bool = True) -> list[dict[str, str]]:
    """The initial state s_0: the paper's single user turn, or system + demo turns + question."""
    text = instructions(task, max_steps, tools)
    if not few_shot:
        return [{"role": "user", "content": f"{text}\n\nQuestion: {question}"}]
    messages = [{"role": "system", "content": text}]
    for demo_question, turns in (_DEMOS if tools else _NO_TOOL_DEMOS)[task]:
        messages.append({"role": "user", "content": f"Question: {demo_question}"})
        for assistant, observation in turns:
            messages.append({"role": "assistant", "content": assistant})
            if observation is not None:
                messages.append({"role": "user", "content": observation})
    messages.append({"role": "user", "content": f"Question: {question}"})
    return messages


def observation_message(tool_input: str, result: str) -> str:
    return f"{tool_input} {ARROW} {result}"


def invalid_action_feedback(task: TaskKind, error: str, tools: bool = True) -> str:
    if not tools:
        return f"Format error: {error}. Reply with brief reasoning followed by <answer>ANSWER</answer>."
    tool = "<search_query> QUERY </search_query>" if task == "qa" else "<math_exp> MATH EXP </math_exp>"
    return (
        f"Format error: {error}. Reply with brief reasoning followed by exactly one action: "
        f"{tool} or <answer>ANSWER</answer>."
    )


# ASCII case folding only: under full Unicode folding `ſ` (long s) would match `s`, and a tag read as
# <ſearch_query> would name no action.
# A message must take exactly one action: the protocol says EITHER a tool call OR the answer.
TWO_ACTIONS = "more than one action in one message"
_OPEN_RE = re.compile(r"<\s*(search_query|math_exp|answer)\s*>", re.IGNORECASE | re.ASCII)
_CLOSE_RE = {tag: re.compile(rf"<\s*/\s*{tag}\s*>", re.IGNORECASE | re.ASCII) for tag in KIND_OF_TAG}  # once, not per step


@dataclass(frozen=True)
class Parsed:
    action: Action
    message: str  # the message as it should enter the conversation (cut after its one action)


def parse_action(text: str, task: TaskKind, tools: bool = True) -> Parsed:
    """Parse one model message into exactly one action; never raises.

    Tolerates text around the tag and a missing closing tag (the content runs to the next tag or
    the end); other text after the action is cut off and the action marked truncated. A message
    holding two actions is `invalid` and kept whole, so the judge sees that it did both. No tag,
    an empty tag, or a tool the task lacks is `invalid` too.
    """
    allowed = actions(task, tools)
    opening = _OPEN_RE.search(text)
    if opening is None:
        return Parsed(Action(kind="invalid", content=text.strip()[:500], error="no action tag"), text)
    tag = opening.group(1).lower()
    kind = KIND_OF_TAG[tag]
    reasoning = text[: opening.start()].strip()
    close = _CLOSE_RE[tag].search(text, opening.end())
    next_open = _OPEN_RE.search(text, opening.end())
    if close is not None and (next_open is None or close.start() < next_open.start()):
        content, end = text[opening.end() : close.start()], close.end()
    else:
        end = next_open.start() if next_open else len(text)
        content = text[opening.end() : end]
    content = content.strip()
    message = text[:end].rstrip() if close is not None else text[:end].rstrip() + f"</{tag}>"
    truncated = bool(text[end:].strip())
    if _OPEN_RE.search(text, end) is not None:
        return Parsed(Action(kind="invalid", reasoning=reasoning, content=content, error=TWO_ACTIONS), text)
    if kind not in allowed:
        error = f"<{tag}> is not available for this task"
        return Parsed(Action(kind="invalid", reasoning=reasoning, content=content, error=error), message)
    if not content:
        return Parsed(Action(kind="invalid", reasoning=reasoning, error=f"empty <{tag}> tag"), message)
    return Parsed(Action(kind=kind, reasoning=reasoning, content=content, truncated=truncated), message)



def action_tags(task: TaskKind, tools: bool = True) -> tuple[str, ...]:
    """The tags a step of this task may use (the action grammar's alphabet)."""
    return tuple(TAGS[k] for k in actions(task, tools))


# --------------------------------------------------------------------------------------------------
# The tools protocol: the same actions as native function calls
# --------------------------------------------------------------------------------------------------

TOOLS_PROMPT_SUFFIX = "+tools-v1"
# Function name -> (action, argument name, description). The answer is a tool too, so every step is one call.
FUNCTIONS: dict[str, tuple[ActionKind, str, str]] = {
    "search": ("search", "query", "Search the corpus; returns the best-matching paragraph."),
    "calculator": ("math", "expression", "Evaluate a plain arithmetic expression (numbers, + - * / ^, parentheses, sqrt)."),
    "answer": ("answer", "answer", "Give the final answer; ends the conversation."),
}
_FUNCTION_OF = {kind: name for name, (kind, _, _) in FUNCTIONS.items()}

_TOOLS_INSTRUCTIONS: dict[TaskKind, str] = {
    "qa": """\
Answer the question below in just a few words. Call the `search` tool to look facts up; some questions need \
several searches in a row. You may search at most {max_steps} times; never repeat a query. When you know \
enough, call the `answer` tool with the final answer. Make exactly one tool call per message.""",
    "math": """\
Solve the math problem below. Call the `calculator` tool for arithmetic, at most {max_steps} times; never \
repeat an expression. When you know the result, call the `answer` tool with the final answer as a number. \
Make exactly one tool call per message.""",
}


def tool_definitions(task: TaskKind) -> list[dict]:
    """The task's actions as OpenAI-style JSON-schema function definitions."""
    defs = []
    for kind in TASK_ACTIONS[task]:
        name = _FUNCTION_OF[kind]
        _, arg, description = FUNCTIONS[name]
        defs.append({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]},
        }})
    return defs


def tools_policy_messages(task: TaskKind, question: str, max_steps: int) -> list[dict[str, str]]:
    text = _TOOLS_INSTRUCTIONS[task].format(max_steps=max_steps)
    return [{"role": "user", "content": f"{text}\n\nQuestion: {question}"}]


def tools_feedback(task: TaskKind, error: str) -> str:
    names = " or ".join(f"`{_FUNCTION_OF[k]}`" for k in TASK_ACTIONS[task])
    return f"Format error: {error}. Reply with exactly one tool call: {names}."


def parse_tool_calls(text: str, tool_calls: list[dict] | None, task: TaskKind) -> Action:
    """One reply's `tool_calls` as exactly one action; never raises. No call, several calls, an unknown or
    unavailable function, arguments that are not a JSON object or lack the argument: `invalid`."""
    reasoning = text.strip()
    if not tool_calls:
        return Action(kind="invalid", content=reasoning[:500], error="no tool call")
    if len(tool_calls) > 1:
        return Action(kind="invalid", reasoning=reasoning, error=TWO_ACTIONS, call_id=_call_id(tool_calls[0]))
    call = tool_calls[0]
    function = call.get("function") if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    name, raw, call_id = str(function.get("name") or ""), function.get("arguments"), _call_id(call)
    spec = FUNCTIONS.get(name)
    if spec is None or spec[0] not in TASK_ACTIONS[task]:
        return Action(kind="invalid", reasoning=reasoning, content=str(raw or "")[:500], call_id=call_id,
                      error=f"unknown tool {name!r}")
    kind, arg, _ = spec
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return Action(kind="invalid", reasoning=reasoning, content=str(raw)[:500], call_id=call_id,
                      error=f"arguments of {name} are not a JSON object")
    content = args.get(arg)
    if not isinstance(content, str | int | float) or not str(content).strip():
        return Action(kind="invalid", reasoning=reasoning, content=str(raw)[:500], call_id=call_id,
                      error=f"{name} needs a non-empty {arg!r}")
    return Action(kind=kind, reasoning=reasoning, content=str(content).strip(), call_id=call_id)


def render_tool_calls(text: str, tool_calls: list[dict] | None) -> str:
    """A tools-protocol message as one readable text (for the judge, the views and the tag-style exports): its
    content, then each call as `name(arguments)`; the calls as sent are kept beside it."""
    calls = []
    for call in tool_calls or []:
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        calls.append(f"{function.get('name')}({function.get('arguments') or ''})")
    return "\n".join(p for p in [text.strip(), *calls] if p)


def _call_id(call: object) -> str | None:
    return str(call["id"]) if isinstance(call, dict) and call.get("id") else None
