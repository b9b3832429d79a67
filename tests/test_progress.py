"""Live progress: a stage's progress artifact (read back through the Prefect API) and its terminal bar move per
trajectory while the shards still run, on the threads runner and on Dask workers in other processes; a rerun that
only resumes says how many calls it replayed for free and pays nothing at the server."""

from __future__ import annotations

import re
import threading
import time

import pytest
from conftest import FIXTURES
from helpers import math_policy
from scripted_server import Faults, ScriptedServer

from swirl_core.config import GenerateConfig, ModelConfig
from swirl_core.llm.cache import CallJournal

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")


def uneven_policy(body: dict) -> str:
    """math_policy's three steps for sample 0, an answer at once for sample 1 (the request's seed): trajectories
    end at different times, as they do with a real model."""
    return "<answer>42</answer>" if body["seed"] == 1 else math_policy(body)


UNEVEN_CALLS = 4 * 3 + 4  # 4 questions: sample 0 in three calls, sample 1 in one


def _config(srv: ScriptedServer, tmp_path, **update) -> GenerateConfig:
    # 4 questions × 2 samples in 2 shards of 4 trajectories, 2 requests in flight: with replies slowed to 0.5 s
    # a shard takes a few seconds.
    return GenerateConfig(**{"dataset": "gsm8k", "data_files": [GSM8K], "split": "test", "limit": 4, "samples": 2,
                             "shard_size": 2, "db": str(tmp_path / "p.duckdb"), "progress": True,
                             "policy": ModelConfig(model="openai/policy", api_base=srv.base_url, concurrency=2)} | update)


class ArtifactWatch:
    """Reads a flow run's progress artifact through the Prefect API every 0.2 s, from a thread of its own."""

    def __init__(self, flow_run_id) -> None:
        self.flow_run_id = flow_run_id
        self.seen: list[tuple[float, float, str]] = []  # (time, percent, description)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

        with get_client(sync_client=True) as client:
            while not self._stop.wait(0.2):
                artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[self.flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
                self.seen += [(time.monotonic(), a.data, a.description) for a in artifacts]

    def stop(self) -> list[tuple[float, float, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen


def _stage_flow(config: GenerateConfig, task_runner=None):
    """A flow that runs generation's shards as one stage, watching its progress artifact meanwhile; returns the
    times shards landed, what the watch saw, the stage's calls and the final artifact."""
    from prefect import flow

    from swirl_core.generation import make_generate_shards, plan_generation
    from swirl_core.progress import CallTally
    from swirl_core.stage import run_stage
    from tasks.stage import on_task_runner, worker_processes

    plan = plan_generation(config)

    @flow(**({"task_runner": task_runner} if task_runner else {}))
    def stage():
        from prefect.runtime import flow_run

        landed: list[float] = []
        calls = CallTally()
        watch = ArtifactWatch(flow_run.id)
        shards = make_generate_shards(plan, config, plan.work, processes=worker_processes())
        assert len(shards) == 2
        failures = run_stage(shards, on_task_runner, lambda shard, trajectories: landed.append(time.monotonic())
                             or len(trajectories), progress=config.progress, calls=calls)
        time.sleep(0.5)  # one more read of the final state
        return failures, landed, watch.stop(), calls

    return stage()


def _assert_moved_before_the_first_shard_landed(landed, seen, trajectories, paid):
    assert len(landed) == 2
    early = [(percent, text) for t, percent, text in seen if t < min(landed) and 0 < percent < 100]
    assert early, f"the artifact did not move before the first shard landed: {seen}"
    assert all(re.match(rf"generate: \d of {trajectories} traj in 2 shards \(0 ended\); [\d.]+ calls/s; [1-9]\d* calls paid", text)
               for _, text in early), early
    percent, text = seen[-1][1:]
    assert percent == 100.0 and text.startswith(f"generate: {trajectories} of {trajectories} traj in 2 shards (2 ended)")
    assert f"{paid} calls paid" in text and "0 replayed from the journal" in text


@pytest.mark.slow
def test_progress_moves_per_trajectory_on_the_threads_runner(prefect_api, tmp_path, capfd):
    with ScriptedServer(responder=uneven_policy, faults=Faults(latency_s=0.5)) as srv:
        failures, landed, seen, calls = _stage_flow(_config(srv, tmp_path))
        paid = srv.stats()["completed"]
        assert failures == [] and paid == UNEVEN_CALLS
    _assert_moved_before_the_first_shard_landed(landed, seen, 8, paid)
    assert (calls.paid, calls.replayed, calls.unpriced) == (paid, 0, paid)  # the scripted model has no price
    assert calls.prompt_tokens > 0 and calls.completion_tokens > 0
    # The terminal bar moved through the trajectories with its calls/s, tokens and cost.
    bar = capfd.readouterr().err
    assert re.search(r"generate: +\d+%.*\b[1-7]/8 \[.*calls/s, [1-9]\d* paid, [\d,]+ tok, \$0\.0000\+\?, 0 replayed free", bar), bar
    assert "8/8" in bar and f"{paid} paid" in bar


@pytest.mark.slow
def test_progress_moves_while_shards_run_on_dask_workers_in_other_processes(prefect_api, tmp_path):
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
        "local_directory": str(tmp_path / "dask")})
    # One request in flight per worker (the run's 2 split over 2): slower replies keep a shard running for seconds.
    with ScriptedServer(responder=uneven_policy, faults=Faults(latency_s=0.5)) as srv:
        failures, landed, seen, calls = _stage_flow(_config(srv, tmp_path, progress=False), runner)
        paid = srv.stats()["completed"]
        assert failures == [] and paid == UNEVEN_CALLS
    _assert_moved_before_the_first_shard_landed(landed, seen, 8, paid)
    assert (calls.paid, calls.replayed) == (paid, 0)


def test_a_retried_shard_adds_its_calls_but_not_its_units(tmp_path):
    from swirl_core.agent import PolicySpec
    from swirl_core.generation import GenerateJob
    from swirl_core.llm.config import ModelConfig as Model
    from swirl_core.progress import ShardMeter, StageProgress
    from swirl_core.records import Question
    from swirl_core.stage import Shard

    question = Question(question_id="q", dataset="gsm8k", split="test", source_id="0", task="math", question="?", answer="1")
    job = GenerateJob(policy=PolicySpec(model="m", task="math", max_steps=3), questions=[question], work=[(0, 0), (0, 1)],
                      corpus_path=None, search_k=1)
    shard = Shard(shard_id=0, run_id="r", job=job, model=Model(model="openai/m"), fingerprint="f",
                  journal_dir=str(tmp_path / "journal"))
    with StageProgress([shard]) as live:
        first = ShardMeter(0, live.receive, interval_s=0)
        first.paid(10, 2, 0.5)
        first.unit_done()
        first.flush(final=True)  # the attempt raised after one trajectory; the retry replays its call
        retry = ShardMeter(0, live.receive, interval_s=0)
        retry.replayed(0.5)
        retry.unit_done()
        retry.paid(10, 2, None)
        snapshot = live.snapshot()
        assert (snapshot.units, snapshot.calls.paid, snapshot.calls.replayed) == (1, 2, 1)
        assert (snapshot.calls.tokens, snapshot.calls.cost_usd, snapshot.calls.unpriced) == (24, 0.5, 1)
        retry.unit_done()
        live.landed(shard, 2)
        assert live.snapshot().units == 2 == live.snapshot().total


async def test_a_shard_reports_its_last_change_within_the_interval_without_waiting_for_another():
    import asyncio

    from swirl_core.progress import ShardMeter, ShardReport

    sent: list[ShardReport] = []
    meter = ShardMeter(3, lambda message: sent.append(ShardReport.of(message)), interval_s=0.2)
    meter.paid(5, 1, None)  # the first change is sent at once
    meter.unit_done()  # within the interval: sent at its end
    assert [r.units for r in sent] == [0]
    await asyncio.sleep(0.3)
    assert [(r.units, r.calls.paid, r.final) for r in sent] == [(0, 1, False), (1, 1, False)]
    meter.flush(final=True)
    assert sent[-1].final and sent[-1].shard_id == 3


def test_a_rerun_that_only_resumes_says_what_it_replays_for_free(prefect_api, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    from flows.cli import _print_generation
    from flows.generate import generate

    with ScriptedServer(responder=math_policy) as srv:
        first = generate(_config(srv, tmp_path, work_dir=str(tmp_path / "work"), progress=False))
        assert (first["calls"].paid, first["calls"].replayed) == (24, 0) == (srv.stats()["completed"], 0)
        # The run interrupted before any trajectory was stored: its journal holds every call, its database none.
        journaled = len(CallJournal(tmp_path / "work" / "journal"))
        again = generate(_config(srv, tmp_path, work_dir=str(tmp_path / "work"), db=str(tmp_path / "fresh.duckdb"),
                                 progress=False))
        assert again["trajectories"] == 8 and srv.stats()["total"] == 24  # nothing sent again
    assert (again["calls"].paid, again["calls"].replayed) == (0, journaled) == (0, 24)
    _print_generation(again)
    assert "calls: 0 calls paid (0 tokens, $0.0000), 24 replayed from the journal for free" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        summary = client.read_latest_artifacts()
    markdown = next(a.data for a in summary if a.key == "generate-summary")
    assert "- this run: 0 calls paid (0 tokens, $0.0000), 24 replayed from the journal for free" in markdown


@pytest.mark.slow
def test_progress_moves_while_shards_run_in_a_process_pool(prefect_api, tmp_path):
    from prefect.task_runners import ProcessPoolTaskRunner

    # Each pool process has the whole concurrency of 2 to itself: slower replies keep a shard running for seconds.
    with ScriptedServer(responder=uneven_policy, faults=Faults(latency_s=0.75)) as srv:
        failures, landed, seen, calls = _stage_flow(_config(srv, tmp_path, progress=False),
                                                    ProcessPoolTaskRunner(max_workers=2))
        paid = srv.stats()["completed"]
        assert failures == [] and paid == UNEVEN_CALLS
    # Each pool process holds one shard and reports through a file beside the journals, removed at the end.
    _assert_moved_before_the_first_shard_landed(landed, seen, 8, paid)
    assert (calls.paid, calls.replayed) == (paid, 0)
    assert not list((tmp_path / "p.work" / "progress").glob("*.jsonl"))
