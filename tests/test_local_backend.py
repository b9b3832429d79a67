"""In-process generation: batching across concurrent requests and the action grammar."""

from __future__ import annotations

import asyncio
import json

import pytest

from swirl_core.agent import PolicySpec
from swirl_core.config import ModelConfig
from swirl_core.constraints import ActionGrammar
from swirl_core.llm.factory import build_client
from swirl_core.protocol import parse_action, policy_messages


@pytest.mark.parametrize("task", ["math", "qa"])
async def test_grammar_makes_a_random_model_emit_exactly_one_action(tiny_model_dir, tmp_path, task):
    cfg = ModelConfig(model=str(tiny_model_dir), max_tokens=24, local_batch_size=8)
    assert cfg.resolved_backend == "transformers" and cfg.resolved_constraint == "grammar"
    client = build_client(cfg, tmp_path)
    spec = PolicySpec(model=cfg.model, task=task, max_steps=5, few_shot=True, constraint="grammar", max_tokens=24, temperature=1.0)
    messages = policy_messages(task, "What is 6 times 7?", 5, few_shot=True)
    responses = await asyncio.gather(*(client.complete(spec.request(messages, i)) for i in range(8)))
    await client.aclose()
    # A random model follows the grammar: every message parses as one action of this task.
    kinds = [parse_action(r.text, task).action.kind for r in responses]
    assert "invalid" not in kinds, [r.text for r in responses]
    assert set(kinds) <= ({"math", "answer"} if task == "math" else {"search", "answer"})
    if task == "math":
        for r in responses:
            action = parse_action(r.text, task).action
            if action.kind == "math":
                assert set(action.content) <= set("0123456789.+-*/()^%, $")
    # Eight concurrent requests went through in one or two batches, not eight.
    assert len(client.backend.batches) <= 2 and sum(client.backend.batches) == 8
    assert all(r.cost_usd == 0.0 and r.completion_tokens for r in responses)


async def test_local_responses_are_journaled_and_replayed(tiny_model_dir, tmp_path):
    cfg = ModelConfig(model=str(tiny_model_dir), max_tokens=12)
    spec = PolicySpec(model=cfg.model, task="math", max_steps=5, constraint="grammar", max_tokens=12)
    request = spec.request(policy_messages("math", "1+1?", 5), 0)
    client = build_client(cfg, tmp_path)
    first = await client.complete(request)
    await client.aclose()
    replay = build_client(cfg, tmp_path)
    replay.journal = type(client.journal)(tmp_path)  # as a new process would see it
    again = await replay.complete(request)
    assert again.cached and again.text == first.text and replay.backend.batches == []


def test_shared_prefix_kv_cache_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    import swirl_core.llm.transformers_backend as tb
    from swirl_core.llm.base import ChatRequest, Grammar

    requests = [
        ChatRequest(model="m", messages=policy_messages("math", q, 10, few_shot=True), temperature=0, max_tokens=16,
                    constraint=Grammar(lark=ActionGrammar.for_task("math").lark(16), label="grammar"))
        for q in ("What is 2+2?", "A much longer question about apples and oranges: how many in total?", "7*6?")
    ]
    cached_backend = tb.TransformersBackend(tiny_model_dir)
    cached = [r.text for r in cached_backend._generate(requests)]
    assert len(cached_backend._prefix_caches) == 1  # the instructions + demo turns were prefilled once
    monkeypatch.setattr(tb, "MIN_SHARED_PREFIX", 10**9)
    plain = [r.text for r in tb.TransformersBackend(tiny_model_dir)._generate(requests)]
    assert cached == plain


async def test_choice_constraint_gives_exactly_one_of_the_choices(tiny_model_dir, tmp_path):
    from swirl_core.llm.base import ChatRequest, Choice

    client = build_client(ModelConfig(model=str(tiny_model_dir)), tmp_path)
    requests = [ChatRequest(model="m", messages=[{"role": "user", "content": f"Is step {i} good?"}], temperature=1.0,
                            max_tokens=8, constraint=Choice(options=("GOOD", "BAD")), sample_index=i, seed=i) for i in range(6)]
    texts = [r.text for r in await asyncio.gather(*(client.complete(r) for r in requests))]
    await client.aclose()
    assert set(texts) <= {"GOOD", "BAD"}, texts


async def test_choice_probabilities_are_reported_journaled_and_replayed(tiny_model_dir, tmp_path):
    from swirl_core.llm.base import ChatRequest, Choice

    cfg = ModelConfig(model=str(tiny_model_dir), temperature=0.0)
    requests = [ChatRequest(model="m", messages=[{"role": "user", "content": f"Is step {i} good?"}], temperature=0.0,
                            max_tokens=8, constraint=Choice(options=("GOOD", "BAD"))) for i in range(4)]
    client = build_client(cfg, tmp_path)
    fresh = await asyncio.gather(*(client.complete(r) for r in requests))
    await client.aclose()
    for r in fresh:
        assert set(r.choice_probs) == {"GOOD", "BAD"} and abs(sum(r.choice_probs.values()) - 1) < 1e-4
        assert 0 < r.choice_probs["GOOD"] < 1
    assert len({r.choice_probs["GOOD"] for r in fresh}) > 1  # the probabilities follow the prompt
    replay = build_client(cfg, tmp_path)
    again = await asyncio.gather(*(replay.complete(r) for r in requests))
    await replay.aclose()
    assert replay.stats["sent"] == 0 and [r.choice_probs for r in again] == [r.choice_probs for r in fresh]


async def test_any_grammar_it_is_given_is_forced_and_the_backend_knows_no_tags(tiny_model_dir, tmp_path):
    """The backend compiles what the request carries (llguidance): here a grammar that is no action at all."""
    import re

    from swirl_core.llm.base import ChatRequest, Grammar, LLMError, Served

    client = build_client(ModelConfig(model=str(tiny_model_dir)), tmp_path)
    grammar = Grammar(lark='start: "id-" /[0-9]{3}/ ("!" | "?")\n', label="ids")
    requests = [ChatRequest(model="m", messages=[{"role": "user", "content": f"Say something {i}"}], temperature=1.0,
                            max_tokens=12, constraint=grammar, sample_index=i, seed=i) for i in range(4)]
    texts = [r.text for r in await asyncio.gather(*(client.complete(r) for r in requests))]
    assert all(re.fullmatch(r"id-[0-9]{3}[!?]", t) for t in texts), texts
    # A constraint only a server can apply is refused, not silently dropped.
    with pytest.raises(LLMError, match="cannot apply a served constraint"):
        await client.complete(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], constraint=Served()))
    await client.aclose()


# -- the tools protocol in-process ------------------------------------------------------------------------
def _calls_grammar(*blocks: str) -> str:
    """A grammar whose only sentence is these `<tool_call>` blocks: the random model writes them, token by token."""
    return "start: " + " ".join(json.dumps(f"<tool_call>\n{b}\n</tool_call>") for b in blocks) + "\n"


def test_a_template_that_ignores_tools_gets_the_shipped_one_and_calls_round_trip(tiny_model_dir):
    from transformers import AutoTokenizer

    from swirl_core.llm.chat_templates import (
        ToolTemplate,
        parse_tool_call_blocks,
        shipped_template,
        template_messages,
        tool_template,
    )
    from swirl_core.protocol import tool_definitions

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tool_template(tok) == ToolTemplate.SWIRL  # SmolLM2's ChatML template renders no tools
    tok.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tool_template(tok) == ToolTemplate.SWIRL  # it shows the tools but not the calls a later step must see
    tok.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m | tojson }}{% endfor %}"
    assert tool_template(tok) == ToolTemplate.MODEL  # a template that renders both is the model's own to use
    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'}}
    messages = [{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    text = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        template_messages(messages), tools=tool_definitions("math"), chat_template=shipped_template(),
        add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(tool_definitions("math")[0]) in text
    # the JSON-string arguments are written once, as an object, and read back as the same call
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert turn == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>'
    assert parse_tool_call_blocks(turn, "c") == ("", [{**call, "id": "c_0"}])
    assert "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    assert messages[1]["tool_calls"][0] is call and messages[1]["content"] is None  # the agent's messages untouched


async def test_in_process_tool_calls_come_back_as_the_served_paths_calls_and_steps(tiny_model_dir, tmp_path):
    """Real generation on the tiny model, each reply forced by a grammar: the backend renders the tools, reads the
    `<tool_call>` blocks back as OpenAI-form calls, and the agent's one parser gives the served path's outcomes."""
    from swirl_core.llm.base import ChatRequest, Grammar
    from swirl_core.protocol import parse_tool_calls, tool_definitions, tools_policy_messages

    client = build_client(ModelConfig(model=str(tiny_model_dir)), tmp_path)
    replies = {
        "valid": _calls_grammar('{"name": "calculator", "arguments": {"expression": "6 * 7"}}'),
        "broken JSON": _calls_grammar('{"name": "calculator", "arguments": {"expression": "6 * 7"}'),
        "unknown tool": _calls_grammar('{"name": "search", "arguments": {"query": "x"}}'),
        "two calls": _calls_grammar('{"name": "calculator", "arguments": {"expression": "1"}}',
                                    '{"name": "answer", "arguments": {"answer": "42"}}'),
    }
    messages = tools_policy_messages("math", "What is 6 times 7?", 3)
    requests = {name: ChatRequest(model="m", messages=messages, tools=tool_definitions("math"), temperature=0,
                                  max_tokens=96, constraint=Grammar(lark=g, label=name)) for name, g in replies.items()}
    assert "<tools>" in client.backend._prompt(requests["valid"])  # the shipped template rendered the offer
    responses = dict(zip(requests, await asyncio.gather(*(client.complete(r) for r in requests.values()))))
    await client.aclose()
    actions = {name: parse_tool_calls(r.text, r.tool_calls, "math") for name, r in responses.items()}
    assert (actions["valid"].kind, actions["valid"].content) == ("math", "6 * 7")
    assert responses["valid"].finish_reason == "tool_calls" and responses["valid"].tool_calls[0]["id"].startswith("call_")
    assert actions["broken JSON"].error == "arguments of calculator are not a JSON object"
    assert actions["unknown tool"].error == "unknown tool 'search'"
    assert actions["two calls"].error == "more than one action in one message"
    # the calls are journaled and replayed with the reply
    replay = build_client(ModelConfig(model=str(tiny_model_dir)), tmp_path)
    again = await replay.complete(requests["two calls"])
    await replay.aclose()
    assert again.cached and again.tool_calls == responses["two calls"].tool_calls


@pytest.mark.slow
async def test_smollm2_runs_the_tools_protocol_in_process_and_every_step_is_an_honest_outcome(tmp_path):
    """The offline SmolLM2 under `--protocol tools`: no tag grammar, no tag demonstrations, the shipped template
    named in every row; whatever the model writes is a step with a valid call or a recorded reason."""
    from swirl_core.agent import Agent
    from swirl_core.config import GenerateConfig
    from swirl_core.generation import plan_generation
    from swirl_core.llm.chat_templates import ToolTemplate
    from swirl_core.records import StepProtocol
    from swirl_core.tools.calculator import Calculator

    plan = plan_generation(GenerateConfig(dataset="demo-math", limit=1, samples=1, max_steps=1, protocol="tools",
                                          db=str(tmp_path / "x.duckdb")))
    policy = plan.policy
    assert (policy.tool_template, policy.constraint, policy.few_shot) == (ToolTemplate.SWIRL, None, False)
    assert policy.prompt_version == "policy-math-v1+tools-v1+swirl-hermes-tools-v1"
    client = build_client(ModelConfig(model="smollm2"), tmp_path)
    trajectories = await Agent(client, policy, {"math": Calculator()}).run_many([(plan.questions[0], 0)])
    await client.aclose()
    reasons = {"no tool call", "more than one action in one message"}
    for t in trajectories:
        assert t.protocol == StepProtocol.TOOLS and t.status in ("answered", "step_cap") and t.steps
        for s in t.steps:
            assert s.prompt_version == policy.prompt_version
            assert s.action.kind in ("math", "answer") or s.action.error in reasons or s.action.error.startswith(
                ("unknown tool", "arguments of", "calculator needs", "answer needs")), s.action
            assert (s.tool_calls is None) == (s.action.error == "no tool call")
