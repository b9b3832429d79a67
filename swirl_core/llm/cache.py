"""The call cache: a per-process append-only journal of paid responses (docs/architecture.md, "The call journal").

Why a journal of files rather than DuckDB or litellm's cache: Dask workers must never open the
DuckDB file (one writer), and a plain directory works from any process — or any machine, when the
work directory is on shared storage. Each process appends to its own file, so writers never
interleave; a response is written and flushed *before* the caller sees it, so a SIGKILL at any
moment loses no paid response. Every process reads all journals of the directory at start, and reads
what other processes appended since each time a shard takes the journal (`shared_journal`): a Dask
worker lives across shards and runs, and a shard that a dead worker had started may land on it.
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
                 "choice_probs")


class CallJournal:
    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._file = None
        self._offsets: dict[Path, int] = {}  # bytes of each other journal already read
        self.path = self.directory / f"calls-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._load()

    def _load(self) -> int:
        """Read what the other journals of the directory gained since the last read; returns the new entries."""
        before = len(self._entries)
        for path in sorted(self.directory.glob(JOURNAL_GLOB)):
            start = self._offsets.get(path, 0)
            if path == self.path or path.stat().st_size <= start:
                continue
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
            lines = data.split(b"\n")
            tail = lines.pop()  # after the last newline: a line still being written, or torn by a crash
            read = len(data) - len(tail)
            for line in lines:
                try:
                    self._remember(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # a line torn by a crash mid-write: that call was never used
            if tail:
                try:
                    self._remember(orjson.loads(tail))  # whole but for its newline
                    read = len(data)
                except orjson.JSONDecodeError:
                    pass  # read again next time: if its writer died, that call was never used
            self._offsets[path] = start + read
        return len(self._entries) - before

    def refresh(self) -> int:
        """Take in the calls other processes journaled since this one last looked; returns how many."""
        with self._lock:
            return self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def _remember(self, record: dict[str, Any]) -> None:
        # Only what a replay needs stays in memory; the ledger fields live on disk and in DuckDB.
        self._entries[record["key"]] = {k: record.get(k) for k in REPLAY_FIELDS}

    def append(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._remember(record)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


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
