"""Generation end to end: the Prefect flow on a real Dask LocalCluster, the CLI, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy
from scripted_server import ScriptedServer
from test_faults import report

from swirl_core.config import ClusterConfig, GenerateConfig, ModelConfig

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")


def _counts(db: Path) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        one = lambda sql: con.execute(sql).fetchall()[0][0]  # noqa: E731
        return {
            "questions": one("SELECT count(*) FROM questions"),
            "trajectories": one("SELECT count(*) FROM trajectories"),
            "distinct_trajectories": one("SELECT count(DISTINCT (question_id, sample_index)) FROM trajectories"),
            "steps": one("SELECT count(*) FROM steps"),
            "llm_calls": one("SELECT count(*) FROM llm_calls"),
            "answered": one("SELECT count(*) FROM trajectories WHERE status = 'answered'"),
            "runs": con.execute("SELECT run_id, status, attempts FROM runs").fetchall(),
        }
    finally:
        con.close()


def _swirl(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )


@pytest.mark.slow
def test_flow_on_local_cluster_writes_duckdb_and_reruns_for_free(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.generate import run_generate

    with ScriptedServer(responder=math_policy) as srv:
        config = GenerateConfig(
            dataset="gsm8k", data_files=[GSM8K], split="test", limit=6, samples=2, shard_size=2,
            policy=ModelConfig(model="openai/policy", api_base=srv.base_url, concurrency=4),
            db=str(tmp_path / "swirl.duckdb"), cluster=ClusterConfig(n_workers=2), progress=False,
        )
        result = run_generate(config)
        assert result["status"] == "completed" and result["trajectories"] == 12
        counts = _counts(tmp_path / "swirl.duckdb")
        assert counts["questions"] == 6 and counts["trajectories"] == 12 == counts["answered"]
        assert counts["steps"] == 36 == counts["llm_calls"] == srv.stats()["completed"]
        # Rerun: nothing is sent, nothing is duplicated, the same run is resumed.
        again = run_generate(config)
        assert again["run_id"] == result["run_id"] and srv.stats()["total"] == 36
        counts2 = _counts(tmp_path / "swirl.duckdb")
        assert {k: v for k, v in counts2.items() if k != "runs"} == {k: v for k, v in counts.items() if k != "runs"}
        assert counts2["runs"] == [(result["run_id"], "completed", 2)]

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        keys = {a.key for a in artifact}
    assert {"generate-summary", "generate-status", "generate-actions"} <= keys


@pytest.mark.slow
def test_kill_mid_run_then_resume_never_resends_a_completed_request(prefect_api, tmp_path):
    db = tmp_path / "swirl.duckdb"
    kill_at = 45
    state = {"n": 0, "proc": None}
    lock, frozen, killed = threading.Lock(), threading.Event(), threading.Event()

    def responder(body: dict) -> str:
        if frozen.is_set() and not killed.is_set():
            killed.wait(10)
            raise RuntimeError("frozen for the kill")  # answered 500: not a completed request
        with lock:
            state["n"] += 1
            n = state["n"]
        if n == kill_at and state["proc"] is not None:
            frozen.set()
            time.sleep(0.5)  # responses already on the wire reach the client's journal first
            os.killpg(state["proc"].pid, signal.SIGKILL)
            killed.set()
            raise RuntimeError("killed")
        return math_policy(body)

    with ScriptedServer(responder=responder) as srv:
        args = ["generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", "20",
                "--samples", "3", "--policy", "openai/policy", "--policy-api-base", srv.base_url, "--db", str(db),
                "--concurrency", "4", "--shard-size", "2", "--workers", "2", "--no-progress"]
        state["proc"] = _swirl(*args, start_new_session=True)
        out, _ = state["proc"].communicate(timeout=300)
        assert state["proc"].returncode == -signal.SIGKILL, out
        completed_before = srv.stats()["completed"]
        assert 0 < completed_before < 180

        state["proc"] = None
        rerun = _swirl(*args)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out
        assert srv.completed_twice() == []
        assert srv.stats()["completed"] == 180  # 20 questions × 3 samples × 3 steps, each paid once
    counts = _counts(db)
    assert counts["trajectories"] == counts["distinct_trajectories"] == 60 == counts["answered"]
    assert counts["steps"] == 180 == counts["llm_calls"]
    assert counts["runs"][0][1:] == ("completed", 2)


def test_malformed_seeds_fail_before_any_call_is_paid(prefect_api, tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"question": "ok?", "answer": "#### 1"}\n{"question": "no answer"}\n')
    with ScriptedServer(responder=math_policy) as srv:
        proc = _swirl("generate", "--dataset", "gsm8k", "--data-files", str(bad), "--policy", "openai/p",
                      "--policy-api-base", srv.base_url, "--db", str(tmp_path / "x.duckdb"))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert "seeds.jsonl line 2" in out and "answer" in out and "Traceback" not in out
        assert srv.stats()["total"] == 0


@pytest.mark.slow
def test_skip_invalid_records_bad_rows_and_secrets_never_leak(prefect_api, tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"question": "Add 2 and 3.", "answer": "#### 5"}\n{"question": "no answer"}\nnot json\n')
    secret = "sk-SENTINEL-never-store-me"
    db = tmp_path / "x.duckdb"
    with ScriptedServer(responder=math_policy) as srv:
        proc = _swirl("generate", "--dataset", "gsm8k", "--data-files", str(bad), "--skip-invalid", "--samples", "2",
                      "--policy", "openai/p", "--policy-api-base", srv.base_url, "--db", str(db),
                      env={"OPENAI_API_KEY": secret})
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert srv.stats()["completed"] == 6
    con = duckdb.connect(str(db), read_only=True)
    errors = con.execute("SELECT source, error FROM seed_errors ORDER BY source").fetchall()
    config = con.execute("SELECT config FROM runs").fetchall()[0][0]
    con.close()
    assert [e[0].rsplit(":", 1)[1] for e in errors] == ["line 2", "line 3"]
    assert json.loads(config)["policy"]["model"] == "openai/p"
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert secret.encode() not in stored and secret not in out


def test_sql_command_prints_a_table_and_reports_errors(tmp_path):
    from swirl_core.store import Store

    with Store(tmp_path / "s.duckdb"):
        pass
    ok = _swirl("sql", "--db", str(tmp_path / "s.duckdb"), "SELECT 41 + 1 AS answer")
    out, _ = ok.communicate(timeout=60)
    assert ok.returncode == 0 and "answer" in out and "42" in out
    bad = _swirl("sql", "--db", str(tmp_path / "s.duckdb"), "SELECT * FROM nope")
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "nope" in out and "Traceback" not in out


@pytest.mark.slow
def test_offline_default_makes_real_data(prefect_api, tmp_path):
    """The README's main job on a small scale: SmolLM2 in-process, demo seeds, no key, no network."""
    db = tmp_path / "demo.duckdb"
    proc = _swirl("generate", "--limit", "3", "--samples", "2", "--db", str(db), "--no-progress")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    con = duckdb.connect(str(db), read_only=True)
    steps, parsed, constrained = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE action_kind <> 'invalid'), count(\"constraint\") FROM steps"
    ).fetchall()[0]
    statuses = dict(con.execute("SELECT status, count(*) FROM trajectories GROUP BY 1").fetchall())
    model, backend = con.execute("SELECT DISTINCT model, backend FROM llm_calls").fetchall()[0]
    con.close()
    assert sum(statuses.values()) == 6 and "error" not in statuses
    assert steps > 0 and parsed / steps >= 0.8 and constrained == steps
    assert (model, backend) == ("smollm2", "transformers")
    assert "parsed as one action" in out


@pytest.mark.slow
def test_rpm_holds_for_the_whole_run_across_two_workers(prefect_api, tmp_path, record_property):
    """`--rpm 600` on two Dask workers, measured where it matters, at the server: no 60 s window of arrivals
    holds more than 1.05 × 600, though the work (660 calls) would go through in seconds without the limit."""
    with ScriptedServer(responder=math_policy) as srv:
        proc = _swirl("generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", "20",
                      "--samples", "11", "--policy", "openai/policy", "--policy-api-base", srv.base_url,
                      "--db", str(tmp_path / "swirl.duckdb"), "--rpm", "600", "--concurrency", "8",
                      "--shard-size", "2", "--workers", "2", "--no-progress")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        arrived = sorted(a["arrived"] for a in srv.attempt_log())
    assert len(arrived) == 660  # 20 questions × 11 samples × 3 steps
    j, busiest = 0, 0
    for i, start in enumerate(arrived):  # the window that starts at each arrival
        while j < len(arrived) and arrived[j] < start + 60:
            j += 1
        busiest = max(busiest, j - i)
    report("rpm_two_workers", {"requests": len(arrived), "busiest_60s": busiest,
                               "sending_s": round(arrived[-1] - arrived[0], 1)}, record_property)
    assert 540 <= busiest <= 630, busiest  # held, and not by starving the run


def _tool_calling_policy(body: dict) -> dict:
    """A function-calling policy: a calculation, a call with broken JSON arguments, then the answer."""
    assert [t["function"]["name"] for t in body["tools"]] == ["calculator", "answer"]
    step = sum(m["role"] == "assistant" for m in body["messages"])
    call = [("calculator", '{"expression": "6 * 7"}'), ("calculator", '{"expression": '), ("answer", '{"answer": "42"}')][min(step, 2)]
    return {"content": None, "tool_calls": [{"id": f"call_{step}", "type": "function",
                                              "function": {"name": call[0], "arguments": call[1]}}]}


@pytest.mark.slow
def test_generate_with_the_tools_protocol_over_http_records_protocol_and_calls(prefect_api, tmp_path):
    db = tmp_path / "swirl.duckdb"
    with ScriptedServer(responder=_tool_calling_policy) as srv:
        proc = _swirl("generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", "2",
                      "--samples", "1", "--policy", "openai/policy", "--policy-api-base", srv.base_url,
                      "--protocol", "tools", "--db", str(db), "--no-progress", "--workers", "1")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert all(r["tools"] for r in srv.requests)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT protocol, status, final_answer, count(*) FROM trajectories GROUP BY ALL").fetchall() == \
        [("tools", "answered", "42", 2)]
    steps = con.execute("SELECT action_kind, action_input, parse_error, observation, tool_calls->>'$[0].id' FROM steps "
                        "ORDER BY trajectory_id, step_index").fetchall()
    con.close()
    assert steps[:3] == [("math", "6 * 7", None, "42", "call_0"),
                         ("invalid", '{"expression": ', "arguments of calculator are not a JSON object",
                          steps[1][3], "call_1"),
                         ("answer", "42", None, None, "call_2")]
    assert "Format error" in steps[1][3]
