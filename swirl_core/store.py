"""DuckDB, the system of record. Only one process (the flow) ever opens it read-write.

Writes go in as Arrow tables through `INSERT OR REPLACE … BY NAME` / `INSERT OR IGNORE`: one
statement per batch, never a Python loop of row inserts, and a rerun adds no duplicates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from swirl_core import __version__
from swirl_core.llm.cache import JOURNAL_GLOB
from swirl_core.records import InvalidRow, Question, Trajectory

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
SECRET_WORDS = ("api_key", "token", "secret", "password")


def scrub(value: Any) -> Any:
    """Drop any field whose name says it is a secret (key *names*, like `api_key_env`, stay)."""
    if isinstance(value, dict):
        return {
            k: scrub(v) for k, v in value.items()
            if not (any(w in k.lower() for w in SECRET_WORDS) and not k.lower().endswith("_env"))
        }
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def query_dicts(con, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Rows of a query as dicts keyed by column name (for reports, cards and artifacts)."""
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


class DatabaseOpenError(RuntimeError):
    """The database file cannot be opened (the message says which file and why)."""


class DatabaseInUseError(DatabaseOpenError):
    """Another process holds the database file: DuckDB allows one process per file while one writes."""


_LOCK_HOLDER = re.compile(r"\(PID (\d+)\)")


def connect(path: str | Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the database; a file locked by another process raises `DatabaseInUseError` saying what to do."""
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise DatabaseOpenError(f"cannot open {path}: {exc}") from exc
        pid = _LOCK_HOLDER.search(str(exc))
        holder = f"another process (pid {pid.group(1)})" if pid else "another process"
        raise DatabaseInUseError(
            f"database {path} is in use by {holder}; wait for it to finish or use another --db "
            "(DuckDB allows one writing process per file)"
        ) from exc


class Store:
    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = connect(self.path, read_only=read_only)
        if not read_only:
            self.apply_sql("schema.sql", "views.sql")

    def apply_sql(self, *names: str) -> None:
        for name in names:
            path = SQL_DIR / name
            if path.exists():
                self.con.execute(path.read_text(encoding="utf-8"))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def upsert(self, table: str, rows: pa.Table) -> None:
        """Insert or replace rows (matched on the table's primary key) from an Arrow table."""
        self._insert(table, rows)

    def _insert(self, table: str, rows: pa.Table, mode: str = "OR REPLACE") -> None:
        if rows.num_rows == 0:
            return
        self.con.register("_incoming", rows)
        try:
            self.con.execute(f"INSERT {mode} INTO {table} BY NAME SELECT * FROM _incoming")
        finally:
            self.con.unregister("_incoming")

    # ---------------------------------------------------------------- runs
    def start_run(self, run_id: str, kind: str, config: dict[str, Any], **fields: Any) -> int:
        """Create the run, or mark an existing one running again; returns the attempt number."""
        now = datetime.now(UTC)
        existing = self.query("SELECT attempts FROM runs WHERE run_id = ?", [run_id])
        if existing:
            attempts = existing[0][0] + 1
            self.con.execute(
                "UPDATE runs SET status = 'running', attempts = ?, started_at = ?, finished_at = NULL WHERE run_id = ?",
                [attempts, now, run_id],
            )
            return attempts
        self.con.execute(
            "INSERT INTO runs (run_id, kind, status, config, started_at, attempts, swirl_version, dataset, model, prompt_version) "
            "VALUES (?, ?, 'running', ?, ?, 1, ?, ?, ?, ?)",
            [run_id, kind, json.dumps(scrub(config)), now, __version__,
             fields.get("dataset"), fields.get("model"), fields.get("prompt_version")],
        )
        return 1

    def finish_run(self, run_id: str, status: str, **counts: int) -> None:
        self.con.execute(
            "UPDATE runs SET status = ?, finished_at = ?, n_questions = ?, n_trajectories = ?, n_errors = ? WHERE run_id = ?",
            [status, datetime.now(UTC), counts.get("n_questions"), counts.get("n_trajectories"),
             counts.get("n_errors"), run_id],
        )

    # ---------------------------------------------------------------- seeds
    def upsert_questions(self, questions: Sequence[Question], run_id: str) -> None:
        rows = pa.Table.from_pylist([
            {
                "question_id": q.question_id, "dataset": q.dataset, "split": q.split, "source_id": q.source_id,
                "task": q.task, "question": q.question, "answer": q.answer, "answer_aliases": list(q.answer_aliases),
                "metadata": json.dumps(q.metadata, default=str), "source": q.source, "first_run_id": run_id,
            }
            for q in questions
        ], schema=pa.schema([
            ("question_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("source_id", pa.string()),
            ("task", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("answer_aliases", pa.list_(pa.string())),
            ("metadata", pa.string()), ("source", pa.string()), ("first_run_id", pa.string()),
        ]))
        self._insert("questions", rows, "OR IGNORE")

    def record_seed_errors(self, invalid: Sequence[InvalidRow], run_id: str) -> None:
        rows = pa.Table.from_pylist([{"run_id": run_id, "source": r.source, "error": r.error} for r in invalid])
        self._insert("seed_errors", rows)

    # ---------------------------------------------------------------- trajectories
    def completed_trajectory_ids(self, ids: Iterable[str]) -> set[str]:
        """Of `ids`, those already stored with a final status (errors are retried on rerun)."""
        wanted = pa.table({"trajectory_id": pa.array(list(ids), pa.string())})
        self.con.register("_wanted", wanted)
        try:
            rows = self.query(
                "SELECT trajectory_id FROM trajectories JOIN _wanted USING (trajectory_id) WHERE status <> 'error'"
            )
        finally:
            self.con.unregister("_wanted")
        return {r[0] for r in rows}

    def write_trajectories(self, trajectories: Sequence[Trajectory], run_id: str, policy_fingerprint: str) -> None:
        if not trajectories:
            return
        traj_rows, step_rows = [], []
        for t in trajectories:
            traj_rows.append({
                "trajectory_id": t.trajectory_id, "run_id": run_id, "question_id": t.question_id,
                "sample_index": t.sample_index, "model": t.model, "prompt_version": t.prompt_version,
                "policy_fingerprint": policy_fingerprint, "status": t.status, "final_answer": t.final_answer,
                "num_steps": len(t.steps), "num_invalid_steps": sum(s.action.kind == "invalid" for s in t.steps),
                "prompt_tokens": sum(s.prompt_tokens or 0 for s in t.steps),
                "completion_tokens": sum(s.completion_tokens or 0 for s in t.steps),
                "error": t.error, "prompt_messages": json.dumps(t.prompt_messages, ensure_ascii=False),
            })
            for s in t.steps:
                step_rows.append({
                    "trajectory_id": t.trajectory_id, "step_index": s.step_index, "message": s.message,
                    "reasoning": s.action.reasoning, "action_kind": s.action.kind, "action_input": s.action.content,
                    "parse_error": s.action.error, "truncated": s.action.truncated, "observation": s.observation,
                    "tool_error": s.tool_error, "call_key": s.call_key, "model": s.model,
                    "prompt_version": s.prompt_version, "constraint": s.constraint, "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens, "latency_s": s.latency_s,
                })
        ids = pa.table({"trajectory_id": pa.array([t.trajectory_id for t in trajectories], pa.string())})
        self.con.execute("BEGIN TRANSACTION")
        try:
            # A retried trajectory may have fewer steps than its failed attempt: replace them all.
            self.con.register("_ids", ids)
            self.con.execute("DELETE FROM steps WHERE trajectory_id IN (SELECT trajectory_id FROM _ids)")
            self.con.unregister("_ids")
            self._insert("trajectories", pa.Table.from_pylist(traj_rows))
            if step_rows:
                self._insert("steps", pa.Table.from_pylist(step_rows))
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- LLM call ledger
    def ingest_journals(self, journal_dir: str | Path) -> int:
        """Copy every journaled call into `llm_calls` (idempotent); returns the rows added."""
        files = sorted(str(p) for p in Path(journal_dir).glob(JOURNAL_GLOB) if p.stat().st_size > 0)
        if not files:
            return 0
        before = self.query("SELECT count(*) FROM llm_calls")[0][0]
        columns = {
            "key": "VARCHAR", "run_id": "VARCHAR", "purpose": "VARCHAR", "model": "VARCHAR", "backend": "VARCHAR",
            "prompt_version": "VARCHAR", "sample_index": "INTEGER", "temperature": "DOUBLE", "max_tokens": "INTEGER",
            "constraint": "VARCHAR", "text": "VARCHAR", "finish_reason": "VARCHAR", "prompt_tokens": "INTEGER",
            "completion_tokens": "INTEGER", "cost_usd": "DOUBLE", "latency_s": "DOUBLE", "attempts": "INTEGER",
            "created_at": "TIMESTAMPTZ",
        }
        self.con.execute(
            f"""
            INSERT OR IGNORE INTO llm_calls BY NAME
            SELECT DISTINCT ON (key) key AS call_key, run_id, purpose, model, backend, prompt_version, sample_index,
                   temperature, max_tokens, "constraint", text AS response_text, finish_reason, prompt_tokens,
                   completion_tokens, cost_usd, latency_s, attempts, created_at
            FROM read_json(?, format = 'newline_delimited', ignore_errors = true, columns = {columns!r})
            WHERE key IS NOT NULL
            """,
            [files],
        )
        return self.query("SELECT count(*) FROM llm_calls")[0][0] - before
