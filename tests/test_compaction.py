"""Compaction of the call journals: finished journals folded into one segment after ingest, never losing a paid call.

The calls are real (HTTP to the scripted server, which counts what it completes), the database a real DuckDB file,
and the kills real SIGKILLs of a process compacting, at points drawn from a seeded RNG among the lines it runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from conftest import ROOT
from scripted_server import ScriptedServer
from test_migrations import _release_db

from flows.cli import main
from swirl_core.config import ModelConfig
from swirl_core.llm.base import ChatRequest
from swirl_core.llm.cache import CLOSE_LINE, JOURNAL_GLOB, SEGMENT_PREFIX, CallJournal, is_finished
from swirl_core.llm.factory import build_client
from swirl_core.store import Store

WRITERS, CALLS = 3, 8  # writer processes (one client each, closed) and the calls each paid
KILLS = 16
SEED = 20261202


def _request(n: int) -> ChatRequest:
    return ChatRequest(model="openai/scripted", messages=[{"role": "user", "content": f"Question: what is {n} + 1?"}])


async def _pay(srv: ScriptedServer, journal: CallJournal, numbers: Sequence[int], *, close: bool = True) -> dict[str, str]:
    """Calls `numbers` through a client on `journal` (one writer process); returns key -> text."""
    client = build_client(ModelConfig(model="openai/scripted", api_base=srv.base_url), None)
    client.journal = journal.acquire()
    paid = {}
    for n in numbers:
        response = await client.complete(_request(n))
        paid[response.key] = response.text
    if close:
        await client.aclose()
    return paid


PAID = range(WRITERS * CALLS + 2)  # the requests `_write_journals` pays


def _write_journals(srv: ScriptedServer, journal_dir: Path) -> dict[str, str]:
    """WRITERS finished journals of CALLS calls each, and one journal whose writer is still running (no close line)."""
    paid: dict[str, str] = {}
    for w in range(WRITERS):
        paid |= asyncio.run(_pay(srv, CallJournal(journal_dir), PAID[w * CALLS:(w + 1) * CALLS]))
    return paid | asyncio.run(_pay(srv, CallJournal(journal_dir), PAID[WRITERS * CALLS:], close=False))


def _replay_all(srv: ScriptedServer, journal_dir: Path, numbers: list[int], paid: dict[str, str]) -> int:
    """The requests `numbers` again through a fresh process's journal; returns how many the server completed anew."""
    before = srv.stats()["completed"]
    assert asyncio.run(_pay(srv, CallJournal(journal_dir), numbers)) == paid
    return srv.stats()["completed"] - before


def _journal_lines(journal_dir: Path) -> list[str]:
    """The call keys of every line of every journal file (segments included)."""
    keys = []
    for path in sorted(journal_dir.glob(JOURNAL_GLOB)):
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            if "key" in record:
                keys.append(record["key"])
    return keys


def _bookkeeping(store: Store, journal_dir: Path) -> tuple[dict, dict]:
    recorded = dict(store.query("SELECT path, bytes FROM journal_ingested"))
    on_disk = {p.name: p.stat().st_size for p in journal_dir.glob(JOURNAL_GLOB)}
    return recorded, on_disk


def test_a_journal_file_is_finished_when_its_last_client_closes_and_never_written_again(tmp_path):
    journal = CallJournal(tmp_path)
    for _ in range(2):  # two clients of one process (a policy and a judge, two shards)
        journal.acquire()
    journal.append({"key": "a", "text": "x"})
    first = journal.path
    journal.release()
    assert not is_finished(first)  # the other client may still pay a call into it
    journal.release()
    assert is_finished(first) and first.read_bytes().endswith(b"\n" + CLOSE_LINE)
    journal.acquire()
    journal.append({"key": "b", "text": "y"})  # a later shard's call goes to a new file
    assert journal.path != first and not is_finished(journal.path)
    assert journal.get("a")["text"] == "x" and journal.get("b")["text"] == "y"
    journal.close()
    assert len(list(tmp_path.glob(JOURNAL_GLOB))) == 2 and all(is_finished(p) for p in tmp_path.glob(JOURNAL_GLOB))


def test_compaction_folds_finished_journals_and_a_resume_pays_nothing(tmp_path):
    journal_dir = tmp_path / "journal"
    with ScriptedServer(default="<answer>4</answer>") as srv:
        paid = _write_journals(srv, journal_dir)
        assert srv.stats()["completed"] == len(paid) == WRITERS * CALLS + 2
        finished = [p for p in journal_dir.glob(JOURNAL_GLOB) if p.read_bytes().endswith(CLOSE_LINE)]
        assert len(finished) == WRITERS  # a client's close finished its writer's file; the running one is open
        worker = CallJournal(journal_dir)  # a long-lived process that indexed the journals before they were folded

        with Store(tmp_path / "s.duckdb") as store:
            done = store.compact_journals(journal_dir)
            assert (done.folded, done.journals_left) == (WRITERS, 2)  # the segment and the running writer's journal
            assert sorted(p.name.startswith(SEGMENT_PREFIX) for p in journal_dir.glob(JOURNAL_GLOB)) == [False, True]
            assert store.query("SELECT count(*), count(DISTINCT call_key) FROM llm_calls") == [(len(paid), len(paid))]
            recorded, on_disk = _bookkeeping(store, journal_dir)
            assert recorded == on_disk  # every file there is recorded as ingested whole, and nothing that is gone
            read = store.journal_bytes_read
            assert store.compact_journals(journal_dir).folded == 0  # nothing new: the segment is not rewritten
            assert store.journal_bytes_read == read  # nor read again

            assert worker.get(next(iter(paid)))["text"] == "<answer>4</answer>"  # its journal is gone: the segment has it
            assert _replay_all(srv, journal_dir, list(PAID), paid) == 0  # a fresh process replays every call for free
            done = store.compact_journals(journal_dir)  # the replaying process paid nothing: its journal stays empty
            assert done.folded == 0 and store.query("SELECT count(*) FROM llm_calls") == [(len(paid),)]

            asyncio.run(_pay(srv, CallJournal(journal_dir), range(100, 103)))  # a later run pays 3 new calls
            assert store.compact_journals(journal_dir).folded == 2  # the old segment and the new journal: one segment
            recorded, on_disk = _bookkeeping(store, journal_dir)
            assert recorded == on_disk and len(on_disk) == 2
            assert store.query("SELECT count(*) FROM llm_calls") == [(len(paid) + 3,)]
        keys = _journal_lines(journal_dir)
        assert len(keys) == len(set(keys)) == len(paid) + 3  # each paid call on disk exactly once
        assert worker.get(next(iter(paid)))["text"] == "<answer>4</answer>"
        worker.close()


# One process imports the store, then forks a compaction per work folder (argv: folder:line ...), each SIGKILLed at
# the given line of store.py / cache.py it runs (0: never); prints each one's exit status and the lines it ran.
_COMPACT_AND_DIE = """
import os, signal, sys
from swirl_core.store import Store
ours = {os.path.join(sys.argv[1], "swirl_core", f) for f in ("store.py", os.path.join("llm", "cache.py"))}
for job in sys.argv[2:]:
    folder, kill_at = job.rsplit(":", 1)
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        seen = 0

        def line(frame, event, arg):
            global seen
            if event == "line":
                seen += 1
                if seen == int(kill_at):
                    os.kill(os.getpid(), signal.SIGKILL)
            return line

        with Store(os.path.join(folder, "s.duckdb")) as store:
            sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename in ours else None)
            store.compact_journals(os.path.join(folder, "journal"))
            sys.settrace(None)
        os.write(write, str(seen).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), os.read(read, 64).decode() or "-", flush=True)
"""


def _compact_in_forks(jobs: list[tuple[Path, int]]) -> list[tuple[int, str]]:
    """(exit code, lines run) of a compaction of each (folder, kill line), each in a process of its own."""
    run = subprocess.run([sys.executable, "-c", _COMPACT_AND_DIE, str(ROOT), *(f"{f}:{n}" for f, n in jobs)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    return [(int(code), lines) for code, lines in (row.split() for row in run.stdout.splitlines())]


@pytest.mark.slow
def test_compaction_sigkilled_at_random_points_then_rerun_loses_and_repays_nothing(tmp_path, record_property):
    """A process compacting is SIGKILLed at a random line of the compaction (ingest, segment write, rename,
    bookkeeping, deletions); after each kill every paid call is still replayable, and a rerun finishes with each
    call on disk once, no duplicate rows, the bookkeeping right and nothing paid again."""
    pristine = tmp_path / "pristine"
    with ScriptedServer(default="<answer>4</answer>") as srv:
        paid = _write_journals(srv, pristine / "journal")
        with Store(pristine / "s.duckdb") as store:  # an earlier stage ingested part of it
            store.ingest_journals(pristine / "journal")
        paid |= asyncio.run(_pay(srv, CallJournal(pristine / "journal"), range(200, 204)))  # and paid more since
        numbers = [*PAID, *range(200, 204)]
        paid_before = srv.stats()["completed"]

        probe = tmp_path / "probe"
        shutil.copytree(pristine, probe)
        [(code, lines)] = _compact_in_forks([(probe, 0)])
        assert code == 0
        lines_run = int(lines)  # the lines one whole compaction runs: the kill points are drawn among them

        rng = random.Random(SEED)  # one point drawn from each of KILLS equal spans of the run, so they cover all of it
        kill_points = [rng.randint(1 + k * lines_run // KILLS, (k + 1) * lines_run // KILLS) for k in range(KILLS)]
        for kill_at in kill_points:
            shutil.copytree(pristine, tmp_path / f"kill-{kill_at}")
        killed = _compact_in_forks([(tmp_path / f"kill-{n}", n) for n in kill_points])
        assert [code for code, _ in killed] == [-signal.SIGKILL] * KILLS
        outcomes = []
        for kill_at in kill_points:
            journal_dir = tmp_path / f"kill-{kill_at}" / "journal"
            names = {p.name for p in journal_dir.glob(JOURNAL_GLOB)}
            segments = {n for n in names if n.startswith(SEGMENT_PREFIX)}
            outcomes.append("segment and its sources" if segments and len(names) > 2 else
                            "folded" if segments else "before the segment")
            index = CallJournal(journal_dir)  # what a process started now could replay
            assert {k: index.get(k)["text"] for k in paid} == paid, f"kill at line {kill_at} lost a call"
            index.close()

            with Store(journal_dir.parent / "s.duckdb") as store:  # the rerun (the next stage's compaction)
                store.compact_journals(journal_dir)
                recorded, on_disk = _bookkeeping(store, journal_dir)
                assert recorded == on_disk, kill_at
                assert store.query("SELECT count(*), count(DISTINCT call_key) FROM llm_calls") == [(len(paid), len(paid))]
            keys = _journal_lines(journal_dir)
            assert len(keys) == len(set(keys)) == len(paid), f"kill at line {kill_at}: a call on disk twice or lost"
            assert len(list(journal_dir.glob(JOURNAL_GLOB))) == 2, kill_at  # the segment, the running writer's journal
            assert list(journal_dir.glob("*.part")) == [], kill_at  # what the kill left half-written is gone
            assert _replay_all(srv, journal_dir, numbers, paid) == 0, f"kill at line {kill_at}: a call was paid again"
        assert srv.stats()["completed"] == paid_before
    # The kills landed on each side of the commit point, and between the rename and the deletions.
    assert set(outcomes) == {"before the segment", "segment and its sources", "folded"}, outcomes
    record_property("compaction_kills", {"lines_run": lines_run, "kills": dict(zip(kill_points, outcomes, strict=True))})


def test_a_database_of_release_0_1_0_gets_the_ingest_bookkeeping(tmp_path):
    """`journal_ingested` is in schema.sql only (CREATE … IF NOT EXISTS, run before the migrations on every open):
    a database of release 0.1.0 gains it and can ingest and compact."""
    db = _release_db(tmp_path)
    journal = CallJournal(tmp_path / "journal")
    journal.append({"key": "k-new", "model": "m", "text": "x", "created_at": "2026-01-01T00:00:00+00:00"})
    journal.close()
    with Store(db) as store:
        before = store.query("SELECT count(*) FROM llm_calls")[0][0]
        assert store.compact_journals(tmp_path / "journal").folded == 1
        assert store.query("SELECT count(*) FROM llm_calls") == [(before + 1,)]
        recorded, on_disk = _bookkeeping(store, tmp_path / "journal")
        assert recorded == on_disk


def test_swirl_compact_folds_and_reports_in_one_line(tmp_path, capsys):
    db = tmp_path / "s.duckdb"
    journal_dir = tmp_path / "s.work" / "journal"
    for i in range(2):
        journal = CallJournal(journal_dir)
        journal.append({"key": f"k{i}", "model": "m", "text": "x", "created_at": "2026-01-01T00:00:00+00:00"})
        journal.close()
    assert main(["compact", "--db", str(db)]) == 2  # no database yet
    assert capsys.readouterr().err.strip() == f"swirl compact: error: {db} does not exist"
    Store(db).close()
    assert main(["compact", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith("folded 2 journals into calls-segment-")
    assert main(["compact", "--db", str(db)]) == 0
    assert capsys.readouterr().out.strip() == f"nothing to fold: {journal_dir} holds 1 journal files"
    assert main(["compact", "--db", str(db), "--work-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/journal does not exist" in err
