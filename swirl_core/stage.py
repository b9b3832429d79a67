"""One sharded LLM stage (generate, judge, grade, calibrate): the shard, the work it carries, and the runner.

A `Shard` ships everything its worker needs, resolved once by the flow process: the model's endpoint config
(to build the client), the stage's resolved spec and items (its `Job`) and the fingerprint its results are
stored under, so a worker derives nothing that the stored rows depend on. `run_shard` runs one on a worker;
`run_stage` maps shards over an executor (the orchestrator's: tasks/stage.py), writes each shard's results
the moment they arrive (this process is the single DuckDB writer), shows the stage's live progress and records a
shard that raised as a `ShardFailure` while the others still land.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, Field, SerializeAsAny

from swirl_core.config import ClusterConfig
from swirl_core.llm.client import LLMClient
from swirl_core.llm.config import ModelConfig
from swirl_core.llm.factory import run_with_client
from swirl_core.progress import CallTally, ShardMeter, StageProgress, publisher


class Job(BaseModel, ABC):
    """A stage's resolved spec and one shard's items: what one client does with them."""

    stage: ClassVar[str]  # names the Prefect task (`<stage>-shard`) and the progress bar
    run_prefix: ClassVar[str]  # task runs are named `<run_prefix>-<shard_id>`
    purpose: ClassVar[str]  # tag of every call in the ledger
    unit: ClassVar[str]  # what `size` counts

    @property
    @abstractmethod
    def size(self) -> int:
        """Units of work in the shard (the progress bar's)."""

    @abstractmethod
    async def run(self, client: LLMClient) -> Any:
        """Work the items with `client`; every paid response is journaled by it. Count each unit on
        `client.meter.unit_done` as it finishes: the live progress moves with it."""


class Shard(BaseModel):
    """A unit of work for one Dask task."""

    shard_id: int
    run_id: str
    job: SerializeAsAny[Job]
    model: ModelConfig  # the endpoint, limits and key reference the worker builds its client from
    fingerprint: str | None  # what the results are stored under (policy or judge); None: they carry none
    journal_dir: str
    fsync: bool = False
    processes: int = Field(1, ge=1)  # that run the stage's shards at once: each gets an even share of the limits
    progress_topic: str | None = None  # where the shard reports its live progress (swirl_core/progress.py)

    @property
    def name(self) -> str:
        return f"{self.job.run_prefix}-{self.shard_id}"


def make_shards(jobs: Iterable[Job], *, run_id: str, model: ModelConfig, fingerprint: str | None,
                journal_dir: str, fsync: bool = False) -> list[Shard]:
    """Number the jobs of one stage run as its shards; they share everything else."""
    return [Shard(shard_id=n, run_id=run_id, job=job, model=model, fingerprint=fingerprint,
                  journal_dir=journal_dir, fsync=fsync) for n, job in enumerate(jobs)]


def run_shard(shard: Shard) -> Any:
    """Run one shard to completion in this process (a Dask worker, or the flow itself)."""
    topic = shard.progress_topic
    meter = ShardMeter(shard.shard_id, publisher(topic, shard.journal_dir) if topic else None)
    try:
        return run_with_client(shard.model.shared_by(shard.processes), shard.journal_dir, shard.job.run,
                               fsync=shard.fsync, tags={"run_id": shard.run_id, "purpose": shard.job.purpose}, meter=meter)
    finally:
        meter.flush(final=True)


def default_workers(cluster: ClusterConfig, model: ModelConfig) -> int:
    # One in-process model per worker: on a small machine one worker with batching beats two copies. No more
    # workers than requests allowed in flight: each holds at least one.
    return min(cluster.n_workers or (1 if model.is_local else 2), model.concurrency)


def shards_per_worker(cluster: ClusterConfig, model: ModelConfig) -> int:
    # No barrier between shards: a worker runs several at once (its threads), and they share the process's
    # limiter and in-flight semaphore, so while one shard tails on its slowest trajectory the next one already
    # fills the slots it frees. An in-process model batches within one shard instead: a second one would contend.
    return cluster.shards_per_worker or (1 if model.is_local else 3)


def shard_sizes(total: int, processes: int, overlap: int, concurrency: int) -> list[int]:
    """Units per shard, in the order they run (guided self-scheduling): each takes 1/(2 × the shards running at
    once) of what is left, and at least one process's share of the requests in flight (so its fixed orchestration
    cost is spread over that many units). The first shards are large, the last small: no worker is left with a
    large shard while the others, done, leave their share of the limits unused."""
    share = max(1, concurrency // max(1, processes))
    running = max(1, processes * overlap)
    sizes, left = [], total
    while left > 0:
        sizes.append(min(left, max(share, -(-left // (2 * running)))))
        left -= sizes[-1]
    return sizes


class ShardFailure(BaseModel):
    """A shard that raised (after the orchestrator's retries): its results are missing, the others landed.
    Every call it paid for is journaled, so a rerun resumes it for free."""

    stage: str
    shard_id: int
    run_id: str
    size: int
    unit: str
    error: str  # the exception's class
    message: str

    @classmethod
    def of(cls, shard: Shard, exc: BaseException) -> ShardFailure:
        return cls(stage=shard.job.stage, shard_id=shard.shard_id, run_id=shard.run_id, size=shard.job.size,
                   unit=shard.job.unit, error=type(exc).__name__, message=str(exc))

    def __str__(self) -> str:
        return f"{self.stage} shard {self.shard_id} of run {self.run_id} ({self.size} {self.unit}): {self.error}: {self.message}"


class StageFailed(RuntimeError):
    """A stage whose every result is needed (calibration, the judge probe) lost a shard."""

    def __init__(self, failures: Sequence[ShardFailure]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(map(str, failures)))


# Yields each shard as it finishes, in completion order, with a call that returns its results or raises its error.
# The writer counts what each yield completes, so an executor that streams a shard's results in batches (the
# same shard yielded once per batch) plugs in without changing a stage's writer.
Executor = Callable[[Sequence[Shard]], Iterator[tuple[Shard, Callable[[], Any]]]]
# Stores one shard's results and returns how many units of work they complete.
Writer = Callable[[Shard, Any], int]


def run_stage(shards: Sequence[Shard], execute: Executor, write: Writer, *, progress: bool = False,
              logger: logging.Logger | logging.LoggerAdapter | None = None, calls: CallTally | None = None) -> list[ShardFailure]:
    """Run the shards of one stage and write each one's results as it arrives; a failed shard is recorded,
    not fatal (a failing write is: nothing may claim to be stored that is not). The shards report their
    progress while they run (a bar on the terminal with `progress`); the stage's calls are added to `calls`."""
    if not shards:
        return []
    failures: list[ShardFailure] = []
    with StageProgress(shards, bar=progress) as live:
        for shard, result in execute([s.model_copy(update={"progress_topic": live.topic}) for s in shards]):
            try:
                results = result()
            except Exception as exc:  # one bad shard must not lose the others' results
                failures.append(failure := ShardFailure.of(shard, exc))
                live.failed(shard)
                if logger is not None:
                    logger.error("shard failed: %s", failure)
                continue
            live.landed(shard, write(shard, results))
    totals = live.snapshot().calls
    if logger is not None:
        logger.info("%s: %s", live.stage, totals.describe())
    if calls is not None:
        calls.add(totals)
    return failures
