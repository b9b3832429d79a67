"""An authenticated Prefect API: the server started exactly as docker/compose.yaml starts it
(docker/prefect-server.sh) with Prefect's basic auth on, then the clients that must present the credential:
`prefect deploy`, a process worker, `prefect deployment run`, and `swirl generate` with its Dask workers.
Requests without it, or with a wrong one, are refused; the script refuses to serve beyond loopback without it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy
from prefect_stack import DEPLOYMENT, FLOW, PrefectStack, duckdb_counts
from scripted_server import ScriptedServer

SCRIPT = ROOT / "docker" / "prefect-server.sh"


def test_the_server_script_refuses_to_publish_the_api_beyond_loopback_without_a_credential():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SWIRL_"))}
    for bind in ("0.0.0.0", "192.0.2.10"):
        for auth in (None, ""):
            out = subprocess.run(["sh", str(SCRIPT), "--port", "4200"], capture_output=True, text=True, timeout=30,
                                 env={**env, "SWIRL_API_BIND": bind, **({} if auth is None else {"PREFECT_SERVER_API_AUTH_STRING": auth})})
            assert out.returncode == 64, (bind, auth, out.stdout, out.stderr)
            assert out.stderr.startswith(f"prefect-server: refusing to publish the Prefect API on {bind} without "
                                         "authentication: set PREFECT_API_AUTH_STRING=user:password"), out.stderr
            assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory) -> Iterator[PrefectStack]:
    stack = PrefectStack(tmp_path_factory.mktemp("prefect-auth"), auth="swirl:" + secrets.token_urlsafe(16))
    try:
        stack.start()  # server with auth on; the pool, the deployment and the worker with the credential
        yield stack
    finally:
        stack.stop()


def _run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_an_authenticated_api_refuses_strangers_and_serves_the_worker_and_the_cli(auth_stack, tmp_path, record_property):
    import httpx

    stack = auth_stack
    dep_path = f"/deployments/{stack.deployment_id}"
    # Refused without the credential or with a wrong one; the health probe stays open; the UI asks for a login.
    assert stack.request("GET", dep_path, auth="").status_code == 401
    assert stack.request("GET", dep_path, auth="swirl:wrong").status_code == 401
    assert stack.request("POST", f"{dep_path}/create_flow_run", {"parameters": {}}, auth="").status_code == 401
    assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack.ui_url}/ui-settings", timeout=10).json()["auth"] == "BASIC"
    assert stack.request("GET", dep_path).json()["name"] == DEPLOYMENT  # `prefect deploy` registered it with the credential

    stranger = {k: v for k, v in stack.env.items() if k != "PREFECT_API_AUTH_STRING"}
    db = stack.base / "auth-run.duckdb"
    run_args = [sys.executable, "-m", "prefect", "deployment", "run", f"{FLOW}/{DEPLOYMENT}", "--param",
                "config=" + json.dumps(stack.params(db)["config"]), "--watch", "--watch-timeout", "240"]
    refused = _run(run_args, stranger, timeout=120)
    assert refused.returncode != 0 and not db.exists(), refused.stdout[-2000:] + refused.stderr[-2000:]

    # With it, `prefect deployment run` starts a run that the worker (holding the credential too) completes.
    t0 = time.perf_counter()
    out = stack.prefect(*run_args[3:], timeout=300)
    deployment_run_s = time.perf_counter() - t0
    assert "Completed" in out or "COMPLETED" in out, out[-3000:]
    assert duckdb_counts(db)["answered"] == 3

    # `swirl generate` against the authenticated API: a one-line error without the credential, a completed run
    # (flow and the Dask workers' task runs reported to this server) with it.
    cli_db = tmp_path / "cli.duckdb"
    with ScriptedServer(responder=math_policy) as srv:
        args = [sys.executable, "-m", "flows.cli", "generate", "--dataset", "gsm8k", "--data-files",
                str(FIXTURES / "gsm8k_test20.jsonl"), "--split", "test", "--limit", "2", "--samples", "1", "--workers", "1",
                "--policy", "openai/policy", "--policy-api-base", srv.base_url, "--db", str(cli_db), "--no-progress"]
        env = {**os.environ, **stack.env, "PYTHONPATH": str(ROOT)}
        for name, credential in (("without", None), ("wrong", "swirl:wrong")):
            bad = _run(args, {**{k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"},
                              **({"PREFECT_API_AUTH_STRING": credential} if credential else {})}, timeout=120)
            problem = "is not set" if credential is None else "does not match the server's"
            assert bad.returncode == 2 and srv.stats()["total"] == 0, (name, bad.stdout[-2000:], bad.stderr[-3000:])
            assert bad.stderr.strip() == (f"swirl generate: error: the Prefect API at {stack.api_url} requires "
                                          f"authentication and PREFECT_API_AUTH_STRING {problem} (user:password)"), bad.stderr
        t0 = time.perf_counter()
        good = _run(args, env)
        cli_s = time.perf_counter() - t0
        assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-3000:]
        assert srv.stats()["completed"] == 6
    runs = stack.request("POST", "/flow_runs/filter", {"limit": 200}).json()
    generate_runs = [r for r in runs if r["state"]["type"] == "COMPLETED" and r["parameters"].get("config", {}).get("db") == str(cli_db)]
    assert generate_runs, [r["parameters"] for r in runs]
    task_runs = stack.request("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in generate_runs]}}}).json()
    assert any(t["name"].startswith("shard-") and t["state"]["type"] == "COMPLETED" for t in task_runs), task_runs
    from test_faults import report

    report("api_auth", {"deployment_run_s": round(deployment_run_s, 1), "cli_generate_s": round(cli_s, 1),
                        "server_start_s": round(stack.timings["server"], 1)}, record_property)


@pytest.mark.slow
def test_the_temporary_api_of_a_cli_run_requires_its_own_credential(tmp_path):
    """Without PREFECT_API_URL, `swirl` starts a temporary Prefect API on 127.0.0.1, which every user of a shared
    host can reach: it requires a random credential that only the command and its Dask workers hold. Probed
    while the run is in flight (from the policy server, at its first request): refused without it."""
    import httpx
    import psutil

    probes: list[dict] = []
    holder: dict = {}
    once = threading.Lock()

    def policy(body: dict) -> str:
        with once:
            if probes:
                return math_policy(body)
            server = next(c for c in psutil.Process(holder["pid"]).children(recursive=True)
                          if "uvicorn" in " ".join(c.cmdline()))
            port = next(c.laddr.port for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
            api = f"http://127.0.0.1:{port}/api"
            probes.append({"health": httpx.get(f"{api}/health", timeout=10).status_code,
                           "flow_runs": httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code,
                           "blocks": httpx.post(f"{api}/block_documents/filter", json={}, timeout=10).status_code})
        return math_policy(body)

    db = tmp_path / "temp-api.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)})
    with ScriptedServer(responder=policy) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "generate", "--dataset", "gsm8k", "--data-files",
                                 str(FIXTURES / "gsm8k_test20.jsonl"), "--split", "test", "--limit", "2", "--samples", "1",
                                 "--workers", "1", "--policy", "openai/policy", "--policy-api-base", srv.base_url,
                                 "--db", str(db), "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        holder["pid"] = proc.pid
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert srv.stats()["completed"] == 6  # the Dask worker reported its task runs with the credential, and paid
    assert probes == [{"health": 200, "flow_runs": 401, "blocks": 401}], probes
