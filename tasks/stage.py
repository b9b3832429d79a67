"""The Prefect task of every sharded LLM stage: what Prefect adds to `run_shard` (a task run per shard, named
after it, with its state, and a retry) and the executor that maps shards over the flow's task runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import task
from prefect.futures import as_completed

from swirl_core.stage import Shard, run_shard


# Every paid call is already journaled by the client, so a retried shard re-sends nothing that completed.
@task(name="llm-shard", retries=1, retry_delay_seconds=5, task_run_name="{shard.name}")
def shard_task(shard: Shard) -> Any:
    return run_shard(shard)


def on_task_runner(shards: Sequence[Shard]) -> Iterator[tuple[Shard, Callable[[], Any]]]:
    """Map the shards over the flow's task runner (Dask workers) and yield each as soon as it finishes."""
    futures = shard_task.with_options(name=f"{shards[0].job.stage}-shard").map(list(shards))
    owner = {future.task_run_id: shard for future, shard in zip(futures, shards, strict=True)}
    for future in as_completed(futures):
        yield owner[future.task_run_id], future.result
