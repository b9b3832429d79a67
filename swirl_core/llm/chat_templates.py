"""Native tool calling for in-process models: which chat template renders the tools, and the calls read back.

A model whose own chat template renders `tools` uses it. One whose template ignores them (SmolLM2's) gets the
template shipped here (`tool_calling.jinja`, Hermes / Qwen2.5 style), and whoever records the run says so:
the model's own template never gets the credit. The completion's `<tool_call>` blocks become the OpenAI-form
`tool_calls` a served model's parser would return, so the agent judges them with the same rules
(`protocol.parse_tool_calls`) whichever path made them.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATE_FILE = Path(__file__).with_name("tool_calling.jinja")
# vLLM's hermes parser reads the same blocks; an unclosed last block runs to the end of the reply.
_BLOCK_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"]*)"')


class ToolTemplate(StrEnum):
    """Which chat template rendered a request's tools (recorded with the run)."""

    MODEL = "model"  # the model's own chat template
    SWIRL = "swirl-hermes-tools-v1"  # `tool_calling.jinja`; bump the version when its text changes


@cache
def shipped_template() -> str:
    return TEMPLATE_FILE.read_text(encoding="utf-8")


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows the model the tools it is offered and the calls it made (a
    multi-step conversation needs both)."""
    from jinja2 import TemplateError

    call = {"type": "function", "function": {"name": "swirl_probe_call", "arguments": {"swirl_probe": "swirl_probe_value"}}}
    tool = {"type": "function", "function": {"name": "swirl_probe_tool", "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False)
    except (TemplateError, ValueError):  # a template that refuses tool calls, or a tokenizer without a template
        return False
    return "swirl_probe_tool" in text and "swirl_probe_value" in text


def tool_template(tokenizer: Any) -> ToolTemplate:
    """The model's own template when it renders the tools and the calls, else the shipped one."""
    return ToolTemplate.MODEL if renders_tools(tokenizer) else ToolTemplate.SWIRL


@cache
def checkpoint_tool_template(path: Path) -> ToolTemplate:
    """`tool_template` of a checkpoint folder's tokenizer (for whoever plans a run without loading the model)."""
    from transformers import AutoTokenizer

    return tool_template(AutoTokenizer.from_pretrained(path))


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: a call's arguments as an object (they arrive as OpenAI's JSON
    string, which templates would encode a second time; arguments that are no JSON object stay the text they
    were) and no `None` content."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [_object_arguments(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        args = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": args}} if isinstance(args, dict) else call


def parse_tool_call_blocks(text: str, id_prefix: str) -> tuple[str, list[dict[str, Any]] | None]:
    """A completion's text before its first `<tool_call>` block, and each block as an OpenAI-form call with a
    JSON-string `arguments`. A block that is not a JSON object is kept as a call of the name it gives (if any)
    with the raw block as arguments, so the step records a malformed call instead of losing it."""
    blocks = [m.group(1).strip() for m in _BLOCK_RE.finditer(text)]
    if not blocks:
        return text, None
    calls = []
    for i, block in enumerate(blocks):
        try:
            parsed = json.loads(block)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            name, args = parsed["name"], parsed.get("arguments")
            arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        else:
            found = _NAME_RE.search(block)
            name, arguments = (found.group(1) if found else ""), block
        calls.append({"id": f"{id_prefix}_{i}", "type": "function", "function": {"name": name, "arguments": arguments}})
    return text[: text.index("<tool_call>")].strip(), calls
