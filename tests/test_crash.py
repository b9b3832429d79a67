"""Crash consistency: `swirl generate` and `swirl curate` SIGKILLed at random points, and a Dask worker killed
mid-shard, against scripted model servers running as their own processes.

Each CLI run is a process group (the flow process and its LocalCluster's nanny and worker processes); a kill
takes the whole group with SIGKILL, at a point drawn from a seeded RNG: either a time since the start (start-up:
imports, Prefect flow run, DuckDB open and schema, the Dask cluster coming up, the first shards) or after the
server completed a drawn number of further requests (mid-run: shards in flight, results being written, journals
ingested). After each kill the same command runs again, so every kill is followed by a resume; a final clean run
must finish. What must hold, at the server and in DuckDB:

* no completed request is ever sent again (the server counts completions per distinct request body);
* no duplicate rows, after every kill and at the end;
* at the end every planned trajectory and every step's judgment is stored and each run is `completed`.

A server counts a request completed when it writes the reply, so a client killed while a reply is on the wire
never had it, and a rerun rightly sends it again. The kills therefore go through a `FreezeGate` (tests/helpers.py):
new requests are held, the server answers what it has, the client gets a moment to journal those replies, then
the kill. Everything else about the kill point is random.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import psutil
import pytest
from conftest import FIXTURES, ROOT
from helpers import FreezeGate, query, wait_drained
from scripted_server import fetch_stats, start_subprocess
from test_faults import duplicate_rows, report

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
SEED = 20260815
QUESTIONS, SAMPLES, STEPS = 8, 2, 3
PLANNED_TRAJECTORIES = QUESTIONS * SAMPLES
POLICY_CALLS = PLANNED_TRAJECTORIES * STEPS  # every trajectory: two calculator steps, then the answer
JUDGE_CALLS = POLICY_CALLS + QUESTIONS  # one verdict per step; one LLM grade per (question, final answer)
# Policy replies are stamped with the request's digest, so every trajectory, and so every judge request, is distinct.
POLICY_SCRIPT = {"Question:": ["First add. <math_exp>2 + 3</math_exp>", "Then double it. <math_exp>(2 + 3) * 2</math_exp>",
                               "<answer>10</answer>"]}
JUDGE_RULES = [["Am I correct\\?", "It differs from the answer key.\nNO"]]
JUDGE_DEFAULT = "The step follows from the question.\nGOOD"
LATENCY_S = 0.15
JOURNAL_GRACE_S = 0.7  # after the server has answered everything it got: time for the client to journal it
RUN_TIMEOUT_S = 240
TIME_KILL_RANGE_S = (0.3, 8.0)  # start-up (imports, flow run, DuckDB, Dask cluster) into the first shards
PROGRESS_KILL_RANGE = (1, 8)  # further completed requests: mid-run


# -- processes ----------------------------------------------------------------------------------------------
def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`swirl ARGS` in its own process group, output to `log` (a pipe could fill up and stall it)."""
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def frozen_kill(gate: FreezeGate, server_url: str, kill) -> None:
    """Hold new requests, let the server answer what it has and the client journal it, kill, release."""
    gate.freeze()
    try:
        wait_drained(server_url)
        time.sleep(JOURNAL_GRACE_S)
        kill()
    finally:
        gate.thaw()


def kill_group(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the process group of `proc`; returns the pids of its descendants that survived (should be none)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):  # it may have just exited on its own
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=15)
    return [p.pid for p in alive if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- checks ---------------------------------------------------------------------------------------------------
TABLES = {"questions", "trajectories", "steps", "llm_calls", "judgments", "grades"}


def db_state(db: Path) -> dict:
    """What a kill left: whether the file opens, duplicate rows per key (None before the schema exists)."""
    if not db.exists():
        return {"db": "absent"}
    con = duckdb.connect(str(db), read_only=True)  # must open after any SIGKILL (the WAL is replayed)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        counts = ({t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("trajectories", "judgments")}
                  if TABLES <= tables else {})
    finally:
        con.close()
    if not TABLES <= tables:
        return {"db": "no schema yet"}
    dupes = duplicate_rows(db)
    return {"db": "ok", "duplicates": sum(dupes.values()), "dupes_by_key": dupes, **counts}


def journal_keys(work_dir: Path) -> list[str]:
    keys = []
    for path in sorted((work_dir / "journal").glob("calls-*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):  # a line torn by a kill mid-write was never used
                if "key" in (record := orjson.loads(line)):  # not a close line or a segment's header
                    keys.append(record["key"])
    return keys


# -- the kill loop ----------------------------------------------------------------------------------------------
def crash_phase(name: str, args: list[str], db: Path, gate: FreezeGate, server_url: str, planned_calls: int,
                rng: random.Random, kills_wanted: int, logs: Path) -> dict:
    """Run `swirl ARGS` again and again, SIGKILLing each run at a random point, until `kills_wanted` kills have
    landed; then one clean run. Checks the database and the server after every kill."""
    events, kills, runs = [], 0, 0
    time_high = TIME_KILL_RANGE_S[1]
    kill_lag = 0.0  # from a kill point to the kill itself (drain and journal grace): the run goes on meanwhile
    while kills < kills_wanted:
        assert runs < kills_wanted + 6, f"{name}: only {kills} kills landed in {runs} runs: {events}"
        before = fetch_stats(server_url)["completed"]
        remaining = planned_calls - before
        if rng.random() < 0.5 or remaining < PROGRESS_KILL_RANGE[1] + 4:
            mode, point = "time", round(rng.uniform(TIME_KILL_RANGE_S[0], time_high), 2)
        else:
            mode, point = "progress", rng.randint(*PROGRESS_KILL_RANGE)
        log = logs / f"{name}-{runs:02d}.log"
        proc = spawn(args, log)
        runs += 1
        started = time.monotonic()
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if mode == "time" and elapsed >= point:
                break
            if mode == "progress" and fetch_stats(server_url)["completed"] - before >= point:
                break
            assert elapsed < RUN_TIMEOUT_S, f"{name} run {runs} stuck before its kill point:\n{tail(log)}"
            time.sleep(0.05)
        event = {"run": runs, "mode": mode, "point": point}
        survivors: list[int] = []
        killed_at: list[float] = []
        if proc.poll() is None:
            def kill() -> None:
                killed_at.append(time.monotonic() - started)  # noqa: B023
                survivors.extend(kill_group(proc))  # noqa: B023

            frozen_kill(gate, server_url, kill)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            event.update(outcome="killed", killed_at_s=round(killed_at[0], 2))
            if mode == "time":
                kill_lag = max(kill_lag, killed_at[0] - point)
        else:  # it finished before its kill point: it must have finished well
            assert proc.returncode == 0, f"{name} run {runs} exited {proc.returncode}:\n{tail(log)}"
            duration = time.monotonic() - started
            event.update(outcome="finished first", wall_s=round(duration, 2))
            # Little work is left: draw later time kills from the span such a run actually lasts, less the lag.
            time_high = max(TIME_KILL_RANGE_S[0] + 0.5, min(time_high, 0.8 * duration - max(kill_lag, JOURNAL_GRACE_S)))
        assert survivors == [], f"{name} run {runs}: processes outlived the SIGKILL of their group: {survivors}"
        state = db_state(db)
        assert state.get("duplicates", 0) == 0, f"{name} after run {runs}: duplicate rows {state}"
        stats = fetch_stats(server_url)
        event.update(paid_this_run=stats["completed"] - before, db=state["db"], **{k: state[k] for k in ("trajectories", "judgments") if k in state})
        events.append(event)
        assert [h for h, n in stats["by_body"].items() if n > 1] == [], f"{name}: a completed request was sent again: {events}"

    log = logs / f"{name}-final.log"
    proc = spawn(args, log)
    started = time.monotonic()
    proc.wait(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{name} final run exited {proc.returncode}:\n{tail(log)}"
    events.append({"run": runs + 1, "outcome": "clean", "wall_s": round(time.monotonic() - started, 2)})
    return {"kills": kills, "runs": runs + 1, "reruns_after_a_kill": kills, "events": events,
            "time_kills": sum(e.get("mode") == "time" and e["outcome"] == "killed" for e in events),
            "progress_kills": sum(e.get("mode") == "progress" and e["outcome"] == "killed" for e in events),
            "finished_before_kill_point": sum(e["outcome"] == "finished first" for e in events)}


@pytest.mark.slow
def test_sigkill_generate_and_curate_at_20_random_points_then_resume(prefect_api, tmp_path, record_property):
    """10 SIGKILLs of `swirl generate`, then 10 of `swirl curate` on its database, each followed by a rerun;
    the final runs finish with every trajectory and judgment stored once and no request paid twice."""
    started = time.perf_counter()
    rng = random.Random(SEED)
    db, logs = tmp_path / "crash.duckdb", tmp_path / "logs"
    logs.mkdir()
    policy_proc, policy_url = start_subprocess(latency=LATENCY_S, scripts=POLICY_SCRIPT, stamp_replies=True)
    judge_proc, judge_url = start_subprocess(latency=LATENCY_S, rules=JUDGE_RULES, default=JUDGE_DEFAULT)
    try:
        with FreezeGate(policy_url) as policy_gate, FreezeGate(judge_url) as judge_gate:
            common = ["--concurrency", "2", "--workers", "2", "--no-progress", "--db", str(db)]
            gen_args = ["generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit",
                        str(QUESTIONS), "--samples", str(SAMPLES), "--shard-size", "2", "--policy", "openai/policy",
                        "--policy-api-base", policy_gate.base_url, *common]
            gen = crash_phase("generate", gen_args, db, policy_gate, policy_url, POLICY_CALLS, rng, 10, logs)
            gen_stats = fetch_stats(policy_url)

            # Every planned trajectory, once, answered; every policy call paid once and in the ledger.
            assert query(db, "SELECT kind, status FROM runs") == [("generate", "completed")]
            assert query(db, "SELECT count(*), count(DISTINCT (question_id, sample_index)), count(*) FILTER (WHERE status = 'answered') "
                         "FROM trajectories") == [(PLANNED_TRAJECTORIES,) * 3]
            assert query(db, "SELECT count(*) FROM steps") == [(POLICY_CALLS,)]
            assert gen_stats["completed"] == POLICY_CALLS and max(gen_stats["by_body"].values()) == 1
            assert query(db, "SELECT count(*) FROM llm_calls WHERE purpose = 'policy'") == [(POLICY_CALLS,)]

            cur_args = ["curate", "--judge", "openai/judge", "--judge-api-base", judge_gate.base_url, "--grader", "llm",
                        "--shard-size", "8", "--probe-limit", "0", *common]
            cur = crash_phase("curate", cur_args, db, judge_gate, judge_url, JUDGE_CALLS, rng, 10, logs)
            cur_stats = fetch_stats(judge_url)
    finally:
        for proc in (policy_proc, judge_proc):
            proc.terminate()
            proc.wait(timeout=10)

    # Every step judged once (all GOOD: no failed judgment left), every trajectory graded, each call paid once.
    assert query(db, "SELECT kind, status FROM runs ORDER BY kind") == [("curate", "completed"), ("generate", "completed")]
    assert query(db, "SELECT verdict, count(*) FROM judgments GROUP BY 1") == [("GOOD", POLICY_CALLS)]
    assert query(db, "SELECT count(*) FROM steps s ANTI JOIN judgments j USING (trajectory_id, step_index)") == [(0,)]
    assert query(db, "SELECT count(*), count(*) FILTER (WHERE NOT correct) FROM grades WHERE method = 'llm'") == [
        (PLANNED_TRAJECTORIES, PLANNED_TRAJECTORIES)]
    assert cur_stats["completed"] == JUDGE_CALLS and max(cur_stats["by_body"].values()) == 1
    assert query(db, "SELECT count(*) FROM llm_calls") == [(POLICY_CALLS + JUDGE_CALLS,)]
    dupes = duplicate_rows(db)
    assert dupes == dict.fromkeys(dupes, 0)
    keys = journal_keys(db.with_suffix(".work"))
    assert len(keys) == len(set(keys)) == POLICY_CALLS + JUDGE_CALLS  # no response journaled twice either
    attempts = dict(query(db, "SELECT kind, attempts FROM runs"))
    figures = {
        "kills": gen["kills"] + cur["kills"], "runs": gen["runs"] + cur["runs"],
        "reruns_after_a_kill": gen["kills"] + cur["kills"],
        "generate": {k: v for k, v in gen.items() if k != "events"} | {"run_attempts_recorded": attempts["generate"]},
        "curate": {k: v for k, v in cur.items() if k != "events"} | {"run_attempts_recorded": attempts["curate"]},
        "requests_completed": {"policy": gen_stats["completed"], "judge": cur_stats["completed"]},
        "requests_repaid": 0, "duplicate_rows": 0, "seed": SEED,
        "kill_points": {"generate": gen["events"], "curate": cur["events"]},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report("crash_sigkill_generate_curate", figures, record_property)


@pytest.mark.slow
def test_dask_worker_killed_mid_shard_is_rescheduled_without_repaying(prefect_api, tmp_path, record_property):
    """`swirl generate --scheduler-address` on a LocalCluster of two workers; one worker is SIGKILLed while its
    shard is in flight with calls already journaled. The nanny restarts it, Dask reschedules the shard (or a
    rerun finishes it), and the resumed shard replays the dead worker's journaled calls instead of paying again."""
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    questions, samples = 6, 2
    planned_calls = questions * samples * STEPS
    db, logs = tmp_path / "worker.duckdb", tmp_path / "logs"
    logs.mkdir()
    journal = db.with_suffix(".work") / "journal"
    policy_proc, policy_url = start_subprocess(latency=0.2, scripts=POLICY_SCRIPT, stamp_replies=True)
    try:
        with FreezeGate(policy_url) as gate, \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                             local_directory=str(tmp_path / "dask")) as cluster, Client(cluster) as client:
            args = ["generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", str(questions),
                    "--samples", str(samples), "--shard-size", "3", "--concurrency", "2", "--policy", "openai/policy",
                    "--policy-api-base", gate.base_url, "--db", str(db), "--scheduler-address", cluster.scheduler_address,
                    "--no-progress"]
            pids = client.run(os.getpid)  # worker address -> pid
            log = logs / "generate-0.log"
            proc = spawn(args, log)
            # Two shards of 18 calls, one per worker: wait until the victim's shard has journaled a few of its calls.
            victim = None
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while victim is None:
                assert proc.poll() is None, f"the run ended before a worker could be killed:\n{tail(log)}"
                assert time.monotonic() < deadline, tail(log)
                processing = client.processing()
                for address, pid in pids.items():
                    lines = sum(p.read_bytes().count(b"\n") for p in journal.glob(f"calls-*-{pid}-*.jsonl"))
                    if processing.get(address) and lines >= 3:
                        victim = (address, pid)
                        break
                time.sleep(0.05)
            address, pid = victim
            in_flight = list(client.processing()[address])

            worker = psutil.Process(pid)

            def kill_worker() -> None:
                os.kill(pid, signal.SIGKILL)
                worker.wait(timeout=15)

            frozen_kill(gate, policy_url, kill_worker)
            journaled_by_victim = sum(p.read_bytes().count(b"\n") for p in journal.glob(f"calls-*-{pid}-*.jsonl"))
            killed_at = fetch_stats(policy_url)["completed"]
            assert not psutil.pid_exists(pid) or not _running(psutil.Process(pid))
            proc.wait(timeout=RUN_TIMEOUT_S)
            runs = [proc.returncode]
            rescheduled = proc.returncode == 0
            while proc.returncode != 0:  # the shard could not be rescheduled: a rerun of the command resumes it
                assert len(runs) < 3, f"reruns did not finish the run: {runs}\n{tail(log)}"
                log = logs / f"generate-{len(runs)}.log"
                proc = spawn(args, log)
                proc.wait(timeout=RUN_TIMEOUT_S)
                runs.append(proc.returncode)
            workers_after = len(client.scheduler_info()["workers"])
        stats = fetch_stats(policy_url)
    finally:
        policy_proc.terminate()
        policy_proc.wait(timeout=10)

    assert journaled_by_victim >= 3  # the killed worker had paid calls of its shard: the resume had to replay them
    assert [h for h, n in stats["by_body"].items() if n > 1] == []
    assert stats["completed"] == planned_calls
    assert query(db, "SELECT kind, status FROM runs") == [("generate", "completed")]
    assert query(db, "SELECT count(*), count(DISTINCT (question_id, sample_index)), count(*) FILTER (WHERE status = 'answered') "
                 "FROM trajectories") == [(questions * samples,) * 3]
    assert query(db, "SELECT count(*) FROM steps") == [(planned_calls,)] == query(db, "SELECT count(*) FROM llm_calls")
    dupes = duplicate_rows(db)
    assert dupes == dict.fromkeys(dupes, 0)
    keys = journal_keys(db.with_suffix(".work"))
    assert len(keys) == len(set(keys)) == planned_calls
    report("crash_dask_worker_killed", {
        "killed_worker_pid": pid, "tasks_in_flight_on_it": len(in_flight), "calls_journaled_by_it": journaled_by_victim,
        "completed_when_killed": killed_at, "rescheduled_by_dask": rescheduled, "cli_exit_codes": runs,
        "reruns": len(runs) - 1, "workers_after": workers_after, "requests_completed": stats["completed"],
        "requests_repaid": 0, "duplicate_rows": 0, "wall_s": round(time.perf_counter() - started, 1),
    }, record_property)
