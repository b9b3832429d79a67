"""DuckDB, the system of record. Only one process (the flow) ever opens it read-write.

Writes go in as Arrow tables through `INSERT OR REPLACE … BY NAME` / `INSERT OR IGNORE` (trajectories and their
steps: a delete of what an earlier attempt left, then plain inserts, in one transaction per batch): one statement
per batch and table, never a Python loop of row inserts, and a rerun adds no duplicates.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from swirl_core import __version__
from swirl_core.llm.cache import (
    JOURNAL_GLOB,
    SEGMENT_PREFIX,
    is_finished,
    segment_header,
    sync_directory,
    whole_lines,
    write_segment,
)
from swirl_core.protocol import TASK_ACTIONS, tool_definitions
from swirl_core.records import (
    Compaction,
    CuratedFilter,
    InvalidRow,
    LLMCallRow,
    Question,
    QuestionRow,
    SeedErrorRow,
    StepRow,
    TableRow,
    Trajectory,
    TrajectoryRow,
)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
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


def step_votes(con, counts: Sequence[tuple[int, int]]) -> list[str]:
    """The verdict of each (GOOD votes, BAD votes) pair by the one vote rule, the `step_vote` macro of views.sql."""
    if not counts:
        return []
    return con.execute("SELECT [step_vote(v[1], v[2]) FOR v IN ?::INTEGER[][]]", [[list(c) for c in counts]]).fetchall()[0][0]


_INGEST_CHUNK = "ingest.jsonl.part"  # the new journal lines of one ingest, beside the journals (not one of them)
_INGEST_BATCH = 16 << 20  # journal bytes per insert: DuckDB's memory for one grows with them


# `llm_calls` columns the call journal names otherwise (journals outlive releases: their names stay).
_JOURNAL_NAMES = {"call_key": "key", "response_text": "text"}
_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN",
                 pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


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


class SchemaVersionError(DatabaseOpenError):
    """The database was written by a newer swirl, whose schema this one does not know."""


def migrations() -> dict[int, Path]:
    """sql/migrations/NNNN-what.sql by version: migration N takes a database of version N-1 to N."""
    return {int(p.name.split("-", 1)[0]): p for p in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]-*.sql"))}


SCHEMA_VERSION = max(migrations(), default=0)  # what sql/schema.sql creates


def schema_version(con) -> int | None:
    """The database's schema version: None for an empty file, 0 for one with tables but no recorded version (made
    before versions were recorded, by swirl 0.1.0 or earlier)."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
    if "schema_version" in tables:
        return con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] or 0
    return 0 if tables else None


def _tool_definitions_sql() -> str:
    """The `tool_definitions` view the tools-protocol views read: each task's functions, from `protocol.py`."""
    rows = ", ".join(f"('{task}', '{json.dumps(tool_definitions(task)).replace(chr(39), chr(39) * 2)}'::JSON[])"
                     for task in TASK_ACTIONS)
    return f"CREATE OR REPLACE VIEW tool_definitions AS SELECT * FROM (VALUES {rows}) AS d(task, tools);"


def _curated_views_sql() -> str:
    """The curated sets' views (tag and tools protocol) and their retention, from `CuratedFilter` (their one home)."""
    views = [f"""CREATE OR REPLACE VIEW {view} AS
                 SELECT l.dataset, s.* FROM {source} s JOIN trajectory_labels l USING (trajectory_id, question_id)
                 WHERE {f.keeps};"""
             for f in CuratedFilter for view, source in ((f.view, "sub_trajectories"), (f.tools_view, "tool_sub_trajectories"))]
    keeps = ", ".join(f"('{f.value}', {f.keeps})" for f in CuratedFilter)
    retention = f"""CREATE OR REPLACE VIEW curation_retention AS
        SELECT dataset, f.name AS filter,
               count(*) FILTER (WHERE f.keep) AS trajectories,
               coalesce(sum(num_steps) FILTER (WHERE f.keep), 0) AS sub_trajectories,
               round(count(*) FILTER (WHERE f.keep) / count(*), 4) AS retention
        FROM trajectory_labels, LATERAL (VALUES {keeps}) AS f(name, keep)
        GROUP BY ALL ORDER BY dataset, filter;"""
    return "\n".join([*views, retention])


class Store:
    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.journal_bytes_read = 0  # by this store's ingests: each reads only what the journals gained
        if read_only:
            self.con = connect(self.path, read_only=True)
            version = schema_version(self.con)
            self._check_version(version)
            if version is not None and version < SCHEMA_VERSION:  # migrate once, then read as asked
                self.con.close()
                Store(self.path).close()
                self.con = connect(self.path, read_only=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = connect(self.path)
        self._open_schema()

    def _check_version(self, version: int | None) -> None:
        if version is not None and version > SCHEMA_VERSION:
            self.con.close()
            raise SchemaVersionError(
                f"database {self.path} has schema version {version}, newer than this swirl {__version__} knows "
                f"({SCHEMA_VERSION}): upgrade swirl to open it")

    def _open_schema(self) -> None:
        """Create the tables of a new database, or migrate an older one to `SCHEMA_VERSION`; then (re)make the views.
        One transaction: a migration that fails leaves the database as it was."""
        version = schema_version(self.con)
        self._check_version(version)
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute((SQL_DIR / "schema.sql").read_text(encoding="utf-8"))  # tables a database lacks
            steps = migrations()
            reached = [SCHEMA_VERSION] if version is None else [n for n in steps if n > version]  # new: born current
            for n in reached:
                if version is not None:
                    self.con.execute(steps[n].read_text(encoding="utf-8"))
                self.con.execute("INSERT INTO schema_version VALUES (?, ?, current_timestamp)", [n, __version__])
            self.con.execute(_tool_definitions_sql())
            self.con.execute((SQL_DIR / "views.sql").read_text(encoding="utf-8"))
            self.con.execute(_curated_views_sql())
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

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

    def write(self, row_type: type[TableRow], rows: Sequence[dict[str, Any]], mode: str = "OR REPLACE") -> None:
        """Write rows of `row_type`'s table, typed by its Arrow schema."""
        self._insert(row_type.TABLE, row_type.arrow_table(list(rows)), mode)

    def _insert(self, table: str, rows: pa.Table, mode: str = "OR REPLACE") -> None:
        if rows.num_rows == 0:
            return
        self.con.register("_incoming", rows)
        try:
            self.con.execute(f"INSERT {mode} INTO {table} BY NAME SELECT * FROM _incoming")
        finally:
            # An aborted transaction refuses this too, and would hide why it aborted; the next write replaces it.
            with contextlib.suppress(duckdb.TransactionException):
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
        self.write(QuestionRow, [
            {
                "question_id": q.question_id, "dataset": q.dataset, "split": q.split, "source_id": q.source_id,
                "task": q.task, "question": q.question, "answer": q.answer, "answer_aliases": list(q.answer_aliases),
                "metadata": json.dumps(q.metadata, default=str), "source": q.source, "first_run_id": run_id,
            }
            for q in questions
        ], "OR IGNORE")

    def record_seed_errors(self, invalid: Sequence[InvalidRow], run_id: str) -> None:
        self.write(SeedErrorRow, [{"run_id": run_id, "source": r.source, "error": r.error} for r in invalid])

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
                "error": t.error, "prompt_messages": orjson.dumps(t.prompt_messages).decode(),
                "protocol": t.protocol, "conversation": t.conversation(), "prompt_turns": len(t.prompt_messages),
            })
            for s in t.steps:
                step_rows.append({
                    "trajectory_id": t.trajectory_id, "step_index": s.step_index, "message": s.message,
                    "reasoning": s.action.reasoning, "action_kind": s.action.kind, "action_input": s.action.content,
                    "parse_error": s.action.error, "truncated": s.action.truncated, "observation": s.observation,
                    "tool_error": s.tool_error, "call_key": s.call_key, "model": s.model,
                    "prompt_version": s.prompt_version, "constraint": s.constraint, "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens, "latency_s": s.latency_s,
                    "tool_calls": orjson.dumps(s.tool_calls).decode() if s.tool_calls else None,
                })
        ids = pa.table({"trajectory_id": pa.array([t.trajectory_id for t in trajectories], pa.string())})
        self.con.execute("BEGIN TRANSACTION")
        try:
            # A retried trajectory may have fewer steps than its failed attempt: its rows go, then all come in
            # as plain inserts (no key lookup per row, as `OR REPLACE` does).
            self.con.register("_ids", ids)
            for table in (TrajectoryRow.TABLE, StepRow.TABLE):
                self.con.execute(f"DELETE FROM {table} WHERE trajectory_id IN (SELECT trajectory_id FROM _ids)")
            self.con.unregister("_ids")
            self.write(TrajectoryRow, traj_rows, mode="")
            self.write(StepRow, step_rows, mode="")
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- LLM call ledger
    def ingest_journals(self, journal_dir: str | Path) -> int:
        """Copy the journaled calls not yet ingested into `llm_calls` (idempotent); returns the rows added.

        Only the bytes each journal gained since the last ingest are read (`journal_ingested` holds how far
        each was read, in the same transaction as the rows, so a kill leaves both as they were). They go in
        `_INGEST_BATCH` bytes at a time: DuckDB's memory for an insert grows with what it reads."""
        journal_dir = Path(journal_dir)
        if not journal_dir.is_dir():
            return 0
        done = dict(self.query("SELECT path, bytes FROM journal_ingested"))
        fresh = journal_dir / _INGEST_CHUNK
        added = 0
        reached: dict[str, int] = {}
        try:
            with open(fresh, "wb") as out:
                for path in sorted(journal_dir.glob(JOURNAL_GLOB)):
                    position = done.get(path.name, 0)
                    if path.stat().st_size <= position:
                        continue
                    for block in whole_lines(path, position):
                        out.write(block if block.endswith(b"\n") else block + b"\n")
                        position += len(block)
                        reached[path.name] = position
                        if out.tell() >= _INGEST_BATCH:
                            added += self._insert_batch(out, fresh, reached)
                            reached = {}
                if reached:
                    added += self._insert_batch(out, fresh, reached)
        finally:
            fresh.unlink(missing_ok=True)
        return added

    def _insert_batch(self, out, lines: Path, reached: dict[str, int]) -> int:
        out.flush()
        self.journal_bytes_read += out.tell()
        added = self._insert_journal_lines(lines, reached)
        out.seek(0)
        out.truncate()
        return added

    def _insert_journal_lines(self, lines: Path, reached: dict[str, int]) -> int:
        before = self.query("SELECT count(*) FROM llm_calls")[0][0]
        fields = LLMCallRow.arrow_schema()
        columns = {_JOURNAL_NAMES.get(f.name, f.name): _DUCKDB_TYPES[f.type] for f in fields}
        select = ", ".join(f'"{_JOURNAL_NAMES[f.name]}" AS "{f.name}"' if f.name in _JOURNAL_NAMES else f'"{f.name}"'
                           for f in fields)
        self.con.execute("BEGIN TRANSACTION")
        try:
            if lines.stat().st_size:
                self.con.execute(
                    f"""
                    INSERT OR IGNORE INTO llm_calls BY NAME
                    SELECT DISTINCT ON (key) {select}
                    FROM read_json(?, format = 'newline_delimited', ignore_errors = true, columns = {columns!r})
                    WHERE key IS NOT NULL
                    """,
                    [str(lines)],
                )
            self.con.register("_reached", pa.table({"path": list(reached), "bytes": list(reached.values())}))
            self.con.execute("INSERT OR REPLACE INTO journal_ingested BY NAME SELECT * FROM _reached")
            self.con.unregister("_reached")
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return self.query("SELECT count(*) FROM llm_calls")[0][0] - before

    def compact_journals(self, journal_dir: str | Path) -> Compaction:
        """Ingest the journals, then fold those of finished writers into one segment and delete them.

        Never loses a paid call, whenever a kill lands: the segment is durable before any journal is deleted
        (`write_segment`), and a compaction interrupted after that is finished here first, from the segment's
        list of what it holds. The segment counts as ingested, in the transaction that forgets its sources."""
        journal_dir = Path(journal_dir)
        if not journal_dir.is_dir():
            return Compaction(folded=0, segment=None, segment_bytes=0, journals_left=0)
        for segment in sorted(journal_dir.glob(f"{SEGMENT_PREFIX}*.jsonl")):
            if segment.exists() and (left := [n for n in segment_header(segment).segment_of if (journal_dir / n).exists()]):
                self._forget_folded(journal_dir, left)  # a compaction killed after its segment's rename
        self.ingest_journals(journal_dir)
        ingested = dict(self.query("SELECT path, bytes FROM journal_ingested"))
        sources = [p for p in sorted(journal_dir.glob(JOURNAL_GLOB))
                   if ingested.get(p.name) == p.stat().st_size and is_finished(p)]
        if not sources or (len(sources) == 1 and sources[0].name.startswith(SEGMENT_PREFIX)):  # folded already
            return Compaction(folded=0, segment=None, segment_bytes=0,
                              journals_left=len(list(journal_dir.glob(JOURNAL_GLOB))))
        segment = write_segment(journal_dir, sources)
        size = segment.stat().st_size
        self._forget_folded(journal_dir, [p.name for p in sources], (segment.name, size))
        return Compaction(folded=len(sources), segment=segment.name, segment_bytes=size,
                          journals_left=len(list(journal_dir.glob(JOURNAL_GLOB))))

    def _forget_folded(self, journal_dir: Path, names: list[str], segment: tuple[str, int] | None = None) -> None:
        """Drop journals a durable segment holds from `journal_ingested` (recording the segment as ingested, when
        given), then delete their files."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute("DELETE FROM journal_ingested WHERE path IN (SELECT unnest(?::VARCHAR[]))", [names])
            if segment is not None:
                self.con.execute("INSERT OR REPLACE INTO journal_ingested VALUES (?, ?)", list(segment))
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        for name in names:
            (journal_dir / name).unlink(missing_ok=True)
        sync_directory(journal_dir)
