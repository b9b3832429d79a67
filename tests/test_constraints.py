"""Served decoding constraints: compiled per server kind, verified by a probe before a run pays for anything."""

from __future__ import annotations

import asyncio
import json
import re

import duckdb
import pytest
from conftest import FIXTURES
from scripted_server import ScriptedServer

from swirl_core.agent import Agent
from swirl_core.config import ModelConfig
from swirl_core.constraints import PROBE_REPLY, ActionGrammar
from swirl_core.generation import policy_spec, verify_constraint
from swirl_core.llm.factory import build_client
from swirl_core.records import Question
from swirl_core.tools.calculator import Calculator

# Where each server kind takes the constraint, as the scripted server reads it back.
FIELD = {
    "vllm": lambda body: (body.get("structured_outputs") or {}).get("regex"),
    "sglang": lambda body: body.get("regex"),
    "llamacpp": lambda body: body.get("grammar"),
    "tgi": lambda body: (body.get("response_format") or {}).get("value") if (body.get("response_format") or {}).get("type") == "regex" else None,
}


def enforcing(kind: str):
    """A server of `kind` that honours its own constraint field (and only that): the probe's forced reply,
    else a two-step calculator trajectory; unconstrained it chats."""
    def respond(body: dict) -> str:
        constraint = FIELD[kind](body)
        if constraint is None:
            return "hello"
        if constraint in (re.escape(PROBE_REPLY), f'root ::= "{PROBE_REPLY}"'):
            return PROBE_REPLY
        first = not any(m["role"] == "assistant" for m in body["messages"])
        return "Add them. <math_exp>2+3</math_exp>" if first else "<answer>5</answer>"
    return respond


def _served(srv: ScriptedServer, **kw) -> ModelConfig:
    return ModelConfig(model="hosted_vllm/scripted", api_base=srv.base_url, temperature=0.0, constraint="regex", **kw)


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llamacpp", "tgi"])
def test_each_server_kind_gets_the_action_grammar_in_its_own_field(tmp_path, kind):
    grammar = ActionGrammar.for_task("math")
    with ScriptedServer(responder=enforcing(kind)) as srv:
        cfg, probe = verify_constraint(_served(srv, server_kind=kind))
        assert probe.enforced and probe.kind == kind and cfg.server_kind == kind and probe.reply == PROBE_REPLY
        spec = policy_spec(cfg, "math", 3, "tools")
        q = Question(question_id="q", dataset="demo-math", split="train", source_id="1", task="math",
                     question="What is 2 + 3?", answer="5")

        async def run():
            client = build_client(cfg, tmp_path)
            try:
                return await Agent(client, spec, {"math": Calculator()}).run(q, 0)
            finally:
                await client.aclose()

        traj = asyncio.run(run())
        bodies = srv.requests[1:]  # after the probe
    assert traj.status == "answered" and [s.constraint for s in traj.steps] == ["regex", "regex"]
    compiled = {"vllm": grammar.regex(), "sglang": grammar.regex(), "tgi": grammar.regex(), "llamacpp": grammar.gbnf()}[kind]
    assert all(FIELD[kind](b) == compiled for b in bodies) and len(bodies) == 2
    others = {"structured_outputs", "regex", "grammar", "response_format", "guided_regex"} - {
        {"vllm": "structured_outputs", "sglang": "regex", "llamacpp": "grammar", "tgi": "response_format"}[kind]}
    assert not any(f in b for b in bodies for f in others)  # one field, the kind's own
    # The replies the server gave under the constraint are ones the grammar allows.
    assert all(re.fullmatch(grammar.regex(), s.message) for s in traj.steps)
    # Content never starts blank: the parser finds blank content invalid.
    assert grammar.gbnf() == ('root ::= [^<]{0,400} ("<math_exp>" [$%()*+,./0123456789^-][ $%()*+,./0123456789^-]{0,299} '
                              '"</math_exp>" | "<answer>" [$,./0123456789-][ $,./0123456789-]{0,299} "</answer>")')
    assert not re.fullmatch(grammar.regex(), "<answer> </answer>") and re.fullmatch(grammar.regex(), "<answer>5 </answer>")


def test_auto_detects_the_server_kind_and_refuses_a_server_that_ignores_the_constraint():
    with ScriptedServer(responder=enforcing("sglang"), owned_by="sglang") as srv:
        cfg, probe = verify_constraint(_served(srv))
        assert (cfg.server_kind, probe.enforced) == ("sglang", True) and len(srv.requests) == 1
    # A vLLM that ignores structured_outputs (e.g. an old one that only knew guided_regex): refused.
    with ScriptedServer(default="hello", owned_by="vllm") as srv:
        with pytest.raises(ValueError, match=re.escape(srv.base_url) + r" \(vllm\) does not enforce .*--constraint regex"):
            verify_constraint(_served(srv))
        assert srv.requests[0]["structured_outputs"] == {"regex": re.escape(PROBE_REPLY)}


def test_cli_refuses_an_ignoring_server_or_records_null_with_the_opt_in(prefect_api, tmp_path, capsys):
    from flows.cli import main

    db = tmp_path / "c.duckdb"
    with ScriptedServer(responder=lambda body: "<answer>5</answer>") as srv:  # a plain OpenAI-like server
        argv = ["generate", "--db", str(db), "--dataset", "gsm8k", "--data-files", str(FIXTURES / "gsm8k_test20.jsonl"),
                "--limit", "2", "--samples", "1", "--policy", "hosted_vllm/scripted", "--policy-api-base", srv.base_url,
                "--constraint", "regex", "--workers", "1", "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and srv.base_url in err and "--allow-unconstrained" in err
        assert not db.exists() and srv.stats()["completed"] == 1  # the probe only: nothing else was paid for
        assert main([*argv, "--allow-unconstrained"]) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        constraints = con.execute('SELECT DISTINCT "constraint" FROM steps').fetchall()
        (config,) = con.execute("SELECT config FROM runs WHERE kind = 'generate'").fetchone()
    finally:
        con.close()
    assert constraints == [(None,)]
    probe = json.loads(config)["resolved_policy"]["constraint_probe"]
    assert probe["enforced"] is False and probe["kind"] == "openai" and probe["endpoint"] == srv.base_url


@pytest.mark.parametrize("task", ["math", "qa"])
def test_the_one_action_grammar_compiles_alike_for_every_place_it_runs(task):
    """The served regex, the GBNF and the in-process Lark are one language: each compiles (llguidance reads
    all three dialects) and they agree on what a step may be."""
    import llguidance

    grammar = ActionGrammar.for_task(task)
    for fmt, text in (("regex", grammar.regex()), ("gbnf", grammar.gbnf()), ("lark", grammar.lark(64))):
        assert llguidance.LLMatcher.validate_grammar_with_warnings(llguidance.grammar_from(fmt, text)) == (False, []), fmt
    tool = "<math_exp>(2+3)*4/2^2 - 1</math_exp>" if task == "math" else "<search_query>capital of France</search_query>"
    good = [tool, "Some reasoning first. " + tool, "<answer>42</answer>"]
    bad = ["no tag at all", tool + tool, "<answer></answer>", "<<answer>4</answer>",
           "<math_exp>two</math_exp>" if task == "math" else "<search_query>a\nb</search_query>"]
    assert all(re.fullmatch(grammar.regex(), s) for s in good)
    assert not any(re.fullmatch(grammar.regex(), s) for s in bad)


# Where each server kind takes a served judge's verdict choice (vLLM its choice list; the others a regex or GBNF).
CHOICE_FIELD = {
    "vllm": lambda body: (body.get("structured_outputs") or {}).get("choice"),
    "sglang": lambda body: body.get("regex"),
    "llamacpp": lambda body: body.get("grammar"),
    "tgi": lambda body: (body.get("response_format") or {}).get("value"),
}
CHOICE_SENT = {"vllm": ["GOOD", "BAD"], "sglang": "(GOOD|BAD)", "llamacpp": 'root ::= "GOOD" | "BAD"', "tgi": "(GOOD|BAD)"}
PROBE_CHOICE = {"vllm": [PROBE_REPLY], "sglang": f"({re.escape(PROBE_REPLY)})", "llamacpp": f'root ::= "{PROBE_REPLY}"',
                "tgi": f"({re.escape(PROBE_REPLY)})"}


def choosing(kind: str):
    """A judge server of `kind` that honours its own choice field: the probe's reply, else the verdict alone;
    unconstrained it reasons at length."""
    def respond(body: dict) -> str:
        field = CHOICE_FIELD[kind](body)
        if field == PROBE_CHOICE[kind]:
            return PROBE_REPLY
        return "BAD" if field == CHOICE_SENT[kind] else "Let me think about this step at length. GOOD"
    return respond


def _judge_items(n: int):
    from swirl_core.judging import StepToJudge

    return [StepToJudge(trajectory_id=f"t{i}", step_index=0, task="math", question=f"What is {i} + 1?", turns=[],
                        action_message=f"<answer>{i + 1}</answer>") for i in range(n)]


def _judge(cfg: ModelConfig, spec, tmp_path, items):
    from swirl_core.judging import StepJudge

    async def run():
        client = build_client(cfg, tmp_path)
        try:
            return await StepJudge(client, spec).judge_many(items)
        finally:
            await client.aclose()
    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llamacpp", "tgi"])
def test_a_served_judge_asked_for_a_constraint_gets_its_verdict_forced_in_its_server_kinds_field(tmp_path, kind):
    from swirl_core.judging import JudgeSpec, verify_judge

    with ScriptedServer(responder=choosing(kind), owned_by=kind) as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, temperature=0.0, constraint="regex",
                          server_kind=kind)
        spec, probe = verify_judge(cfg, JudgeSpec.for_model(cfg))
        assert probe["enforced"] and probe["kind"] == kind and probe["choice"] and len(srv.requests) == 1
        assert CHOICE_FIELD[kind](srv.requests[0]) == PROBE_CHOICE[kind] and srv.requests[0]["logprobs"] is True
        judgments = _judge(cfg, spec, tmp_path, _judge_items(2))
        bodies = srv.requests[1:]
    assert [CHOICE_FIELD[kind](b) for b in bodies] == [CHOICE_SENT[kind]] * 2
    assert [j.verdict for j in judgments] == ["BAD", "BAD"] and all(j.reasoning == "BAD" for j in judgments)
    # Unconstrained (no `constraint: regex`): no probe, no choice field, the judge's free text.
    with ScriptedServer(responder=choosing(kind), owned_by=kind) as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, temperature=0.0)
        spec, probe = verify_judge(cfg, JudgeSpec.for_model(cfg))
        assert probe is None and spec.constraint is None
        assert [j.verdict for j in _judge(cfg, spec, tmp_path / "free", _judge_items(1))] == ["GOOD"]
        assert CHOICE_FIELD[kind](srv.requests[0]) is None


def test_a_judge_server_that_ignores_the_choice_field_is_refused_or_with_the_opt_in_goes_unconstrained(tmp_path):
    from swirl_core.judging import JudgeSpec, verify_judge

    with ScriptedServer(default="GOOD", owned_by="vllm") as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, temperature=0.0, constraint="regex")
        with pytest.raises(ValueError, match=re.escape(srv.base_url) + r" \(vllm\) does not enforce .*allow_unconstrained"):
            verify_judge(cfg, JudgeSpec.for_model(cfg))
        spec, probe = verify_judge(cfg.model_copy(update={"allow_unconstrained": True}), JudgeSpec.for_model(cfg))
        assert probe["enforced"] is False and spec.constraint is None and spec.server_kind is None
        assert srv.stats()["completed"] == 2  # the two probes: nothing else was paid for


def test_a_server_that_refuses_logprobs_is_asked_again_without_them_once_for_the_run(tmp_path, caplog):
    from swirl_core.judging import JudgeSpec, verify_judge

    with ScriptedServer(default="The step is right. GOOD", rejects=("logprobs",)) as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, temperature=0.0)
        spec = JudgeSpec.for_model(cfg)
        assert spec.served_probabilities
        with caplog.at_level("WARNING"):
            judgments = _judge(cfg, spec, tmp_path, _judge_items(3))
        statuses = [a["status"] for a in srv.attempt_log()]
        bodies = srv.requests
    # Only requests sent before the refusal was known carry logprobs (and got 400); each was asked again once.
    refused = [b for b in bodies if "logprobs" in b]
    assert statuses.count(400) == len(refused) >= 1 and statuses.count(200) == 3
    assert [j.verdict for j in judgments] == ["GOOD"] * 3 and all(j.p_good is None for j in judgments)
    assert sum("refused" not in r.message and "logprobs" in r.message for r in caplog.records) == 1
    # The probe learns it before a constrained judge pays: the spec then reads no P(GOOD), and says so.
    with ScriptedServer(responder=choosing("vllm"), owned_by="vllm", rejects=("logprobs",)) as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, temperature=0.0, constraint="regex")
        spec, probe = verify_judge(cfg, JudgeSpec.for_model(cfg))
        assert probe["logprobs"] is False and probe["enforced"] and not spec.served_probabilities
        assert [a["status"] for a in srv.attempt_log()] == [400, 200]
