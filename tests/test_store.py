"""DuckDB store: idempotent upserts, journal ingestion, no secrets."""

from __future__ import annotations

import json
import socket

import duckdb
import pytest

from swirl_core.records import Action, GradeRow, Question, Step, TableRow, Trajectory
from swirl_core.store import Store, scrub


def _trajectory(n_steps: int, status: str = "answered") -> Trajectory:
    steps = [
        Step(step_index=i, message=f"<math_exp>{i}+1</math_exp>", action=Action(kind="math", content=f"{i}+1"),
             observation=f"{i}+1 → {i + 1}", model="m", prompt_version="v", call_key=f"k{i}")
        for i in range(n_steps)
    ]
    return Trajectory(trajectory_id="t1", question_id="q1", sample_index=0, model="m", prompt_version="v",
                      prompt_messages=[{"role": "user", "content": "hi"}], steps=steps, status=status)


def test_rewriting_a_trajectory_replaces_its_steps(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        store.write_trajectories([_trajectory(3, "error")], "r1", "fp")
        assert store.completed_trajectory_ids(["t1"]) == set()  # errors are redone on rerun
        store.write_trajectories([_trajectory(2)], "r1", "fp")
        store.write_trajectories([_trajectory(2)], "r1", "fp")
        assert store.query("SELECT count(*) FROM trajectories") == [(1,)]
        assert store.query("SELECT count(*) FROM steps") == [(2,)]
        assert store.completed_trajectory_ids(["t1", "t2"]) == {"t1"}


def test_questions_and_runs_are_idempotent(tmp_path):
    q = Question(question_id="q1", dataset="d", split="s", source_id="1", task="math", question="2+2?", answer="4",
                 answer_aliases=("four",))
    with Store(tmp_path / "s.duckdb") as store:
        for _ in range(2):
            store.upsert_questions([q], "r1")
        assert store.start_run("r1", "generate", {"policy": {"api_key": "sk-x", "api_key_env": "MY_KEY"}}) == 1
        assert store.start_run("r1", "generate", {}) == 2
        assert store.query("SELECT answer_aliases FROM questions") == [(["four"],)]
        config = json.loads(store.query("SELECT config FROM runs")[0][0])
    assert config == {"policy": {"api_key_env": "MY_KEY"}}


def test_journal_ingestion_is_idempotent_and_skips_torn_lines(tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    rows = [{"key": f"k{i}", "model": "m", "text": "x", "prompt_tokens": 3, "cost_usd": None, "run_id": "r1",
             "purpose": "policy", "created_at": "2026-01-01T00:00:00+00:00"} for i in range(3)]
    (journal / "calls-a-1-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"key": "torn')
    (journal / "calls-b-2-y.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[0]) + "\n")
    with Store(tmp_path / "s.duckdb") as store:
        assert store.ingest_journals(journal) == 3
        assert store.ingest_journals(journal) == 0
        assert store.query("SELECT count(*), count(cost_usd) FROM llm_calls") == [(3, 0)]


def test_journal_ingestion_reads_only_the_bytes_journals_gained(tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    row = {"model": "m", "text": "x", "run_id": "r1", "purpose": "policy", "created_at": "2026-01-01T00:00:00+00:00"}
    path = journal / "calls-a-1-x.jsonl"
    first = json.dumps({**row, "key": "k0"}) + "\n"
    torn = json.dumps({**row, "key": "k1"})
    path.write_text(first + torn[:10])  # k1's writer is mid-line
    with Store(tmp_path / "s.duckdb") as store:
        assert store.ingest_journals(journal) == 1
        assert store.journal_bytes_read == len(first)
        assert store.ingest_journals(journal) == 0
        assert store.journal_bytes_read == len(first)  # the unchanged journal was not read again
        path.write_text(first + torn + "\n")  # the line is finished
        assert store.ingest_journals(journal) == 1
        assert store.journal_bytes_read == len(first) + len(torn) + 1
        assert store.query("SELECT call_key FROM llm_calls ORDER BY 1") == [("k0",), ("k1",)]
    with Store(tmp_path / "s.duckdb") as store:  # how far each journal was read outlives the process
        assert store.ingest_journals(journal) == 0 and store.journal_bytes_read == 0


def test_journal_ingestion_in_batches_keeps_every_row_and_how_far_each_journal_was_read(tmp_path, monkeypatch):
    import swirl_core.store as store_module

    monkeypatch.setattr(store_module, "_INGEST_BATCH", 200)  # a few lines per insert, as 16 MiB are at scale
    journal = tmp_path / "journal"
    journal.mkdir()
    row = {"model": "m", "text": "x" * 50, "run_id": "r1", "purpose": "policy", "created_at": "2026-01-01T00:00:00+00:00"}
    for name in ("calls-a-1-x.jsonl", "calls-b-2-y.jsonl"):
        (journal / name).write_text("".join(json.dumps({**row, "key": f"{name}-{i}"}) + "\n" for i in range(10)))
    with Store(tmp_path / "s.duckdb") as store:
        assert store.ingest_journals(journal) == 20
        assert store.query("SELECT count(*), count(DISTINCT call_key) FROM llm_calls") == [(20, 20)]
        assert dict(store.query("SELECT path, bytes FROM journal_ingested")) == {
            p.name: p.stat().st_size for p in journal.glob("calls-*.jsonl")}
        assert store.ingest_journals(journal) == 0
        assert store.journal_bytes_read == sum(p.stat().st_size for p in journal.glob("calls-*.jsonl"))
    assert not list(journal.glob("*.part"))


def test_scrub_drops_secret_fields_at_any_depth():
    assert scrub({"a": [{"token": "t", "hf_token_env": "HF"}], "password": "p", "b": 1}) == {
        "a": [{"hf_token_env": "HF"}], "b": 1}


def test_second_writer_gets_a_clear_error(tmp_path):
    import subprocess
    import sys

    with Store(tmp_path / "s.duckdb"):
        code = f"from swirl_core.store import Store; Store({str(tmp_path / 's.duckdb')!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "one writing process" in out.stderr


def test_network_guard_blocks_non_loopback_addresses():
    with pytest.raises(RuntimeError, match="reach the network"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


_COMPATIBLE = {"string": {"VARCHAR", "JSON"}, "int64": {"INTEGER", "BIGINT"}, "double": {"DOUBLE"}, "bool": {"BOOLEAN"},
               "timestamp[us, tz=UTC]": {"TIMESTAMP WITH TIME ZONE"}, "list<item: string>": {"VARCHAR[]"},
               "list<item: struct<role: string, content: string>>": {'STRUCT("role" VARCHAR, "content" VARCHAR)[]'}}


@pytest.mark.parametrize("row_type", TableRow.__subclasses__(), ids=lambda t: t.TABLE)
def test_every_row_type_is_its_table(tmp_path, row_type):
    """A row type's fields are columns of its table in a type DuckDB stores losslessly, and it leaves out no column
    that must be given (NOT NULL without a default)."""
    with Store(tmp_path / "s.duckdb") as store:
        columns = {name: (kind, nullable, default) for name, kind, nullable, default in store.query(
            "SELECT column_name, data_type, is_nullable, column_default FROM duckdb_columns() WHERE table_name = ?",
            [row_type.TABLE])}
    fields = {f.name: str(f.type) for f in row_type.arrow_schema()}
    assert {name: columns[name][0] in _COMPATIBLE[kind] for name, kind in fields.items()} == dict.fromkeys(fields, True)
    required = {name for name, (_, nullable, default) in columns.items() if not nullable and default is None}
    assert required <= set(fields)


def test_store_writes_any_row_type(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        row = {"trajectory_id": "t", "method": "llm", "correct": True, "score": 1.0, "run_id": "r"}
        store.write(GradeRow, [row, row | {"method": "numeric", "correct": None}])
        store.write(GradeRow, [row | {"correct": False}])  # replaced on its primary key
        assert store.query("SELECT method, correct, detail FROM grades ORDER BY 1") == [("llm", False, None),
                                                                                       ("numeric", None, None)]
        with pytest.raises(Exception, match="int|bool"):  # Arrow refuses a value of the wrong type
            store.write(GradeRow, [row | {"correct": "yes"}])


def test_a_tools_protocol_trajectory_keeps_its_calls_and_decomposes_like_a_tagged_one(tmp_path):
    from swirl_core.records import StepProtocol

    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}
    steps = [Step(step_index=0, message='calculator({"expression": "2+2"})', tool_calls=[call],
                  action=Action(kind="math", content="2+2", call_id="c1"), observation="4", model="m", prompt_version="v"),
             Step(step_index=1, message='answer({"answer": "4"})', action=Action(kind="answer", content="4"),
                  model="m", prompt_version="v")]
    traj = Trajectory(trajectory_id="t1", question_id="q1", sample_index=0, model="m", prompt_version="v",
                      prompt_messages=[{"role": "user", "content": "hi"}], steps=steps, status="answered",
                      protocol=StepProtocol.TOOLS)
    with Store(tmp_path / "s.duckdb") as store:
        store.write_trajectories([traj], "r1", "fp")
        assert store.query("SELECT protocol FROM trajectories") == [("tools",)]
        stored = store.query("SELECT tool_calls FROM steps ORDER BY step_index")
        assert json.loads(stored[0][0]) == [call] and stored[1][0] is None
        # the judge's view: each step's state and its action as readable text
        rows = store.query("SELECT step_index, action, len(state) FROM sub_trajectories ORDER BY 1")
        assert rows == [(0, 'calculator({"expression": "2+2"})', 1), (1, 'answer({"answer": "4"})', 3)]


def _old_decomposition():
    """The decomposition as it was before conversations were stored: built from `steps` on every query (kept in the
    benchmark as its `unnest` variant, the formulation it measures the stored one against)."""
    import importlib.util
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("curation_throughput", ROOT / "benchmarks" / "curation_throughput.py")
    bench = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench)
    return bench.VARIANTS["unnest"], bench.COLUMNS


def test_the_stored_conversation_decomposes_into_exactly_the_rows_built_from_the_steps(tmp_path):
    old_sql, columns = _old_decomposition()
    answered = _trajectory(4).model_copy(update={"trajectory_id": "t-answered"})
    answered.steps[-1] = Step(step_index=3, message="so: <answer>4</answer>", action=Action(kind="answer", content="4"),
                              model="m", prompt_version="v")  # no observation: content NULL in its turn
    unicode = _trajectory(2).model_copy(update={
        "trajectory_id": "t-unicode", "prompt_messages": [{"role": "system", "content": "Ünïcode → ∑ 🙂"},
                                                          {"role": "user", "content": 'quotes " and \\ and\nnewline'}]})
    rows = [answered, unicode, _trajectory(1, "step_cap").model_copy(update={"trajectory_id": "t-one"}),
            _trajectory(3, "error").model_copy(update={"trajectory_id": "t-error"}),  # left out by both
            _trajectory(0, "step_cap").model_copy(update={"trajectory_id": "t-empty"})]
    with Store(tmp_path / "s.duckdb") as store:
        store.write_trajectories(rows, "r1", "fp")
        new = store.query(f"SELECT {columns} FROM sub_trajectories ORDER BY 1, 3")
        assert new == store.query(f"SELECT {columns} FROM ({old_sql}) ORDER BY 1, 3")
        assert len(new) == 4 + 2 + 1
        # a state is the conversation's first `state_turns` messages; the last one is the observation before it
        turns = store.query("SELECT step_index, state_turns, len(state), state[-1] FROM sub_trajectories "
                            "WHERE trajectory_id = 't-answered' ORDER BY 1")
        assert [t[1] for t in turns] == [t[2] for t in turns] == [1, 3, 5, 7]
        assert turns[1][3] == {"role": "user", "content": "0+1 → 1"}
        stored = store.query("SELECT conversation FROM trajectories WHERE trajectory_id = 't-answered'")[0][0]
        assert stored[-2:] == [{"role": "assistant", "content": "so: <answer>4</answer>"}, {"role": "user", "content": None}]
        # a retried trajectory replaces its conversation with its steps
        store.write_trajectories([_trajectory(2).model_copy(update={"trajectory_id": "t-error"})], "r1", "fp")
        assert store.query(f"SELECT {columns} FROM sub_trajectories ORDER BY 1, 3") == \
            store.query(f"SELECT {columns} FROM ({old_sql}) ORDER BY 1, 3")
        assert store.query("SELECT len(conversation), prompt_turns FROM trajectories WHERE trajectory_id = 't-error'") == \
            [(5, 1)]


def _numbered(n: int, n_steps: int = 2) -> Trajectory:
    return _trajectory(n_steps).model_copy(update={"trajectory_id": f"t{n}", "question_id": f"q{n // 5}", "sample_index": n % 5})


def test_a_batch_of_trajectories_is_one_transaction_and_stores_what_single_writes_store(tmp_path):
    batch = [_numbered(n) for n in range(50)]
    tables = "SELECT * EXCLUDE (created_at) FROM trajectories ORDER BY ALL", "SELECT * FROM steps ORDER BY ALL"
    with Store(tmp_path / "one.duckdb") as one, Store(tmp_path / "each.duckdb") as each:
        one.write_trajectories(batch, "r1", "fp")
        for t in batch:
            each.write_trajectories([t], "r1", "fp")
        assert [one.query(q) for q in tables] == [each.query(q) for q in tables]
        assert one.query("SELECT count(*) FROM steps") == [(100,)]
        # A batch that fails part-way (its last trajectory repeats a step: the steps' key refuses it) leaves
        # nothing of itself, its trajectories included, and everything written before stays.
        broken = _numbered(99).model_copy(update={"steps": [_trajectory(1).steps[0]] * 2})
        with pytest.raises(duckdb.ConstraintException):
            one.write_trajectories([_numbered(60), _numbered(61), broken], "r1", "fp")
        assert one.query("SELECT count(*) FROM trajectories WHERE trajectory_id IN ('t60', 't61', 't99')") == [(0,)]
        assert [one.query(q) for q in tables] == [each.query(q) for q in tables]
