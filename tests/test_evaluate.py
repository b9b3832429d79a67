"""Evaluation end to end: two served models of known quality, a served judge, CIs and paired tests."""

from __future__ import annotations

import json
import re

import duckdb
import pytest
from conftest import FIXTURES
from scripted_server import ScriptedServer

from swirl_core.config import ClusterConfig, EvalConfig, EvalModel, GenerateConfig, ModelConfig, parse_model_spec
from swirl_core.grading import parse_number
from swirl_core.protocol import parse_action, policy_messages, prompt_version
from swirl_core.stats import mcnemar_exact

GSM8K = FIXTURES / "gsm8k_test20.jsonl"
GOLD = {}
for _line in GSM8K.read_text().splitlines():
    _row = json.loads(_line)
    GOLD[_row["question"].strip()] = str(parse_number(_row["answer"].rsplit("####", 1)[1]))
QUESTIONS = list(GOLD)
# The weak model is right on every other question: exactly 10 of 20.
WEAK_RIGHT = {q for i, q in enumerate(QUESTIONS) if i % 2 == 0}


def _question_of(messages: list[dict]) -> str:
    text = next(m["content"] for m in messages if m["role"] == "user" and "Question:" in m["content"])
    return text.rsplit("Question:", 1)[1].strip()


def responder(body: dict) -> str:
    """Policies `strong` and `weak` (one calculator step, then an answer) and a judge/grader `judge`."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if body["model"] == "judge":
        if "Am I correct?" in last:
            key = re.search(r"Answer key: (.*)", last).group(1).strip()
            mine = re.search(r"My answer: (.*)", last).group(1).strip()
            return "The numbers match.\nYES" if key == mine else "They differ.\nNO"
        step = last.rsplit("Last message to evaluate:", 1)[1]
        question = re.search(r"Question: (.*?)\n\nConversation so far", last, re.DOTALL).group(1).strip()
        if "<math_exp>" in step:
            return "A sensible first calculation.\nGOOD"
        answer = re.search(r"<answer>(.*?)</answer>", step).group(1)
        return "Supported.\nGOOD" if answer == GOLD[question] else "Not supported by the work shown.\nBAD"
    question = _question_of(messages)
    if not any(m["role"] == "assistant" for m in messages):
        return "Start with the first quantity. <math_exp>2 + 3</math_exp>"
    right = body["model"] == "strong" or question in WEAK_RIGHT
    return f"<answer>{GOLD[question] if right else '-1'}</answer>"


@pytest.fixture
def server():
    with ScriptedServer(responder=responder) as srv:
        yield srv


def _served(name: str, srv: ScriptedServer) -> ModelConfig:
    return ModelConfig(model=f"openai/{name}", api_base=srv.base_url, temperature=0.0)


def _config(tmp_path, srv, **kw) -> EvalConfig:
    return EvalConfig(
        db=str(tmp_path / "eval.duckdb"), dataset="gsm8k", data_files=[str(GSM8K)], split="test",
        models=[EvalModel(label="weak", model=_served("weak", srv)), EvalModel(label="strong", model=_served("strong", srv))],
        grader="llm", judge=_served("judge", srv), cluster=ClusterConfig(n_workers=1), progress=False, **kw,
    )


@pytest.mark.slow
def test_two_models_over_http_give_known_accuracies_cis_and_a_significant_paired_test(prefect_api, tmp_path, server):
    from flows.evaluate import evaluate
    from flows.generate import run_generate

    # Three of the evaluation questions were also used for training data: the check must flag them.
    run_generate(GenerateConfig(dataset="gsm8k", data_files=[str(GSM8K)], split="train", limit=3, samples=1,
                                policy=_served("strong", server), db=str(tmp_path / "eval.duckdb"),
                                cluster=ClusterConfig(n_workers=1), progress=False))
    config = _config(tmp_path, server)
    result = evaluate(config)
    assert result["status"] == "completed"

    metrics = {(r["label"], r["metric"]): r for r in result["metrics"]}
    for metric in ("llm_judge", "exact_match", "f1"):
        strong, weak = metrics["strong", metric], metrics["weak", metric]
        assert strong["n"] == weak["n"] == 20
        assert strong["mean"] == 1.0 and strong["ci_low"] == strong["ci_high"] == 1.0
        assert weak["mean"] == 0.5
        assert 0.25 <= weak["ci_low"] < 0.5 < weak["ci_high"] <= 0.75  # binomial sd 0.11: ±2 sd
    # Step score: the calculator step is always GOOD, the answer GOOD only when right.
    assert metrics["strong", "step_score"]["mean"] == 1.0
    assert metrics["weak", "step_score"]["mean"] == pytest.approx(0.75)

    paired = {c["metric"]: c for c in result["comparisons"]}
    acc = paired["llm_judge"]
    assert (acc["model_a"], acc["model_b"], acc["n"]) == ("weak", "strong", 20)
    assert acc["diff"] == 0.5 and acc["low"] > 0  # strong beats weak, CI excludes 0
    assert (acc["mcnemar_b"], acc["mcnemar_c"]) == (0, 10)
    assert acc["p_mcnemar"] == pytest.approx(mcnemar_exact(0, 10)) and acc["p_mcnemar"] < 0.01
    assert acc["p_bootstrap"] < 0.01

    con = duckdb.connect(config.db, read_only=True)
    try:
        rows = con.execute("SELECT label, count(*), count(*) FILTER (WHERE in_training), "
                           "count(*) FILTER (WHERE exact_match), count(*) FILTER (WHERE judge_correct) "
                           "FROM eval_results WHERE eval_run_id = ? GROUP BY label ORDER BY label",
                           [result["run_id"]]).fetchall()
        assert rows == [("strong", 20, 3, 20, 20), ("weak", 20, 3, 10, 10)]
        # Trajectories are stored like generation's, with the tool executed live ...
        obs = con.execute("SELECT DISTINCT s.observation FROM eval_results e JOIN steps s USING (trajectory_id) "
                          "WHERE s.action_kind = 'math'").fetchall()
        assert obs == [("2 + 3 → 5",)]
        # ... under eval-generate runs, which never become training data.
        kinds = dict(con.execute("SELECT kind, count(*) FROM runs GROUP BY kind").fetchall())
        assert kinds["eval-generate"] == 2 and kinds["evaluate"] == 1 and kinds["generate"] == 1
        assert con.execute("SELECT count(DISTINCT trajectory_id) FROM curated_none").fetchone()[0] == 3
        summary = con.execute("SELECT label, exact_match, llm_judge, step_score FROM eval_summary "
                              "WHERE eval_run_id = ? ORDER BY label", [result["run_id"]]).fetchall()
        assert summary == [("strong", 1.0, 1.0, 1.0), ("weak", 0.5, 0.5, 0.75)]
    finally:
        con.close()

    report = open(result["report"]).read()
    assert f"| strong | `openai/strong@{server.base_url}` | 20 | 20 | 0 | 1.000 [1.000, 1.000]" in report
    assert "3 of 20 evaluated questions overlap" in report and "0 / 10" in report
    assert open(result["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["evaluate-results", "evaluate-paired-comparisons", "evaluate-summary"]

    async def artifacts():  # filtered by key: the API pages (200 at most) and a full suite has more artifacts
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
            return {a.key: a for a in found}

    import asyncio

    found = asyncio.run(artifacts())
    assert {"evaluate-results", "evaluate-paired-comparisons", "evaluate-summary"} <= set(found)
    assert "data:image/png;base64," in found["evaluate-summary"].data

    # A rerun pays for nothing and reproduces the same run and numbers.
    paid = server.stats()["completed"]
    again = evaluate(config)
    assert server.stats()["completed"] == paid
    assert again["run_id"] == result["run_id"] and again["metrics"] == result["metrics"]


def test_local_checkpoint_is_evaluated_in_process_and_keyed_by_its_weights(prefect_api, tmp_path, tiny_model_dir):
    from flows.evaluate import evaluate

    config = EvalConfig(db=str(tmp_path / "local.duckdb"), dataset="demo-math", limit=3, max_steps=2,
                        models=[EvalModel.parse(f"tiny={tiny_model_dir}", max_tokens=8)],
                        cluster=ClusterConfig(n_workers=1), progress=False)
    result = evaluate(config)
    assert result["status"] == "completed"
    con = duckdb.connect(config.db, read_only=True)
    try:
        models = con.execute("SELECT DISTINCT model FROM eval_results").fetchall()
        calls = con.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
        n = con.execute("SELECT count(*) FROM eval_results").fetchone()[0]
    finally:
        con.close()
    assert n == 3 and calls >= 3
    # The checkpoint's weights hash is part of its identity: retraining into the folder re-evaluates.
    assert len(models) == 1 and re.fullmatch(re.escape(str(tiny_model_dir)) + r"@[0-9a-f]{12}", models[0][0])
    again = evaluate(config)
    con = duckdb.connect(config.db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == calls  # nothing new was generated
    finally:
        con.close()
    assert again["metrics"] == result["metrics"]


def test_no_tool_mode_has_its_own_prompt_and_accepts_only_answers():
    assert prompt_version("math", False, tools=False) == "policy-math-notool-v1"
    text = policy_messages("math", "What is 2+2?", 1, tools=False)[0]["content"]
    assert "No calculator" in text and "<math_exp>" not in text
    assert parse_action("<math_exp>2+2</math_exp>", "math", tools=False).action.kind == "invalid"
    assert parse_action("so 4. <answer>4</answer>", "math", tools=False).action.content == "4"


def test_model_specs_parse_and_bad_ones_fail_clearly():
    m = EvalModel.parse("sft=openai/sft@http://127.0.0.1:8000/v1")
    assert (m.label, m.model.model, m.model.api_base, m.model.temperature) == ("sft", "openai/sft", "http://127.0.0.1:8000/v1", 0.0)
    assert parse_model_spec("smollm2").api_base is None
    with pytest.raises(ValueError, match="no checkpoint folder at ./out/missing"):
        parse_model_spec("./out/missing")
    assert parse_model_spec("user@example/model").model == "user@example/model"  # an @ that is no endpoint
    with pytest.raises(ValueError, match="LABEL=SPEC"):
        EvalModel.parse("openai/gpt-4o-mini")
    with pytest.raises(ValueError, match="needs a judge"):
        EvalConfig(grader="llm")
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(models=[EvalModel(label="a"), EvalModel(label="a")])


def test_cli_reports_bad_options_before_any_call(tmp_path, capsys):
    from flows.cli import main

    assert main(["evaluate", "--db", str(tmp_path / "x.duckdb"), "--grader", "llm"]) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert main(["evaluate", "--db", str(tmp_path / "x.duckdb"), "--model", "nolabel"]) == 2
    assert "LABEL=SPEC" in capsys.readouterr().err
    assert main(["evaluate", "--db", str(tmp_path / "x.duckdb"), "--model", f"ckpt={tmp_path}/missing-dir/"]) == 2
    assert not (tmp_path / "x.duckdb").exists()


HOTPOT = FIXTURES / "hotpotqa_dev20.json"
HOTPOT_GOLD = {r["question"].strip(): r["answer"] for r in json.loads(HOTPOT.read_text())}


def grid_responder(body: dict) -> str:
    """`strong` answers at once: the GSM8K number, or the HotPotQA answer inside a sentence (EM misses it,
    the grader does not); `weak` is always wrong. The judge grades by whether the key is in the answer."""
    last = body["messages"][-1]["content"]
    if body["model"] == "judge":
        key = re.search(r"Answer key: (.*)", last).group(1).strip()
        mine = re.search(r"My answer: (.*)", last).group(1).strip()
        return "Same answer.\nYES" if key.lower() in mine.lower() else "Different.\nNO"
    question = _question_of(body["messages"])
    if body["model"] == "weak":
        return "<answer>-1</answer>"
    if question in GOLD:
        return f"<answer>{GOLD[question]}</answer>"
    return f"<answer>I am quite sure the answer is {HOTPOT_GOLD[question]}</answer>"


@pytest.mark.slow
def test_a_grid_of_two_datasets_gives_a_model_by_dataset_table(prefect_api, tmp_path):
    """Cross-task evaluation in one run: GSM8K graded by rule (math), HotPotQA by the LLM grader (auto: QA with a
    judge), each with its own CIs and paired tests, and one model × dataset table."""
    from flows.evaluate import evaluate

    with ScriptedServer(responder=grid_responder) as srv:
        config = EvalConfig(
            db=str(tmp_path / "grid.duckdb"), dataset="gsm8k", data_files=[str(GSM8K)], split="test", limit=4,
            also=[{"dataset": "hotpotqa", "data_files": [str(HOTPOT)], "split": "validation"}],
            models=[EvalModel(label="weak", model=_served("weak", srv)), EvalModel(label="strong", model=_served("strong", srv))],
            judge=_served("judge", srv), step_scores=False, cluster=ClusterConfig(n_workers=1), progress=False,
        )
        result = evaluate(config)
    assert result["status"] == "completed" and [d["dataset"] for d in result["datasets"]] == ["gsm8k", "hotpotqa"]
    assert [d["primary_metric"] for d in result["datasets"]] == ["exact_match", "llm_judge"]
    assert len({d["run_id"] for d in result["datasets"]}) == 2
    cells = {(r["label"], r["dataset"]): r for r in result["grid"]}
    assert set(cells) == {(m, d) for m in ("weak", "strong") for d in ("gsm8k", "hotpotqa")}
    assert cells["strong", "gsm8k"]["mean"] == cells["strong", "hotpotqa"]["mean"] == 1.0
    assert cells["weak", "gsm8k"]["mean"] == cells["weak", "hotpotqa"]["mean"] == 0.0
    assert all(c["n"] == 4 for c in cells.values())
    # Exact match would have scored the right HotPotQA answers as wrong: the reason QA defaults to the grader.
    qa = {(m["label"], m["metric"]): m["mean"] for m in result["datasets"][1]["metrics"]}
    assert qa["strong", "exact_match"] == 0.0 and qa["strong", "llm_judge"] == 1.0
    report = open(result["report"]).read()
    assert "| model | gsm8k (EM, n=4) | hotpotqa (LLM judge, n=4) |" in report
    assert "| strong | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in report
    assert "| hotpotqa | LLM judge | weak | strong | 4 |" in report and "| gsm8k | EM | weak | strong | 4 |" in report


def test_cli_takes_several_datasets_each_with_its_files(tmp_path):
    from flows.cli import main, resolve

    config = resolve(["evaluate", "--dataset", "hotpotqa", "--data-files", "dev.json", "--corpus", "wiki.jsonl",
                      "--dataset", "gsm8k", "--data-files", "a.jsonl", "b.jsonl"])
    assert [(c.dataset, c.data_files, c.corpus) for c in config.per_dataset()] == [
        ("hotpotqa", ["dev.json"], "wiki.jsonl"), ("gsm8k", ["a.jsonl", "b.jsonl"], None)]
    config = resolve(["evaluate", "--data-files", "x.jsonl"])
    assert (config.dataset, config.data_files, config.also) == ("demo-math", ["x.jsonl"], [])
    with pytest.raises(ValueError, match="--data-files given twice for --dataset gsm8k"):
        resolve(["evaluate", "--dataset", "gsm8k", "--data-files", "a", "--data-files", "b"])
    # A bad file of the second dataset fails in one line before any call, and nothing is created.
    assert main(["evaluate", "--db", str(tmp_path / "g.duckdb"), "--dataset", "gsm8k", "--data-files", str(GSM8K),
                 "--dataset", "hotpotqa", "--data-files", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "g.duckdb").exists()
    with pytest.raises(ValueError, match="evaluated once"):
        EvalConfig(dataset="gsm8k", also=[{"dataset": "gsm8k"}])
    qa = EvalConfig(judge=ModelConfig(), also=[{"dataset": "hotpotqa"}])
    assert (qa.grader_for({"qa"}), qa.grader_for({"math"}), EvalConfig().grader_for({"qa"})) == ("llm", "rule", "rule")
    assert [c.dataset for c in qa.per_dataset()] == ["demo-math", "hotpotqa"] and qa.per_dataset()[1].data_files is None


def _graded_responder(right: set[str]):
    """A policy server under the one name `scripted`: answers the questions in `right` correctly, the rest wrong."""
    def respond(body: dict) -> str:
        question = _question_of(body["messages"])
        return f"<answer>{GOLD[question] if question in right else '-1'}</answer>"
    return respond


def test_two_endpoints_serving_one_model_name_are_two_models(prefect_api, tmp_path, capsys):
    from flows.cli import main

    good_right, weak_right = set(QUESTIONS[:14]), set(QUESTIONS[:8])  # 70% and 40% of the 20 questions
    db = tmp_path / "endpoints.duckdb"
    with ScriptedServer(responder=_graded_responder(good_right)) as a, \
            ScriptedServer(responder=_graded_responder(weak_right)) as b:
        argv = ["evaluate", "--db", str(db), "--dataset", "gsm8k", "--data-files", str(GSM8K), "--split", "test",
                "--model", f"good=openai/scripted@{a.base_url}", "--model", f"weak=openai/scripted@{b.base_url}",
                "--workers", "1", "--no-progress"]
        assert main(argv) == 0
        assert a.stats()["completed"] == b.stats()["completed"] == 20  # neither replayed the other's replies
        con = duckdb.connect(str(db), read_only=True)
        try:
            scores = dict(con.execute("SELECT label, avg(exact_match::INT) FROM eval_results GROUP BY label").fetchall())
            models = dict(con.execute("SELECT DISTINCT label, model FROM eval_results").fetchall())
            shared = con.execute("SELECT count(*) FROM eval_results g JOIN eval_results w USING (trajectory_id) "
                                 "WHERE g.label = 'good' AND w.label = 'weak'").fetchone()[0]
        finally:
            con.close()
        assert scores == {"good": pytest.approx(0.7), "weak": pytest.approx(0.4)}
        assert models == {"good": f"openai/scripted@{a.base_url}", "weak": f"openai/scripted@{b.base_url}"}
        assert shared == 0



def test_identity_of_a_model_without_endpoint_is_unchanged():
    # Journals and databases written before endpoints were part of identity keep their keys.
    from swirl_core.agent import PolicySpec
    from swirl_core.generation import policy_spec

    bare = ModelConfig(model="openai/gpt-4o-mini")
    assert bare.resolved_identity == "openai/gpt-4o-mini"
    spec = policy_spec(bare, "math", 3, "tools")
    assert spec == PolicySpec(model="openai/gpt-4o-mini", task="math", max_steps=3, few_shot=False, constraint=None,
                              temperature=0.7, max_tokens=256, tools_fingerprint="tools")
    served = ModelConfig(model="openai/x", api_base="http://h:1/v1/")
    assert served.resolved_identity == "openai/x@http://h:1/v1"
    # Two hosts said to serve one model share calls (one key) and trajectories (one fingerprint).
    a, b = (policy_spec(ModelConfig(model="openai/x", api_base=f"http://h{n}:1/v1", identity="x-v1"), "math", 3, "t")
            for n in (1, 2))
    assert a.fingerprint == b.fingerprint and a.request([], 0).key() == b.request([], 0).key()
    assert a.fingerprint != policy_spec(served, "math", 3, "t").fingerprint
    with pytest.raises(ValueError, match="identity is for served models"):
        ModelConfig(model="smollm2", identity="x")
