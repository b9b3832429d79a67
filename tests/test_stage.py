"""The one sharded LLM stage: a shard that raises is recorded as a typed failure while the others land, under the
fingerprint shipped with them, and each shard is a Prefect task run named after it."""

from __future__ import annotations

import pickle

import pytest
from conftest import FIXTURES
from helpers import math_policy
from scripted_server import ScriptedServer, fetch_attempts, start_subprocess

from swirl_core.config import ClusterConfig, GenerateConfig, ModelConfig
from swirl_core.records import Trajectory

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")


def test_a_failing_shard_is_a_typed_failure_and_the_others_land_under_the_shipped_fingerprint(prefect_api, tmp_path,
                                                                                               monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
                                                FlowRunFilter, FlowRunFilterId)

    from swirl_core.generation import make_generate_shards, plan_generation
    from swirl_core.stage import ShardFailure, run_stage
    from swirl_core.store import Store
    from tasks.stage import on_task_runner

    monkeypatch.delenv("SWIRL_TEST_UNSET_KEY", raising=False)
    with ScriptedServer(responder=math_policy) as srv:
        config = GenerateConfig(dataset="gsm8k", data_files=[GSM8K], split="test", limit=6, samples=2, shard_size=2,
                                policy=ModelConfig(model="openai/policy", api_base=srv.base_url, concurrency=4),
                                db=str(tmp_path / "s.duckdb"), progress=False)
        plan = plan_generation(config)
        shards = make_generate_shards(plan, config, plan.work)
        assert [s.name for s in shards] == ["shard-0", "shard-1", "shard-2"]
        assert {s.fingerprint for s in shards} == {plan.policy.fingerprint}
        # What a worker receives carries the fingerprint computed by the plan: it derives none of its own.
        shipped = pickle.loads(pickle.dumps(shards[0]))
        assert vars(shipped.job.policy)["fingerprint"] == shipped.fingerprint
        # A worker without the key the config names: its shard raises before any call is made.
        shards[1] = shards[1].model_copy(update={"model": config.policy.model_copy(
            update={"api_key_env": "SWIRL_TEST_UNSET_KEY"})})
        written: dict[int, list[Trajectory]] = {}

        @flow
        def stage() -> tuple[list[ShardFailure], str]:
            from prefect.runtime import flow_run

            with Store(config.db) as store:

                def write(shard, trajectories: list[Trajectory]) -> int:
                    store.write_trajectories(trajectories, shard.run_id, shard.fingerprint)
                    written[shard.shard_id] = trajectories
                    return len(trajectories)

                return run_stage(shards, on_task_runner, write), flow_run.id

        failures, flow_run_id = stage()

        assert failures == [ShardFailure(stage="generate", shard_id=1, run_id=plan.run_id, size=4, unit="traj",
                                         error="ValueError", message="environment variable SWIRL_TEST_UNSET_KEY is not set")]
        assert str(failures[0]).startswith(f"generate shard 1 of run {plan.run_id} (4 traj): ValueError: ")
        assert sorted(written) == [0, 2] and srv.stats()["completed"] == 8 * 3  # 8 trajectories × 3 calls
        expected = {Trajectory.make_id(shards[n].job.questions[j].question_id, s, shards[n].fingerprint)
                    for n in (0, 2) for j, s in shards[n].job.work}
        with Store(config.db) as store:
            stored = store.query("SELECT trajectory_id, policy_fingerprint, run_id FROM trajectories")
        assert {r[0] for r in stored} == expected
        assert {(r[1], r[2]) for r in stored} == {(plan.policy.fingerprint, plan.run_id)}

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    states = {r.name: r.state.type.value for r in runs}
    assert states == {"shard-0": "COMPLETED", "shard-1": "FAILED", "shard-2": "COMPLETED"}
    # The flow run's progress moved past every shard, the failed one included.
    assert [(a.data, a.description.split(";")[0]) for a in artifacts] == [(100.0, "generate: 12 of 12 traj in 3 shards (3 ended)")]


def test_shards_are_sized_by_the_work():
    from swirl_core.stage import shard_sizes

    # At least one process's share of the requests in flight (32 of 64 over 2 workers) ...
    assert shard_sizes(100, processes=2, overlap=3, concurrency=64) == [32, 32, 32, 4]
    # ... and on large work, each a twelfth (1/(2 × 2 workers × 3 at once)) of what is left: large first, small last.
    sizes = shard_sizes(10_000, processes=2, overlap=3, concurrency=64)
    assert sum(sizes) == 10_000 and sizes[:3] == [834, 764, 701] and set(sizes[-12:-1]) == {32} and sizes[-1] < 32
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def _mean_in_flight(attempts: list[dict], limit: int) -> tuple[float, float]:
    """Requests in flight at the server, averaged over time, from the moment they first reach `limit` to the last
    request's arrival (after it the run only drains); and that window's length in seconds."""
    events = sorted([(a["arrived"], 1) for a in attempts] + [(a["replied"], -1) for a in attempts])
    last_arrival = max(a["arrived"] for a in attempts)
    level, start, area, previous = 0, None, 0.0, 0.0
    for at, step in events:
        if start is not None:
            area += level * (min(at, last_arrival) - previous)
        if at >= last_arrival:
            break
        level += step
        previous = at
        if start is None and level >= limit:
            start = at
    assert start is not None, "the requests in flight never reached the limit"
    return area / (last_arrival - start), last_arrival - start


@pytest.mark.slow
def test_no_barrier_between_shards_the_in_flight_budget_stays_full(prefect_api, tmp_path):
    """200 trajectories in shards sized by the work over two Dask workers that may hold 4 requests each: measured at
    the server, the requests in flight stay near the limit across the shards' boundaries (a worker that waited for
    each shard's slowest trajectory before starting the next would fall towards 0 at each of them, and one left with
    a large last shard would run alone at half the limit), and every shard is still a task run of its own."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.generate import run_generate

    limit = 8
    # Its own process (own GIL): this one runs the flow, whose work must not delay the server's replies.
    proc, base_url = start_subprocess(latency=0.25, scripts={"Question:": [
        "First add. <math_exp>2 + 3</math_exp>", "Then double it. <math_exp>(2 + 3) * 2</math_exp>", "<answer>10</answer>"]})
    try:
        config = GenerateConfig(dataset="gsm8k", data_files=[GSM8K], split="test", limit=20, samples=10,
                                policy=ModelConfig(model="openai/policy", api_base=base_url, concurrency=limit),
                                db=str(tmp_path / "s.duckdb"), cluster=ClusterConfig(n_workers=2), progress=False)
        result = run_generate(config)
        attempts = fetch_attempts(base_url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert result["status"] == "completed" and result["trajectories"] == 200 and len(attempts) == 600
    mean, window_s = _mean_in_flight(attempts, limit)
    assert mean >= 0.8 * limit, (mean, window_s)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["generate"])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)[0]  # this test's, just finished
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert len(runs) >= 10 and sorted(r.name for r in runs) == sorted(f"shard-{n}" for n in range(len(runs)))
    assert {r.state.type.value for r in runs} == {"COMPLETED"}
