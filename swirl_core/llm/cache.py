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

Compaction keeps the directory from growing with every process of every run. A writer marks its journal done
with `CLOSE_LINE` when its last client closes (later calls go to a fresh file), so a journal with that last line
never changes again; once ingested, the store folds such journals into one segment (`write_segment`: written
beside them, fsynced, renamed into place) and only then deletes them. A segment names the journals it holds in its
first line, so a compaction a kill interrupted after the rename is finished by the next one (`segment_header`).
A journal without the close line (its writer is running, or died) is never deleted.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

JOURNAL_GLOB = "calls-*.jsonl"
SEGMENT_PREFIX = "calls-segment-"  # a compacted journal (it matches JOURNAL_GLOB: readers take it as any other)
CLOSE_LINE = b'{"closed":true}\n'  # a journal's last line once its writer is done with it
_SEGMENT_PART = "segment.jsonl.part"  # a segment being written (not a journal until renamed)
_READ_BLOCK = 1 << 20
REPLAY_FIELDS = ("key", "text", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s",
                 "choice_probs", "tool_calls")
_OFFSET_BITS = 40  # a journal file may grow to 1 TiB; the file number takes the bits above
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_OPEN_READERS = 32  # journals kept open for replay: a work directory gains a journal per process per run


def whole_lines(path: Path, start: int = 0) -> Iterator[bytes]:
    """The lines of a journal from byte `start`, in blocks of whole lines: the one rule for a journal's last line.

    A last line without its newline is taken (as a block of its own, without the newline) when it is whole JSON:
    its writer died before the newline. One torn mid-write, or still being written, is left to be read next time;
    if its writer died, that call was never used."""
    tail = b""
    with open(path, "rb") as fh:
        fh.seek(start)
        while block := fh.read(_READ_BLOCK):
            block = tail + block
            cut = block.rfind(b"\n") + 1
            if cut:
                yield block[:cut]
            tail = block[cut:]
    if tail:
        try:
            orjson.loads(tail)
        except orjson.JSONDecodeError:
            return
        yield tail


_KEY_FIRST = b'{"key":"'  # how `LLMClient` writes a line: the key first, a hex digest


def _call_key(line: bytes) -> str | None:
    """The call key of a journal line; None for a torn line (its call was never used), a header, a close line.
    A line as the client writes it gives its key without being parsed: an index reads only that."""
    if line.startswith(_KEY_FIRST) and line.endswith(b"}\n") and (end := line.find(b'"', len(_KEY_FIRST))) > 0:
        return line[len(_KEY_FIRST):end].decode()
    try:
        return orjson.loads(line)["key"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def is_finished(path: Path) -> bool:
    """Whether the journal's writer is done with it (its last line is `CLOSE_LINE`): only then may it be folded."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size < len(CLOSE_LINE):
            return False
        fh.seek(size - len(CLOSE_LINE))
        return fh.read() == CLOSE_LINE


@dataclass(frozen=True)
class SegmentHeader:
    """A segment's first line: the files it folded (deleted once it is durable) and the calls each writer paid."""

    segment_of: list[str]
    writers: dict[str, int]  # writer process (its journals' name without the file's own suffix) -> calls


def segment_header(path: Path) -> SegmentHeader:
    with open(path, "rb") as fh:
        return SegmentHeader(**orjson.loads(fh.readline()))


def _body(fh, source: Path) -> Iterator[bytes]:
    """The call lines of a finished journal or segment, in blocks: what lies between its header and its close line."""
    if source.name.startswith(SEGMENT_PREFIX):
        fh.readline()
    left = source.stat().st_size - len(CLOSE_LINE) - fh.tell()
    while left > 0 and (block := fh.read(min(left, _READ_BLOCK))):
        yield block
        left -= len(block)


def write_segment(directory: Path, sources: list[Path]) -> Path:
    """Fold finished journals (segments too) into one new segment; returns its path. The sources stay: delete them
    only after this returns. The rename is the commit point: before it, the sources are all there is; after it, the
    segment holds every line of them, durably (fsynced before the rename, the directory after)."""
    writers: Counter[str] = Counter()
    for source in sources:
        if source.name.startswith(SEGMENT_PREFIX):
            writers.update(segment_header(source).writers)
        else:
            with open(source, "rb") as fh:
                writers[source.name.rsplit("-", 1)[0]] += sum(block.count(b"\n") for block in _body(fh, source))
    part = directory / _SEGMENT_PART
    with open(part, "wb") as out:
        out.write(orjson.dumps(SegmentHeader([p.name for p in sources], dict(writers))) + b"\n")
        for source in sources:
            with open(source, "rb") as fh:
                for block in _body(fh, source):
                    out.write(block)
        out.write(CLOSE_LINE)
        out.flush()
        os.fsync(out.fileno())
    segment = directory / f"{SEGMENT_PREFIX}{uuid.uuid4().hex}.jsonl"
    os.replace(part, segment)
    sync_directory(directory)
    return segment


def sync_directory(directory: Path) -> None:
    """Make the renames and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._users = 0  # clients using it (`acquire`, `release`)
        self.path = self._new_path()
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
            try:
                if path == self.path or path.stat().st_size <= start:
                    continue
                number = self._number(path) << _OFFSET_BITS
                position = start
                for block in whole_lines(path, start):
                    for line in io.BytesIO(block):
                        if (key := _call_key(line)) is not None:
                            self._index[key] = number | position
                        position += len(line)
            except FileNotFoundError:  # compacted away meanwhile: its lines are in a segment read below or next time
                continue
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
            try:
                reader = self._reader(where >> _OFFSET_BITS)
            except FileNotFoundError:  # its journal was compacted since it was indexed: the segment holds the line
                self._load()
                reader = self._reader((where := self._index[key]) >> _OFFSET_BITS)
            reader.seek(where & _OFFSET_MASK)
            record = orjson.loads(reader.readline())
        return {k: record.get(k) for k in REPLAY_FIELDS}

    def _reader(self, number: int):
        reader = self._readers.pop(number, None) or open(self._paths[number], "rb")
        self._readers[number] = reader  # the most recently used last
        if len(self._readers) > _OPEN_READERS:
            self._readers.pop(next(iter(self._readers))).close()
        return reader

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

    def acquire(self) -> CallJournal:
        """A client starts using the journal; `release` when it closes."""
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        """A client is done: when it was the last, the journal file is finished (`_finish`)."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if not self._users:
                self._finish()

    def _finish(self) -> None:
        """End the file with `CLOSE_LINE` and take a new one for later calls: a finished file never changes again."""
        if self._file is None:
            return
        self._file.write(CLOSE_LINE)
        self._file.close()
        self._file = None
        self._offsets[self.path] = self._written + len(CLOSE_LINE)  # read as another journal from now on
        self.path = self._new_path()
        self._own = self._number(self.path)
        self._written = 0

    def _new_path(self) -> Path:
        return self.directory / f"calls-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def close(self) -> None:
        with self._lock:
            self._finish()
            for handle in self._readers.values():
                handle.close()
            self._readers.clear()


_journals: dict[Path, CallJournal] = {}
_journals_lock = threading.Lock()


def shared_journal(directory: str | Path, *, fsync: bool = False) -> CallJournal:
    """One journal per directory per process, shared by every client (policy and judge); a client `release`s it
    when it closes, and the file is finished when no client is left.

    A cached journal first reads what other processes journaled since: a long-lived process (a Dask
    worker) must see the calls of a shard that ran, or died, elsewhere before it resumes that shard.
    """
    key = Path(directory).resolve()
    with _journals_lock:
        if key not in _journals:
            _journals[key] = CallJournal(key, fsync=fsync)
        else:
            _journals[key].refresh()
        return _journals[key].acquire()
