"""One training run end to end: export the curated set, train (in this process or under `accelerate launch`),
resume an interrupted run, write the model card, push to the Hub."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from swirl_core.config_base import ActionProtocol, Workspace
from swirl_core.llm.config import GreedyModelConfig, ModelConfig
from swirl_core.llm.local_models import SMOLLM2_HUB_ID, is_smollm2
from swirl_core.records import CuratedFilter, StepProtocol, TaskKind
from swirl_core.store import Store
from swirl_core.training.data import load_exported, rl_dataset, sft_dataset
from swirl_core.training.progress import ProgressSink, progress_callback
from swirl_core.training.rewards import JudgeReward, format_reward
from swirl_core.training.trainers import (
    CHECKPOINT_PREFIX,
    SUMMARY_FILE,
    TrainResult,
    TrainSettings,
    train_sft,
    train_swirl,
)

log = logging.getLogger(__name__)
RUN_FILE = "swirl_run.json"  # the run an output folder's checkpoints belong to, written before the first step
LAUNCH_DIR = "launch"  # spec, progress and per-rank results of a launched (several-process) run
# Left out of a model pushed to the Hub: the trainer's checkpoints, the exported data, the launch files.
HUB_IGNORE = [f"{CHECKPOINT_PREFIX}*", "train_data/*", f"{LAUNCH_DIR}/*", "runs/*", RUN_FILE]


class TrainConfig(ActionProtocol, Workspace):
    """Parameters of the `train` flow."""

    filter: CuratedFilter | None = Field(
        None, description="curated set; default: process_outcome for SFT, process for SWiRL (the paper's best)")
    settings: TrainSettings
    judge: GreedyModelConfig | None = Field(None, description="SWiRL's generative reward model; default: the offline model")
    dataset: str | None = Field(None, description="only steps of this seed dataset")
    run_ids: list[str] | None = Field(None, description="only trajectories of these generation runs; default: every run")
    limit: int | None = Field(None, ge=1, description="at most this many training rows")
    progress: bool = Field(True, description="the trainer's progress bar on a terminal")
    push_to_hub: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$", description="USER/NAME of a model repo to push to")
    private: bool = Field(True, description="a new Hub repo is private")
    token_secret: str | None = Field(None, description="Prefect Secret block holding the Hub token; default: HF_TOKEN")
    license: str = Field("apache-2.0", description="licence of the trained model (the card's `license`)")
    dataset_repo_id: str | None = Field(None, description="Hub dataset holding the curated set (the card's `datasets`)")

    @property
    def resolved_filter(self) -> CuratedFilter:
        return self.filter or (CuratedFilter.PROCESS_OUTCOME if self.settings.method == "sft" else CuratedFilter.PROCESS)

    @property
    def resolved_judge(self) -> ModelConfig:
        return self.judge or GreedyModelConfig()

    @property
    def launched(self) -> bool:
        """Several processes, or a sharded engine: the run goes through `accelerate launch`."""
        return self.settings.num_processes > 1 or self.settings.distributed != "ddp"


class LaunchSpec(BaseModel):
    """What every launched process needs: the request, the exported data and its lineage."""

    request: TrainConfig
    run_id: str
    data_file: str
    lineage: dict[str, Any]
    progress_bar: bool
    sampling_task: TaskKind | None


def run_training(request: TrainConfig, run_id: str, *, on_progress: ProgressSink | None = None) -> dict[str, Any]:
    settings = request.settings
    folder = Path(settings.output_dir)
    data_dir = folder / "train_data"
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
    if request.protocol != StepProtocol.TAGS:  # named only when not the paper's, so earlier runs keep their lineage
        lineage["protocol"] = request.protocol
    if settings.method == "swirl":
        lineage["judge_model"] = request.resolved_judge.model
    if (done := finished_run(folder, settings, lineage)) is not None:
        write_model_card(folder, settings, lineage, done["log_history"], done["dropped_too_long"], license=request.license,
                         dataset_repo_id=request.dataset_repo_id)  # the card may name a newly published set
        return done
    resuming = claim_output(folder, settings, lineage)
    if resuming:
        log.warning("%s: resuming the interrupted run from its last checkpoint", folder)
    # RL samples under generation's action constraint, which is per task: one task per run, else free text.
    tasks = sorted(export.dataset.unique("task")) if settings.method == "swirl" else []
    if len(tasks) > 1 and settings.constraint == "auto":
        log.warning("the RL states mix tasks %s: sampling is unconstrained (train one task per run to keep it)", tasks)
    spec = LaunchSpec(request=request, run_id=run_id, data_file=export.files[0], lineage=lineage,
                      progress_bar=request.progress and sys.stderr.isatty(),
                      sampling_task=tasks[0] if len(tasks) == 1 else None)
    if request.launched:
        from swirl_core.training.launch import launch

        result, reward = launch(spec, on_progress=on_progress)
    else:
        result, reward = train_exported(spec, export.dataset, on_progress)
    write_model_card(folder, settings, lineage, result.log_history, result.dropped_too_long, license=request.license,
                     dataset_repo_id=request.dataset_repo_id)
    return {"output_dir": result.output_dir, "steps": result.steps, "train_runtime_s": result.train_runtime_s,
            "seconds_per_step": result.seconds_per_step, "log_history": result.log_history, "lineage": lineage,
            "dropped_too_long": result.dropped_too_long, "reward": reward, "skipped": False,
            "resumed_from": result.resumed_from, "world_size": result.world_size}


def train_exported(spec: LaunchSpec, dataset: Any = None, on_progress: ProgressSink | None = None
                   ) -> tuple[TrainResult, dict[str, Any] | None]:
    """Train on the exported set: in the flow's process, or in each process `accelerate launch` started."""
    request, settings = spec.request, spec.request.settings
    data = dataset if dataset is not None else load_exported(spec.data_file)
    callbacks = [progress_callback(on_progress)] if on_progress is not None else []
    if settings.method == "sft":
        return train_sft(settings, data, lineage=spec.lineage, progress_bar=spec.progress_bar, callbacks=callbacks), None
    reward = JudgeReward(request.resolved_judge, request.journal_dir, run_id=spec.run_id)
    result = train_swirl(settings, data, [reward, format_reward], lineage=spec.lineage, progress_bar=spec.progress_bar,
                         callbacks=callbacks, sampling_task=spec.sampling_task)
    return result, reward.summary()


def _sha256(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _identity(settings: TrainSettings, lineage: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"settings": settings.identity(), "lineage": lineage}, default=str))


def finished_run(folder: Path, settings: TrainSettings, lineage: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a finished run in `folder` with these settings on this very data, or None: a rerun of a
    pipeline must not train again what it already trained."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    normal = _identity(settings, lineage)
    if summary.get("settings") != normal["settings"] or summary.get("lineage") != normal["lineage"]:
        return None
    result = summary["result"]
    trained = max(int(result["steps"]) - int(result.get("resumed_from", 0)), 1)
    return {"output_dir": result["output_dir"], "steps": result["steps"], "train_runtime_s": result["train_runtime_s"],
            "seconds_per_step": result["train_runtime_s"] / trained, "log_history": result["log_history"],
            "lineage": lineage, "dropped_too_long": result.get("dropped_too_long", 0), "reward": None, "skipped": True,
            "resumed_from": result.get("resumed_from", 0),
            "world_size": result.get("world_size", 1)}


def claim_output(folder: Path, settings: TrainSettings, lineage: dict[str, Any]) -> bool:
    """Mark `folder` as this run's before the first step; True when it already holds this run's checkpoints
    (an interrupted run: the trainer resumes from the last). Checkpoints of another run are never mixed in
    nor deleted: that is a clear error."""
    marker = folder / RUN_FILE
    checkpoints = list(folder.glob(f"{CHECKPOINT_PREFIX}*"))
    identity = _identity(settings, lineage)
    if checkpoints and (folder / SUMMARY_FILE).is_file():
        # A finished run of other settings: its final model is replaced anyway, so are its checkpoints.
        for path in checkpoints:
            shutil.rmtree(path)
        checkpoints = []
    if checkpoints:
        if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")) != identity:
            raise ValueError(f"{folder} holds checkpoints of another training run (other settings or data): "
                             "choose another --output, or delete the folder to start over")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity, indent=2), encoding="utf-8")
    tmp.replace(marker)
    return False


def hub_base_model(base_model: str) -> str | None:
    """The base model as a Hub id, for the card: the offline SmolLM2's Hub name, a checkpoint folder's own base
    (followed through earlier stages), a Hub name as it is, or None for a folder of unknown origin."""
    if is_smollm2(base_model):
        return SMOLLM2_HUB_ID
    if not Path(base_model).is_dir():
        return base_model
    summary = Path(base_model) / SUMMARY_FILE
    if summary.is_file():
        return hub_base_model(json.loads(summary.read_text(encoding="utf-8"))["settings"]["base_model"])
    return None


def write_model_card(folder: Path, settings: TrainSettings, lineage: dict[str, Any], history: list[dict],
                     dropped_too_long: int = 0, *, license: str = "apache-2.0", dataset_repo_id: str | None = None) -> None:
    """README.md through `huggingface_hub`'s ModelCardData: the Hub reads base model, datasets, tags and licence
    from its metadata; the body holds the lineage the run recorded and its configuration."""
    from huggingface_hub import ModelCard, ModelCardData

    method = "SFT baseline" if settings.method == "sft" else "SWiRL step-wise RL (GRPO, judge reward, KL to the initial policy)"
    last = history[-1] if history else {}
    data = ModelCardData(
        base_model=hub_base_model(settings.base_model), datasets=[dataset_repo_id] if dataset_repo_id else None,
        library_name="transformers", license=license, pipeline_tag="text-generation",
        tags=["swirl", "trl", "tool-use", "sft" if settings.method == "sft" else "grpo"],
    )
    requested = lineage.get("requested_run_ids")
    rows = [("curated filter", lineage["filter"]),
            ("training rows (sub-trajectories)", f"{lineage['rows']} exported, {dropped_too_long} left out as longer than max_length"),
            ("trajectories", lineage["trajectories"]), ("seed datasets", ", ".join(lineage["datasets"])),
            ("generation runs", ", ".join(lineage["run_ids"])),
            ("run filter", ", ".join(requested) if requested else "none: every run in the database"),
            ("policy prompt versions", ", ".join(lineage["prompt_versions"])),
            ("reward judge", lineage.get("judge_model", "—")), ("base model", settings.base_model),
            ("training data sha256", lineage["data_sha256"])]
    body = f"""
# {Path(settings.output_dir).name}

{method} of `{settings.base_model}` on the **{lineage['filter']}** curated set of a SWiRL data factory run
(Goldie et al., 2025, arXiv:2504.04736). The model writes one step at a time: brief reasoning, then exactly
one of `<search_query>`, `<math_exp>` or `<answer>`.

## Data lineage

| what | value |
|---|---|
""" + "\n".join(f"| {k} | {v} |" for k, v in rows) + f"""

## Training configuration

```json
{json.dumps(settings.model_dump(mode="json"), indent=2)}
```

Steps: {len(history)}; last logged metrics: `{json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))})}`.
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(folder / "README.md")
