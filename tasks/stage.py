"""The Prefect task of every sharded LLM stage: what Prefect adds to `run_shard` (a task run per shard, named
after it, with its state, and a retry) and the executor that maps shards over the flow's task runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from swirl_core.progress import live_stage
from swirl_core.stage import Shard, run_shard


# Every paid call is already journaled by the client, so a retried shard re-sends nothing that completed; and
# nothing is cached or persisted by Prefect (which would hash every shard's input and store its result).
@task(name="llm-shard", retries=1, retry_delay_seconds=5, task_run_name="{shard.name}", persist_result=False)
def shard_task(shard: Shard) -> Any:
    return run_shard(shard)


def _dask_client():
    """The Dask client of the flow's task runner, None when it runs tasks in this process."""
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return runner.client if isinstance(runner, DaskTaskRunner) else None


def worker_processes() -> int:
    """How many processes the flow's task runner runs tasks in: Dask's workers (each a process); any other
    runner runs them in this process, whose threads share its limiters."""
    client = _dask_client()
    return max(1, len(client.nthreads())) if client is not None else 1


def on_task_runner(shards: Sequence[Shard]) -> Iterator[tuple[Shard, Callable[[], Any]]]:
    """Map the shards over the flow's task runner (Dask workers) and yield each as soon as it finishes. The
    model's limits are split between the processes that can hold its shards at once. The flow run's progress
    artifact follows the stage's live progress (`run_stage`'s), at most once a second: on Dask, the shards'
    reports come through the scheduler's events (swirl_core/progress.py says why)."""
    processes = min(worker_processes(), len(shards))
    shards = [shard.model_copy(update={"processes": processes}) for shard in shards]
    live = live_stage(shards[0].progress_topic)
    artifact = create_progress_artifact(0.0, description=live.snapshot().describe())
    live.add_sink(lambda snapshot: update_progress_artifact(artifact, snapshot.percent, description=snapshot.describe()))
    dask = _dask_client()
    if dask is not None:  # before the shards start, so that their first reports find the subscription
        dask.subscribe_topic(live.topic, lambda event: live.receive(event[1]))
    try:
        futures = shard_task.with_options(name=f"{shards[0].job.stage}-shard").map(list(shards))
        owner = {future.task_run_id: shard for future, shard in zip(futures, shards, strict=True)}
        for future in as_completed(futures):
            yield owner[future.task_run_id], future.result
        live.await_finals()  # the shards' last reports may still be on their way through the scheduler
    finally:
        if dask is not None:
            dask.unsubscribe_topic(live.topic)
