"""The judge probe: labelled steps from gold solutions, and a judge's figures measured over real HTTP."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from conftest import FIXTURES
from helpers import query
from scripted_server import ScriptedServer

from swirl_core.config import JudgeEvalConfig, ModelConfig
from swirl_core.judge_probe import choose_threshold, labelled_steps, probe_metrics
from swirl_core.judging import judge_messages
from swirl_core.seeds import load_seeds
from swirl_core.tools.calculator import Calculator

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
HOTPOT = str(FIXTURES / "hotpotqa_dev20.json")


def _steps(dataset, path, limit=20, seed=0):
    return labelled_steps(load_seeds(dataset, data_files=path, split="test", limit=limit).questions, seed)


def test_math_steps_follow_the_gold_solution_and_corrupt_it():
    steps = _steps("gsm8k", GSM8K)
    assert steps == _steps("gsm8k", GSM8K)  # deterministic
    assert [s.probe_step_id for s in steps] != [s.probe_step_id for s in _steps("gsm8k", GSM8K, seed=1)]
    kinds = {s.corruption for s in steps if s.label == "BAD"}
    assert kinds == {"wrong_operand", "wrong_operator", "wrong_answer", "premature_answer", "repeat"}
    assert all(s.corruption is None for s in steps if s.label == "GOOD")
    for s in steps:
        # every state is gold steps with the calculator's own observations
        for call, observation in zip(s.turns[::2], s.turns[1::2]):
            expr = call["content"].removeprefix("<math_exp>").removesuffix("</math_exp>")
            assert observation["content"] == f"{expr} → {Calculator()(expr).output}"
        if s.corruption in ("wrong_operand", "wrong_operator"):
            good = next(g for g in steps if g.label == "GOOD" and g.question_id == s.question_id
                        and g.turns == s.turns and g.action_kind == "math")
            value = lambda m: Calculator()(m.removeprefix("<math_exp>").removesuffix("</math_exp>")).output  # noqa: E731
            assert value(s.action_message) != value(good.action_message)
        if s.corruption == "repeat":
            assert {"role": "assistant", "content": s.action_message} in s.turns
    first = load_seeds("gsm8k", data_files=GSM8K, split="test", limit=1).questions[0]
    answers = [s for s in steps if s.question_id == first.question_id and s.action_kind == "answer"]
    assert {(s.label, s.action_message) for s in answers if s.corruption != "premature_answer"} == {
        ("GOOD", f"<answer>{first.answer}</answer>"), *[("BAD", s.action_message) for s in answers if s.corruption == "wrong_answer"]}


def test_qa_steps_search_the_supporting_titles():
    questions = load_seeds("hotpotqa", data_files=HOTPOT, split="test").questions
    steps = labelled_steps(questions)
    q = questions[0]
    support = {f[0] for f in q.metadata["supporting_facts"]}
    mine = [s for s in steps if s.question_id == q.question_id]
    good_queries = [s.action_message for s in mine if s.label == "GOOD" and s.action_kind == "search"]
    assert {m.removeprefix("<search_query>").removesuffix("</search_query>") for m in good_queries} == support
    unrelated = [s for s in mine if s.corruption == "unrelated_query"]
    assert unrelated and all(s.action_message[len("<search_query>"):-len("</search_query>")] not in
                             {p.title for p in q.context} for s in unrelated)
    assert {s.corruption for s in steps if s.label == "BAD"} == {"unrelated_query", "repeated_query", "wrong_answer"}
    gold_answer = next(s for s in mine if s.label == "GOOD" and s.action_kind == "answer")
    assert len(gold_answer.turns) == 2 * len(support)  # the answer comes after every supporting search


def test_metrics_on_known_verdicts():
    rows = ([{"label": "GOOD", "verdict": "GOOD", "action_kind": "math", "corruption": None}] * 30
            + [{"label": "BAD", "verdict": "BAD", "action_kind": "math", "corruption": "repeat"}] * 20
            + [{"label": "BAD", "verdict": "GOOD", "action_kind": "answer", "corruption": "wrong_answer"}] * 10)
    figures = {(m["grp"], m["metric"]): m for m in probe_metrics(rows, n_resamples=200)}
    assert figures["all", "accuracy"]["value"] == pytest.approx(50 / 60)
    assert figures["all", "recall_bad"]["value"] == pytest.approx(20 / 30)
    assert figures["all", "precision_bad"]["value"] == 1.0
    assert figures["all", "f1_bad"]["value"] == pytest.approx(2 * 20 / (20 + 30))
    assert figures["all", "balanced_accuracy"]["value"] == pytest.approx((1 + 20 / 30) / 2)
    assert figures["corruption=wrong_answer", "accuracy"]["value"] == 0.0
    low, high = figures["all", "accuracy"]["ci_low"], figures["all", "accuracy"]["ci_high"]
    assert low < 50 / 60 < high
    assert choose_threshold([0.1, 0.2, 0.3, 0.4], ["BAD", "BAD", "GOOD", "GOOD"]) == 0.3


def _gold_judge(steps):
    """A judge that knows every labelled step's verdict: keyed on the very request curation would send."""
    labels = {judge_messages(s.task, s.question, s.turns, s.action_message)[0]["content"]: s.label for s in steps}
    return lambda body: f"I checked the step.\n{labels[body['messages'][-1]['content']]}"


def _random_judge(body):
    digest = hashlib.sha256(body["messages"][-1]["content"].encode()).digest()
    return "Hard to tell.\n" + random.Random(digest).choice(["GOOD", "BAD"])


@pytest.mark.parametrize("judge, better", [("gold", True), ("random", False)])
def test_judge_eval_over_http(prefect_api, tmp_path, judge, better):
    from flows.judge_eval import build_steps, judge_eval

    config = JudgeEvalConfig(db=str(tmp_path / "probe.duckdb"), dataset="gsm8k", data_files=[GSM8K], split="test",
                             limit=20, n_resamples=500,
                             judge=ModelConfig(model="openai/judge", temperature=0.0, input_price_per_mtok=1.0,
                                               output_price_per_mtok=2.0))
    steps = build_steps(config)
    responder = _gold_judge(steps) if judge == "gold" else _random_judge
    with ScriptedServer(responder=responder) as srv:
        config.judge.api_base = srv.base_url
        result = judge_eval(config)
        sent = srv.stats()["total"]
        again = judge_eval(config)
        assert srv.stats()["total"] == sent  # a rerun pays nothing
    assert sent == len(steps) == result["steps"] and again["judged_now"] == 0
    s = result["summary"]
    assert s["better_than_chance"] is better and result["better_than_chance"] is better
    if judge == "gold":
        assert s["accuracy"] == 1.0 and s["f1_bad"] == 1.0
    else:
        assert 0.35 < s["balanced_accuracy"] < 0.65 and s["balanced_accuracy_ci_low"] < 0.5
    assert s["cost_usd_per_1000_steps"] > 0 and s["auroc"] is None  # a served judge reports no P(GOOD)
    assert ("NOT better than chance" in result["headline"]) is not better
    rows = query(tmp_path / "probe.duckdb", "SELECT label, verdict, p_good, action_kind, corruption, message, "
                                            "judge_fingerprint FROM judge_probe_results")
    assert len(rows) == len(steps) and {r[6] for r in rows} == {result["fingerprint"]}
    assert {r[4] for r in rows if r[0] == "GOOD"} == {None} and all(r[2] is None for r in rows)
    groups = {r[0] for r in query(tmp_path / "probe.duckdb", "SELECT DISTINCT grp FROM judge_probe_metrics")}
    assert {"all", "action=math", "action=answer", "corruption=repeat", "corruption=gold"} <= groups


def test_judge_eval_cli(prefect_api, tmp_path, capsys):
    from flows.cli import main

    db = str(tmp_path / "cli.duckdb")
    with ScriptedServer(default="Looks right to me.\nGOOD") as srv:
        assert main(["judge-eval", "--db", db, "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test",
                     "--limit", "3", "--judge", f"openai/judge@{srv.base_url}", "--resamples", "200"]) == 0
        assert srv.stats()["total"] > 0
    out = capsys.readouterr()
    assert "balanced_accuracy" in out.out and "judge_probe_summary" in out.out
    assert "NOT better than chance" in out.err  # GOOD to everything carries no signal, and it says so
    assert main(["judge-eval", "--db", db, "--dataset", "demo-qa"]) == 2
    assert "no labelled steps can be built" in capsys.readouterr().err


def test_a_calibrated_judge_gets_its_threshold_from_the_labelled_steps(prefect_api, tmp_path, tiny_model_dir):
    """An in-process judge reports P(GOOD): the threshold is chosen on the calibration fold, scored on the other."""
    from flows.judge_eval import judge_eval

    config = JudgeEvalConfig(db=str(tmp_path / "local.duckdb"), dataset="gsm8k", data_files=[GSM8K], split="test",
                             limit=3, n_resamples=200, judge=ModelConfig(model=str(tiny_model_dir), temperature=0.0))
    result = judge_eval(config)
    rows = query(tmp_path / "local.duckdb", "SELECT fold, scored, p_good, threshold, verdict, label FROM judge_probe_results")
    threshold = result["threshold"]
    assert threshold is not None and all(r[3] == threshold for r in rows)
    assert all(r[2] is not None and r[4] == ("GOOD" if r[2] >= threshold else "BAD") for r in rows)
    assert {(r[0], r[1]) for r in rows} == {("calibration", False), ("evaluation", True)}
    assert result["scored_steps"] == sum(r[1] for r in rows) and result["summary"]["auroc"] is not None
    assert result["reliability"] and sum(b["steps"] for b in result["reliability"]) == result["scored_steps"]
    cal = [(r[2], r[5]) for r in rows if r[0] == "calibration"]
    assert threshold == choose_threshold([p for p, _ in cal], [label for _, label in cal])


def test_a_failed_judge_call_is_recorded_and_asked_again_by_the_next_run(prefect_api, tmp_path):
    from scripted_server import Faults

    from flows.judge_eval import judge_eval

    config = JudgeEvalConfig(db=str(tmp_path / "f.duckdb"), dataset="gsm8k", data_files=[GSM8K], split="test", limit=2,
                             n_resamples=100, judge=ModelConfig(model="openai/judge", temperature=0.0, max_retries=0))
    with ScriptedServer(default="Fine.\nGOOD", faults=Faults(server_error_first=1)) as srv:
        config.judge.api_base = srv.base_url
        failed = judge_eval(config)
        assert query(tmp_path / "f.duckdb", "SELECT DISTINCT verdict FROM judge_probe_results") == [("UNKNOWN",)]
        again = judge_eval(config)
    assert again["judged_now"] == failed["steps"] and again["summary"]["accuracy"] < 1  # GOOD to all: BAD steps wrong
    assert query(tmp_path / "f.duckdb", "SELECT DISTINCT verdict FROM judge_probe_results") == [("GOOD",)]


def test_self_consistency_with_k_judge_samples(prefect_api, tmp_path):
    from flows.judge_eval import judge_eval

    def moody(body):  # each sample (its own seed) votes at random
        return random.Random(json.dumps(body, sort_keys=True)).choice(["GOOD", "BAD"])

    config = JudgeEvalConfig(db=str(tmp_path / "k.duckdb"), dataset="gsm8k", data_files=[GSM8K], split="test", limit=3,
                             n_resamples=100, judge_samples=3, judge=ModelConfig(model="openai/judge"))
    with ScriptedServer(responder=moody) as srv:
        config.judge.api_base = srv.base_url
        result = judge_eval(config)
        assert srv.stats()["total"] == 3 * result["steps"]
    unanimous = query(tmp_path / "k.duckdb", "SELECT avg((greatest(good_votes, bad_votes) = votes)::INT), max(votes) "
                                             "FROM judge_probe_results")[0]
    assert unanimous[1] == 3 and result["summary"]["self_consistency"] == pytest.approx(unanimous[0])
    assert 0 < unanimous[0] < 1
