"""The schema's version and migrations: a database written by an earlier release opens with every row and view."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from conftest import ROOT

from swirl_core.config import CurateConfig
from swirl_core.curation import pending_steps
from swirl_core.hub import export_folder
from swirl_core.records import CuratedFilter
from swirl_core.store import SCHEMA_VERSION, SchemaVersionError, Store, migrations, schema_version

RELEASE_0_1_0 = Path(__file__).parent / "fixtures" / "schema-v0.duckdb.gz"  # made by tests/fixtures/make_db.py
TABLES = ("runs", "questions", "seed_errors", "trajectories", "steps", "llm_calls", "judgments", "judge_selection",
          "judges", "judge_probe_results", "judge_probe_metrics", "grades", "eval_results")
# What both releases compute from the same rows: the migrated database must give the same answers.
SAME_ANSWERS = {
    # the release built every state from the steps; now each is sliced from the stored conversation
    "sub_trajectories": "SELECT trajectory_id, step_index, question_id, state, history, action, action_kind, "
                        "is_last_step, model, prompt_version FROM sub_trajectories ORDER BY 1, 2",
    "step_verdicts": "SELECT * FROM step_verdicts ORDER BY 1, 2",
    "trajectory_labels": "SELECT * FROM trajectory_labels ORDER BY 1",
    "curation_retention": "SELECT * FROM curation_retention",
    **{f.view: f"SELECT trajectory_id, step_index FROM {f.view} ORDER BY 1, 2" for f in CuratedFilter},
}


def _release_db(tmp_path: Path) -> Path:
    db = tmp_path / "release.duckdb"
    with gzip.open(RELEASE_0_1_0) as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return db


def _read(db: Path, queries: dict[str, str]) -> dict[str, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {name: con.execute(sql).fetchall() for name, sql in queries.items()}
    finally:
        con.close()


def test_a_database_of_release_0_1_0_opens_with_every_row_and_view(tmp_path):
    db = _release_db(tmp_path)
    counts = {t: f"SELECT count(*) FROM {t}" for t in TABLES}
    before = _read(db, counts | SAME_ANSWERS)
    probe_failed = _read(db, {"n": "SELECT count(*) FROM judge_probe_results WHERE starts_with(reasoning, 'LLMError: ')"})
    # The fixture is what make_db.py describes: 3 questions x 2 samples x 3 steps, one question's judging failed.
    assert [before[t][0][0] for t in ("questions", "trajectories", "steps", "judgments")] == [3, 6, 18, 18]
    assert before["judge_probe_results"][0][0] > 0 and before["llm_calls"][0][0] > 0
    with duckdb.connect(str(db), read_only=True) as con:
        assert schema_version(con) == 0

    with Store(db) as store:
        assert schema_version(store.con) == SCHEMA_VERSION
        assert store.query("SELECT version FROM schema_version ORDER BY 1") == [(n,) for n in migrations()]
        views = [r[0] for r in store.query("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")]
        assert {"conversations", "sub_trajectories", "curation_retention", *(f.view for f in CuratedFilter)} <= set(views)
        for view in views:  # every view binds against the migrated tables
            store.query(f"SELECT count(*) FROM {view}")
        # The failed judgments of that release (reason behind an "LLMError: " prefix) now carry a typed error.
        failed = store.query("SELECT verdict, reasoning, error FROM judgments WHERE error IS NOT NULL")
        assert len(failed) == 6 and all(v == "UNKNOWN" and r == "" and "gave up after" in e for v, r, e in failed)
        assert store.query("SELECT count(*) FROM judgments WHERE starts_with(reasoning, 'LLMError')") == [(0,)]
        assert probe_failed["n"] != [(0,)]
        assert store.query("SELECT count(*) FROM judge_probe_results WHERE error IS NOT NULL AND reasoning = ''") == \
            probe_failed["n"]
        # The rows of that release were the paper's tag protocol, and no step made a native tool call.
        assert store.query("SELECT protocol, count(*) FROM trajectories GROUP BY 1") == [("tags", 6)]
        assert store.query("SELECT count(*) FROM steps WHERE tool_calls IS NOT NULL") == [(0,)]
        # ... and the next curation hands exactly those steps to the judge again.
        fingerprint = store.query("SELECT DISTINCT judge_fingerprint FROM judgments")[0][0]
        assert pending_steps(store.con, CurateConfig(db=str(db)), fingerprint).num_rows == 6
        summary = export_folder(store.con, tmp_path / "hub")
        assert sum(summary.rows["none"].values()) == 6 and sum(summary.rows["steps"].values()) == 18

    after = _read(db, counts | SAME_ANSWERS)
    assert after == before
    assert {r[1] for r in after["curation_retention"]} == {str(f) for f in CuratedFilter}
    assert all(after[f.view] for f in CuratedFilter), "the fixture should leave no curated set empty"
    with Store(db) as store:  # opening again migrates nothing
        assert store.query("SELECT count(*) FROM schema_version") == [(len(migrations()),)]


def test_a_read_only_open_migrates_an_older_database_first(tmp_path):
    db = _release_db(tmp_path)
    with Store(db, read_only=True) as store:
        assert schema_version(store.con) == SCHEMA_VERSION
        assert store.query("SELECT count(*) FROM judgments WHERE error IS NOT NULL") == [(6,)]


def test_a_new_database_is_born_at_the_current_version(tmp_path):
    with Store(tmp_path / "new.duckdb") as store:
        assert store.query("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == max(migrations()) >= 2


def test_databases_made_before_p_good_gain_the_column(tmp_path):
    db = str(tmp_path / "old.duckdb")
    con = duckdb.connect(db)
    con.execute("CREATE TABLE judgments (judgment_id VARCHAR PRIMARY KEY, run_id VARCHAR, trajectory_id VARCHAR NOT NULL, "
                "step_index INTEGER NOT NULL, sample_index INTEGER NOT NULL, judge_model VARCHAR NOT NULL, "
                "judge_fingerprint VARCHAR NOT NULL, prompt_version VARCHAR NOT NULL, verdict VARCHAR NOT NULL, "
                "reasoning VARCHAR, attempts INTEGER, call_keys VARCHAR[], created_at TIMESTAMPTZ DEFAULT current_timestamp)")
    con.execute("INSERT INTO judgments VALUES ('j', 'r', 't', 0, 0, 'm', 'f', 'v', 'GOOD', '', 1, [], now())")
    con.close()
    with Store(db) as store:
        assert store.query("SELECT verdict, p_good, error FROM judgments") == [("GOOD", None, None)]


def test_a_database_of_a_newer_schema_gives_a_one_line_error(tmp_path):
    db = tmp_path / "future.duckdb"
    with Store(db) as store:
        store.con.execute("INSERT INTO schema_version VALUES (?, '9.9.9', now())", [SCHEMA_VERSION + 1])
        rows = store.query("SELECT count(*) FROM runs")
    for read_only in (False, True):
        with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer") as info:
            Store(db, read_only=read_only)
        assert "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "--db", str(db), "SELECT 1"], cwd=ROOT,
                          env=os.environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"database {db} has schema version {SCHEMA_VERSION + 1}, newer" in lines[0], lines
    with duckdb.connect(str(db), read_only=True) as con:  # nothing was touched
        assert con.execute("SELECT count(*) FROM runs").fetchall() == rows
        assert con.execute("SELECT max(version) FROM schema_version").fetchall() == [(SCHEMA_VERSION + 1,)]
