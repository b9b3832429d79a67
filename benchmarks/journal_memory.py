"""Memory of the call journal: peak RSS of a fresh process that indexes a journal of N synthetic entries, and of
one that compacts them (`Store.compact_journals`: ingest into DuckDB, fold into one segment), then indexes the segment.

Each measurement runs in its own interpreter, so one size's memory never inflates the next. A synthetic
entry has a real call key (32 hex digits) and the size of a real response (about 1 KB of text); the journal
keeps only its index in memory. The entries are split over `JOURNALS` finished journals, as a run's writers leave them.

    python benchmarks/journal_memory.py 10000 100000 1000000
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from swirl_core.hashing import content_hash
from swirl_core.llm.cache import CLOSE_LINE

TEXT = "x" * 1000  # about one real response
JOURNALS = 8

_BASE = "\nimport resource, sys, time\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nt = time.perf_counter()\n"
_REPORT = "\nprint(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)\n"
_INDEX = "from swirl_core.llm.cache import CallJournal" + _BASE + """journal = CallJournal(sys.argv[1])
assert len(journal) == int(sys.argv[2]) and journal.get(sys.argv[3])["text"]""" + _REPORT
_COMPACT = "from swirl_core.store import Store" + _BASE + """with Store(sys.argv[1] + "/s.duckdb") as store:
    done = store.compact_journals(sys.argv[1] + "/journal")
    assert done.folded == int(sys.argv[2]) and store.query("SELECT count(*) FROM llm_calls")[0][0] == int(sys.argv[3])""" + _REPORT


def _write(directory: Path, entries: int) -> None:
    directory.mkdir(parents=True)
    for j in range(JOURNALS):
        with open(directory / f"calls-bench-{j}-00000000.jsonl", "w") as fh:
            for i in range(j, entries, JOURNALS):
                fh.write(orjson.dumps({"key": content_hash(i), "model": "m", "text": TEXT, "finish_reason": "stop",
                                       "prompt_tokens": 100, "completion_tokens": 200, "cost_usd": 0.0001,
                                       "latency_s": 0.5}).decode() + "\n")  # as the client writes it
            fh.write(CLOSE_LINE.decode())


def _child(script: str, *args: str) -> tuple[float, float, float]:
    """(RSS before, peak RSS in MB, seconds) of `script` in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True)
    out = run.stdout.splitlines()[-1].split()  # the last line: DuckDB may draw a progress bar above it
    return int(out[0]) / 1024, int(out[1]) / 1024, float(out[2])


def measure(entries: int) -> dict:
    """Peak RSS (MB) of a process indexing `entries` synthetic calls, of one compacting them, and of one indexing
    the segment the compaction left."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "journal"
        _write(journal, entries)
        journal_mb = sum(p.stat().st_size for p in journal.iterdir()) / 2**20
        base, peak, load_s = _child(_INDEX, str(journal), str(entries), content_hash(0))
        _, compact_peak, compact_s = _child(_COMPACT, tmp, str(JOURNALS), str(entries))
        files_after = len(list(journal.iterdir()))
        _, segment_peak, segment_load_s = _child(_INDEX, str(journal), str(entries), content_hash(entries - 1))
    return {"entries": entries, "journal_mb": round(journal_mb, 1), "rss_before_mb": round(base, 1),
            "rss_peak_mb": round(peak, 1), "index_mb": round(peak - base, 1), "load_s": round(load_s, 2),
            "compact_rss_peak_mb": round(compact_peak, 1), "compact_s": round(compact_s, 2),
            "journal_files": f"{JOURNALS} -> {files_after}", "segment_rss_peak_mb": round(segment_peak, 1),
            "segment_load_s": round(segment_load_s, 2)}


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [10_000, 100_000]:
        print(json.dumps(measure(n)))
