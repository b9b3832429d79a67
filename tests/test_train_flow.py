"""The train flow and CLI: SFT and SWiRL RL on the tiny model, model card lineage, artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import build_labeled_db
from scripted_server import ScriptedServer


@pytest.fixture()
def labeled_db(tmp_path):
    db = tmp_path / "train.duckdb"
    build_labeled_db(db)
    return db


@pytest.mark.slow
def test_swirl_cli_sft_writes_a_checkpoint_with_lineage(labeled_db, tiny_model_dir, tmp_path, prefect_api):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--db", str(labeled_db), "--method", "sft", "--base-model",
         str(tiny_model_dir), "--output", str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "2"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "trained 2 steps" in out.stdout and "'process_outcome' set" in out.stdout
    card = (tmp_path / "sft" / "README.md").read_text()
    assert "| curated filter | process_outcome |" in card and "| generation runs | r |" in card
    summary = json.loads((tmp_path / "sft" / "swirl_training.json").read_text())
    assert summary["lineage"]["rows"] == 2 and summary["settings"]["method"] == "sft"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    ids = tok("Question: where?", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3

    # The same command again: same settings, same data, so nothing is trained twice.
    weights = (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(out.args, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already holds this training run" in again.stdout, again.stdout[-2000:]
    assert (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.slow
def test_swirl_rl_flow_scores_fresh_actions_with_the_judge_over_http(labeled_db, tiny_model_dir, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.train import train_flow
    from swirl_core.config import ModelConfig
    from swirl_core.training.run import TrainConfig
    from swirl_core.training.trainers import TrainSettings

    with ScriptedServer(default="The step is plausible. GOOD") as srv:
        config = TrainConfig(
            db=str(labeled_db), judge=ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0),
            settings=TrainSettings(method="swirl", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "rl"),
                                   max_steps=2, per_device_batch_size=4, num_generations=4, max_completion_length=8),
        )
        result = train_flow(config)
        judged = [r for r in srv.requests if "Last message to evaluate" in r["messages"][-1]["content"]]
    assert result["steps"] == 2 and result["lineage"]["filter"] == "process" and result["lineage"]["judge_model"] == "openai/judge"
    assert result["reward"]["completions"] == 8 and judged  # 2 steps × 4 fresh samples, judged over HTTP
    assert any("rewards/judge_reward/mean" in h for h in result["log_history"])
    assert (tmp_path / "rl" / "config.json").exists() and "SWiRL step-wise RL" in (tmp_path / "rl" / "README.md").read_text()
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    assert {"train-swirl-summary", "train-swirl-log", "train-swirl-progress"} <= set(artifacts)
    assert artifacts["train-swirl-progress"].data == 100.0  # moved by every logged step, in this process
    # The share of groups whose rewards were all equal (they teach nothing) is logged per step and summarised.
    shares = [h["frac_reward_zero_std"] for h in result["log_history"]]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
    summary = artifacts["train-swirl-summary"].data
    assert f"groups with zero reward variance (no learning signal): {sum(shares) / 2:.1%} on average" in summary
    assert "sampled steps cut at max_completion_length" in summary
