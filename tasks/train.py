"""Tasks of the train flow."""

from __future__ import annotations

from prefect import task

from swirl_core.hub import upload_folder
from swirl_core.training.run import HUB_IGNORE, TrainConfig, run_training
from tasks.artifacts import progress_tracker


@task(name="train", task_run_name="train-{config.settings.method}", log_prints=False)  # see flows/train.py
def train(config: TrainConfig, run_id: str) -> dict:
    """Trains in this process, or supervises the processes of `accelerate launch` until they exit; the run's
    progress artifact follows every logged step either way."""
    method = config.settings.method
    track = progress_tracker(f"train-{method}-progress", f"training run {run_id} ({method})")
    return run_training(config, run_id, on_progress=track)


@task(name="push-model-to-hub", retries=2, retry_delay_seconds=10)
def push_model(folder: str, repo_id: str, private: bool, token: str | None) -> dict:
    """The final model, tokenizer and card; checkpoints, exported data and launch files stay local."""
    return upload_folder(folder, repo_id, token=token, private=private, repo_type="model",
                         message="Publish a SWiRL-trained model", ignore_patterns=HUB_IGNORE)
