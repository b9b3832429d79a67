"""Concurrent use of one DuckDB file: DuckDB lets one process hold a file while it writes, so a second `swirl`
process must get a clear one-line error (exit code 3: "database ... is in use by another process") or wait its
turn, never a traceback, a corrupt file or duplicate rows; and a rerun afterwards finishes the work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy, query
from scripted_server import Faults, ScriptedServer
from test_faults import duplicate_rows, report

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
IN_USE = "is in use by another process"


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def _generate_args(db: Path, base_url: str, questions: int, samples: int) -> list[str]:
    return ["generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", str(questions),
            "--samples", str(samples), "--shard-size", "2", "--workers", "1", "--concurrency", "2", "--policy",
            "openai/policy", "--policy-api-base", base_url, "--db", str(db), "--no-progress"]


def _assert_in_use_error(command: str, rc: int, stderr: str, db: Path) -> str:
    """Exit code 3 and one line naming the database, no traceback."""
    lines = stderr.strip().splitlines()
    assert rc == 3, f"swirl {command} exited {rc}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"swirl {command}: error: database {db} {IN_USE}"), lines[0]
    return lines[0]


def _assert_complete(db: Path, trajectories: int) -> None:
    assert query(db, "SELECT kind, status FROM runs") == [("generate", "completed")]
    assert query(db, "SELECT count(*), count(*) FILTER (WHERE status = 'answered') FROM trajectories") == [(trajectories,) * 2]
    assert query(db, "SELECT count(*) FROM steps") == [(trajectories * 3,)] == query(db, "SELECT count(*) FROM llm_calls")
    dupes = duplicate_rows(db)
    assert dupes == dict.fromkeys(dupes, 0)


@pytest.mark.slow
def test_two_generates_started_together_one_waits_out_or_fails_clearly(prefect_api, tmp_path, record_property):
    """Both start on a database that does not exist yet, so both pass the CLI's early check and race inside the
    flow: the loser must still exit 3 with the one-line message (or, had they not overlapped, both finish)."""
    started = time.perf_counter()
    db = tmp_path / "shared.duckdb"
    questions, samples = 6, 2
    planned = questions * samples
    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.1)) as srv:
        args = _generate_args(db, srv.base_url, questions, samples)
        procs = [_spawn(*args), _spawn(*args)]
        outs = [p.communicate(timeout=300) for p in procs]
        rcs = [p.returncode for p in procs]
        assert sorted(rcs) in ([0, 3], [0, 0]), [(rc, o[0][-1500:], o[1][-3000:]) for rc, o in zip(rcs, outs)]
        message = None
        if sorted(rcs) == [0, 3]:
            loser = rcs.index(3)
            message = _assert_in_use_error("generate", 3, outs[loser][1], db)
            assert "completed" not in outs[loser][0]
        paid = srv.stats()
        assert srv.completed_twice() == [] and paid["completed"] == planned * 3
        _assert_complete(db, planned)

        # A rerun finds everything done: it completes, sends nothing and adds nothing.
        rerun = _run(*args)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        assert srv.stats()["total"] == paid["total"]
    _assert_complete(db, planned)
    report("concurrency_two_generates", {"exit_codes": rcs, "serialized": sorted(rcs) == [0, 0], "loser_message": message,
                                         "requests_completed": paid["completed"], "requests_repaid": 0,
                                         "duplicate_rows": 0, "rerun_exit_code": rerun.returncode,
                                         "wall_s": round(time.perf_counter() - started, 1)}, record_property)


@pytest.mark.slow
def test_commands_against_a_database_a_generate_holds_fail_in_one_line(prefect_api, tmp_path, record_property):
    """While a generate holds the file: `swirl sql`, a second `swirl generate` and `swirl curate` each exit 3
    with the same one-line message; the holder is unharmed, and afterwards the database opens and `swirl sql`
    reads it."""
    started = time.perf_counter()
    db = tmp_path / "held.duckdb"
    questions, samples = 6, 2
    planned = questions * samples
    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.4)) as srv:
        args = _generate_args(db, srv.base_url, questions, samples)
        holder = _spawn(*args)
        deadline = time.monotonic() + 240
        while srv.stats()["total"] == 0:  # the flow opens the database before its first shard sends anything
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        messages, timings = {}, {}
        for command, cmd_args in {
            "sql": ["sql", "--db", str(db), "SELECT count(*) FROM trajectories"],
            "generate": args,
            "curate": ["curate", "--db", str(db), "--judge", "openai/judge", "--judge-api-base", srv.base_url, "--no-progress"],
        }.items():
            t0 = time.perf_counter()
            out = _run(*cmd_args, timeout=120)
            timings[command] = round(time.perf_counter() - t0, 2)
            messages[command] = _assert_in_use_error(command, out.returncode, out.stderr, db)
        still_running = holder.poll() is None
        assert still_running, "the holder finished before the checks: they proved nothing"
        out, err = holder.communicate(timeout=300)
        assert holder.returncode == 0, out[-2000:] + err[-3000:]
        assert srv.completed_twice() == [] and srv.stats()["completed"] == planned * 3
    _assert_complete(db, planned)
    after = _run("sql", "--db", str(db), "--csv", "SELECT count(*) AS n FROM trajectories")
    assert after.returncode == 0 and after.stdout.split() == ["n", str(planned)], after.stdout + after.stderr
    report("concurrency_db_held", {"exit_codes": dict.fromkeys(messages, 3), "messages": messages,
                                   "seconds_to_fail": timings, "holder_exit_code": holder.returncode,
                                   "duplicate_rows": 0, "wall_s": round(time.perf_counter() - started, 1)}, record_property)
