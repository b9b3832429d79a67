"""Tasks of the train flow."""

from __future__ import annotations

from prefect import task

from swirl_core.training.run import TrainConfig, run_training


@task(name="train", task_run_name="train-{config.settings.method}", log_prints=False)  # see flows/train.py
def train(config: TrainConfig, run_id: str) -> dict:
    return run_training(config, run_id)
