"""Deployments for real: `prefect.yaml` checked offline, then a real `prefect server`, `prefect deploy`, a
process worker, a run triggered through the REST API as the UI triggers one, and its rows in DuckDB.

The stack (server, pool, deployment, worker, a scripted policy model: tests/prefect_stack.py) is started
once per session by the `prefect_stack` fixture of tests/conftest.py and shared with tests/test_browser_ui.py.
It runs in its own PREFECT_HOME and SQLite database on a free loopback port, and every subprocess gets its
environment explicitly (never the session's ephemeral API).
The deployment is `generate-nightly` exactly as prefect.yaml declares it (entrypoint, pool, pull step,
schedule, tags); only its default parameters are overridden at deploy time (`--params`), to point the
policy at the scripted OpenAI-compatible server and the database into the test's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from prefect_stack import DEPLOYMENT, FLOW, POLICY, POOLS, SEEDS, duckdb_counts
from scripted_server import Faults, ScriptedServer, fetch_stats


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


def test_a_deployment_parameter_with_an_unknown_key_is_refused_naming_it():
    """The flow configs forbid unknown keys, so a misspelt field in a deployment form or `-p config=...` fails
    (the server enforces the same schema: `additionalProperties: false`) instead of running with the default."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    flow = load_flow_from_entrypoint(str(ROOT / "flows/generate.py:generate_on_cluster"))
    definitions = parameter_schema(flow).model_dump()["definitions"]
    assert definitions["GenerateConfig"]["additionalProperties"] is False
    with pytest.raises(Exception, match="sample"):
        flow.validate_parameters({"config": {"sample": 10}})
    pipeline = load_flow_from_entrypoint(str(ROOT / "flows/pipeline.py:pipeline"))
    with pytest.raises(Exception, match="sample"):
        pipeline.validate_parameters({"config": {"generate": {"sample": 10}}})


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
            if source.startswith("./"):  # a bind mount of a folder the repository holds (kept out of git and images)
                assert (DOCKER / source).is_dir() and (DOCKER / source / ".gitignore").is_file(), (name, source)
                assert volume.endswith(":ro"), (name, volume)
            else:
                assert source in spec.get("volumes", {}), (name, source)
    # the worker creates its pool and runs flows from the image's checkout; the UI reaches the API
    worker_cmd = " ".join(services["worker"]["command"])
    assert "--pool swirl-cpu" in worker_cmd and "--type process" in worker_cmd
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert "gpu" in services["train-worker"]["profiles"]
    # Published ports listen on loopback unless told otherwise; the server turns basic auth on from the variable
    # every API client presents; the Dask cluster speaks TLS only and its clients read its certificates.
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published and all(p.startswith(("127.0.0.1:", "${SWIRL_API_BIND:-127.0.0.1}:")) for p in published), published
    server = services["server"]
    assert server["command"][:2] == ["sh", "docker/prefect-server.sh"] and (ROOT / server["command"][1]).is_file()
    assert "COPY docker/prefect-server.sh ./docker/" in (DOCKER / "Dockerfile.cpu").read_text()
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_API_AUTH_STRING:-}"
    for name, svc in services.items():
        if "PREFECT_API_URL" in svc.get("environment", {}):
            assert svc["environment"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_API_AUTH_STRING:-}", name
    assert "--protocol tls" in " ".join(services["dask-scheduler"]["command"])
    assert services["dask-worker"]["command"][2].startswith("tls://")
    for name in ("dask-scheduler", "dask-worker", "worker"):
        assert services[name]["environment"]["DASK_CONFIG"] == "/etc/swirl/dask-tls", name
        assert "./dask-tls:/etc/swirl/dask-tls:ro" in services[name]["volumes"], name
    gpus = services["train-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]
    # every Dockerfile copies what the flows import, and each has its own .dockerignore for the root context
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / dockerfile).read_text()
        for part in ("swirl_core", "tasks", "flows", "sql", "prefect.yaml", "pyproject.toml"):
            assert f"COPY {part}" in text or f" {part} " in text, (dockerfile, part)
        ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
        assert ".venv" in ignore and "*.duckdb" in ignore


@pytest.mark.slow
def test_two_runs_on_one_database_triggered_together_queue_and_both_complete(prefect_stack):
    """DuckDB admits one process per file: two runs of `generate-nightly` on one database, triggered at the same
    moment (a schedule and a UI run, say), both complete: one waits on the database's concurrency limit while the
    other holds the file, instead of failing. The second resumes the first's run and pays for nothing again."""
    from flows.runtime import database_limit_name

    stack = prefect_stack
    db = stack.base / "queued.duckdb"
    # A policy slow enough (2 s a reply) that the first run still holds the file when the second one starts.
    with ScriptedServer(**POLICY, faults=Faults(latency_s=2.0)) as slow:
        params = stack.params(db)
        params["config"]["policy"]["api_base"] = slow.base_url
        ids = []
        for n in range(2):
            r = stack.request("POST", f"/deployments/{stack.deployment_id}/create_flow_run",
                              {"parameters": params, "state": {"type": "SCHEDULED", "message": f"together {n}"}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        started = time.monotonic()
        runs = [stack.wait_for_run(i, timeout=360) for i in ids]
        paid = slow.stats()
    print(f"two queued runs on one database: both final after {time.monotonic() - started:.1f}s")
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], ([r["state"] for r in runs], stack.diagnostics())
    # One of them waited for the other: its log says so (both subflows' logs belong to the child runs).
    children = stack.request("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": ids}}}).json()
    waited = [c["id"] for c in children if any("is in use by another run: waiting" in line for line in stack.run_logs(c["id"]))]
    assert len(children) == 2 and len(waited) == 1, (children, waited)
    limit = stack.get(f"/v2/concurrency_limits/{database_limit_name(db)}")
    assert limit["limit"] == 1 and limit["active_slots"] == 0  # released by both
    counts = duckdb_counts(db)
    assert counts["trajectories"] == 3 == counts["answered"]
    assert paid["completed"] == 6 == paid["total"]  # 3 trajectories × 2 steps, each paid once
    assert [status for status, _ in counts["runs"]] == ["completed"]


@pytest.mark.slow
def test_a_run_killed_while_it_holds_a_database_gives_it_back(prefect_stack):
    """SIGKILL of a deployment run that holds a database (no cleanup runs) does not block the database for good:
    its lease is no longer renewed, the server takes the slot back, and the next run on that database completes."""
    import psutil

    from flows.runtime import DATABASE_LEASE_S, database_limit_name

    stack = prefect_stack
    db = stack.base / "killed.duckdb"
    name = database_limit_name(db)
    with socket.socket() as silent:  # a policy endpoint that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        params = stack.params(db)
        params["config"]["policy"].update(api_base=f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout_s=600)
        first = stack.request("POST", f"/deployments/{stack.deployment_id}/create_flow_run", {"parameters": params}).json()["id"]
        deadline = time.monotonic() + 180
        while (r := stack.request("GET", f"/v2/concurrency_limits/{name}")).status_code != 200 or not r.json()["active_slots"]:
            assert time.monotonic() < deadline, f"the first run never took the slot\n{stack.diagnostics()}"
            time.sleep(0.5)
        procs = psutil.Process(stack.procs["worker"].pid).children(recursive=True)
        victim = next(p for p in procs if _environ(p).get("PREFECT__FLOW_RUN_ID") == first)
        doomed = [victim, *victim.children(recursive=True)]  # its Dask cluster too
        for proc in doomed:
            proc.kill()
        psutil.wait_procs(doomed, timeout=30)
        killed = time.monotonic()
        second = stack.request("POST", f"/deployments/{stack.deployment_id}/create_flow_run",
                               {"parameters": stack.params(db)}).json()["id"]
        run = stack.wait_for_run(second, timeout=DATABASE_LEASE_S + 240)
    waited = time.monotonic() - killed
    print(f"a killed holder's database came back; the next run finished {waited:.1f}s after the kill")
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.diagnostics())
    assert stack.wait_for_run(first, timeout=120)["state"]["type"] == "CRASHED"
    children = stack.request("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [second]}}}).json()
    assert any("is in use by another run: waiting" in line for c in children for line in stack.run_logs(c["id"]))
    assert duckdb_counts(db)["answered"] == 3
    assert stack.get(f"/v2/concurrency_limits/{name}")["active_slots"] == 0


def _environ(proc) -> dict:
    import psutil

    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}
