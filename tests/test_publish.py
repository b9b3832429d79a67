"""Publishing: the exported Hub folder loads with `datasets.load_dataset` and matches DuckDB."""

from __future__ import annotations

import duckdb
import pytest
from helpers import build_labeled_db

from swirl_core.hub import RUN_CONFIG_FILE, contamination, dataset_card, export_folder, write_run_config


@pytest.fixture()
def labeled_db(tmp_path):
    db = tmp_path / "pub.duckdb"
    build_labeled_db(db)
    return db


def _export(db, folder):
    con = duckdb.connect(str(db), read_only=True)
    try:
        summary = export_folder(con, folder)
        write_run_config(con, folder)
        report = contamination(con)
        card = dataset_card(con, summary, "me/swirl-test", report)
    finally:
        con.close()
    card.save(folder / "README.md")
    return summary, str(card)


def test_export_loads_with_datasets_and_matches_duckdb(labeled_db, tmp_path):
    from datasets import load_dataset

    folder = tmp_path / "hub"
    summary, card = _export(labeled_db, folder)
    assert summary.rows == {"none": {"train": 4}, "process": {"train": 2}, "outcome": {"train": 2},
                            "process_outcome": {"train": 1}, "steps": {"train": 8}}
    process = load_dataset(str(folder), "process", split="train")
    assert sorted(process["trajectory_id"]) == ["t0", "t1"]
    messages = process[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == "<answer>Vistula</answer>"
    steps = load_dataset(str(folder), "steps", split="train")
    con = duckdb.connect(str(labeled_db), read_only=True)
    expected = con.execute("SELECT trajectory_id, step_index, action FROM sub_trajectories ORDER BY 1, 2").fetchall()
    con.close()
    got = sorted((r["trajectory_id"], r["step_index"], r["completion"][0]["content"]) for r in steps)
    assert got == expected
    assert steps[0]["prompt"][0]["role"] == "user"  # conversational prompt/completion, ready for TRL
    assert load_dataset(str(folder), "process_outcome", split="train")["trajectory_id"] == ["t0"]


def test_card_carries_configs_licence_retention_contamination_and_citation(labeled_db, tmp_path):
    _, card = _export(labeled_db, tmp_path / "hub")
    front, body = card.split("---\n", 2)[1:]
    assert "license: cc-by-sa-4.0" in front and "config_name: process_outcome" in front
    assert "source_datasets:\n- hotpotqa/hotpot_qa" in front and "size_categories:\n- n<1K" in front
    assert "license_name" not in front  # only an `other` licence is named
    for needle in ("## Retention per filter", "## Judge quality", "## Contamination check", "## Lineage",
                   'load_dataset("me/swirl-test", "steps")', "arXiv:2504.04736", "goldie2025swirl", "hotpotqa (cc-by-sa-4.0)"):
        assert needle in body


def test_card_carries_the_judges_probe_figures(labeled_db, tmp_path):
    import pyarrow as pa

    from swirl_core.store import Store

    with Store(labeled_db) as store:  # the judge "f" of the labelled data, measured by probe "p"
        store.con.execute("INSERT INTO judges VALUES ('f', 'openai/judge', "
                          "'{\"calibration\": \"median\", \"thresholds\": {\"qa\": 0.62}}', 'p', current_timestamp)")
        store.upsert("judge_probe_metrics", pa.Table.from_pylist([
            {"judge_fingerprint": "p", "dataset": "hotpotqa", "split": "train", "grp": "all", "metric": m, "n": 40,
             "value": v, "ci_low": lo, "ci_high": hi}
            for m, v, lo, hi in [("accuracy", 0.8, 0.7, 0.9), ("balanced_accuracy", 0.75, 0.61, 0.88),
                                 ("f1_bad", 0.7, 0.5, 0.85), ("better_than_chance", 1.0, None, None)]]))
    _, card = _export(labeled_db, tmp_path / "hub")
    probe = card.split("The judge probe", 1)[1].split("Process verdict vs outcome", 1)[0]
    assert "| openai/judge | f | hotpotqa | 40 | 0.75 | [0.61, 0.88] | 0.7 |" in probe and "| True |" in probe
    calibration = card.split("Judge calibration", 1)[1].split("Process verdict vs outcome", 1)[0]
    assert '| openai/judge | f | median | {"qa":0.62} |' in calibration


def test_export_is_deterministic(labeled_db, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _export(labeled_db, a)
    _export(labeled_db, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_contamination_counts_overlap_with_evaluation_questions(labeled_db):
    from swirl_core.records import Question
    from swirl_core.store import Store

    with Store(labeled_db) as store:
        store.upsert_questions([Question(
            question_id="e", dataset="hotpotqa", split="test", source_id="9", task="qa", answer="x",
            question="which river flows through the birthplace of marie curie")], "r")
        report = contamination(store.con)
    assert report["exact_overlap"] == 1 and report["eval_questions"] == 1 and report["train_questions"] == 1


@pytest.mark.slow
def test_publish_to_a_hub_then_load_dataset_and_republish_without_a_commit(labeled_db, tmp_path, prefect_api):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from fake_hub import FakeHub

    token = "hf_SENTINEL_never_log_me"
    with FakeHub(token=token) as hub:
        env = {**os.environ, **hub.env(), "HF_HOME": str(tmp_path / "hf-home")}

        def publish() -> str:
            out = subprocess.run([sys.executable, "-m", "flows.cli", "publish", "--db", str(labeled_db),
                                  "--repo-id", "user/swirl-test"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout + out.stderr

        first = publish()
        assert "new commit" in first and hub.repo_info("user/swirl-test")["private"] is True
        seen = hub.requests_seen  # the Hub validated the card before the repo was made
        assert seen.index("POST /api/validate-yaml") < seen.index("POST /api/repos/create")
        commits = len(hub.commits("user/swirl-test"))
        second = publish()
        assert "unchanged, no new commit" in second and len(hub.commits("user/swirl-test")) == commits
        assert token not in first + second
        assert {h for h in hub.auth_headers_seen} == {f"Bearer {token}"}
        # A fresh process downloads it the way users do.
        code = ("import json; from datasets import load_dataset; "
                "ds = load_dataset('user/swirl-test', 'process', split='train'); "
                "print(json.dumps(sorted(ds['trajectory_id'])))")
        fresh = {**env, "HF_HOME": str(tmp_path / "fresh-home")}
        out = subprocess.run([sys.executable, "-c", code], env=fresh, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == ["t0", "t1"]
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert token.encode() not in stored


@pytest.mark.slow
def test_publish_refuses_a_card_the_hub_rejects_in_one_line_and_uploads_nothing(labeled_db, tmp_path, prefect_api):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from fake_hub import FakeHub

    def too_many_tags(card: str) -> list[str]:  # a rule of the real Hub's that the fake does not otherwise know
        return ['"tags" may hold at most 3 entries'] if "- process-supervision" in card else []

    folder = tmp_path / "out"
    with FakeHub(card_rules=[too_many_tags]) as hub:
        env = {**os.environ, **hub.env(), "HF_HOME": str(tmp_path / "hf-home")}
        out = subprocess.run([sys.executable, "-m", "flows.cli", "publish", "--db", str(labeled_db), "--repo-id",
                              "user/rejected", "--out-dir", str(folder)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        seen = list(hub.requests_seen)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("swirl publish: error:")]
    assert errors == ['swirl publish: error: the Hub rejected the dataset card: "tags" may hold at most 3 entries']
    assert "POST /api/validate-yaml" in seen and not any(r.startswith("POST /api/repos") for r in seen)  # nothing uploaded
    assert (folder / "README.md").is_file() and list(folder.glob("data/*/*.parquet"))  # the export is kept


def test_token_can_come_from_a_prefect_secret_block(prefect_api):
    from prefect.blocks.system import Secret

    from tasks.publish import hub_token

    Secret(value="hf_from_block").save("swirl-test-hf-token", overwrite=True)
    assert hub_token("swirl-test-hf-token") == "hf_from_block"  # datasets (publish) and models (train) alike
    assert hub_token(None) is None  # huggingface_hub then reads HF_TOKEN itself


def test_size_categories_follow_the_hubs_buckets_past_a_million():
    from swirl_core.hub import size_category

    assert [size_category(n) for n in (0, 999, 1000, 999_999, 1_000_000, 5 * 10**9, 10**12 - 1, 10**12, 10**15)] == [
        "n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "1M<n<10M", "1B<n<10B", "100B<n<1T", "n>1T", "n>1T"]


def test_run_configurations_are_written_beside_the_data(labeled_db, tmp_path):
    import json

    from swirl_core.store import Store

    with Store(labeled_db) as store:  # scrubbed on the way in, as every run's config is
        store.start_run("gen-1", "generate", {"dataset": "hotpotqa", "samples": 2, "policy": {"api_key": "sk-x"}})
    folder = tmp_path / "hub"
    _, card = _export(labeled_db, folder)
    runs = json.loads((folder / RUN_CONFIG_FILE).read_text())
    with duckdb.connect(str(labeled_db), read_only=True) as con:
        stored = {r: json.loads(c) for r, c in con.execute("SELECT run_id, config FROM runs").fetchall()}
    assert [r["run_id"] for r in runs] == ["gen-1"] and {r["run_id"]: r["config"] for r in runs} == stored
    assert runs[0]["config"]["samples"] == 2 and "sk-x" not in (folder / RUN_CONFIG_FILE).read_text()
    assert RUN_CONFIG_FILE in card


@pytest.mark.slow
def test_tools_configs_load_from_the_hub_in_a_fresh_process_and_match_duckdb(tools_db, tmp_path):
    """Tools-protocol trajectories (generated and curated over HTTP) export as `<set>-tools` / `<set>-tools-steps`;
    the card validates at the Hub, and a fresh process loads every config with `load_dataset`, row for row DuckDB's."""
    import json
    import os
    import subprocess
    import sys

    from fake_hub import FakeHub

    from swirl_core.records import CuratedFilter

    db, _ = tools_db
    folder = tmp_path / "hub"
    summary, card = _export(db, folder)
    sets = [str(f) for f in CuratedFilter]
    tools_configs = [c for f in sets for c in (f"{f}-tools", f"{f}-tools-steps")]
    assert list(summary.files) == [*sets, "steps", *tools_configs]  # the tag configs first, as they always were
    assert {c: summary.rows[c]["train"] for c in ("none-tools", "process-tools", "none-tools-steps")} == {
        "none-tools": 6, "process-tools": 2, "none-tools-steps": 15}
    front = card.split("---\n", 2)[1]
    assert all(f"config_name: {c}\n" in front for c in tools_configs) and 'load_dataset("me/swirl-test", "process-tools")' in card
    with duckdb.connect(str(db), read_only=True) as con:
        def rows(sql: str) -> list[dict]:
            cursor = con.execute(sql)
            names = [d[0] for d in cursor.description]
            return [{k: [json.loads(m) for m in v] if k in ("messages", "prompt", "completion", "tools") else v
                     for k, v in zip(names, r, strict=True)} for r in cursor.fetchall()]

        expected = {}
        for f in CuratedFilter:
            expected[f"{f}-tools"] = rows(f"""
                SELECT c.trajectory_id, c.messages, c.tools FROM tool_conversations c JOIN trajectory_labels USING (trajectory_id)
                JOIN trajectories t USING (trajectory_id) WHERE {f.keeps} ORDER BY c.question_id, t.sample_index, c.trajectory_id""")
            expected[f"{f}-tools-steps"] = rows(f"""SELECT trajectory_id, step_index, prompt, completion, tools FROM {f.tools_view}
                                                    ORDER BY question_id, trajectory_id, step_index""")
    with FakeHub() as hub:
        env = {**os.environ, **hub.env(), "HF_HOME": str(tmp_path / "hf-home")}
        publish = ("import sys; from huggingface_hub import DatasetCard; from swirl_core.hub import upload_folder; "
                   "DatasetCard.load(sys.argv[1] + '/README.md').validate(repo_type='dataset'); "
                   "print(upload_folder(sys.argv[1], 'user/swirl-tools', token=None, private=True))")
        out = subprocess.run([sys.executable, "-c", publish, str(folder)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "POST /api/validate-yaml" in hub.requests_seen
        load = ("import json, sys; from datasets import load_dataset; "
                "out = {c: load_dataset('user/swirl-tools', c, split='train') for c in sys.argv[1:]}; "
                "print(json.dumps({c: {'features': str(d.features), 'rows': d.to_list()} for c, d in out.items()}))")
        fresh = {**env, "HF_HOME": str(tmp_path / "fresh-home")}
        out = subprocess.run([sys.executable, "-c", load, *tools_configs], env=fresh, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    for config in tools_configs:
        got = [{k: r[k] for k in want} for r, want in zip(loaded[config]["rows"], expected[config], strict=True)]
        assert got == expected[config] and len(got) == summary.rows[config]["train"], config
        assert "List(Json(" in loaded[config]["features"]  # every message with exactly its own keys, no NULL-filled ones
    first = loaded["process-tools-steps"]["rows"][0]
    assert first["completion"][0]["tool_calls"][0]["function"]["arguments"] == {"query": first["prompt"][0]["content"]
                                                                               .rsplit("Question: ", 1)[1][:40]}
