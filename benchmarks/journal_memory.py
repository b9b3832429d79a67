"""Memory of the call journal: peak RSS of a fresh process that indexes a journal of N synthetic entries.

Each measurement runs in its own interpreter, so one size's memory never inflates the next. A synthetic
entry has a real call key (32 hex digits) and the size of a real response (about 1 KB of text); the journal
keeps only its index in memory.

    python benchmarks/journal_memory.py 10000 100000 1000000
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from swirl_core.hashing import content_hash

TEXT = "x" * 1000  # about one real response

_CHILD = """
import resource, sys, time
from swirl_core.llm.cache import CallJournal
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
journal = CallJournal(sys.argv[1])
load_s = time.perf_counter() - t
assert len(journal) == int(sys.argv[2]) and journal.get(sys.argv[3])["text"]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, load_s)
"""


def _write(directory: Path, entries: int) -> None:
    with open(directory / "calls-bench-0-00000000.jsonl", "w") as fh:
        for i in range(entries):
            fh.write(json.dumps({"key": content_hash(i), "text": TEXT, "finish_reason": "stop", "prompt_tokens": 100,
                                 "completion_tokens": 200, "cost_usd": 0.0001, "latency_s": 0.5}) + "\n")


def measure(entries: int) -> dict:
    """Peak RSS (MB) of a process before and after it indexes a journal of `entries` synthetic calls."""
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), entries)
        out = subprocess.run([sys.executable, "-c", _CHILD, tmp, str(entries), content_hash(0)], check=True, capture_output=True,
                             text=True).stdout.split()
        journal_mb = (Path(tmp) / "calls-bench-0-00000000.jsonl").stat().st_size / 2**20
    base_kb, peak_kb, load_s = int(out[0]), int(out[1]), float(out[2])
    return {"entries": entries, "journal_mb": round(journal_mb, 1), "rss_before_mb": round(base_kb / 1024, 1),
            "rss_peak_mb": round(peak_kb / 1024, 1), "index_mb": round((peak_kb - base_kb) / 1024, 1),
            "load_s": round(load_s, 2)}


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [10_000, 100_000]:
        print(json.dumps(measure(n)))
