"""Validated configuration: one object per flow, with defaults that work offline.

These are the typed parameters of the Prefect deployments and the forms in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from swirl_core.config_base import ActionProtocol, StrictConfig, Workspace
from swirl_core.llm.config import GreedyModelConfig, ModelConfig, parse_model_spec
from swirl_core.records import StepProtocol
from swirl_core.training.trainers import TrainSettings

__all__ = ["ModelConfig", "GreedyModelConfig", "parse_model_spec", "Workspace"]  # re-exported: flows and tests import them here

DATASETS = "gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa"


class ClusterConfig(StrictConfig):
    """Where shards run: a local Dask cluster by default, or an existing scheduler."""

    address: str | None = Field(None, description="tls://HOST:PORT (or tcp://) of a running Dask scheduler")
    cluster_class: str | None = Field(None, description="e.g. dask_jobqueue.SLURMCluster; default distributed.LocalCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    n_workers: int | None = Field(None, ge=1, description="local workers; default 2 (1 for in-process models)")
    shards_per_worker: int | None = Field(None, ge=1, description="shards a local worker runs at once, sharing its limits; default 3 (1 for in-process models)")


class OnCluster(StrictConfig):
    """A stage whose shards run on Dask, with a progress bar on a terminal."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    progress: bool = True


class SeedFiles(StrictConfig):
    """Where a dataset's questions come from: local files, else the Hub."""

    data_files: list[str] | None = Field(None, description="local JSONL/JSON/Parquet files; default: the Hub dataset")
    hub_name: str | None = None
    hub_config: str | None = None

    @field_validator("data_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class SeedSource(SeedFiles):
    """A dataset's questions: which dataset, split and how many."""

    dataset: str = Field("demo-math", description=DATASETS)
    split: str = "train"
    limit: int | None = Field(None, ge=1)


class Judging(StrictConfig):
    """The process judge and how it is asked."""

    judge: GreedyModelConfig = Field(default_factory=GreedyModelConfig)
    judge_samples: int = Field(1, ge=1, le=99, description="judge samples per step (majority vote, self-consistency)")
    max_reasks: int = Field(2, ge=0, le=10, description="re-asks when a verdict is unparseable")


class Bootstrap(StrictConfig):
    """The confidence intervals of a measurement."""

    n_resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples for the CIs")
    confidence: float = Field(0.95, gt=0.5, lt=1)


class GenerateConfig(ActionProtocol, SeedSource, OnCluster, Workspace):
    """Parameters of the `generate` flow."""

    skip_invalid: bool = False
    samples: int = Field(5, ge=1, le=1000, description="trajectories per question (paper: 5)")
    max_steps: int | None = Field(None, ge=1, le=50, description="step cap; default 10 for math, 5 for QA")
    policy: ModelConfig = Field(default_factory=ModelConfig)
    corpus: str | None = Field(None, description="search corpus (JSONL/Parquet of title,text); 'seeds' = the questions' own context paragraphs; default: the dataset's own")
    search_k: int = Field(1, ge=1, le=20)
    shard_size: int | None = Field(None, ge=1, description="questions per shard; default: sized by the work (at least one worker's share of the requests in flight)")
    fsync: bool = Field(False, description="fsync the call journal after each response (power-loss safety)")
    tools: bool = Field(True, description="False: no-tool mode, the answer in one message (the paper's Figure 6)")
    purpose: Literal["train", "eval"] = Field("train", description="eval runs never enter the curated training sets")


class CurateConfig(Judging, OnCluster, Workspace):
    """Parameters of the `curate` flow: process judge, outcome grading, curated views."""

    grader: Literal["rule", "llm"] = Field("rule", description="outcome grader: rule-based only, or the LLM grader too")
    skip_judge: bool = Field(False, description="grade outcomes only")
    judge_id: str | None = Field(None, description="judge nothing: the curated sets read the verdicts this judge "
                                                   "(fingerprint) already gave, e.g. an earlier judge")
    probe_limit: int = Field(20, ge=0, description="seed questions the judge probe builds labelled steps from "
                                                   "(`swirl judge-eval`); 0: no probe")
    min_judge_f1: float | None = Field(None, ge=0, le=1, description="refuse to curate when the judge's probe F1 "
                                                                     "for detecting BAD steps is below this")
    run_ids: list[str] | None = Field(None, description="only trajectories of these generation runs")
    dataset: str | None = Field(None, description="only questions of this dataset")
    shard_size: int = Field(64, ge=1, description="steps (or trajectories) per shard")
    fsync: bool = Field(False, description="fsync the call journal after each response (power-loss safety)")


class JudgeEvalConfig(SeedSource, Judging, Bootstrap, Workspace):
    """Parameters of the `judge-eval` flow: a judge measured on labelled steps built from gold solutions."""

    dataset: str = Field("demo-math", description="a dataset with gold steps: gsm8k, hotpotqa, musique, demo-math")
    limit: int | None = Field(20, ge=1, description="seed questions to build labelled steps from")
    seed: int = Field(0, description="seed of the corruptions")
    shard_size: int = Field(64, ge=1, description="steps per shard")


class PublishConfig(Workspace):
    """Parameters of the `publish` flow. The Hub endpoint comes from HF_ENDPOINT as usual."""

    repo_id: str = Field(..., pattern=r"^[\w.-]+/[\w.-]+$", description="USER/NAME of the dataset repo")
    private: bool = True
    out_dir: str | None = Field(None, description="the exported Hub folder; default: <work_dir>/hub/<name>")
    token_secret: str | None = Field(None, description="name of a Prefect Secret block holding the token; default: HF_TOKEN")
    eval_splits: list[str] = Field(default_factory=lambda: ["test", "validation", "dev"],
                                   description="question splits counted as evaluation data in the contamination check")
    dry_run: bool = Field(False, description="export and write the card, but do not upload")
    push_models: bool = Field(False, description="pipeline: also push each trained model to the model repo <repo_id>-<method>")

    @property
    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return self.resolved_work_dir / "hub" / self.repo_id.replace("/", "__")


class EvalModel(StrictConfig):
    """One model under evaluation, with the label the report uses (base, sft, swirl, …)."""

    label: str = Field(..., pattern=r"^[\w.+-]{1,64}$")
    model: GreedyModelConfig = Field(default_factory=GreedyModelConfig)

    @model_validator(mode="before")
    @classmethod
    def _label_spec(cls, data: Any) -> Any:
        """`LABEL=MODEL[@API_BASE]`, as `--model` and a YAML list of strings spell one."""
        if not isinstance(data, str):
            return data
        label, sep, spec = data.partition("=")
        if not sep or not label.strip() or not spec.strip():
            raise ValueError(f"a model under evaluation is LABEL=SPEC (e.g. sft=openai/sft@http://127.0.0.1:8000/v1), got {data!r}")
        return {"label": label.strip(), "model": spec}

    @classmethod
    def parse(cls, text: str, **overrides: Any) -> EvalModel:
        """`LABEL=MODEL[@API_BASE]`, with model fields on top (e.g. max_tokens)."""
        parsed = cls.model_validate(text)
        return parsed.model_copy(update={"model": GreedyModelConfig.model_validate(
            parsed.model.model_dump(exclude_unset=True) | overrides)})


class EvalDataset(SeedFiles):
    """One more dataset of an evaluation grid, with its own files (the paper: trained on HotPotQA, tested on GSM8K too)."""

    dataset: str = Field(..., description=DATASETS)
    split: str | None = Field(None, description="default: the evaluation's split")
    corpus: str | None = Field(None, description="search corpus; default: the dataset's own")


class EvalConfig(ActionProtocol, SeedSource, Bootstrap, OnCluster, Workspace):
    """Parameters of the `evaluate` flow: the same agent loop and step caps for every model, on one dataset or a
    grid of several (`also`)."""

    split: str = Field("test", description="a split not used for training (the contamination check reports overlap)")
    models: list[EvalModel] = Field(default_factory=lambda: [EvalModel(label="base")], min_length=1)
    tools: bool = Field(True, description="False: no-tool mode (the paper's Figure 6)")
    max_steps: int | None = Field(None, ge=1, le=50, description="step cap; default 10 for math, 5 for QA (1 without tools)")
    corpus: str | None = Field(None, description="search corpus; default: the dataset's own")
    search_k: int = Field(1, ge=1, le=20)
    grader: Literal["auto", "rule", "llm"] = Field(
        "auto", description="correctness: rule-based only, or also the judge's YES/NO; auto = llm for QA when a judge "
                            "is configured (exact match undercounts free-text answers), rule otherwise")
    judge: GreedyModelConfig | None = Field(None, description="LLM grader and process judge; without it, no judge metrics")
    also: list[EvalDataset] = Field(default_factory=list, description="more datasets, each evaluated like the first: "
                                                                      "a table of model × dataset (cross-task transfer)")
    step_scores: bool = Field(True, description="mean process-judge step score (needs a judge)")
    report: str | None = Field(None, description="markdown report path; default: <db>.work/eval/report-<run>.md")
    shard_size: int = Field(16, ge=1, description="questions per shard (local models batch across a shard)")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}")
        if self.grader == "llm" and self.judge is None:
            raise ValueError("--grader llm needs a judge model (--judge MODEL[@API_BASE])")
        names = [(d.dataset, d.split) for d in self.per_dataset()]
        if len(set(names)) != len(names):
            raise ValueError(f"each dataset (and split) is evaluated once, got {[n for n, _ in names]}")
        return self

    def per_dataset(self) -> list[EvalConfig]:
        """One configuration per dataset of the grid; with several, the report path names the grid's report."""
        if not self.also:
            return [self]
        first = self.model_copy(update={"also": [], "report": None})
        # Files, Hub names and corpus are the dataset's own (none: its defaults); the split is shared unless given.
        return [first, *(first.model_copy(update=d.model_dump(exclude={"split"}) | {"split": d.split or self.split})
                         for d in self.also)]

    def grader_for(self, tasks: set[str]) -> Literal["rule", "llm"]:
        if self.grader != "auto":
            return self.grader
        return "llm" if self.judge is not None and "qa" in tasks else "rule"

    def generate_config(self, model: EvalModel) -> GenerateConfig:
        """One greedy trajectory per question, through the generation flow (same loop, caps, journal)."""
        return GenerateConfig(
            dataset=self.dataset, data_files=self.data_files, split=self.split, hub_name=self.hub_name,
            hub_config=self.hub_config, limit=self.limit, samples=1, max_steps=self.max_steps, policy=model.model,
            corpus=self.corpus, search_k=self.search_k, db=self.db, work_dir=self.work_dir, cluster=self.cluster,
            shard_size=self.shard_size, progress=self.progress, tools=self.tools, protocol=self.protocol, purpose="eval",
        )


PIPELINE_SAMPLES = 4  # trajectories per question in a pipeline run: the demo's, within its 10 minutes


class PipelineConfig(ActionProtocol, OnCluster, Workspace):
    """Parameters of the `pipeline` flow: generate → curate → train (SFT, SWiRL) → evaluate → publish.

    `db`, `work_dir`, `cluster`, `progress` and `protocol` are set once here and hold for every stage; a stage that
    names another value is refused. Defaults are the offline demo: the shipped math questions, the
    in-process SmolLM2 as policy and judge, a few training steps of each method, and evaluation of
    base vs SFT vs SWiRL on the demo's held-out test split.
    """

    generate: GenerateConfig = Field(default_factory=dict, validate_default=True,
                                     description=f"generation; samples default to {PIPELINE_SAMPLES} here")
    curate: CurateConfig = Field(default_factory=CurateConfig)
    sft: TrainSettings | None = Field(
        default_factory=lambda: TrainSettings(method="sft", output_dir="", max_steps=4),
        description="the SFT baseline (None: skip); output_dir '' = <work_dir>/models/sft")
    swirl: TrainSettings | None = Field(
        default_factory=lambda: TrainSettings(method="swirl", output_dir="", max_steps=2, max_completion_length=32),
        description="SWiRL step-wise RL (None: skip); output_dir '' = <work_dir>/models/swirl")
    evaluate: EvalConfig | None = Field(
        default_factory=lambda: EvalConfig(models=[EvalModel(label="base", model=GreedyModelConfig(max_tokens=48))]),
        description="held-out evaluation (None: skip); the trained checkpoints join `models` under their method's name")
    publish: PublishConfig | None = Field(None, description="Hub upload of the curated sets (None: skip)")

    @field_validator("generate", mode="before")
    @classmethod
    def _demo_samples(cls, v: Any) -> Any:
        # The pipeline's own default, whether its generate section is left out or names other settings only.
        return {"samples": PIPELINE_SAMPLES, **v} if isinstance(v, dict) else v

    @model_validator(mode="before")
    @classmethod
    def _no_default_rl_under_tools(cls, data: Any) -> Any:
        # SWiRL RL learns tag-protocol steps only (TrainConfig refuses the tools protocol): a tools run leaves out
        # the default RL stage, and one that asks for it is refused (`_share`).
        if isinstance(data, dict) and data.get("protocol") == StepProtocol.TOOLS and "swirl" not in data:
            return {**data, "swirl": None}
        return data

    @model_validator(mode="after")
    def _share(self) -> PipelineConfig:
        """Hand the shared settings to every stage; a stage that sets one differently is a mistake."""
        if self.protocol == StepProtocol.TOOLS and self.swirl is not None:
            raise ValueError("SWiRL RL trains on tag-protocol steps: with protocol tools set `swirl: null` (SFT only)")
        shared = {"db": self.db, "work_dir": self.work_dir, "cluster": self.cluster, "progress": self.progress,
                  "protocol": self.protocol}
        for stage in ("generate", "curate", "evaluate", "publish"):
            section = getattr(self, stage)
            if section is None:
                continue
            update = {k: v for k, v in shared.items() if k in type(section).model_fields}
            for name in update.keys() & section.model_fields_set:
                if getattr(section, name) != update[name]:
                    raise ValueError(f"{stage}.{name} is set once for the whole pipeline: use the top-level `{name}`")
            setattr(self, stage, section.model_copy(update=update))
        if self.evaluate is not None and "dataset" not in self.evaluate.model_fields_set:
            self.evaluate = self.evaluate.model_copy(update={"dataset": self.generate.dataset})  # held out of the same task
        for method in ("sft", "swirl"):
            settings = getattr(self, method)
            if settings is not None and not settings.output_dir:
                setattr(self, method, settings.model_copy(
                    update={"output_dir": str(self.resolved_work_dir / "models" / method)}))
        return self
