"""The Prefect task of every sharded LLM stage: what Prefect adds to `run_shard` (a task run per shard, named
after it, with its state, and a retry) and the executor that maps shards over the flow's task runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from swirl_core.stage import Shard, run_shard


# Every paid call is already journaled by the client, so a retried shard re-sends nothing that completed; and
# nothing is cached or persisted by Prefect (which would hash every shard's input and store its result).
@task(name="llm-shard", retries=1, retry_delay_seconds=5, task_run_name="{shard.name}", persist_result=False)
def shard_task(shard: Shard) -> Any:
    return run_shard(shard)


def worker_processes() -> int:
    """How many processes the flow's task runner runs tasks in: Dask's workers (each a process); any other
    runner runs them in this process, whose threads share its limiters."""
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return max(1, len(runner.client.nthreads())) if isinstance(runner, DaskTaskRunner) else 1


def on_task_runner(shards: Sequence[Shard]) -> Iterator[tuple[Shard, Callable[[], Any]]]:
    """Map the shards over the flow's task runner (Dask workers) and yield each as soon as it finishes, moving
    the flow run's progress artifact. The model's limits are split between the processes that can hold its
    shards at once."""
    processes = min(worker_processes(), len(shards))
    shards = [shard.model_copy(update={"processes": processes}) for shard in shards]
    futures = shard_task.with_options(name=f"{shards[0].job.stage}-shard").map(list(shards))
    owner = {future.task_run_id: shard for future, shard in zip(futures, shards, strict=True)}
    job, total, done = shards[0].job, sum(shard.job.size for shard in shards), 0
    describe = f"{job.stage}: {{}} of {total} {job.unit} in {len(shards)} shards".format
    artifact = create_progress_artifact(0.0, description=describe(0))
    for future in as_completed(futures):
        shard = owner[future.task_run_id]
        yield shard, future.result
        done += shard.job.size  # finished, whether its results landed or it failed: the run moved past it
        update_progress_artifact(artifact, 100.0 * done / total, description=describe(done))
