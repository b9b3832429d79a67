"""One training run end to end: export the curated set, train, write the model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from swirl_core.config import ModelConfig
from swirl_core.store import Store
from swirl_core.training.data import rl_dataset, sft_dataset
from swirl_core.training.rewards import JudgeReward, format_reward
from swirl_core.training.trainers import SUMMARY_FILE, TrainSettings, train_sft, train_swirl


class TrainConfig(BaseModel):
    """Parameters of the `train` flow."""

    db: str = "swirl.duckdb"
    filter: Literal["none", "process", "outcome", "process_outcome"] | None = Field(
        None, description="curated set; default: process_outcome for SFT, process for SWiRL (the paper's best)")
    settings: TrainSettings
    judge: ModelConfig | None = Field(None, description="SWiRL's generative reward model; default: the offline model")
    dataset: str | None = Field(None, description="only steps of this seed dataset")
    run_ids: list[str] | None = Field(None, description="only trajectories of these generation runs; default: every run")
    limit: int | None = Field(None, ge=1, description="at most this many training rows")
    work_dir: str | None = Field(None, description="journals of the judge's calls; default: <db>.work")

    @property
    def resolved_filter(self) -> str:
        return self.filter or ("process_outcome" if self.settings.method == "sft" else "process")

    @property
    def journal_dir(self) -> Path:
        return (Path(self.work_dir) if self.work_dir else Path(self.db).with_suffix(".work")) / "journal"


def run_training(request: TrainConfig, run_id: str) -> dict[str, Any]:
    settings = request.settings
    data_dir = Path(settings.output_dir) / "train_data"
    # Read-only: training may run on another machine than the flow that writes DuckDB.
    with Store(request.db, read_only=True) as store:
        export = (sft_dataset if settings.method == "sft" else rl_dataset)(
            store.con, request.resolved_filter, out_dir=data_dir, dataset=request.dataset, run_ids=request.run_ids,
            limit=request.limit)
        prompt_versions = [r[0] for r in store.query(
            "SELECT DISTINCT prompt_version FROM trajectories WHERE run_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY 1",
            [export.run_ids])]
    if export.rows == 0:
        raise ValueError(f"the '{request.resolved_filter}' curated set is empty: nothing to train on "
                         "(run `swirl curate`, or choose another --filter)")
    lineage = export.lineage() | {"filter": request.resolved_filter, "prompt_versions": prompt_versions, "db": request.db,
                                  "data_sha256": _sha256(export.files), "requested_run_ids": request.run_ids}
    judge = request.judge or ModelConfig(temperature=0.0)
    if settings.method == "swirl":
        lineage["judge_model"] = judge.model
    if (done := finished_run(Path(settings.output_dir), settings, lineage)) is not None:
        return done
    reward = None
    if settings.method == "sft":
        result = train_sft(settings, export.dataset, lineage=lineage)
    else:
        reward = JudgeReward(judge, request.journal_dir, run_id=run_id)
        result = train_swirl(settings, export.dataset, [reward, format_reward], lineage=lineage)
    write_model_card(Path(settings.output_dir), settings, lineage, result.log_history, result.dropped_too_long)
    return {"output_dir": result.output_dir, "steps": result.steps, "train_runtime_s": result.train_runtime_s,
            "seconds_per_step": result.seconds_per_step, "log_history": result.log_history, "lineage": lineage,
            "dropped_too_long": result.dropped_too_long,
            "reward": reward.summary() if reward is not None else None, "skipped": False}


def _sha256(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def finished_run(folder: Path, settings: TrainSettings, lineage: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a finished run in `folder` with these settings on this very data, or None: a rerun of a
    pipeline must not train again what it already trained."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    normal = json.loads(json.dumps({"settings": settings.model_dump(), "lineage": lineage}, default=str))
    if summary.get("settings") != normal["settings"] or summary.get("lineage") != normal["lineage"]:
        return None
    result = summary["result"]
    steps = max(int(result["steps"]), 1)
    return {"output_dir": result["output_dir"], "steps": result["steps"], "train_runtime_s": result["train_runtime_s"],
            "seconds_per_step": result["train_runtime_s"] / steps, "log_history": result["log_history"],
            "lineage": lineage, "dropped_too_long": result.get("dropped_too_long", 0), "reward": None, "skipped": True}


def write_model_card(folder: Path, settings: TrainSettings, lineage: dict[str, Any], history: list[dict],
                     dropped_too_long: int = 0) -> None:
    method = "SFT baseline" if settings.method == "sft" else "SWiRL step-wise RL (GRPO, judge reward, KL to the initial policy)"
    last = history[-1] if history else {}
    card = f"""---
library_name: transformers
base_model: {settings.base_model}
tags:
- swirl
- tool-use
- {"sft" if settings.method == "sft" else "grpo"}
---

# {Path(settings.output_dir).name}

{method} of `{settings.base_model}` on the **{lineage['filter']}** curated set of a SWiRL data factory run
(Goldie et al., 2025, arXiv:2504.04736). The model writes one step at a time: brief reasoning, then exactly
one of `<search_query>`, `<math_exp>` or `<answer>`.

## Data lineage

| what | value |
|---|---|
| curated filter | {lineage['filter']} |
| training rows (sub-trajectories) | {lineage['rows']} exported, {dropped_too_long} left out as longer than max_length |
| trajectories | {lineage['trajectories']} |
| seed datasets | {", ".join(lineage['datasets'])} |
| generation runs | {", ".join(lineage['run_ids'])} |
| run filter | {", ".join(lineage['requested_run_ids']) if lineage.get('requested_run_ids') else "none: every run in the database"} |
| policy prompt versions | {", ".join(lineage['prompt_versions'])} |
| reward judge | {lineage.get('judge_model', '—')} |

## Training configuration

```json
{json.dumps(settings.model_dump(), indent=2, default=str)}
```

Steps: {len(history)}; last logged metrics: `{json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))})}`.
"""
    (folder / "README.md").write_text(card, encoding="utf-8")
