"""Training at scale on CPU: a SIGKILLed run resumes from its checkpoint, two processes over gloo under
`accelerate launch`, the vLLM and engine settings, the model card, and a push to the (fake) Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from fake_hub import FakeHub
from helpers import build_labeled_db
from scripted_server import Faults, ScriptedServer

from swirl_core.config import ModelConfig
from swirl_core.constraints import ActionGrammar
from swirl_core.training.run import RUN_FILE, TrainConfig, claim_output, hub_base_model, write_model_card
from swirl_core.training.trainers import SUMMARY_FILE, TrainSettings, grpo_config, last_checkpoint

# Trains through the library in its own process (so the test can SIGKILL it), printing each progress event.
_TRAIN_SCRIPT = """
import json, sys
from swirl_core.training.run import TrainConfig, run_training
config = TrainConfig.model_validate_json(open(sys.argv[1]).read())
result = run_training(config, "scale-test", on_progress=lambda e: print("EVENT", json.dumps(e), flush=True))
print("RESULT", json.dumps({k: result[k] for k in ("steps", "resumed_from", "skipped", "world_size", "reward")}), flush=True)
"""


@pytest.fixture()
def labeled_db(tmp_path):
    db = tmp_path / "train.duckdb"
    build_labeled_db(db)
    return db


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _swirl_config(db: Path, tiny: Path, out: Path, judge_url: str, **settings) -> TrainConfig:
    return TrainConfig(
        db=str(db), work_dir=str(out.parent / "work"), progress=False,
        judge=ModelConfig(model="openai/judge", api_base=judge_url, temperature=0.0),
        settings=TrainSettings(method="swirl", base_model=str(tiny), output_dir=str(out), per_device_batch_size=4,
                               num_generations=2, max_completion_length=8, learning_rate=1e-3, **settings))


def _command(config: TrainConfig, tmp_path: Path) -> list[str]:
    spec = tmp_path / f"config-{time.monotonic_ns()}.json"
    spec.write_text(config.model_dump_json())
    script = tmp_path / "train_script.py"
    script.write_text(_TRAIN_SCRIPT)
    return [sys.executable, str(script), str(spec)]


def _parse(output: str) -> tuple[list[dict], dict]:
    events = [json.loads(line[6:]) for line in output.splitlines() if line.startswith("EVENT ")]
    results = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    assert results, output[-4000:]
    return events, results[0]


@pytest.mark.slow
def test_a_sigkilled_run_resumes_from_its_last_checkpoint(labeled_db, tiny_model_dir, tmp_path):
    """SIGKILL after the step-2 checkpoint; the same run again continues at step 3 (optimizer, scheduler, data
    position restored) and ends at max_steps; a third run finds it finished and trains nothing."""
    out = tmp_path / "rl"
    with ScriptedServer(default="Plausible. GOOD", faults=Faults(latency_s=0.3)) as srv:  # ≥ 0.3 s a step: time to kill it
        config = _swirl_config(labeled_db, tiny_model_dir, out, srv.base_url, max_steps=6, save_steps=2)
        proc = subprocess.Popen(_command(config, tmp_path), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while last_checkpoint(out) is None:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        proc.wait()
        killed_at = int(last_checkpoint(out).name.split("-")[1])
        assert 2 <= killed_at < 6 and not (out / SUMMARY_FILE).exists()
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in last_checkpoint(out).iterdir()}

        # One run at a time: two on one output folder would race on its exported data.
        again = subprocess.run(_command(config, tmp_path), cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=600)
        events, result = _parse(again.stdout + again.stderr)
        assert again.returncode == 0
        assert result["resumed_from"] == killed_at and result["steps"] == 6 and not result["skipped"]
        assert [e["step"] for e in events] == list(range(killed_at + 1, 7))  # the global step continues
        summary = json.loads((out / SUMMARY_FILE).read_text())
        history = summary["result"]["log_history"]
        assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # one curve across both runs
        # 2 states a step of a 4-state set: the data position carries over, so epochs advance by 0.5 a step.
        assert [h["epoch"] for h in history] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
        assert result["reward"]["clients_built"] == 1  # one judge client for the whole (resumed) run

        third = subprocess.run(again.args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert _parse(third.stdout + third.stderr)[1]["skipped"] is True


def test_checkpoints_of_another_run_are_never_mixed_in(tmp_path):
    settings = TrainSettings(method="sft", output_dir=str(tmp_path / "o"))
    lineage = {"rows": 2, "data_sha256": "a"}
    folder = Path(settings.output_dir)
    assert claim_output(folder, settings, lineage) is False and (folder / RUN_FILE).is_file()
    (folder / "checkpoint-2").mkdir()
    assert claim_output(folder, settings.model_copy(update={"save_steps": 7}), lineage) is True  # how it saves: same run
    with pytest.raises(ValueError, match="checkpoints of another training run"):
        claim_output(folder, settings.model_copy(update={"max_steps": 7}), lineage)
    with pytest.raises(ValueError, match="checkpoints of another training run"):
        claim_output(folder, settings, {"rows": 2, "data_sha256": "b"})  # other data
    # A finished run of other settings is replaced, as its final model is, checkpoints included.
    (folder / SUMMARY_FILE).write_text("{}")
    assert claim_output(folder, settings.model_copy(update={"max_steps": 7}), lineage) is False
    assert not (folder / "checkpoint-2").exists()
    # Only complete checkpoints count: one cut short by a kill has no trainer_state.json.
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(folder).name == "checkpoint-3"


@pytest.mark.slow
def test_two_processes_train_over_gloo_and_rank_zero_writes_the_checkpoints(labeled_db, tiny_model_dir, tmp_path,
                                                                              prefect_api):
    """`swirl train --num-processes 2`: accelerate launch, one gloo process group, both ranks train every step,
    each judges its own completions over HTTP, rank 0 alone writes checkpoints and the final model."""
    from prefect.client.orchestration import get_client

    with ScriptedServer(default="Plausible. GOOD") as srv:
        out = tmp_path / "ddp"
        cmd = [sys.executable, "-m", "flows.cli", "train", "--db", str(labeled_db), "--method", "swirl", "--base-model",
               str(tiny_model_dir), "--output", str(out), "--max-steps", "2", "--save-steps", "1", "--batch-size", "2",
               "--num-generations", "2", "--max-completion-length", "8", "--num-processes", "2",
               "--judge", "openai/judge", "--judge-api-base", srv.base_url]
        run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
        judged = len(srv.requests)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "trained 2 steps" in run.stdout and "2 process(es)" in run.stdout
    ranks = [json.loads((out / "launch" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert {r["rank"] for r in ranks} == {0, 1} and len({r["pid"] for r in ranks}) == 2
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["result"]["steps"] == 2 for r in ranks)
    # Per step: 2 processes × 2 completions each (batch 2 per device), every one judged by its own process.
    assert [r["reward"]["completions"] for r in ranks] == [4, 4] and judged >= 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # The trainer saves one model per checkpoint (the main process) and each rank's RNG state.
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert len(list((out / "checkpoint-2").glob("model*.safetensors"))) == 1
    assert (out / "model.safetensors").is_file() and (out / SUMMARY_FILE).is_file()
    with get_client(sync_client=True) as client:
        progress = [a for a in client.read_latest_artifacts() if a.key == "train-swirl-progress"]
    assert progress and progress[0].data == pytest.approx(100.0)  # the supervisor moved it from rank 0's events


def test_vllm_settings_build_a_grpo_config_on_cpu(tmp_path):
    """No GPU and no vllm here: the settings validate and become TRL's vLLM options; the trainer refuses clearly."""
    base = {"method": "swirl", "output_dir": str(tmp_path), "use_vllm": True, "max_completion_length": 256}
    colocate = grpo_config(TrainSettings(**base, vllm_gpu_memory_utilization=0.5), sampling_task="qa")
    assert (colocate.use_vllm, colocate.vllm_mode, colocate.vllm_gpu_memory_utilization) == (True, "colocate", 0.5)
    assert colocate.vllm_structured_outputs_regex == ActionGrammar.for_task("qa").regex()  # generation's guided decoding, for RL too
    free = grpo_config(TrainSettings(**base, constraint="none"), sampling_task="qa")
    assert free.vllm_structured_outputs_regex is None
    # A budget too short for a guided step with its reasoning would cut every sample before its tag closes.
    with pytest.raises(ValueError, match="cannot hold a step with its reasoning"):
        TrainSettings(**base | {"max_completion_length": 64})
    assert TrainSettings(**base | {"max_completion_length": 64, "constraint": "none"}).use_vllm
    server = grpo_config(TrainSettings(**base, vllm_mode="server", vllm_server_base_url="http://127.0.0.1:8000"))
    assert (server.vllm_mode, server.vllm_server_base_url) == ("server", "http://127.0.0.1:8000")
    assert grpo_config(TrainSettings(method="swirl", output_dir=str(tmp_path))).use_vllm is False
    with pytest.raises(ValueError, match="SFT samples nothing"):
        TrainSettings(method="sft", output_dir=str(tmp_path), use_vllm=True)
    with pytest.raises(ValueError, match="vllm_mode 'server'"):
        TrainSettings(**base, vllm_server_base_url="http://x:8000")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from swirl_core.training.trainers import swirl_trainer

        with pytest.raises(ValueError, match="needs the vllm package"):
            swirl_trainer(TrainSettings(**base), None, [])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            grpo_config(TrainSettings(method="swirl", output_dir=str(tmp_path), report_to=["tensorboard"]))


def test_shipped_engine_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    from swirl_core.training.launch import CONFIG_DIR, accelerate_command

    engines = {"zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3), "fsdp": ("FSDP", None)}
    for name, (kind, stage) in engines.items():
        config = load_config_from_file(str(CONFIG_DIR / f"{name}.yaml"))
        assert config.distributed_type.value == kind
        if stage:
            assert config.deepspeed_config["zero_stage"] == stage
        cmd = accelerate_command(Path("spec.json"), 4, name)
        assert cmd[cmd.index("--config_file") + 1] == str(CONFIG_DIR / f"{name}.yaml") and "--multi_gpu" not in cmd
    ddp = accelerate_command(Path("spec.json"), 2, "ddp")
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "2" and ddp[-2:] == [
        "swirl_core.training.launch", "spec.json"]


def test_model_card_names_the_hub_base_model_datasets_and_lineage(tmp_path):
    from huggingface_hub import ModelCard

    assert hub_base_model("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    sft = tmp_path / "sft"  # a SWiRL run on an SFT checkpoint: the card names the Hub model it all started from
    sft.mkdir()
    (sft / SUMMARY_FILE).write_text(json.dumps({"settings": {"base_model": "smollm2"}}))
    assert hub_base_model(str(sft)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "unknown").mkdir()
    assert hub_base_model(str(tmp_path / "unknown")) is None
    settings = TrainSettings(method="swirl", base_model=str(sft), output_dir=str(tmp_path / "rl"))
    lineage = {"filter": "process", "rows": 4, "trajectories": 2, "datasets": ["hotpotqa"], "run_ids": ["r1", "r2"],
               "prompt_versions": ["v"], "judge_model": "openai/judge", "data_sha256": "abc123"}
    (tmp_path / "rl").mkdir()
    write_model_card(tmp_path / "rl", settings, lineage, [{"step": 1, "loss": 0.5}], license="mit",
                     dataset_repo_id="me/swirl-data")
    card = ModelCard.load(tmp_path / "rl" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.datasets == ["me/swirl-data"]
    assert {"swirl", "trl", "grpo"} <= set(card.data.tags) and card.data.license == "mit"
    assert "| generation runs | r1, r2 |" in card.text and "| reward judge | openai/judge |" in card.text


@pytest.mark.slow
def test_swirl_train_pushes_the_model_and_its_card_to_the_hub(labeled_db, tiny_model_dir, tmp_path, prefect_api):
    with FakeHub() as hub:
        out = tmp_path / "sft"
        cmd = [sys.executable, "-m", "flows.cli", "train", "--db", str(labeled_db), "--method", "sft", "--base-model",
               str(tiny_model_dir), "--output", str(out), "--max-steps", "2", "--save-steps", "1", "--batch-size", "2",
               "--push-to-hub", "user/swirl-sft", "--dataset-repo-id", "user/swirl-data"]
        run = subprocess.run(cmd, cwd=ROOT, env={**_env(), **hub.env()}, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert "pushed to the Hub: user/swirl-sft" in run.stdout
        files = hub.files("user/swirl-sft", "model")
        assert hub.repo_info("user/swirl-sft", "model")["private"] is True
        # The same command again: the finished run is not retrained, and the unchanged files make no new commit.
        commits = len(hub.commits("user/swirl-sft", "model"))
        again = subprocess.run(cmd, cwd=ROOT, env={**_env(), **hub.env()}, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "already holds this training run" in again.stdout, again.stderr[-3000:]
        assert len(hub.commits("user/swirl-sft", "model")) == commits
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", SUMMARY_FILE} <= set(files)
    assert not any(f.startswith(("checkpoint-", "train_data/", "launch/")) or f == RUN_FILE for f in files)
    card = files["README.md"].decode()
    assert "datasets:\n- user/swirl-data" in card and "- trl" in card and "license: apache-2.0" in card
    assert "hf_test_token" not in card and (out / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_a_failed_launch_reports_the_exit_and_which_ranks_finished(tmp_path):
    """Both processes die (their data file is gone): the supervisor fails with the launcher's exit code, the
    ranks that finished (none) and the processes' last output, instead of returning a result."""
    from swirl_core.training.launch import TrainingProcessError, launch
    from swirl_core.training.run import LaunchSpec

    settings = TrainSettings(method="sft", base_model="smollm2", output_dir=str(tmp_path / "out"), num_processes=2)
    spec = LaunchSpec(request=TrainConfig(settings=settings, progress=False), run_id="r", lineage={},
                      data_file=str(tmp_path / "gone.parquet"), progress_bar=False, sampling_task=None)
    with pytest.raises(TrainingProcessError) as failed:
        launch(spec)
    message = str(failed.value)
    assert re.search(r"2 training processes exited with code [1-9]\d* \(rank 0: -?\d+, rank 1: -?\d+\); ranks that "
                     r"finished: none; first error: FileNotFoundError: .*gone\.parquet", message), message
