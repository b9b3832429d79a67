"""Tasks of the curate flow: judge and grade shards on Dask workers."""

from __future__ import annotations

from prefect import task

from swirl_core.curation import GradeShard, JudgeShard, run_calibration_shard, run_grade_shard, run_judge_shard


@task(name="judge-shard", retries=1, retry_delay_seconds=5, task_run_name="judge-{shard.shard_id}")
def judge_shard(shard: JudgeShard) -> list[dict]:
    return [j.model_dump(mode="json") for j in run_judge_shard(shard)]


@task(name="calibrate-judge", retries=1, retry_delay_seconds=5)
def calibrate_judge(shard: JudgeShard) -> dict[str, float]:
    return run_calibration_shard(shard)


@task(name="grade-shard", retries=1, retry_delay_seconds=5, task_run_name="grade-{shard.shard_id}")
def grade_shard(shard: GradeShard) -> list[dict]:
    return [g.model_dump(mode="json") for g in run_grade_shard(shard)]
