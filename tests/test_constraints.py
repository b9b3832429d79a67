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
    assert grammar.gbnf() == ('root ::= [^<]{0,400} ("<math_exp>" [^<]{1,300} "</math_exp>" | '
                              '"<answer>" [^<]{1,300} "</answer>")')


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
