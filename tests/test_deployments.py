"""Deployments for real: `prefect.yaml` checked offline, then a real `prefect server`, `prefect deploy`, a
process worker, a run triggered through the REST API as the UI triggers one, and its rows in DuckDB.

The stack (server, pool, deployment, worker, a scripted policy model) is started once per session and
shared with tests/test_browser_ui.py. It runs in its own PREFECT_HOME and SQLite database on a free
loopback port, and every subprocess gets its environment explicitly (never the session's ephemeral API).
The deployment is `generate-nightly` exactly as prefect.yaml declares it (entrypoint, pool, pull step,
schedule, tags); only its default parameters are overridden at deploy time (`--params`), to point the
policy at the scripted OpenAI-compatible server and the database into the test's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from conftest import ROOT
from scripted_server import fetch_stats, start_subprocess

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


def _load_prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


# -- prefect.yaml, offline ---------------------------------------------------------------------------------
def test_prefect_yaml_parameters_are_typed_and_valid_for_every_deployment():
    """Every deployment loads its flow, its parameters validate against the flow's pydantic config,
    and it names a known work pool; Prefect's own prefect.yaml model accepts the file."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    raw = _load_prefect_yaml()
    PrefectYamlModel.model_validate(raw)
    deployments = raw["deployments"]
    names = [d["name"] for d in deployments]
    assert len(names) == len(set(names)), names
    assert {"generate-nightly", "curate-after-generation", "publish-to-hub", "train-swirl-gpu"} <= set(names)
    for dep in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        schema = parameter_schema(flow).model_dump()
        assert set(dep.get("parameters", {})) <= set(schema["properties"]), dep["name"]
        # typed: each parameter is a pydantic model whose schema the UI renders as a form
        for name in schema["properties"]:
            assert schema["properties"][name].get("$ref", "").startswith("#/definitions/"), (dep["name"], name)
        flow.validate_parameters(dep.get("parameters", {}))  # raises on a bad value or unknown field
        assert dep["work_pool"]["name"] in POOLS, dep["name"]
        assert dep.get("enforce_parameter_schema", True) is True, dep["name"]
    gpu = {d["name"] for d in deployments if d["work_pool"]["name"] == "swirl-gpu"}
    assert {"train-swirl-gpu", "train-sft-gpu"} <= gpu
    generate = next(d for d in deployments if d["name"] == DEPLOYMENT)
    assert [s["cron"] for s in generate["schedules"]] == ["0 2 * * *"]


# -- the stack ----------------------------------------------------------------------------------------------
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

    def __init__(self, base: Path) -> None:
        self.base = base
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

    # processes ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.base / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
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
        scripts = {q.split(".")[0]: [f"I compute it. <math_exp>{expr}</math_exp>", f"<answer>{ans}</answer>"]
                   for q, _, expr, ans in SEEDS}
        self.policy_proc, self.policy_url = start_subprocess(scripts=scripts, default="<answer>unknown</answer>")

        t0 = time.monotonic()
        server = self._spawn("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
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

    def request(self, method: str, path: str, body: Any = None):
        import httpx

        return httpx.request(method, self.api_url + path, json=body, timeout=30)

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


_STACK: PrefectStack | None = None
_STACK_ERROR: BaseException | None = None


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, pytestconfig) -> PrefectStack:
    """One stack per session, shared by this module and tests/test_browser_ui.py (which imports this fixture)."""
    global _STACK, _STACK_ERROR
    if _STACK_ERROR is not None:
        pytest.fail(f"the Prefect stack failed to start earlier: {_STACK_ERROR}")
    if _STACK is None:
        stack = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
        pytestconfig.add_cleanup(stack.stop)
        started = time.monotonic()
        try:
            stack.start()
        except BaseException as exc:
            _STACK_ERROR = exc
            stack.stop()
            raise
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items())
        print(f"\nprefect stack up in {time.monotonic() - started:.1f}s ({phases}): {stack.ui_url}")
        _STACK = stack
    return _STACK


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


# -- a real server ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deploy_then_trigger_with_parameters_through_the_api_writes_duckdb(prefect_stack):
    stack = prefect_stack
    dep = stack.get(f"/deployments/{stack.deployment_id}")
    # What prefect.yaml declares arrived: pool, pull step, an (inactive) nightly schedule, typed parameters.
    assert dep["work_pool_name"] == "swirl-cpu" and dep["entrypoint"] == "flows/generate.py:generate_on_cluster"
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert [(s["schedule"]["cron"], s["active"]) for s in dep["schedules"]] == [("0 2 * * *", False)]
    assert dep["enforce_parameter_schema"] is True
    samples_schema = dep["parameter_openapi_schema"]["definitions"]["GenerateConfig"]["properties"]["samples"]
    assert samples_schema["type"] == "integer" and samples_schema["minimum"] == 1

    # The server rejects a parameter that breaks the schema, as the UI's form would.
    bad = stack.params(stack.base / "bad.duckdb")
    bad["config"]["samples"] = 0
    r = stack.request("POST", f"/deployments/{stack.deployment_id}/create_flow_run", {"parameters": bad})
    assert r.status_code in (409, 422), r.text
    assert "samples" in r.text

    # Trigger exactly as the UI does: POST /deployments/{id}/create_flow_run with the full parameters.
    db = stack.base / "api-run.duckdb"
    before = fetch_stats(stack.policy_url)["completed"]
    r = stack.request("POST", f"/deployments/{stack.deployment_id}/create_flow_run",
                      {"parameters": stack.params(db, samples=2), "tags": ["api-test"],
                       "state": {"type": "SCHEDULED", "message": "triggered by tests/test_deployments.py"}})
    assert r.status_code == 201, r.text
    started = time.monotonic()
    run = stack.wait_for_run(r.json()["id"])
    print(f"flow run {run['name']} took {time.monotonic() - started:.1f}s from trigger to {run['state']['type']}")
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.run_logs(run['id'])[-20:]}\n{stack.diagnostics()}"
    assert run["work_pool_name"] == "swirl-cpu" and run["deployment_id"] == stack.deployment_id

    counts = duckdb_counts(db)
    assert counts["questions"] == 3 and counts["trajectories"] == 6 == counts["answered"]
    assert counts["math_steps"] == 6
    assert counts["answers"] == {q: ans for q, _, _, ans in SEEDS}
    assert len(counts["runs"]) == 1 and counts["runs"][0][0] == "completed"
    stored = json.loads(counts["runs"][0][1])
    assert stored["samples"] == 2 and stored["policy"]["api_base"] == stack.policy_url  # the parameters we sent
    assert fetch_stats(stack.policy_url)["completed"] - before == 12  # 6 trajectories × 2 steps, each paid once

    logs = stack.run_logs(run["id"])
    assert any("set_working_directory" in line for line in logs), logs  # prefect.yaml's pull step ran
    # The entrypoint runs `generate` as a subflow on its Dask cluster; its artifacts hang off that run.
    r = stack.request("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    children = r.json()
    assert [(c["name"] != "", c["state"]["type"]) for c in children] == [(True, "COMPLETED")], children
    r = stack.request("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [children[0]["id"]]}}})
    assert {"generate-summary", "generate-status"} <= {a["key"] for a in r.json()}


@pytest.mark.slow
def test_cli_deployment_run_with_a_param_override(prefect_stack):
    """`prefect deployment run NAME --param config=...` is the CLI way to the same thing."""
    stack = prefect_stack
    db = stack.base / "cli-run.duckdb"
    out = stack.prefect("deployment", "run", f"{FLOW}/{DEPLOYMENT}", "--param",
                        "config=" + json.dumps(stack.params(db)["config"]), "--watch", "--watch-timeout", "240", timeout=300)
    assert "Completed" in out or "COMPLETED" in out, out[-3000:]
    counts = duckdb_counts(db)
    assert counts["trajectories"] == 3 == counts["answered"]


# -- docker/ ------------------------------------------------------------------------------------------------
DOCKER = ROOT / "docker"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        message = f"{name} is not installed: `make lint-tools` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint")
    files = sorted(str(p) for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
    assert {Path(f).name for f in files} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    proc = subprocess.run([hadolint, "--config", str(DOCKER / "hadolint.yaml"), *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_spec_and_the_repository():
    checker = _tool("check-jsonschema")
    compose = DOCKER / "compose.yaml"
    proc = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(compose)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    spec = yaml.safe_load(compose.read_text())
    services = spec["services"]
    assert {"server", "worker"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, (name, context)
            assert (context / build["dockerfile"]).is_file(), (name, build)
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            assert source in spec.get("volumes", {}), (name, source)
    # the worker creates its pool and runs flows from the image's checkout; the UI reaches the API
    worker_cmd = " ".join(services["worker"]["command"])
    assert "--pool swirl-cpu" in worker_cmd and "--type process" in worker_cmd
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert "gpu" in services["train-worker"]["profiles"]
    gpus = services["train-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]
    # every Dockerfile copies what the flows import, and each has its own .dockerignore for the root context
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / dockerfile).read_text()
        for part in ("swirl_core", "tasks", "flows", "sql", "prefect.yaml", "pyproject.toml"):
            assert f"COPY {part}" in text or f" {part} " in text, (dockerfile, part)
        ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
        assert ".venv" in ignore and "*.duckdb" in ignore
