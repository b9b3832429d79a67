"""The flow's DuckDB writes: CPU and wall milliseconds per 1,000 trajectories, written in batches as shards land.

Each trajectory is what the end-to-end benchmark's server makes (a calculator step, then the answer) under a
~1.7 kB prompt; batches of `--batch` (a shard) go through `Store.write_trajectories` into one database until
`--trajectories` are in. CPU time is the figure to compare on a loaded machine (wall time waits for the cores).

Measured on 2 cores shared with other jobs (load average 9), batches of 417, 10,000 trajectories, two runs each:

| store | CPU ms / 1k trajectories | wall ms / 1k |
|---|---:|---:|
| `INSERT OR REPLACE` of Arrow built from row dicts (before) | 120-164 | 382-524 |
| delete what an earlier attempt left, then plain inserts of Arrow built from columns | 83-101 | 245-449 |

    .venv/bin/python benchmarks/trajectory_writes.py [--batch 417] [--trajectories 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from swirl_core.records import Action, Step, Trajectory
from swirl_core.store import Store

PROMPT = [{"role": "system", "content": "x" * 1500}, {"role": "user", "content": "Question: what is 2+2? " * 10}]


def trajectory(n: int) -> Trajectory:
    common = {"model": "bench", "prompt_version": "v", "prompt_tokens": 10, "completion_tokens": 5, "latency_s": 0.01}
    steps = [Step(step_index=0, message="Add them. <math_exp>2 + 2</math_exp>", observation="2 + 2 → 4",
                  action=Action(kind="math", content="2 + 2", reasoning="Add them."), call_key=f"k{n}a", **common),
             Step(step_index=1, message="<answer>4</answer>", action=Action(kind="answer", content="4"),
                  call_key=f"k{n}b", **common)]
    return Trajectory(trajectory_id=f"t{n:09d}", question_id=f"q{n // 5}", sample_index=n % 5, model="bench",
                      prompt_version="v", prompt_messages=PROMPT, steps=steps, status="answered", final_answer="4")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", type=int, default=417)
    p.add_argument("--trajectories", type=int, default=10_000)
    a = p.parse_args()
    batches = [[trajectory(n) for n in range(start, min(start + a.batch, a.trajectories))]
               for start in range(0, a.trajectories, a.batch)]
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "writes.duckdb") as store:
        store.write_trajectories(batches[0], "warm-up", "fp")  # lazy imports and first-use costs stay out
        store.con.execute("DELETE FROM steps; DELETE FROM trajectories")
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            store.write_trajectories(batch, "bench", "fp")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_1k = 1000 / a.trajectories
    print(f"{a.trajectories:,} trajectories in batches of {a.batch}: CPU {cpu * 1000 * per_1k:.0f} ms, "
          f"wall {wall * 1000 * per_1k:.0f} ms per 1k trajectories")


if __name__ == "__main__":
    main()
