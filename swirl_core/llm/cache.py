"""The call cache: a per-process append-only journal of paid responses (DESIGN.md §5).

Why a journal of files rather than DuckDB or litellm's cache: Dask workers must never open the
DuckDB file (one writer), and a plain directory works from any process — or any machine, when the
work directory is on shared storage. Each process appends to its own file, so writers never
interleave; a response is written and flushed *before* the caller sees it, so a SIGKILL at any
moment loses no paid response. Every process reads all journals of the directory at start, and the
flow ingests them into the `llm_calls` table.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

JOURNAL_GLOB = "calls-*.jsonl"


class CallJournal:
    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._file = None
        self.path = self.directory / f"calls-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._load()

    def _load(self) -> None:
        for path in sorted(self.directory.glob(JOURNAL_GLOB)):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a crash mid-write: that call was never used
                    self._entries[record["key"]] = record

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._entries[record["key"]] = record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_journals: dict[Path, CallJournal] = {}
_journals_lock = threading.Lock()


def shared_journal(directory: str | Path, *, fsync: bool = False) -> CallJournal:
    """One journal per directory per process, shared by every client (policy and judge)."""
    key = Path(directory).resolve()
    with _journals_lock:
        if key not in _journals:
            _journals[key] = CallJournal(key, fsync=fsync)
        return _journals[key]
