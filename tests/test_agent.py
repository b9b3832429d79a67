"""The agent loop over real HTTP with real tools."""

from __future__ import annotations

import pytest
from conftest import FIXTURES
from helpers import math_policy
from scripted_server import Faults, ScriptedServer

from swirl_core.agent import Agent, PolicySpec
from swirl_core.config import ModelConfig
from swirl_core.llm.factory import build_client
from swirl_core.records import Question
from swirl_core.tools.calculator import Calculator
from swirl_core.tools.search import SearchTool


def _question(text: str, task: str = "math", answer: str = "42") -> Question:
    return Question(question_id=Question.make_id("t", "test", text, text), dataset="t", split="test",
                    source_id=text, task=task, question=text, answer=answer)


def _agent(srv, tmp_path, task="math", max_steps=10, tools=None, **cfg):
    client = build_client(ModelConfig(model="openai/policy", api_base=srv.base_url, **cfg), tmp_path)
    spec = PolicySpec(model="openai/policy", task=task, max_steps=max_steps)
    return Agent(client, spec, tools if tools is not None else {"math": Calculator()})


async def test_math_trajectory_runs_tools_and_stops_at_answer(tmp_path):
    with ScriptedServer(responder=math_policy) as srv:
        agent = _agent(srv, tmp_path)
        traj = await agent.run(_question("Add 3 and 4, then double."), sample_index=0)
        await agent.client.aclose()
    assert traj.status == "answered" and traj.final_answer == "42"
    assert [s.action.kind for s in traj.steps] == ["math", "math", "answer"]
    assert traj.steps[0].observation == "3 + 4 → 7"
    assert traj.steps[1].observation == "(3 + 4) * 2 → 14"
    assert traj.steps[0].action.reasoning == "First add."
    assert all(s.call_key and s.prompt_version == "policy-math-v1" and s.model == "openai/policy" for s in traj.steps)
    # The policy saw each observation as the next user turn.
    assert srv.requests[-1]["messages"][-1] == {"role": "user", "content": "(3 + 4) * 2 → 14"}


async def test_step_cap_invalid_steps_and_tool_errors(tmp_path):
    replies = iter(["no tag here", "<math_exp>1/0</math_exp>", "<math_exp>2+2</math_exp>", "<math_exp>3+3</math_exp>"])
    with ScriptedServer(responder=lambda body: next(replies)) as srv:
        agent = _agent(srv, tmp_path, max_steps=3)
        traj = await agent.run(_question("q"), sample_index=0)
        await agent.client.aclose()
    assert traj.status == "step_cap" and traj.final_answer is None
    kinds = [s.action.kind for s in traj.steps]
    assert kinds == ["invalid", "math", "math", "math"]
    assert traj.steps[0].action.error == "no action tag" and "Format error" in traj.steps[0].observation
    assert traj.steps[1].tool_error and "division by zero" in traj.steps[1].observation
    assert traj.steps[2].observation == "2+2 → 4" and not traj.steps[2].tool_error
    # the turn after the cap takes only an answer: a fourth calculation is recorded but never run
    assert traj.steps[3].observation is None and len(srv.requests) == 4


async def test_an_answer_after_all_allowed_tool_calls_is_accepted(tmp_path):
    # The prompt promises N calculator uses before answering: N calls, then the answer still counts.
    replies = iter(["<math_exp>2+2</math_exp>", "<math_exp>4*3</math_exp>", "<answer>12</answer>"])
    with ScriptedServer(responder=lambda body: next(replies)) as srv:
        agent = _agent(srv, tmp_path, max_steps=2)
        assert "at most 2 times" in agent.initial_messages(_question("q"))[0]["content"]
        traj = await agent.run(_question("q"), sample_index=0)
        await agent.client.aclose()
    assert traj.status == "answered" and traj.final_answer == "12"
    assert [s.action.kind for s in traj.steps] == ["math", "math", "answer"]


async def test_llm_failure_is_recorded_with_the_steps_so_far(tmp_path):
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return "<math_exp>1+1</math_exp>"

    with ScriptedServer(responder=flaky) as srv:
        agent = _agent(srv, tmp_path, max_retries=1)
        traj = await agent.run(_question("q"), sample_index=0)
        await agent.client.aclose()
    assert traj.status == "error" and "gave up" in traj.error and len(traj.steps) == 1


async def test_search_trajectory_over_the_fixture_corpus(tmp_path):
    tool = SearchTool.from_file(FIXTURES / "corpus_fixture.jsonl", cache_dir=tmp_path / "bm25")
    script = {"Jonny Craig": ["<search_query>Jonny Craig</search_query>", "<answer>Slaves</answer>"]}
    with ScriptedServer(scripts=script) as srv:
        agent = _agent(srv, tmp_path, task="qa", max_steps=5, tools={"search": tool})
        traj = await agent.run(_question("Which band did Jonny Craig sing in?", task="qa"), 0)
        await agent.client.aclose()
    assert traj.status == "answered"
    assert traj.steps[0].observation.startswith("Jonny Craig → Jonny Craig:")


async def test_k_samples_are_distinct_requests_and_ids(tmp_path):
    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.05)) as srv:
        agent = _agent(srv, tmp_path)
        q = _question("Add 5 and 6.")
        trajs = await agent.run_many([(q, i) for i in range(3)])
        await agent.client.aclose()
        assert len({t.trajectory_id for t in trajs}) == 3
        assert srv.stats()["completed"] == 9 and srv.completed_twice() == []


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize("backend", ["auto", "litellm"])  # the fast OpenAI path, and litellm (hosted APIs)
async def test_tools_protocol_sends_tools_runs_calls_and_records_malformed_ones(tmp_path, backend):
    from swirl_core.protocol import tool_definitions
    from swirl_core.records import StepProtocol

    replies = iter([
        {"content": "", "tool_calls": [_call("c1", "calculator", '{"expression": "3 + 4"')]},  # broken JSON
        {"content": "Let me look.", "tool_calls": [_call("c2", "search", '{"query": "x"}')]},  # not this task's tool
        {"content": "I think 7."},  # no call at all
        {"content": None, "tool_calls": [_call("c3", "calculator", '{"expression": "3 + 4"}'),
                                         _call("c4", "calculator", '{"expression": "1"}')]},  # two calls
        {"content": None, "tool_calls": [_call("c5", "calculator", '{"expression": "(3 + 4) * 6"}')]},
        {"content": "Done.", "tool_calls": [_call("c6", "answer", '{"answer": "42"}')]},
    ])
    with ScriptedServer(responder=lambda body: next(replies)) as srv:
        cfg = ModelConfig(model="openai/policy", api_base=srv.base_url, backend=backend)
        spec = PolicySpec(model="openai/policy", task="math", max_steps=10, protocol=StepProtocol.TOOLS)
        runs = []
        for _ in range(2):  # the second, a resumed run, replays every reply from the journal, its calls included
            client = build_client(cfg, tmp_path)
            assert client.backend.name == ("openai_compat" if backend == "auto" else "litellm")
            runs.append(await Agent(client, spec, {"math": Calculator()}).run(_question("Add 3 and 4, then times 6."), 0))
            await client.aclose()
        assert srv.stats()["completed"] == 6
    traj, replayed = runs
    assert all(s.cached for s in replayed.steps)
    assert [(s.action, s.tool_calls, s.observation) for s in replayed.steps] == [(s.action, s.tool_calls, s.observation) for s in traj.steps]
    assert traj.status == "answered" and traj.final_answer == "42" and traj.protocol == StepProtocol.TOOLS
    kinds = [(s.action.kind, s.action.error) for s in traj.steps]
    assert kinds == [
        ("invalid", "arguments of calculator are not a JSON object"), ("invalid", "unknown tool 'search'"),
        ("invalid", "no tool call"), ("invalid", "more than one action in one message"), ("math", None), ("answer", None),
    ]
    assert traj.steps[4].observation == "42" and traj.steps[4].action.call_id == "c5"
    assert traj.steps[1].message == 'Let me look.\nsearch({"query": "x"})'
    assert all(s.prompt_version == "policy-math-v1+tools-v1" for s in traj.steps)
    # every request offered the task's functions and no tag instructions
    assert all(r["tools"] == tool_definitions("math") for r in srv.requests)
    assert [t["function"]["name"] for t in srv.requests[0]["tools"]] == ["calculator", "answer"]
    last = srv.requests[-1]["messages"]
    # each call got its `tool` result by id; the reply with no call got a user turn
    assert last[-2]["tool_calls"][0]["id"] == "c5" and last[-1] == {"role": "tool", "tool_call_id": "c5", "content": "42"}
    assert [m["tool_call_id"] for m in last if m["role"] == "tool"] == ["c1", "c2", "c3", "c4", "c5"]
    assert last[6] == {"role": "user", "content": traj.steps[2].observation}
    assert "Format error: no tool call" in traj.steps[2].observation


def test_tools_protocol_refuses_a_constraint_it_cannot_apply():
    from swirl_core.records import StepProtocol

    with pytest.raises(ValueError, match="does not apply under --protocol tools"):
        PolicySpec(model="m", task="math", max_steps=3, constraint="grammar", protocol=StepProtocol.TOOLS)
