"""The call cache: a per-process append-only journal of paid responses (docs/architecture.md, "The call journal").

Why a journal of files rather than DuckDB or litellm's cache: Dask workers must never open the
DuckDB file (one writer), and a plain directory works from any process — or any machine, when the
work directory is on shared storage. Each process appends to its own file, so writers never
interleave; a response is written and flushed *before* the caller sees it, so a SIGKILL at any
moment loses no paid response. Every process indexes all journals of the directory at start (each key and
where its line is, never the text), and what other processes appended since each time a shard takes the
journal (`shared_journal`): a Dask worker lives across shards and runs, and a shard that a dead worker had
started may land on it.
The flow ingests the journals into the `llm_calls` table.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson

JOURNAL_GLOB = "calls-*.jsonl"
REPLAY_FIELDS = ("key", "text", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s",
                 "choice_probs", "tool_calls")
_OFFSET_BITS = 40  # a journal file may grow to 1 TiB; the file number takes the bits above
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_OPEN_READERS = 32  # journals kept open for replay: a work directory gains a journal per process per run


class CallJournal:
    """The journals of one directory, as an index (call key -> where its line is); a response is read when replayed.

    Only the index stays in memory — one packed integer per key — so a process holding a million
    journaled calls stays small; the text of a response is read from its line when it is replayed.
    """

    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._index: dict[str, int] = {}  # key -> file number << _OFFSET_BITS | byte offset of its line
        self._paths: list[Path] = []
        self._numbers: dict[Path, int] = {}
        self._readers: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._file = None
        self._offsets: dict[Path, int] = {}  # bytes of each other journal already read
        self.path = self.directory / f"calls-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._own = self._number(self.path)
        self._written = 0  # bytes of this process's own journal
        self._load()

    def _number(self, path: Path) -> int:
        if path not in self._numbers:
            self._numbers[path] = len(self._paths)
            self._paths.append(path)
        return self._numbers[path]

    def _load(self) -> int:
        """Index what the other journals of the directory gained since the last read; returns the new entries."""
        before = len(self._index)
        for path in sorted(self.directory.glob(JOURNAL_GLOB)):
            start = self._offsets.get(path, 0)
            if path == self.path or path.stat().st_size <= start:
                continue
            number = self._number(path) << _OFFSET_BITS
            with open(path, "rb") as fh:
                fh.seek(start)
                position = start
                for line in fh:
                    if not line.endswith(b"\n"):
                        try:
                            orjson.loads(line)  # whole but for its newline
                        except orjson.JSONDecodeError:
                            break  # read again next time: if its writer died, that call was never used
                    try:
                        self._index[orjson.loads(line)["key"]] = number | position
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        pass  # a line torn by a crash mid-write: that call was never used
                    position += len(line)
            self._offsets[path] = position
        return len(self._index) - before

    def refresh(self) -> int:
        """Take in the calls other processes journaled since this one last looked; returns how many."""
        with self._lock:
            return self._load()

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> dict[str, Any] | None:
        """What a replay needs of the journaled call `key` (the ledger fields live on disk and in DuckDB)."""
        with self._lock:
            where = self._index.get(key)
            if where is None:
                return None
            number, offset = where >> _OFFSET_BITS, where & _OFFSET_MASK
            reader = self._readers.pop(number, None) or open(self._paths[number], "rb")
            self._readers[number] = reader  # the most recently used last
            if len(self._readers) > _OPEN_READERS:
                self._readers.pop(next(iter(self._readers))).close()
            reader.seek(offset)
            record = orjson.loads(reader.readline())
        return {k: record.get(k) for k in REPLAY_FIELDS}

    def append(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._index[record["key"]] = self._own << _OFFSET_BITS | self._written
            self._written += len(line)

    def close(self) -> None:
        with self._lock:
            for handle in (self._file, *self._readers.values()):
                if handle is not None:
                    handle.close()
            self._file = None
            self._readers.clear()


_journals: dict[Path, CallJournal] = {}
_journals_lock = threading.Lock()


def shared_journal(directory: str | Path, *, fsync: bool = False) -> CallJournal:
    """One journal per directory per process, shared by every client (policy and judge).

    A cached journal first reads what other processes journaled since: a long-lived process (a Dask
    worker) must see the calls of a shard that ran, or died, elsewhere before it resumes that shard.
    """
    key = Path(directory).resolve()
    with _journals_lock:
        if key not in _journals:
            _journals[key] = CallJournal(key, fsync=fsync)
        else:
            _journals[key].refresh()
        return _journals[key]
