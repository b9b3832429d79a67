"""The Prefect UI in a real browser: Debian's headless Chromium, driven by playwright-core from Node
(tests/browser/ui_custom_run.mjs), opens the UI of the session's `prefect server` (the `prefect_stack`
fixture), goes Deployments → generate-nightly → Run → Custom run, changes parameters in the form and
submits. The run then goes through the real worker, and its rows in DuckDB must reflect what was typed.

Screenshots of every step land in test-artifacts/browser/ (gitignored). `make browser-deps` installs
Chromium and playwright-core; without them the test skips locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT
from prefect_stack import DEPLOYMENT, SEEDS, duckdb_counts
from scripted_server import fetch_stats

BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "ui_custom_run.mjs"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("SWIRL_CHROMIUM", "/usr/bin/chromium"))


def _browser_tools() -> str:
    """The node binary, once Chromium and playwright-core are there; else skip (locally) or fail (CI)."""
    node = shutil.which("node")
    missing = [what for what, ok in [
        (f"Chromium at {CHROMIUM}", CHROMIUM.exists()),
        ("node", node is not None),
        (f"playwright-core in {BROWSER_DIR / 'node_modules'}", (BROWSER_DIR / "node_modules" / "playwright-core").is_dir()),
    ] if not ok]
    if missing:
        message = f"browser test dependencies missing ({', '.join(missing)}): run `make browser-deps`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return node


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _next_line(lines: queue.Queue, prefix: str, timeout: float, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if line is None or (line == "" and time.monotonic() > deadline):
            proc.wait(timeout=30)
            raise AssertionError(f"the browser driver gave no {prefix} line (rc={proc.returncode}):\n"
                                 f"{log.read_text(errors='replace')[-4000:]}\nscreenshots: {ARTIFACTS}")
        if line.startswith(prefix + " "):
            return json.loads(line[len(prefix) + 1:])


@pytest.mark.slow
def test_custom_run_from_the_prefect_ui_writes_what_the_form_says(request):
    node = _browser_tools()
    stack = request.getfixturevalue("prefect_stack")  # only once the browser is known to be there
    started = time.monotonic()

    # The server serves the UI at its root (PREFECT_UI_ENABLED): the Vue app's index page.
    index = httpx.get(stack.ui_url + "/", timeout=10)
    assert index.status_code == 200 and '<div id="app"' in index.text, index.text[:500]

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    db = stack.base / "ui-run.duckdb"
    samples, limit = 3, 2  # the deployment's defaults: 1 sample, no limit (all 3 seed questions)
    paid_before = fetch_stats(stack.policy_url)["completed"]
    args = {"uiUrl": stack.ui_url, "deployment": DEPLOYMENT, "samples": samples, "limit": limit, "db": str(db),
            "screenshots": str(ARTIFACTS), "chromium": str(CHROMIUM), "budgetSeconds": 170}
    log = ARTIFACTS / "driver.log"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with open(log, "w") as err:
        proc = subprocess.Popen([node, str(DRIVER), json.dumps(args)], cwd=BROWSER_DIR, env=env, stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        submitted = _next_line(lines, "SUBMITTED", 90, proc, log)
        # What the form posted: the deployment's parameters as shown, with our three edits.
        assert submitted["before"] == {"samples": "1", "db": str(stack.base / "default.duckdb")}, submitted["before"]
        config = submitted["parameters"]["config"]
        assert (config["samples"], config["limit"], config["db"]) == (samples, limit, str(db)), config
        assert config["policy"]["api_base"] == stack.policy_url and config["data_files"] == [str(stack.seeds)]

        # The run, as the API sees it: created by the UI for this deployment, run by the worker.
        run = stack.wait_for_run(submitted["flow_run_id"], timeout=150)
        assert run["deployment_id"] == stack.deployment_id and run["name"] == submitted["name"]
        assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.run_logs(run['id'])[-20:]}\n{stack.diagnostics()}"
        assert run["parameters"]["config"]["samples"] == samples and run["parameters"]["config"]["limit"] == limit

        final = _next_line(lines, "FINAL", 60, proc, log)
        assert final["state"] == "Completed"  # and the run page shows it
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
    print(f"\nUI custom run: {time.monotonic() - started:.1f}s; screenshots in {ARTIFACTS}")

    # DuckDB holds what the form said: 2 questions (limit) × 3 samples, each step paid once.
    counts = duckdb_counts(db)
    assert counts["questions"] == limit and counts["trajectories"] == limit * samples == counts["answered"]
    assert counts["answers"] == {q: ans for q, _, _, ans in SEEDS[:limit]}
    assert len(counts["runs"]) == 1 and counts["runs"][0][0] == "completed"
    stored = json.loads(counts["runs"][0][1])
    assert (stored["samples"], stored["limit"], stored["db"]) == (samples, limit, str(db))
    assert fetch_stats(stack.policy_url)["completed"] - paid_before == limit * samples * 2  # calculator + answer

    shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    assert [name.split("-", 1)[1] for name in shots] == [
        "deployments.png", "deployment.png", "run-menu.png", "custom-run-form.png", "form-edited.png",
        "submitted.png", "flow-run.png", "flow-run-final.png"], shots
    assert all((ARTIFACTS / name).stat().st_size > 10_000 for name in shots)  # rendered pages, not blank images
