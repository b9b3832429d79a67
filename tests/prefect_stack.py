"""The Prefect stack of the deployment tests: a real `prefect server` (API and UI), the work pools of
prefect.yaml, the `generate-nightly` deployment, a process worker and a scripted policy model.

Shared by tests/test_deployments.py and tests/test_browser_ui.py through the session fixture
`prefect_stack` (tests/conftest.py): one stack per session, started on first use.
It runs in its own PREFECT_HOME and SQLite database on a free loopback port, and every subprocess
gets its environment explicitly (never the session's ephemeral API).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
from conftest import ROOT
from scripted_server import start_subprocess

PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENT = "generate-nightly"
FLOW = "generate-on-cluster"
POOLS = {"swirl-cpu": "process", "swirl-gpu": "process"}  # the pools prefect.yaml's deployments name, and their types
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# Three tiny math questions; the scripted policy uses the calculator once, then answers.
SEEDS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "3 + 4 = 7 #### 7", "3 + 4", "7"),
    ("A box holds 6 rows of 5 eggs. How many eggs are in the box?", "6 * 5 = 30 #### 30", "6 * 5", "30"),
    ("Sara reads 12 pages a day for 3 days. How many pages does she read?", "12 * 3 = 36 #### 36", "12 * 3", "36"),
]
# The scripted policy's replies (ScriptedServer / start_subprocess keyword arguments).
POLICY = {"scripts": {q.split(".")[0]: [f"I compute it. <math_exp>{expr}</math_exp>", f"<answer>{ans}</answer>"]
                      for q, _, expr, ans in SEEDS},
          "default": "<answer>unknown</answer>"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class PrefectStack:
    """`prefect server start` + `prefect work-pool create` + `prefect deploy` + `prefect worker start`."""

    def __init__(self, base: Path, auth: str | None = None) -> None:
        self.base = base
        self.auth = auth  # Prefect's basic auth (user:password): the server requires it, every client presents it
        self.home = base / "prefect-home"
        self.home.mkdir(parents=True)
        self.port = _free_port()
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui_url}/api"
        self.seeds = base / "seeds.jsonl"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.policy_proc: subprocess.Popen | None = None
        self.policy_url = ""
        self.deployment_id = ""
        self.timings: dict[str, float] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_PROFILES_PATH": str(self.home / "profiles.toml"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_URL": self.ui_url,
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
            "SWIRL_PROJECT_DIR": str(ROOT),  # the pull step's working directory
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if auth:
            self.env["PREFECT_API_AUTH_STRING"] = auth

    # processes ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.base / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def prefect(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([*PREFECT, *args], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
        return out

    def start(self) -> None:
        self.seeds.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _, _ in SEEDS))
        self.policy_proc, self.policy_url = start_subprocess(**POLICY)

        t0 = time.monotonic()
        # Through the script docker/compose.yaml runs, with the variables compose passes it (an empty credential
        # when the user sets none); on loopback, like everything the tests start.
        server_env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                      "SWIRL_API_BIND": "127.0.0.1", "PREFECT_SERVER_API_AUTH_STRING": self.auth or "",
                      "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}
        server = self._spawn("server", ["sh", str(ROOT / "docker" / "prefect-server.sh"), "--host", "127.0.0.1",
                                        "--port", str(self.port)], server_env)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start (rc={server.poll()}):\n{_tail(self.logs['server'])}")
            time.sleep(0.5)
        self.timings["server"] = time.monotonic() - t0

        t0 = time.monotonic()
        self.prefect("work-pool", "create", "swirl-cpu", "--type", POOLS["swirl-cpu"])
        self.prefect("--no-prompt", "deploy", "--name", DEPLOYMENT, "--params", json.dumps(self.params(self.base / "default.duckdb")))
        self.deployment_id = self.get(f"/deployments/name/{FLOW}/{DEPLOYMENT}")["id"]
        self.timings["pool+deploy"] = time.monotonic() - t0

        t0 = time.monotonic()

        worker = self._spawn("worker", [*PREFECT, "worker", "start", "--pool", "swirl-cpu", "--type", "process",
                                        "--name", "swirl-test-worker"])
        deadline = time.monotonic() + 90
        while self.get("/work_pools/swirl-cpu")["status"] != "READY":
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not come up (rc={worker.poll()}):\n{_tail(self.logs['worker'])}")
            time.sleep(0.5)
        self.timings["worker"] = time.monotonic() - t0

    def stop(self) -> None:
        for name in ("worker", "server"):  # the worker first: its flow-run subprocesses share its group
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self.policy_proc is not None:
            self.policy_proc.terminate()
            self.policy_proc.wait(timeout=10)
            self.policy_proc = None

    # API ----------------------------------------------------------------------------------------------------
    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def request(self, method: str, path: str, body: Any = None, auth: str | None = None):
        """A REST call with the stack's credential (or `auth`, "" for none), as Prefect's client sends it."""
        import httpx

        auth = self.auth if auth is None else auth
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        for _ in range(5):  # a 5xx is the server busy (its database locked right after a kill): ask again
            response = httpx.request(method, self.api_url + path, json=body, headers=headers, timeout=30)
            if response.status_code < 500:
                break
            time.sleep(1)
        return response

    def get(self, path: str) -> Any:
        r = self.request("GET", path)
        r.raise_for_status()
        return r.json()

    def params(self, db: Path, samples: int = 1) -> dict:
        """The deployment's `config` parameter: the seed file, the scripted policy, a database of the test's."""
        return {"config": {
            "dataset": "gsm8k", "data_files": [str(self.seeds)], "split": "test", "samples": samples,
            "policy": {"model": "openai/scripted-policy", "api_base": self.policy_url, "concurrency": 4},
            "db": str(db), "cluster": {"n_workers": 1}, "shard_size": 2, "progress": False,
        }}

    def wait_for_run(self, flow_run_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in FINAL_STATES:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {flow_run_id} still {run['state']['type']} after {timeout}s\n{self.diagnostics()}")
            time.sleep(1)

    def run_logs(self, flow_run_id: str) -> list[str]:
        r = self.request("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        r.raise_for_status()
        return [entry["message"] for entry in r.json()]

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name}.log ---\n{_tail(path)}" for name, path in self.logs.items())



def duckdb_counts(db: Path) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            "questions": con.execute("SELECT count(*) FROM questions").fetchone()[0],
            "trajectories": con.execute("SELECT count(*) FROM trajectories").fetchone()[0],
            "answered": con.execute("SELECT count(*) FROM trajectories WHERE status = 'answered'").fetchone()[0],
            "math_steps": con.execute("SELECT count(*) FROM steps WHERE action_kind = 'math'").fetchone()[0],
            "answers": dict(con.execute(
                "SELECT q.question, t.final_answer FROM trajectories t JOIN questions q USING (question_id)").fetchall()),
            "runs": con.execute("SELECT status, config FROM runs").fetchall(),
        }
    finally:
        con.close()

