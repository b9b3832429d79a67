"""Tasks of the generate flow."""

from __future__ import annotations

from prefect import task

from swirl_core.generation import Shard, run_shard


@task(name="generate-shard", retries=1, retry_delay_seconds=5, task_run_name="shard-{shard.shard_id}")
def generate_shard(shard: Shard) -> list[dict]:
    # Plain dicts cross the Dask boundary; every paid call is already journaled by the client,
    # so a retried shard re-sends nothing that completed.
    return [t.model_dump(mode="json") for t in run_shard(shard)]
