"""Secrets: the model API keys and the Hub token reach the servers that need them, and nothing else.

`swirl generate` and `swirl curate` run against a scripted server that records the Authorization header, the
policy's key in a Prefect Secret block named by --policy-api-key-secret (read on the Dask workers that make the
calls) and the judge's in an environment variable named by --judge-api-key-env; `swirl publish` uploads
for real to a fake Hub with HF_TOKEN set. All three are CLI subprocesses using the session's Prefect API. Then
the canaries are searched for in: the DuckDB file and WAL bytes, every table's and view's rows through SQL, the
work directory (journals, Dask scratch, the exported dataset: Parquet decoded, README.md card), everything else
the test's processes wrote, the captured stdout/stderr, the Prefect API (artifacts, flow and task runs, logs) and
the Prefect server's own database file, and the files that landed on the Hub.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, ROOT
from fake_hub import FakeHub
from helpers import math_policy
from scripted_server import ScriptedServer, _Handler, _HTTPServer
from test_faults import report

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
REPO_ID = "user/swirl-canary"


class _KeyRecordingHandler(_Handler):
    def do_POST(self) -> None:
        with self.server.owner._lock:
            self.server.owner.authorization_seen.append(self.headers.get("Authorization"))
        super().do_POST()


class KeyRecordingServer(ScriptedServer):
    """The scripted server, also recording every POST's Authorization header."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.authorization_seen: list[str | None] = []

    def start(self) -> KeyRecordingServer:
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port), _KeyRecordingHandler)
            self._httpd.owner = self
            self.port = int(self._httpd.server_address[1])
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self


def _dispatch(body: dict) -> str:
    """Policy (scripted math steps), process judge (GOOD/BAD) and outcome grader (NO)."""
    last = body["messages"][-1]["content"]
    if "Last message to evaluate:" in last:
        return "Uses the question's numbers.\nGOOD" if "<math_exp>" in last.rsplit("Last message to evaluate:", 1)[1] else "No.\nBAD"
    if "Am I correct?" in last:
        return "It differs from the key.\nNO"
    return math_policy(body)


# -- where a secret could hide ---------------------------------------------------------------------------------
def find(canaries: dict[str, str], text: str | bytes) -> list[str]:
    blob = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return [name for name, value in canaries.items() if value.encode() in blob]


def scan_duckdb(db: Path, canaries: dict[str, str]) -> tuple[dict[str, list[str]], int]:
    """Every row of every table and view, cast to text, searched in SQL (strings in the file may be compressed)."""
    hits, rows = {}, 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        relations = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        relations += [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        for rel in relations:
            rows += con.execute(f'SELECT count(*) FROM "{rel}"').fetchall()[0][0]
            for name, value in canaries.items():
                n = con.execute(f'SELECT count(*) FROM (SELECT CAST(r AS VARCHAR) AS s FROM "{rel}" r) WHERE contains(s, ?)',
                                [value]).fetchall()[0][0]
                if n:
                    hits.setdefault(rel, []).append(name)
    finally:
        con.close()
    return hits, rows


def scan_files(root: Path, canaries: dict[str, str]) -> tuple[dict[str, list[str]], int]:
    """Bytes of every file under `root`; Parquet files also decoded (their pages are compressed)."""
    hits, n = {}, 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        n += 1
        found = find(canaries, path.read_bytes())
        if path.suffix == ".parquet":
            found += find(canaries, json.dumps(pq.read_table(path).to_pylist(), default=str))
        if found:
            hits[str(path.relative_to(root))] = sorted(set(found))
    return hits, n


def scan_prefect(canaries: dict[str, str], since: datetime) -> tuple[dict[str, list[str]], dict]:
    """Artifacts (all of the session's), this test's flow runs (parameters), their task runs and their logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )

    def every(read, **kwargs) -> list:  # the API pages its answers (200 at most): a full suite has more
        items: list = []
        while len(page := read(**kwargs, limit=200, offset=len(items))) == 200:
            items += page
        return items + page

    hits: dict[str, list[str]] = {}
    with get_client(sync_client=True) as client:
        flow_runs = every(client.read_flow_runs, flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        ids = [fr.id for fr in flow_runs]
        artifacts = every(client.read_artifacts)
        task_runs = every(client.read_task_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))) if ids else []
        logs = every(client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))) if ids else []
    for kind, items in (("artifact", artifacts), ("flow_run", flow_runs), ("task_run", task_runs), ("log", logs)):
        for item in items:
            found = find(canaries, item.model_dump_json())
            if found:
                hits[f"{kind} {getattr(item, 'key', None) or item.id}"] = found
    ours = [a for a in artifacts if a.flow_run_id in set(ids)]
    counts = {"flow_runs": len(flow_runs), "artifacts": len(artifacts), "artifacts_of_these_runs": len(ours),
              "artifact_keys": sorted({a.key for a in ours if a.key}), "task_runs": len(task_runs), "logs": len(logs)}
    return hits, counts


def prefect_database() -> Path | None:
    """The SQLite file behind the session's Prefect API (the test harness's temporary database)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value() or ""
    path = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    return path if path and path.exists() else None


def test_scanners_find_a_planted_canary(tmp_path):
    """The searches below can fail: a canary hidden the way a leak would hide is found (compressed DuckDB
    columns, a list inside a struct, a view, a gzip-compressed Parquet page)."""
    canary = {"key": "sk-canary-" + secrets.token_hex(8)}
    db = tmp_path / "plant.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE t(id INTEGER, meta STRUCT(tags VARCHAR[]))")
    con.execute("INSERT INTO t SELECT i, {'tags': ['x' || i]} FROM range(200000) r(i)")
    con.execute("INSERT INTO t VALUES (-1, {'tags': ['a', ?]})", [canary["key"]])
    con.execute("CREATE VIEW v AS SELECT meta FROM t WHERE id < 0")
    con.execute("CHECKPOINT")
    con.close()
    hits, _ = scan_duckdb(db, canary)
    assert hits == {"t": ["key"], "v": ["key"]}
    pq.write_table(pa.table({"a": [canary["key"] * 3] * 200}), tmp_path / "p.parquet", compression="gzip",
                   use_dictionary=False, write_statistics=False)
    assert canary["key"].encode() not in (tmp_path / "p.parquet").read_bytes()  # compressed: a byte scan alone misses it
    files, _ = scan_files(tmp_path, canary)
    assert files.get("p.parquet") == ["key"]


def test_a_secret_block_key_is_read_by_the_worker_that_makes_the_calls(prefect_api, tmp_path):
    """What the flow sends a Dask worker (a pickled shard) names the block, never the key; the worker's task reads
    the block and sends the key as the bearer token. A missing block, or a key named twice, is a one-line error."""
    import cloudpickle
    from prefect.blocks.system import Secret

    from swirl_core.config import EvalConfig, GenerateConfig, ModelConfig
    from swirl_core.generation import make_generate_shards, plan_generation
    from tasks.stage import shard_task

    key, block = "sk-canary-block-" + secrets.token_hex(12), "swirl-test-policy-key"
    Secret(value=key).save(block, overwrite=True)
    with KeyRecordingServer(responder=math_policy) as srv:
        policy = ModelConfig(model="openai/policy", api_base=srv.base_url, api_key_secret=block)
        config = GenerateConfig(dataset="gsm8k", data_files=[GSM8K], split="test", limit=2, samples=1, policy=policy,
                                db=str(tmp_path / "s.duckdb"), progress=False)
        plan = plan_generation(config)
        shards = make_generate_shards(plan, config, plan.work)
        wire = cloudpickle.dumps(shards)
        assert block.encode() in wire and key.encode() not in wire
        rows = shard_task.fn(shards[0])  # exactly what a Dask worker runs
        assert rows and all(r.status == "answered" for r in rows)
        assert srv.authorization_seen and set(srv.authorization_seen) == {f"Bearer {key}"}
    from swirl_core.llm.factory import build_client

    with pytest.raises(ValueError, match="no Prefect Secret block named 'no-such-block'"):
        build_client(ModelConfig(model="openai/x", api_base="http://127.0.0.1:9/v1", api_key_secret="no-such-block"), None)
    with pytest.raises(ValueError, match="not both"):
        ModelConfig(model="openai/x", api_key_env="K", api_key_secret=block)
    evaluated = EvalConfig.model_validate({"models": [{"label": "api", "model": {"model": "openai/x", "api_key_secret": block}}]})
    assert evaluated.models[0].model.api_key_secret == block


@pytest.mark.slow
def test_api_key_and_hub_token_appear_nowhere_but_on_the_wire(prefect_api, tmp_path, record_property):
    started, since = time.perf_counter(), datetime.now(UTC) - timedelta(seconds=5)
    from prefect.blocks.system import Secret

    canaries = {
        "model API key": "sk-canary-" + secrets.token_hex(12),
        "policy API key (Secret block)": "sk-canary-block-" + secrets.token_hex(12),
        "OPENAI_API_KEY (set, unused)": "sk-canary-openai-" + secrets.token_hex(8),
        "Hub token": "hf_canary" + secrets.token_hex(12),
    }
    key, token, block_key = canaries["model API key"], canaries["Hub token"], canaries["policy API key (Secret block)"]
    block = "swirl-canary-policy-key"
    Secret(value=block_key).save(block, overwrite=True)
    db, logs = tmp_path / "secret.duckdb", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "SWIRL_CANARY_KEY": key, "OPENAI_API_KEY": canaries["OPENAI_API_KEY (set, unused)"],
           "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf-home")}
    outputs: dict[str, str] = {}

    def swirl(name: str, *args: str, extra_env: dict | None = None) -> None:
        out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**env, **(extra_env or {})},
                             capture_output=True, text=True, timeout=300)
        (logs / f"{name}.stdout").write_text(out.stdout)
        (logs / f"{name}.stderr").write_text(out.stderr)
        outputs[name] = out.stdout + out.stderr
        assert out.returncode == 0, f"swirl {name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"

    with KeyRecordingServer(responder=_dispatch) as srv:
        swirl("generate", "generate", "--dataset", "gsm8k", "--data-files", GSM8K, "--split", "test", "--limit", "4",
              "--samples", "2", "--shard-size", "2", "--workers", "2", "--policy", "openai/policy",
              "--policy-api-base", srv.base_url, "--policy-api-key-secret", block, "--db", str(db), "--no-progress")
        policy_authorization = list(srv.authorization_seen)
        swirl("curate", "curate", "--db", str(db), "--judge", "openai/judge", "--judge-api-base", srv.base_url,
              "--judge-api-key-env", "SWIRL_CANARY_KEY", "--grader", "llm", "--workers", "2", "--no-progress")
        model_calls, authorization = srv.stats()["completed"], srv.authorization_seen[len(policy_authorization):]
    with FakeHub(token=token) as hub:
        swirl("publish", "publish", "--db", str(db), "--repo-id", REPO_ID, extra_env=hub.env())
        hub_auth, hub_files = list(hub.auth_headers_seen), hub.files(REPO_ID)

    # Not vacuous: each key went to the model server as the bearer token on every call of its stage, the token to
    # the Hub, the data went everywhere it should.
    assert policy_authorization and set(policy_authorization) == {f"Bearer {block_key}"}
    assert model_calls > len(policy_authorization) and authorization and set(authorization) == {f"Bearer {key}"}
    assert hub_auth and set(hub_auth) == {f"Bearer {token}"}
    export = db.with_suffix(".work") / "hub" / REPO_ID.replace("/", "__")
    parquet = sorted(export.rglob("*.parquet"))
    assert (export / "README.md").is_file() and parquet and "README.md" in hub_files
    assert "swirl_runs.json" in hub_files  # the run configurations uploaded beside the data: scanned below too
    assert "new commit" in outputs["publish"]

    leaks: dict[str, object] = {}
    leaks["logs"] = {name: found for name, text in outputs.items() if (found := find(canaries, text))}
    hits, db_rows = scan_duckdb(db, canaries)
    leaks["duckdb_sql"] = hits
    leaks["duckdb_bytes"] = {p.name: f for p in (db, Path(f"{db}.wal")) if p.exists() and (f := find(canaries, p.read_bytes()))}
    leaks["work_dir"], work_files = scan_files(db.with_suffix(".work"), canaries)
    leaks["export"], _ = scan_files(export, canaries)
    leaks["everything_written"], all_files = scan_files(tmp_path, canaries)
    leaks["hub_files"] = {}
    for path, data in hub_files.items():
        found = find(canaries, data)
        if path.endswith(".parquet"):
            found += find(canaries, json.dumps(pq.read_table(pa.BufferReader(data)).to_pylist(), default=str))
        if found:
            leaks["hub_files"][path] = found
    leaks["prefect_api"], prefect_counts = scan_prefect(canaries, since)
    prefect_db = prefect_database()
    leaks["prefect_database"] = {}
    if prefect_db is not None:
        for p in prefect_db.parent.glob(prefect_db.name + "*"):
            if found := find(canaries, p.read_bytes()):
                leaks["prefect_database"][p.name] = found
    assert leaks == {k: {} for k in leaks}, leaks

    # The places searched held the run's data (a scan of nothing finds nothing).
    assert db_rows > 0 and work_files > 0 and all_files > work_files
    assert prefect_counts["artifacts_of_these_runs"] > 0 and prefect_counts["logs"] > 0
    assert {"generate-summary", "curate-summary", "publish-card"} <= set(prefect_counts["artifact_keys"])
    report("secrets", {"canaries": len(canaries), "model_calls_with_bearer_key": len(authorization),
                       "model_calls_with_block_key": len(policy_authorization),
                       "hub_requests_with_token": len(hub_auth), "duckdb_rows_scanned": db_rows,
                       "files_scanned": all_files, "work_dir_files": work_files, "export_parquet_files": len(parquet),
                       "hub_files": len(hub_files), "log_chars": sum(map(len, outputs.values())),
                       "prefect": prefect_counts,
                       "prefect_database_scanned": prefect_db is not None, "leaks": 0,
                       "wall_s": round(time.perf_counter() - started, 1)}, record_property)
