"""The factory against a real OpenAI-compatible server the project did not write: `transformers serve`
(shipped with transformers) serving the converted SmolLM2 as policy and judge, on CPU, offline."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import query

from swirl_core.config import ModelConfig
from swirl_core.constraints import PROBE_REPLY, SERVER_KINDS
from swirl_core.generation import verify_constraint

pytestmark = pytest.mark.slow



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_smollm2(tmp_path_factory):
    from swirl_core.llm.local_models import smollm2_path

    port = _free_port()
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    proc = subprocess.Popen([exe, "serve", str(smollm2_path()), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with opener.open(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"transformers serve did not start (rc={proc.poll()})") from None
                time.sleep(1)
        yield base + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_generate_curate_and_judge_eval_against_transformers_serve(prefect_api, served_smollm2, tmp_path, capsys):
    from flows.cli import main
    from swirl_core.llm.local_models import smollm2_path

    served = f"openai/{smollm2_path()}"  # the name the server knows its model by (it refuses others)
    db = tmp_path / "served.duckdb"
    common = ["--db", str(db), "--max-tokens", "24", "--concurrency", "2"]
    gen = ["generate", *common, "--dataset", "demo-math", "--limit", "2", "--samples", "1", "--max-steps", "2",
           "--policy", served, "--policy-api-base", served_smollm2, "--workers", "1", "--no-progress",
           "--constraint", "regex", "--server-kind", "auto"]
    # The probe finds that this server enforces no constraint (it rejects the unknown fields): refused.
    assert main(gen) == 2
    err = capsys.readouterr().err
    assert served_smollm2 in err and "does not enforce" in err and not db.exists()
    # With the opt-in the run goes on unconstrained, and its steps say so.
    assert main([*gen, "--allow-unconstrained"]) == 0
    (config,) = query(db, "SELECT config FROM runs WHERE kind = 'generate'")[0]
    probe = json.loads(config)["resolved_policy"]["constraint_probe"]
    # It names no kind (`owned_by: local`), so it was probed as plain OpenAI, unconstrained: it chatted.
    assert probe["enforced"] is False and probe["kind"] == "openai" and probe["reply"] != PROBE_REPLY
    assert query(db, 'SELECT count(*), count("constraint") FROM steps')[0][1] == 0
    assert query(db, "SELECT count(*) FROM trajectories WHERE status = 'error'") == [(0,)]
    assert query(db, "SELECT DISTINCT model FROM trajectories") == [(f"{served}@{served_smollm2}",)]

    # What it makes of each kind's constraint field: vLLM's, SGLang's and llama.cpp's it rejects as unknown
    # fields; TGI's (a regex `response_format`) it accepts and ignores. Either way nothing is enforced.
    for kind in SERVER_KINDS[:-1]:
        said = r"it said .HTTP 4\d\d: Unexpected fields" if kind != "tgi" else r"it said (?!.HTTP)"
        with pytest.raises(ValueError, match=rf"\({kind}\) does not enforce .*{said}"):
            verify_constraint(ModelConfig(model=served, api_base=served_smollm2, constraint="regex", server_kind=kind))

    judge = ["--judge", served, "--judge-api-base", served_smollm2, "--max-tokens", "24", "--concurrency", "2"]
    assert main(["curate", "--db", str(db), *judge, "--probe-limit", "1", "--workers", "1", "--no-progress"]) == 0
    judged, unknown, with_p = query(db, "SELECT count(*), count(*) FILTER (WHERE verdict = 'UNKNOWN'), count(p_good) "
                                     "FROM judgments")[0]
    steps = query(db, "SELECT count(*) FROM steps")[0][0]
    assert judged >= steps > 0
    # It accepts logprobs/top_logprobs but returns none: no P(GOOD), so the reward would be the vote.
    assert with_p == 0
    assert main(["judge-eval", "--db", str(db), "--limit", "1", *judge]) == 0
    assert query(db, "SELECT count(*) FROM judge_probe_results")[0][0] > 0
    print(f"served run: {steps} steps, {judged} judgments ({unknown} UNKNOWN)", file=sys.stderr)
