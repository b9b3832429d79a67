"""Training data from the curated views: SFT pairs (state → action) and RL states (the paper's stage 2).

Rows stream from DuckDB as Arrow record batches into a Parquet file, which `datasets` then
memory-maps: no Python object is built per row, so a 50,000-trajectory run exports in seconds
and never has to fit in memory twice. The lineage (rows, trajectories, generation runs,
datasets) is counted from the exported file itself, so it describes exactly what was trained on.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from swirl_core.records import CuratedFilter, StepProtocol

BATCH_ROWS = 10_000

# Conversational prompt/completion columns, as TRL's SFTTrainer expects them; the ids stay for lineage. Under the
# tools protocol the messages carry `tool_calls` and `tool` results, and `tools` is the functions offered, which
# SFTTrainer passes to the chat template (the `curated_<name>_tools` views, TRL's tool-calling format).
_SFT_SELECT = {
    StepProtocol.TAGS: """
SELECT c.trajectory_id, c.step_index, c.dataset, c.state AS prompt,
       [{'role': 'assistant', 'content': c.action}] AS completion
FROM __VIEW__ c
""",
    StepProtocol.TOOLS: """
SELECT c.trajectory_id, c.step_index, c.dataset, c.prompt, c.completion, c.tools
FROM __TOOLS_VIEW__ c
""",
}

# GRPO passes every extra column to the reward functions: the judge needs the task, the question
# and the turns after the policy's prompt (JSON text: a list-of-struct column would be re-decoded
# into Python dicts per row by `datasets` for nothing).
_RL_SELECT = """
SELECT c.trajectory_id, c.step_index, c.dataset, c.state AS prompt, q.task, q.question,
       to_json(c.history)::VARCHAR AS history
FROM __VIEW__ c JOIN questions q ON q.question_id = c.question_id
"""


@dataclass
class ExportedData:
    dataset: Any  # datasets.Dataset (imported lazily: `datasets` is slow to import)
    rows: int
    trajectories: int
    run_ids: list[str] = field(default_factory=list)  # generation runs the rows come from
    datasets: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def lineage(self) -> dict[str, Any]:
        return {"rows": self.rows, "trajectories": self.trajectories, "run_ids": self.run_ids,
                "datasets": self.datasets, "files": self.files}


def sft_dataset(con, filter: CuratedFilter | str = CuratedFilter.PROCESS_OUTCOME, *, out_dir: str | Path | None = None,
                dataset: str | None = None, run_ids: list[str] | None = None, limit: int | None = None,
                protocol: StepProtocol = StepProtocol.TAGS) -> ExportedData:
    """(state, action) pairs of one curated set: its tag-protocol steps, or its tools-protocol steps in TRL's
    tool-calling format. The paper's SFT does best on process+outcome."""
    return _export(con, _SFT_SELECT[protocol], filter, f"sft-{protocol}" if protocol == StepProtocol.TOOLS else "sft",
                   out_dir, dataset, run_ids, limit)


def rl_dataset(con, filter: CuratedFilter | str = CuratedFilter.PROCESS, *, out_dir: str | Path | None = None,
               dataset: str | None = None, run_ids: list[str] | None = None, limit: int | None = None) -> ExportedData:
    """States of one curated set, with what the judge reward needs. The paper's RL does best on process-only."""
    return _export(con, _RL_SELECT, filter, "rl", out_dir, dataset, run_ids, limit)


def load_exported(path: str | Path) -> Any:
    """An exported Parquet file as a `datasets.Dataset`: memory-mapped, with its Arrow cache beside the file (not
    in the user's global HF cache), so the processes of a launched run share the one the flow built."""
    import datasets

    path = Path(path)
    if pq.ParquetFile(path).metadata.num_rows == 0:  # `load_dataset` refuses a split with no rows; valid here
        return datasets.Dataset(pq.read_table(path))
    return datasets.load_dataset("parquet", data_files=[str(path)], split="train", cache_dir=str(path.parent / ".hf-cache"))


def _connection(con):
    return getattr(con, "con", con)  # a swirl_core.store.Store or a bare DuckDB connection


def _export(con, select: str, filter: str, kind: str, out_dir: str | Path | None, dataset: str | None,
            run_ids: list[str] | None, limit: int | None) -> ExportedData:
    if filter not in set(CuratedFilter):
        raise ValueError(f"unknown curation filter {filter!r}; expected one of {[str(f) for f in CuratedFilter]}")
    con = _connection(con)
    clauses, params = [], []
    if dataset:
        clauses.append("c.dataset = ?")
        params.append(dataset)
    if run_ids:
        clauses.append("c.trajectory_id IN (SELECT trajectory_id FROM trajectories WHERE run_id IN (SELECT unnest(?::VARCHAR[])))")
        params.append(list(run_ids))
    sql = select.replace("__VIEW__", CuratedFilter(filter).view).replace("__TOOLS_VIEW__", CuratedFilter(filter).tools_view)
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY c.trajectory_id, c.step_index"  # deterministic files: same data, same dataset fingerprint
    if limit is not None:
        sql += f" LIMIT {int(limit)}"

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"swirl-{kind}-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{filter}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    # Lossless: a JSON column (a tools-protocol message) leaves as Arrow's JSON type, which `datasets` decodes into
    # the dicts it holds (its Json feature), where plain Arrow strings would reach the trainer as text.
    lossless = con.execute("SELECT current_setting('arrow_lossless_conversion')").fetchall()[0][0]
    con.execute("SET arrow_lossless_conversion = true")
    try:
        reader = con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)
        # Opened on the reader's schema, so an empty selection still gives a valid (empty) file.
        with pq.ParquetWriter(tmp, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    finally:
        con.execute(f"SET arrow_lossless_conversion = {str(lossless).lower()}")
    tmp.replace(path)

    rows, trajectories, runs, names = con.execute(
        """SELECT count(*), count(DISTINCT e.trajectory_id),
                  coalesce(list(DISTINCT t.run_id ORDER BY t.run_id), []),
                  coalesce(list(DISTINCT e.dataset ORDER BY e.dataset), [])
           FROM read_parquet(?) e LEFT JOIN trajectories t USING (trajectory_id)""",
        [str(path)],
    ).fetchall()[0]
    return ExportedData(dataset=load_exported(path), rows=rows, trajectories=trajectories, run_ids=list(runs), datasets=list(names),
                        files=[str(path)])
