"""Curation end to end: decomposition, the process judge over HTTP on a LocalCluster, grades, views."""

from __future__ import annotations

import duckdb
import pytest
from conftest import FIXTURES
from helpers import math_policy
from scripted_server import ScriptedServer

from swirl_core.config import ClusterConfig, CurateConfig, GenerateConfig, ModelConfig


@pytest.fixture(scope="module")
def generated_db(prefect_api, tmp_path_factory):
    """6 GSM8K questions × 2 samples × 3 steps (calc, calc, answer 42) from the scripted policy."""
    from flows.generate import run_generate

    db = tmp_path_factory.mktemp("curate") / "swirl.duckdb"
    with ScriptedServer(responder=math_policy) as srv:
        result = run_generate(GenerateConfig(
            dataset="gsm8k", data_files=[str(FIXTURES / "gsm8k_test20.jsonl")], split="test", limit=6, samples=2,
            policy=ModelConfig(model="openai/policy", api_base=srv.base_url), db=str(db), progress=False,
            cluster=ClusterConfig(n_workers=1),
        ))
    assert result["trajectories"] == 12
    return db


def _judge(body: dict) -> str:
    """GOOD for calculator steps that add, BAD for the rest; unparseable once for the doubling step."""
    last = body["messages"][-1]["content"]
    if "Am I correct?" in last:
        return "42 differs from the answer key.\nNO"
    action = last.rsplit("Last message to evaluate:", 1)[-1]
    if "* 2" in action and body.get("seed", 0) < 1000:
        return "Hmm, hard to say."  # no verdict: the judge must be re-asked
    if "<math_exp>" in action and "+" in action:
        return "The expression adds the two numbers from the question. GOOD"
    if "* 2" in action:
        return "Doubling follows from the question. GOOD"
    return "The answer does not follow from the computations. BAD"


def _q(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_decomposition_has_one_sub_trajectory_per_action(generated_db):
    assert _q(generated_db, "SELECT count(*) FROM sub_trajectories") == _q(generated_db, "SELECT count(*) FROM steps")
    rows = _q(generated_db, """SELECT step_index, len(state), state[-1].role, action, is_last_step FROM sub_trajectories
                               WHERE trajectory_id = (SELECT min(trajectory_id) FROM trajectories) ORDER BY step_index""")
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [(0, 1, "user", False), (1, 3, "user", False), (2, 5, "user", True)]
    assert rows[2][3] == "<answer>42</answer>"
    # s_2 ends with the observation of action 1, which is what the policy saw.
    last_state = _q(generated_db, """SELECT state[-1].content, state[-2].content FROM sub_trajectories
                                     WHERE step_index = 2 ORDER BY trajectory_id LIMIT 1""")[0]
    assert " → " in last_state[0] and last_state[1].startswith("Then double it.")


@pytest.mark.slow
def test_curate_judges_grades_and_builds_the_four_sets(generated_db, prefect_api):
    from flows.curate import run_curate

    with ScriptedServer(responder=_judge) as srv:
        config = CurateConfig(db=str(generated_db), judge=ModelConfig(model="openai/judge", api_base=srv.base_url),
                              grader="llm", max_reasks=2, cluster=ClusterConfig(n_workers=2), shard_size=8,
                              progress=False, probe_limit=0)
        result = run_curate(config)
        assert result["status"] == "completed" and result["judged_steps"] == 36
        sent = srv.stats()["total"]
        # The scripted policy is deterministic, so both samples of a question are the same trajectory:
        # 18 distinct steps, the 6 distinct doubling steps re-asked once (unparseable first), 6 distinct
        # grades. Identical requests are paid once.
        assert sent == 18 + 6 + 6 and srv.completed_twice() == []
        assert result["calls"].paid == sent  # what the judge and grader shards reported while they ran
        again = run_curate(config)
        assert again["judged_steps"] == 0 and srv.stats()["total"] == sent  # nothing is paid twice

    verdicts = dict(_q(generated_db, "SELECT verdict, count(*) FROM judgments GROUP BY 1"))
    assert verdicts == {"GOOD": 24, "BAD": 12}
    assert _q(generated_db, "SELECT max(attempts) FROM judgments") == [(2,)]
    # Gold of the fixtures is never 42, so no trajectory is correct; grades carry their method.
    assert _q(generated_db, "SELECT method, count(*), count(*) FILTER (WHERE correct) FROM grades GROUP BY 1 ORDER BY 1") == [
        ("llm", 12, 0), ("numeric", 12, 0)]
    sizes = dict(_q(generated_db, "SELECT filter, trajectories FROM curation_retention"))
    assert sizes == {"none": 12, "process": 0, "outcome": 0, "process_outcome": 0}
    assert _q(generated_db, "SELECT * FROM good_rate_by_action") == [("answer", 12, 0.0), ("math", 24, 1.0)]


def test_curated_views_hold_what_their_definitions_say(tmp_path):
    """Hand-made labels: process ⊆ none, process_outcome = process ∩ outcome, sub-trajectories carry ids."""
    import pyarrow as pa
    from helpers import build_labeled_db

    from swirl_core.store import Store

    build_labeled_db(tmp_path / "v.duckdb")
    with Store(tmp_path / "v.duckdb") as store:
        ids = {name: {r[0] for r in store.query(f"SELECT DISTINCT trajectory_id FROM curated_{name}")}
               for name in ("none", "process", "outcome", "process_outcome")}
        assert ids == {"none": {"t0", "t1", "t2", "t3"}, "process": {"t0", "t1"}, "outcome": {"t0", "t2"},
                       "process_outcome": {"t0"}}
        assert store.query("SELECT count(*) FROM curated_process") == [(4,)]  # 2 trajectories × 2 sub-trajectories
        assert store.query("SELECT * FROM judge_agreement WHERE process_pass AND outcome_pass") == [("hotpotqa", True, True, 1)]
        # An LLM grade overrides the rule grade for the outcome.
        store.upsert("grades", pa.Table.from_pylist([{"trajectory_id": "t1", "method": "llm", "correct": True}]))
        assert {r[0] for r in store.query("SELECT DISTINCT trajectory_id FROM curated_process_outcome")} == {"t0", "t1"}


def test_self_consistency_with_k_judge_samples(tmp_path):
    import pyarrow as pa
    from helpers import build_labeled_db

    from swirl_core.store import Store

    build_labeled_db(tmp_path / "k.duckdb")
    with Store(tmp_path / "k.duckdb") as store:
        # Two more samples for t0's steps: step 0 stays unanimous GOOD, step 1 splits 2 GOOD / 1 BAD.
        store.upsert("judgments", pa.Table.from_pylist([
            {"judgment_id": f"x{i}", "trajectory_id": "t0", "step_index": s, "sample_index": i, "judge_model": "j",
             "judge_fingerprint": "f", "prompt_version": "v", "verdict": v}
            for i, (s, v) in enumerate([(0, "GOOD"), (0, "GOOD"), (1, "GOOD"), (1, "BAD")], start=1)]))
        assert store.query("SELECT * FROM judge_self_consistency") == [(2, 0.5, round((1 + 2 / 3) / 2, 4))]
        assert store.query("SELECT verdict FROM step_verdicts WHERE trajectory_id = 't0' ORDER BY step_index") == [
            ("GOOD",), ("GOOD",)]


@pytest.mark.slow
def test_curate_cli(tmp_path, prefect_api):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from helpers import build_labeled_db

    build_labeled_db(tmp_path / "c.duckdb")
    with ScriptedServer(default="Fine step. GOOD") as srv:
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "curate", "--db", str(tmp_path / "c.duckdb"), "--judge", "openai/judge",
             "--judge-api-base", srv.base_url, "--grader", "rule", "--workers", "1", "--no-progress"],
            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert srv.stats()["completed"] == 2  # 8 steps, but the 4 samples repeat the same 2 (state, action) pairs
    assert "curation_retention" in out.stdout and "process_outcome" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "flows.cli", "curate", "--db", str(tmp_path / "nope.duckdb")],
                             cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "swirl generate" in missing.stderr


def test_curated_sets_read_one_judge(tmp_path):
    """Two judges on one database: the sets read the latest (or the selected) judge, never a mix of votes."""
    import pyarrow as pa
    from helpers import build_labeled_db

    from swirl_core.store import Store

    build_labeled_db(tmp_path / "two.duckdb")
    with Store(tmp_path / "two.duckdb") as store:
        # judge "g" came later and says BAD to t0's answer: pooled with "f" that step would tie and be UNKNOWN
        store.con.execute("UPDATE judgments SET created_at = TIMESTAMPTZ '2026-01-01 00:00:00+00'")
        store.upsert("judgments", pa.Table.from_pylist([
            {"judgment_id": f"g{t}{i}", "trajectory_id": t, "step_index": i, "sample_index": 0, "judge_model": "j2",
             "judge_fingerprint": "g", "prompt_version": "v", "verdict": "BAD" if (t, i) == ("t0", 1) else "GOOD"}
            for t in ("t0", "t1", "t2", "t3") for i in (0, 1)]))
        process = lambda: {r[0] for r in store.query("SELECT DISTINCT trajectory_id FROM curated_process")}  # noqa: E731
        assert process() == {"t1", "t2", "t3"}  # g's verdicts alone
        assert store.query("SELECT DISTINCT judge_fingerprint FROM step_verdicts") == [("g",)]
        assert store.query("SELECT max(votes) FROM step_verdicts") == [(1,)]
        store.con.execute("INSERT INTO judge_selection VALUES ('r', 'f', 'c', current_timestamp)")  # --judge-id f
        assert process() == {"t0", "t1"}  # the earlier judge's set is still there
        assert store.query("SELECT count(DISTINCT judge_fingerprint) FROM step_verdicts_by_judge") == [(2,)]


def test_outcome_rules_and_the_invalid_step_rule(tmp_path):
    import pyarrow as pa
    from helpers import build_labeled_db

    from swirl_core.store import Store

    build_labeled_db(tmp_path / "o.duckdb")
    with Store(tmp_path / "o.duckdb") as store:
        outcome = lambda: {r[0] for r in store.query("SELECT DISTINCT trajectory_id FROM curated_outcome")}  # noqa: E731
        # An unparseable LLM grade (correct NULL) decides nothing: the rule grade stands; a parsed one decides.
        store.upsert("grades", pa.Table.from_pylist([{"trajectory_id": "t0", "method": "llm", "correct": None},
                                                     {"trajectory_id": "t2", "method": "llm", "correct": False}]))
        assert outcome() == {"t0"}
        assert store.query("SELECT method FROM trajectory_outcomes WHERE trajectory_id = 't0'") == [("exact_match",)]
        # A step the parser found invalid (e.g. two actions) fails the process filter whatever the judge said.
        store.con.execute("UPDATE steps SET action_kind = 'invalid' WHERE trajectory_id = 't1' AND step_index = 0")
        assert {r[0] for r in store.query("SELECT DISTINCT trajectory_id FROM curated_process")} == {"t0"}


def _probe_aware(judge, steps_for_probe):
    """The judge of a curation: `judge` for the trajectories' steps, the gold verdict for probe steps."""
    from swirl_core.judging import judge_messages

    labels = {judge_messages(s.task, s.question, s.turns, s.action_message)[0]["content"]: s.label for s in steps_for_probe}

    def respond(body):
        content = body["messages"][-1]["content"]
        return f"Checked against the gold steps.\n{labels[content]}" if content in labels else judge(body)

    return respond


def test_curate_measures_its_judge_and_refuses_a_bad_one(prefect_api, tmp_path):
    import random

    from flows.curate import run_curate
    from flows.generate import run_generate
    from flows.judge_eval import build_steps
    from swirl_core.config import JudgeEvalConfig

    db = tmp_path / "m.duckdb"
    with ScriptedServer(responder=math_policy) as srv:
        gen = run_generate(GenerateConfig(
            dataset="gsm8k", data_files=[str(FIXTURES / "gsm8k_test20.jsonl")], split="test", limit=3, samples=1,
            policy=ModelConfig(model="openai/policy", api_base=srv.base_url), db=str(db), progress=False,
            cluster=ClusterConfig(n_workers=1)))
    probe_steps = build_steps(JudgeEvalConfig(dataset="gsm8k", data_files=[str(FIXTURES / "gsm8k_test20.jsonl")],
                                              split="test", limit=4))
    common = dict(db=str(db), grader="rule", cluster=ClusterConfig(n_workers=1), progress=False, probe_limit=4)
    with ScriptedServer(responder=_probe_aware(_judge, probe_steps)) as srv:
        first = run_curate(CurateConfig(judge=ModelConfig(model="openai/judge", api_base=srv.base_url), **common))
    probe = first["probes"][0]
    assert probe["better_than_chance"] and probe["steps"] == len(probe_steps) and probe["summary"]["f1_bad"] == 1.0
    assert _q(db, "SELECT judge_fingerprint, probe_fingerprint FROM judges") == [(first["fingerprint"], probe["fingerprint"])]
    assert _q(db, "SELECT run_id, judge_fingerprint FROM judge_selection") == [(gen["run_id"], first["fingerprint"])]

    # A judge that answers at random is measured, found no better than chance, and refused before judging.
    coin = lambda body: random.Random(body["messages"][-1]["content"]).choice(["GOOD", "BAD"])  # noqa: E731
    with ScriptedServer(responder=coin) as srv, pytest.raises(ValueError, match="min-judge-f1"):
        run_curate(CurateConfig(judge=ModelConfig(model="openai/coin", api_base=srv.base_url), min_judge_f1=0.9, **common))
    assert _q(db, "SELECT count(*) FROM judgments WHERE judge_model LIKE 'openai/coin@%'") == [(0,)]

    # Re-curating with another judge: the sets read its verdicts only; --judge-id brings the first one back.
    everything_good = lambda body: "Fine.\nGOOD"  # noqa: E731
    with ScriptedServer(responder=everything_good) as srv:
        second = run_curate(CurateConfig(judge=ModelConfig(model="openai/lenient", api_base=srv.base_url), **common))
    assert not second["probes"][0]["better_than_chance"]  # GOOD to everything: balanced accuracy exactly 0.5
    assert _q(db, "SELECT DISTINCT judge_fingerprint FROM step_verdicts") == [(second["fingerprint"],)]
    assert _q(db, "SELECT trajectories FROM curation_retention WHERE filter = 'process'") == [(3,)]
    back = run_curate(CurateConfig(judge_id=first["fingerprint"], **common))
    assert back["judged_steps"] == 0 and back["probes"] == []
    assert _q(db, "SELECT DISTINCT judge_fingerprint FROM step_verdicts") == [(first["fingerprint"],)]
    assert _q(db, "SELECT trajectories FROM curation_retention WHERE filter = 'process'") == [(0,)]
    with pytest.raises(ValueError, match="judged no step"):
        run_curate(CurateConfig(judge_id="0000000000000000", **common))


def _as_exported(messages: list[dict]) -> list[dict]:
    """The messages the policy was sent, as the tools-protocol views carry them: an assistant's text stripped ('' for
    none), each call's JSON-object arguments parsed (chat templates serialise them), each result naming its tool."""
    import json

    names, out = {}, []
    for message in messages:
        message = dict(message)
        if message["role"] == "assistant":
            message["content"] = (message.get("content") or "").strip()
        for call in message.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
            try:
                parsed = json.loads(call["function"]["arguments"])
            except ValueError:
                continue
            if isinstance(parsed, dict):
                call["function"]["arguments"] = parsed
        if message["role"] == "tool":
            message["name"] = names[message["tool_call_id"]]
        out.append(message)
    return out


@pytest.mark.slow
def test_tools_views_hold_what_the_policy_was_sent_in_trls_format(tools_db):
    """Generated with `--protocol tools` over HTTP and curated: every step's `prompt` is the very conversation its
    request carried, in TRL's tool-calling format, and the curated `_tools` sets hold what the tag sets hold."""
    import copy
    import json

    db, requests = tools_db
    sent = [_as_exported(copy.deepcopy(r["messages"])) for r in requests]
    rows = _q(db, "SELECT trajectory_id, step_index, prompt, completion FROM tool_sub_trajectories ORDER BY 1, 2")
    assert len(rows) == len(requests) == _q(db, "SELECT count(*) FROM steps")[0][0] == 15
    for _, _, prompt, completion in rows:
        assert [json.loads(m) for m in prompt] in sent
        assert json.loads(completion[0])["role"] == "assistant"
    conversations = {d: [[json.loads(m) for m in c] for (c,) in _q(db, f"""
        SELECT messages FROM tool_conversations JOIN questions USING (question_id) WHERE dataset = '{d}'""")]
        for d in ("demo-math", "demo-qa")}
    messages = [m for cs in conversations.values() for c in cs for m in c]
    calls = [c["function"] for m in messages for c in m.get("tool_calls", [])]
    # Arguments are JSON objects, whatever their names; the string a model wrote that is none stays that string.
    assert {"expression": "12 * 3"} in [c["arguments"] for c in calls] and {"answer": "36"} in [c["arguments"] for c in calls]
    assert any(isinstance(c["arguments"], dict) and "query" in c["arguments"] for c in calls)
    assert sorted(c["arguments"] for c in calls if isinstance(c["arguments"], str)) == ['{"expression": ', '{"query": ']
    # Each result names its call; an unknown tool and two calls in one message are answered, never run.
    results = [m for m in messages if m["role"] == "tool"]
    assert {"tool_call_id": "call_0", "name": "python"}.items() <= next(m for m in results if m["name"] == "python").items()
    two = next(c for cs in conversations.values() for c in cs for i, m in enumerate(c) if len(m.get("tool_calls", [])) == 2)
    at = next(i for i, m in enumerate(two) if len(m.get("tool_calls", [])) == 2)
    assert [(m["role"], m["tool_call_id"]) for m in two[at + 1:at + 3]] == [("tool", "call_0"), ("tool", "call_0b")]
    assert all("Format error" in m["content"] for m in two[at + 1:at + 3])
    no_call = next(i for c in conversations["demo-math"] for i, m in enumerate(c) if m == {"role": "assistant", "content": "I think I know it."})
    assert no_call and any(m["role"] == "user" and "no tool call" in m["content"] for m in messages)
    assert all(set(m) <= {"role", "content", "tool_calls", "tool_call_id", "name"} and None not in m.values() for m in messages)
    tools = dict(_q(db, "SELECT dataset, list(DISTINCT t->'function'->>'name' ORDER BY t->'function'->>'name') FROM "
                        "(SELECT dataset, unnest(tools) AS t FROM curated_none_tools) GROUP BY 1"))
    assert tools == {"demo-math": ["answer", "calculator"], "demo-qa": ["answer", "search"]}
    for name in ("none", "process", "outcome", "process_outcome"):
        assert _q(db, f"SELECT DISTINCT trajectory_id, step_index FROM curated_{name}_tools ORDER BY ALL") == \
            _q(db, f"SELECT DISTINCT trajectory_id, step_index FROM curated_{name} ORDER BY ALL")
    # Only the two clean trajectories (one call, then the right answer) pass the process filter.
    assert _q(db, "SELECT count(DISTINCT trajectory_id) FROM curated_process_tools") == [(2,)]
