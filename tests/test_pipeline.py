"""The whole pipeline as one flow: generate → curate → train (SFT, SWiRL) → evaluate → publish.

The end-to-end test runs every stage for real: the policy and the judge are a scripted OpenAI-compatible
server over HTTP, training is TRL on a tiny model, evaluation runs the checkpoints in-process, and the
publish stage writes the Hub folder. A rerun must pay for nothing and train nothing again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from conftest import ROOT
from scripted_server import ScriptedServer

from swirl_core.config import PipelineConfig

DEMO_ANSWERS = {json.loads(line)["question"]: json.loads(line)["answer"].rsplit("####", 1)[1].strip()
                for line in (ROOT / "swirl_core/demo_data/demo_math.jsonl").read_text().splitlines()}


def _dispatch(body: dict) -> str:
    """Policy: one calculator step, then the right answer for every other question (a wrong one otherwise).
    Judge: a wrong-looking answer (0) is BAD, anything else GOOD."""
    last = body["messages"][-1]["content"]
    if "Last message to evaluate:" in last:
        return "Reasonable.\nBAD" if "<answer>0</answer>" in last.rsplit("Last message to evaluate:", 1)[1] else "Fine.\nGOOD"
    question = next(q for q in DEMO_ANSWERS if any(q in (m.get("content") or "") for m in body["messages"]))
    if "→" not in last:  # no calculator result yet
        numbers = re.findall(r"\d+", question)[:2]
        return f"Start with the numbers. <math_exp>{numbers[0]} + {numbers[-1]}</math_exp>"
    right = list(DEMO_ANSWERS).index(question) % 2 == 0
    return f"<answer>{DEMO_ANSWERS[question] if right else 0}</answer>"


def test_config_is_shared_by_every_stage_and_conflicts_are_refused(tmp_path):
    db = str(tmp_path / "f.duckdb")
    config = PipelineConfig(db=db, cluster={"n_workers": 1})
    for stage in (config.generate, config.curate, config.evaluate):
        assert stage.db == db and stage.cluster.n_workers == 1
    assert config.sft.output_dir == str(tmp_path / "f.work" / "models" / "sft")
    assert config.swirl.output_dir == str(tmp_path / "f.work" / "models" / "swirl")
    assert config.evaluate.split == "test" and config.generate.split == "train"
    with pytest.raises(ValueError, match="generate.db is set once"):
        PipelineConfig(db=db, generate={"db": str(tmp_path / "other.duckdb")})
    assert PipelineConfig(db=db, sft=None, swirl=None, evaluate=None).sft is None
    # Evaluation holds out questions of the task trained on, unless told otherwise.
    assert PipelineConfig(db=db, generate={"dataset": "gsm8k"}).evaluate.dataset == "gsm8k"
    assert PipelineConfig(db=db, generate={"dataset": "gsm8k"}, evaluate={"dataset": "demo-math"}).evaluate.dataset == "demo-math"
    # The deployment form: the flow's parameter schema carries every stage, typed.
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump()
    props = schema["definitions"]["PipelineConfig"]["properties"]
    assert {"generate", "curate", "sft", "swirl", "evaluate", "publish", "db"} <= set(props)


@pytest.mark.slow
def test_pipeline_end_to_end_then_a_rerun_pays_and_trains_nothing(prefect_api, tmp_path, tiny_model_dir):
    from flows.curate import run_curate
    from flows.generate import run_generate
    from flows.pipeline import pipeline
    from swirl_core.config import CurateConfig, GenerateConfig

    with ScriptedServer(responder=_dispatch) as srv:
        # A foreign run already curated in the database (another policy): the pipeline must not train on it.
        foreign = run_generate(GenerateConfig(
            db=str(tmp_path / "p.duckdb"), samples=1, limit=2, max_steps=3, progress=False, cluster={"n_workers": 1},
            policy={"model": "openai/old-policy", "api_base": srv.base_url, "temperature": 0.0}))
        run_curate(CurateConfig(db=str(tmp_path / "p.duckdb"), run_ids=[foreign["run_id"]], progress=False,
                                cluster={"n_workers": 1}, judge={"model": "openai/judge", "api_base": srv.base_url}))
        api = {"api_base": srv.base_url, "temperature": 0.0, "max_tokens": 64}
        tiny = str(tiny_model_dir)
        train = {"base_model": tiny, "max_steps": 1, "per_device_batch_size": 2, "num_generations": 2,
                 "max_completion_length": 8, "max_length": 512}
        config = PipelineConfig(
            db=str(tmp_path / "p.duckdb"), progress=False, cluster={"n_workers": 1},
            generate={"samples": 2, "limit": 6, "max_steps": 3, "policy": {"model": "openai/policy", **api}},
            curate={"judge": {"model": "openai/judge", **api}},
            sft={"method": "sft", "output_dir": "", **{k: v for k, v in train.items() if k not in ("num_generations", "max_completion_length")}},
            swirl={"method": "swirl", "output_dir": "", **train},
            evaluate={"limit": 3, "max_steps": 2, "models": [{"label": "base", "model": {"model": tiny, "max_tokens": 16}}]},
            publish={"repo_id": "me/demo", "dry_run": True},
        )
        first = pipeline(config)
        sent_first = srv.stats()["total"]
        assert first["status"] == "completed", first["stages"]
        assert [s["stage"] for s in first["stages"]] == ["generate", "curate", "train-sft", "train-swirl", "evaluate", "publish"]
        retention = {r["filter"]: r["trajectories"] for r in first["retention"]}
        assert retention == {"none": 14, "process": 7, "outcome": 7, "process_outcome": 7}  # 2 of them foreign
        for method in ("sft", "swirl"):
            folder = Path(first["checkpoints"][method])
            lineage = json.loads((folder / "swirl_training.json").read_text())["lineage"]
            assert lineage["run_ids"] == lineage["requested_run_ids"] == [first["generation_run"]]
            assert f"| generation runs | {first['generation_run']} |" in (folder / "README.md").read_text()
        assert {m["label"] for m in first["metrics"]} == {"base", "sft", "swirl"}
        assert Path(first["report"]).is_file()
        assert (tmp_path / "p.work" / "hub" / "me__demo" / "README.md").is_file()

        second = pipeline(config)
        assert srv.stats()["total"] == sent_first  # every call replays from the journal
        status = {s["stage"]: s["status"] for s in second["stages"]}
        assert status["train-sft"].startswith("skipped") and status["train-swirl"].startswith("skipped")
        assert second["metrics"] == first["metrics"]

    con = duckdb.connect(str(tmp_path / "p.duckdb"), read_only=True)
    try:
        n_eval = con.execute("SELECT count(DISTINCT label), count(*) FROM eval_results").fetchall()
        dupes = con.execute("SELECT count(*) - count(DISTINCT trajectory_id) FROM trajectories").fetchall()
    finally:
        con.close()
    assert n_eval == [(3, 9)] and dupes == [(0,)]
    assert first["probes"] and first["probes"][0]["dataset"] == "demo-math"  # the demo's judge was measured


@pytest.mark.slow
def test_swirl_run_offline_demo_makes_real_data(tmp_path, record_property):
    """The README's main job, exactly: `swirl run` on the offline default (SmolLM2 in-process), no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--db", str(tmp_path / "demo.duckdb"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    wall = time.monotonic() - started
    record_property("swirl_run_wall_s", round(wall, 1))
    print(f"\nswirl run: {wall:.0f} s\n{proc.stdout[-4000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for query in ("SELECT * FROM curation_retention", "SELECT state, action FROM curated_process_outcome LIMIT 5"):
        assert query in proc.stdout  # it tells the user what to try
    con = duckdb.connect(str(tmp_path / "demo.duckdb"), read_only=True)
    try:
        parse_rate = con.execute("SELECT sum(parsed) / sum(steps) FROM step_parse_report r JOIN runs USING (run_id) "
                                 "WHERE runs.kind = 'generate'").fetchone()[0]
        retention = dict(con.execute("SELECT filter, trajectories FROM curation_retention").fetchall())
        labels = {r[0] for r in con.execute("SELECT label FROM eval_results").fetchall()}
    finally:
        con.close()
    assert parse_rate >= 0.8
    assert set(retention) == {"none", "process", "outcome", "process_outcome"} and min(retention.values()) > 0, retention
    assert labels == {"base", "sft", "swirl"}
    assert wall < 900


def test_swirl_run_refuses_bad_inputs_before_any_work(tmp_path, capsys):
    from flows.cli import main

    db = tmp_path / "r.duckdb"
    # demo-qa ships no test split to evaluate on: said before anything runs.
    assert main(["run", "--db", str(db), "--dataset", "demo-qa"]) == 2
    assert "ships the splits train; got split 'test'" in capsys.readouterr().err
    config = tmp_path / "p.yaml"
    config.write_text("generate: {db: other.duckdb}\n")
    assert main(["run", "--db", str(db), "--config", str(config)]) == 2
    assert "generate.db is set once for the whole pipeline" in capsys.readouterr().err
    config.write_text("- not a mapping\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "expected a mapping of pipeline settings" in capsys.readouterr().err
    assert not db.exists()


def test_swirl_run_protocol_reaches_generation_training_and_evaluation(tmp_path):
    from flows.cli import resolve
    from flows.pipeline import train_config
    from swirl_core.records import StepProtocol

    config = resolve(["run", "--protocol", "tools", "--db", str(tmp_path / "p.duckdb")])
    assert config.protocol == config.generate.protocol == config.evaluate.protocol == StepProtocol.TOOLS
    assert config.evaluate.generate_config(config.evaluate.models[0]).protocol == StepProtocol.TOOLS
    assert config.swirl is None and train_config(config, config.sft, "run").protocol == StepProtocol.TOOLS
    with pytest.raises(ValueError, match="SWiRL RL trains on tag-protocol steps"):  # RL learns tag steps only
        PipelineConfig(protocol="tools", swirl={"method": "swirl", "output_dir": ""})
    assert resolve(["run"]).generate.protocol == StepProtocol.TAGS  # the paper's, by default
    with pytest.raises(ValueError, match="evaluate.protocol is set once"):
        PipelineConfig(evaluate={"protocol": "tools"})
