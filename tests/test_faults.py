"""Fault matrix: the LLM client and both flows against a scripted server that misbehaves at random.

Every attempt draws its fault from an RNG seeded with (seed, body digest, attempt number): 30% 429 with a
fractional Retry-After, 10% 500, 5% hanging past the client's timeout, 5% malformed JSON, 5% a body cut off
before its Content-Length. The server logs each attempt's arrival and reply times, so the retry budget and
Retry-After are checked where they matter: at the server. Results to show: every request, trajectory and
judgment either completes or is recorded as failed with its reason, nothing is lost, nothing paid twice.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import duckdb
import orjson
import pytest
from conftest import FIXTURES
from helpers import math_policy, query
from scripted_server import Faults, ScriptedServer

from swirl_core.config import ClusterConfig, CurateConfig, GenerateConfig, ModelConfig
from swirl_core.llm.base import ChatRequest, LLMError
from swirl_core.llm.factory import build_client

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
MAX_RETRIES = 3  # the retry budget: at most MAX_RETRIES + 1 attempts per request
TIMEOUT_S = 0.5  # per attempt; a hang sleeps HANG_S, far past it
HANG_S = 2.0
FAULT_RATES = {"rate_limit": 0.30, "server_error": 0.10, "hang": 0.05, "malformed": 0.05, "truncated": 0.05}
# What the client's final error says after each kind of fault on its last attempt.
REASONS = {"rate_limit": "HTTP 429", "server_error": "HTTP 500", "hang": "timeout after",
           "malformed": "malformed response body", "truncated": "connection error"}


def fault_matrix(seed: int) -> Faults:
    return Faults(p_rate_limit=FAULT_RATES["rate_limit"], p_server_error=FAULT_RATES["server_error"],
                  p_hang=FAULT_RATES["hang"], p_malformed=FAULT_RATES["malformed"],
                  p_truncated=FAULT_RATES["truncated"], seed=seed, retry_after_s=0.05, retry_after_max_s=0.4,
                  slow_s=HANG_S)


# -- reporting ----------------------------------------------------------------------------------------
def report(name: str, figures: dict, record_property=None) -> None:
    """Print a test's figures and append them as one JSON line to $SWIRL_TEST_FIGURES (default: a temp file)."""
    line = json.dumps({"test": name, **figures}, default=str, sort_keys=True)
    print(f"\nFIGURES {line}")
    path = Path(os.environ.get("SWIRL_TEST_FIGURES") or Path(tempfile.gettempdir()) / "swirl-test-figures.jsonl")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    if record_property is not None:
        for key, value in figures.items():
            record_property(key, json.dumps(value, default=str))


# -- checks at the server -------------------------------------------------------------------------------
def check_retries(log: list[dict], budget: int, boundaries: list[float] = ()) -> dict:
    """Group attempts by body and by run (runs split at `boundaries`, wall-clock times), then assert at the
    server: at most budget + 1 attempts per body per run; nothing sent again after it completed; after a
    429, the next attempt arrived no earlier than its Retry-After. Returns the figures."""
    calls: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for e in log:
        run = sum(e["arrived"] >= b for b in boundaries)
        calls[(e["digest"], run)].append(e)
    waits, per_call = [], collections.Counter()
    for (digest, run), attempts in calls.items():
        attempts.sort(key=lambda e: e["attempt"])
        assert len(attempts) <= budget + 1, f"{digest[:12]} run {run}: {len(attempts)} attempts > budget {budget} + 1"
        per_call[len(attempts)] += 1
        done = [i for i, e in enumerate(attempts) if e["completed"]]
        assert done in ([], [len(attempts) - 1]), f"{digest[:12]}: sent again after it completed"
        for prev, nxt in zip(attempts, attempts[1:]):
            if prev["status"] == 429:
                waited = nxt["arrived"] - prev["replied"]
                assert waited >= prev["retry_after"] - 1e-3, (
                    f"{digest[:12]}: retried {waited:.3f}s after a 429 with Retry-After {prev['retry_after']}")
                waits.append(waited - prev["retry_after"])
    faults = collections.Counter(e["fault"] or "none" for e in log)
    return {"attempts": len(log), "faults_injected": dict(faults), "requests": len(calls),
            "attempts_per_request": dict(sorted(per_call.items())), "retries_after_429": len(waits),
            "min_slack_after_retry_after_s": round(min(waits), 4) if waits else None}


def last_fault(log: list[dict], digest: str) -> str | None:
    return max((e for e in log if e["digest"] == digest), key=lambda e: e["arrived"])["fault"]


# -- the client alone -------------------------------------------------------------------------------------
def test_client_fault_matrix_every_request_completes_or_fails_with_its_reason(tmp_path, record_property):
    """200 distinct requests through the real client (journal, retries, aiohttp) at 16 in flight; failures
    are resent in later passes until all complete. Each failure names its last fault; nothing is paid twice."""
    started = time.perf_counter()
    journal = tmp_path / "journal"
    cfg = lambda srv: ModelConfig(model="openai/m", api_base=srv.base_url, concurrency=16,  # noqa: E731
                                  timeout_s=TIMEOUT_S, max_retries=MAX_RETRIES)
    requests = [ChatRequest(model="openai/m", messages=[{"role": "user", "content": f"Question {i}: 2+{i}?"}],
                            max_tokens=32) for i in range(200)]
    with ScriptedServer(responder=lambda body: "<answer>" + body["messages"][-1]["content"] + "</answer>",
                        faults=fault_matrix(seed=2026)) as srv:

        async def one_pass():
            client = build_client(cfg(srv), journal, tags={"run_id": "faults", "purpose": "policy"})
            try:
                results = await asyncio.gather(*(client.complete(r) for r in requests), return_exceptions=True)
                digests = [hashlib.sha256(orjson.dumps(client.backend.payload(r))).hexdigest() for r in requests]
                return results, digests, dict(client.stats)
            finally:
                await client.aclose()

        passes, boundaries, failed_by_reason = [], [], collections.Counter()
        for n in range(6):
            if n:
                boundaries.append(time.time())
            results, digests, stats = asyncio.run(one_pass())
            log = srv.attempt_log()
            failures = 0
            for request, result, digest in zip(requests, results, digests):
                if isinstance(result, BaseException):
                    assert isinstance(result, LLMError), repr(result)  # nothing but a recorded LLM failure
                    fault = last_fault(log, digest)
                    assert f"gave up after {MAX_RETRIES + 1} attempts" in str(result) and REASONS[fault] in str(result), (
                        fault, str(result))
                    failed_by_reason[fault] += 1
                    failures += 1
                else:
                    assert result.text == "<answer>" + request.messages[-1]["content"] + "</answer>"
            passes.append({"sent": stats["sent"], "cache_hits": stats["cache_hits"], "failed": failures})
            if not failures:
                break
        log = srv.attempt_log()
        figures = check_retries(log, MAX_RETRIES, boundaries)
        completed = srv.stats()["completed"]
        assert srv.completed_twice() == [] and completed == len(requests)  # each paid exactly once, none lost
        assert failures == 0 and len(passes) > 1, passes
        # Every pass after the first resends only what failed before: completed requests replay from the journal.
        for prev, cur in zip(passes, passes[1:]):
            assert cur["cache_hits"] == len(requests) - prev["failed"]
        journal_keys = [r["key"] for p in journal.glob("calls-*.jsonl") for line in p.read_bytes().splitlines()
                        if "key" in (r := orjson.loads(line))]
        assert len(journal_keys) == len(set(journal_keys)) == len(requests)
    assert failed_by_reason, "the matrix should make some requests exhaust their retry budget"
    assert set(figures["faults_injected"]) == {"none", *FAULT_RATES}  # every kind of fault was injected
    figures.update(passes=passes, failed_by_last_fault=dict(failed_by_reason), completed=completed,
                   requests_repaid=0, requests_lost=0, wall_s=round(time.perf_counter() - started, 2))
    report("client_fault_matrix", figures, record_property)


# -- both flows on a long-lived Dask cluster ---------------------------------------------------------
def _dispatch(body: dict) -> str:
    """The policy (scripted math steps), the process judge (calculator steps GOOD, answers BAD) and the grader."""
    last = body["messages"][-1]["content"]
    if "Last message to evaluate:" in last:
        action = last.rsplit("Last message to evaluate:", 1)[1]
        return "Uses the calculator on the question's numbers.\nGOOD" if "<math_exp>" in action else "Unsupported.\nBAD"
    if "Am I correct?" in last:
        return "42 is not the answer key.\nNO"
    return math_policy(body)


def duplicate_rows(db: Path) -> dict[str, int]:
    """count(*) - count(DISTINCT key) per table and key (0 everywhere = no duplicate rows)."""
    keys = {"trajectories": ["trajectory_id", "question_id, sample_index, policy_fingerprint"],
            "steps": ["trajectory_id, step_index"], "llm_calls": ["call_key"],
            "judgments": ["judgment_id", "trajectory_id, step_index, sample_index, judge_fingerprint"],
            "grades": ["trajectory_id, method"], "questions": ["question_id"]}
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {f"{table}({key})": con.execute(f"SELECT count(*) - count(DISTINCT ({key})) FROM {table}").fetchone()[0]
                for table, ks in keys.items() for key in ks}
    finally:
        con.close()


@pytest.mark.slow
def test_flows_under_the_fault_matrix_record_every_failure_and_lose_nothing(prefect_api, tmp_path, record_property):
    """Generation then curation on one long-lived LocalCluster (the `--scheduler-address` path) under the fault
    matrix. After each run every planned trajectory and every step's judgment is stored, complete or failed
    with its reason; reruns finish the failed ones, replaying journaled calls on whichever worker gets them."""
    from distributed import LocalCluster

    from flows.curate import run_curate
    from flows.generate import run_generate

    started = time.perf_counter()
    db = tmp_path / "swirl.duckdb"
    questions, samples = 8, 2
    planned = questions * samples
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      local_directory=str(tmp_path / "dask")) as cluster, \
            ScriptedServer(responder=_dispatch, faults=fault_matrix(seed=7)) as srv:
        model = lambda name: ModelConfig(model=name, api_base=srv.base_url, concurrency=4,  # noqa: E731
                                         timeout_s=TIMEOUT_S, max_retries=MAX_RETRIES, temperature=0.0)
        on_cluster = ClusterConfig(address=cluster.scheduler_address)
        gen = GenerateConfig(dataset="gsm8k", data_files=[GSM8K], split="test", limit=questions, samples=samples,
                             shard_size=2, policy=model("openai/policy"), db=str(db), cluster=on_cluster, progress=False)
        cur = CurateConfig(db=str(db), judge=model("openai/judge"), grader="llm", shard_size=8, cluster=on_cluster,
                           progress=False, probe_limit=0)
        boundaries, gen_runs, cur_runs = [], [], []

        # Generation: each run stores every planned trajectory; an error row carries the client's reason.
        for _ in range(8):
            boundaries.append(time.time())
            result = run_generate(gen)
            assert result["status"] == "completed" and result["shard_failures"] == []
            rows = query(db, "SELECT status, error FROM trajectories")
            assert len(rows) == planned  # nothing lost, failed or not
            errors = [e for s, e in rows if s == "error"]
            assert all(s in ("answered", "error") for s, _ in rows)
            assert all(f"gave up after {MAX_RETRIES + 1} attempts" in (e or "") for e in errors), errors
            gen_runs.append({"errors": len(errors), "error_reasons": sorted({e.split(": ", 2)[-1][:40] for e in errors})})
            assert srv.completed_twice() == []  # a resumed trajectory replays its journaled steps for free
            if not errors:
                break
        assert gen_runs[-1]["errors"] == 0 and len(gen_runs) > 1, gen_runs
        assert query(db, "SELECT count(*) FROM steps") == [(planned * 3,)]

        # Curation: every sub-trajectory gets a judgment; a failed call is stored as UNKNOWN with its reason
        # and judged again by the next run, which touches nothing else.
        steps_total = planned * 3
        pending_before = steps_total
        for _ in range(8):
            boundaries.append(time.time())
            result = run_curate(cur)
            assert result["status"] == "completed" and result["shard_failures"] == []
            assert result["judged_steps"] == pending_before  # only what was missing or had failed
            judged = query(db, "SELECT verdict, error FROM judgments")
            assert len(judged) == steps_total  # one per step, nothing lost
            failed = [e for v, e in judged if e is not None]
            assert all(f"gave up after {MAX_RETRIES + 1} attempts" in e for e in failed), failed
            assert query(db, "SELECT count(*) FROM judgments WHERE error IS NOT NULL AND verdict <> 'UNKNOWN'") == [(0,)]
            graded = query(db, "SELECT count(*) FROM grades WHERE method = 'llm'")[0][0]
            cur_runs.append({"judged": result["judged_steps"], "failed_judgments": len(failed), "llm_grades": graded})
            assert srv.completed_twice() == []
            pending_before = len(failed)
            if not failed and graded == planned:
                break
        assert cur_runs[-1]["failed_judgments"] == 0 and len(cur_runs) > 1, cur_runs
        # The verdicts are what the scripted judge says of each step, as if no fault had happened.
        assert dict(query(db, "SELECT verdict, count(*) FROM judgments GROUP BY 1")) == {"GOOD": planned * 2, "BAD": planned}
        assert query(db, "SELECT count(*), count(*) FILTER (WHERE NOT correct) FROM grades WHERE method = 'llm'") == [(planned, planned)]

        log = srv.attempt_log()
        figures = check_retries(log, MAX_RETRIES, boundaries[1:])
        completed = srv.stats()["completed"]
        paid = query(db, "SELECT count(*) FROM llm_calls")[0][0]
        assert paid == completed  # every paid response is in the ledger, once
    assert duplicate_rows(db) == dict.fromkeys(duplicate_rows(db), 0)
    assert query(db, "SELECT kind, status FROM runs ORDER BY kind") == [("curate", "completed"), ("generate", "completed")]
    assert set(figures["faults_injected"]) == {"none", *FAULT_RATES}
    figures.update(generate_runs=gen_runs, curate_runs=cur_runs, completed=completed, llm_calls=paid,
                   requests_repaid=0, rows_lost=0, wall_s=round(time.perf_counter() - started, 2))
    report("flows_fault_matrix", figures, record_property)
