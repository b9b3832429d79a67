"""Bad seed files through the CLI: every malformed row stops `swirl generate` before anything is paid for.

Each case runs the real `swirl generate` against a scripted server and asserts: exit code 2, one line on stderr
naming the file and the line (JSON lines, 1-based) or row (Parquet and JSON lists, 0-based) and what is wrong,
no traceback, no database created and not one request at the server. Huge fields included: a question over
`MAX_QUESTION_CHARS` (100,000 characters) is rejected as a bad row, so a 50 MB question never reaches a model,
a journal or DuckDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy
from scripted_server import ScriptedServer
from test_faults import report

from swirl_core.seeds import MAX_QUESTION_CHARS

GOOD = [json.loads(line) for line in (FIXTURES / "gsm8k_test20.jsonl").read_text().splitlines()[:3]]
HUGE = 50 * 1024 * 1024  # a 50 MB question
SEVERAL_MB = 6 * 1024 * 1024


def _jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
            fh.write(b"\n")
    return path


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def _truncated_parquet(path: Path) -> Path:
    _parquet(path, {"question": [g["question"] for g in GOOD], "answer": [g["answer"] for g in GOOD]})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# name -> (dataset, builder(tmp) -> file, position named in the message, what the message says)
CASES = {
    "jsonl-not-json": ("gsm8k", lambda d: _jsonl(d / "bad.jsonl", [GOOD[0], GOOD[1], "{oops", GOOD[2]]),
                       "line 3", "not valid JSON"),
    "jsonl-missing-answer": ("gsm8k", lambda d: _jsonl(d / "noanswer.jsonl", [GOOD[0], {"question": "How many?"}]),
                             "line 2", "missing field 'answer'"),
    "jsonl-question-list": ("gsm8k", lambda d: _jsonl(d / "qlist.jsonl", [GOOD[0], GOOD[1] | {"question": ["a", "b"]}]),
                            "line 2", "question must be a string, got list"),
    "jsonl-question-int": ("gsm8k", lambda d: _jsonl(d / "qint.jsonl", [GOOD[0] | {"question": 1234}]),
                           "line 1", "question must be a string, got int"),
    "jsonl-row-not-object": ("gsm8k", lambda d: _jsonl(d / "array.jsonl", [GOOD[0], "[1, 2, 3]"]),
                             "line 2", "expected a JSON object, got list"),
    "jsonl-not-utf8": ("gsm8k", lambda d: _jsonl(d / "latin1.jsonl", [GOOD[0], '{"question": "Caf\xe9?", "answer": "#### 1"}'
                                                                        .encode("latin-1")]),
                       "line 2", "not valid UTF-8"),
    "jsonl-50MB-question": ("gsm8k", lambda d: _jsonl(d / "huge.jsonl", [GOOD[0], {"question": "x" * HUGE, "answer": "#### 1"}]),
                            "line 2", f"question is {HUGE:,} characters, over the limit of {MAX_QUESTION_CHARS:,}"),
    "jsonl-several-MB-garbage-line": ("gsm8k", lambda d: _jsonl(d / "garbage.jsonl", [GOOD[0], "{" + "y" * SEVERAL_MB]),
                                      "line 2", "not valid JSON"),
    "jsonl-several-MB-answer-type": ("generic", lambda d: _jsonl(d / "bigans.jsonl",
                                                                 [{"question": "Q?", "answer": ["z" * SEVERAL_MB]}]),
                                     "line 1", "answer must be a string, got list"),
    "parquet-question-int": ("gsm8k", lambda d: _parquet(d / "qint.parquet", {"question": [7, 8], "answer": ["#### 1", "#### 2"]}),
                             "row 0", "question must be a string, got int"),
    "parquet-question-list": ("gsm8k", lambda d: _parquet(d / "qlist.parquet",
                                                          {"question": [["a"], ["b"]], "answer": ["#### 1", "#### 2"]}),
                              "row 0", "question must be a string, got list"),
    "parquet-null-question": ("gsm8k", lambda d: _parquet(d / "qnull.parquet", {
        "question": [g["question"] for g in GOOD] + [None], "answer": [g["answer"] for g in GOOD] + ["#### 4"]}),
                              "row 3", "missing field 'question'"),
    "parquet-missing-column": ("gsm8k", lambda d: _parquet(d / "nocol.parquet", {"question": [g["question"] for g in GOOD]}),
                               "row 0", "missing field 'answer'"),
    "parquet-50MB-question": ("gsm8k", lambda d: _parquet(d / "huge.parquet", {
        "question": [GOOD[0]["question"], GOOD[1]["question"], "q" * HUGE], "answer": [g["answer"] for g in GOOD]}),
                              "row 2", f"question is {HUGE:,} characters"),
    "parquet-truncated": ("gsm8k", lambda d: _truncated_parquet(d / "cut.parquet"), "", "not a readable Parquet file"),
    "json-list-answer-object": ("generic", lambda d: (d / "list.json").write_text(json.dumps(
        [{"question": "Q1?", "answer": "A"}, {"question": "Q2?", "answer": {"text": "B"}}])) and d / "list.json",
                                "row 1", "answer must be a string, got dict"),
}


def _swirl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_seed_fails_in_one_line_before_any_request(case, tmp_path, record_property):
    dataset, build, where, what = CASES[case]
    path = build(tmp_path)
    db = tmp_path / "never.duckdb"
    started = time.perf_counter()
    with ScriptedServer(responder=math_policy) as srv:
        out = _swirl("generate", "--dataset", dataset, "--data-files", str(path), "--split", "test", "--samples", "1",
                     "--policy", "openai/policy", "--policy-api-base", srv.base_url, "--db", str(db), "--no-progress")
        sent = srv.stats()["total"]
    wall = time.perf_counter() - started
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    message = lines[0]
    assert message.startswith("swirl generate: error: ") and f"{path}{' ' + where if where else ''}:" in message, message
    assert what in message, message
    assert len(message) < 600, f"the message echoes the row: {len(message)} characters"
    assert sent == 0  # validation ran before any request
    assert not db.exists()  # nor was a database created
    report(f"bad_seed[{case}]", {"exit_code": out.returncode, "message": message, "requests_sent": sent,
                                 "file_bytes": path.stat().st_size, "wall_s": round(wall, 2)}, record_property)


@pytest.mark.slow
def test_skip_invalid_records_every_bad_row_and_stores_no_huge_field(prefect_api, tmp_path, record_property):
    """With --skip-invalid the same rows land in `seed_errors` (file:line and reason), the good questions run,
    and neither the 50 MB question nor a several-MB line reaches the server, a journal or DuckDB."""
    started = time.perf_counter()
    path = _jsonl(tmp_path / "mixed.jsonl", [
        GOOD[0], "{oops", {"question": "How many?"}, GOOD[1] | {"question": ["a"]}, {"question": "x" * HUGE, "answer": "#### 1"},
        '{"question": "Caf\xe9?", "answer": "#### 1"}'.encode("latin-1"), "{" + "y" * SEVERAL_MB, GOOD[1], GOOD[2] | {"question": 5},
    ])
    db = tmp_path / "skip.duckdb"
    with ScriptedServer(responder=math_policy) as srv:
        out = _swirl("generate", "--dataset", "gsm8k", "--data-files", str(path), "--split", "test", "--samples", "1",
                     "--skip-invalid", "--policy", "openai/policy", "--policy-api-base", srv.base_url, "--db", str(db),
                     "--workers", "1", "--no-progress")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        asked = {m["content"] for body in srv.requests for m in body["messages"] if m["role"] == "user"}
        biggest_request = max(len(json.dumps(body)) for body in srv.requests)
        stats = srv.stats()
    con = duckdb.connect(str(db), read_only=True)
    try:
        errors = con.execute("SELECT source, error FROM seed_errors ORDER BY source").fetchall()
        questions = sorted(r[0] for r in con.execute("SELECT question FROM questions").fetchall())
        longest = con.execute("SELECT max(length(error)), max(length(source)) FROM seed_errors").fetchall()[0]
    finally:
        con.close()
    by_line = {int(src.rsplit("line ", 1)[1]): err for src, err in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 9]
    assert "not valid JSON" in by_line[2] and "missing field 'answer'" in by_line[3]
    assert "got list" in by_line[4] and "over the limit" in by_line[5] and "not valid UTF-8" in by_line[6]
    assert "not valid JSON" in by_line[7] and "got int" in by_line[9]
    assert questions == sorted([GOOD[0]["question"], GOOD[1]["question"]])
    assert any(GOOD[0]["question"] in a for a in asked) and biggest_request < 100_000
    assert stats["completed"] == 2 * 3  # two questions, three scripted steps each
    assert max(longest) < 600
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p != path)
    assert stored < 20 * 1024 * 1024  # nothing of the 50 MB row was kept (the DB, WAL, journals, Dask scratch)
    report("bad_seeds_skip_invalid", {"seed_errors": len(errors), "questions_run": len(questions),
                                      "requests_completed": stats["completed"], "largest_request_bytes": biggest_request,
                                      "bytes_written": stored, "wall_s": round(time.perf_counter() - started, 1)},
           record_property)


def test_loader_limits_and_skips_bad_rows(tmp_path):
    """At the loader: the cap's boundary, and the new row errors are skippable like any other bad row."""
    from swirl_core.seeds import SeedError, load_seeds

    edge = _jsonl(tmp_path / "edge.jsonl", [{"question": "q" * MAX_QUESTION_CHARS, "answer": "#### 1"},
                                            {"question": "q" * (MAX_QUESTION_CHARS + 1), "answer": "#### 2"}])
    with pytest.raises(SeedError, match=rf"edge\.jsonl line 2: question is {MAX_QUESTION_CHARS + 1:,} characters"):
        load_seeds("gsm8k", data_files=edge)
    assert len(load_seeds("gsm8k", data_files=edge, limit=1).questions[0].question) == MAX_QUESTION_CHARS
    mixed = _jsonl(tmp_path / "mixed.jsonl", [GOOD[0], b'{"question": "\xff\xfe?", "answer": "#### 1"}', GOOD[0] | {"question": 3.5},
                                              GOOD[1]])
    res = load_seeds("gsm8k", data_files=mixed, skip_invalid=True)
    assert [q.question for q in res.questions] == [GOOD[0]["question"], GOOD[1]["question"]]
    assert [(r.source.rsplit(":", 1)[1], r.error) for r in res.invalid] == [
        ("line 2", "not valid UTF-8 (at character 15 of the line)"), ("line 3", "question must be a string, got float")]
    with pytest.raises(SeedError, match=r"cut\.parquet: not a readable Parquet file"):
        load_seeds("gsm8k", data_files=_truncated_parquet(tmp_path / "cut.parquet"))
