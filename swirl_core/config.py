"""Validated configuration: one object per flow, with defaults that work offline.

These are the typed parameters of the Prefect deployments and the forms in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from swirl_core.constraints import ServerKind
from swirl_core.llm.local_models import DEFAULT_LOCAL_MODEL, is_local_model, model_identity
from swirl_core.training.trainers import TrainSettings

# litellm providers that speak the OpenAI protocol: with an api_base (Ollama: by default) they take the fast path.
OLLAMA_PROVIDERS = ("ollama", "ollama_chat")
OPENAI_COMPATIBLE_PROVIDERS = ("openai", "hosted_vllm", "vllm", "openai_compat", "llamacpp", "lm_studio", *OLLAMA_PROVIDERS)
OLLAMA_DEFAULT_BASE = "http://localhost:11434"  # litellm's default; Ollama's OpenAI API is under /v1 of it


class ModelConfig(BaseModel):
    """A policy or judge model: an API model via litellm, a served model, or an in-process one."""

    model: str = Field(DEFAULT_LOCAL_MODEL, description="litellm name (openai/gpt-4o-mini, hosted_vllm/NAME, …), 'smollm2', or a local checkpoint folder")
    api_base: str | None = Field(None, description="endpoint of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key (default: the provider's usual one); the key itself is never stored")
    api_key_secret: str | None = Field(None, description="NAME of a Prefect Secret block holding the key, read by the process that makes the calls (instead of api_key_env)")
    identity: str | None = Field(None, min_length=1, description="the name its calls, trajectories and results are stored under; "
                                 "default MODEL@API_BASE, so two endpoints are two models: give one model served on several hosts one identity")
    backend: Literal["auto", "openai_compat", "litellm", "transformers"] = "auto"
    concurrency: int = Field(32, ge=1, le=4096, description="max requests in flight per process")
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="per step; default 256 for API models, 64 in-process")
    input_price_per_mtok: float | None = Field(None, ge=0, description="USD per 1M input tokens, for models litellm does not price")
    output_price_per_mtok: float | None = Field(None, ge=0)
    few_shot: bool | None = Field(None, description="demonstrations as chat turns; default on for in-process models")
    constraint: Literal["auto", "none", "grammar", "regex"] = Field(
        "auto", description="decoding constraint: grammar (in-process), regex (served: verified by a probe first); "
                            "auto = grammar in-process, none otherwise"
    )
    server_kind: Literal["auto"] | ServerKind = Field(
        "auto", description="how a served constraint is sent: vLLM structured_outputs, SGLang regex, llama.cpp GBNF "
                            "grammar, TGI regex response_format; auto = what the server's /models says, else openai (none)")
    allow_unconstrained: bool = Field(False, description="when the probe finds the server ignores the constraint, "
                                                         "continue without it (steps record constraint NULL) instead of stopping")
    local_batch_size: int = Field(16, ge=1)

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        if is_local_model(self.model):
            return "transformers"
        return "openai_compat" if self.served_endpoint else "litellm"

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else ""

    @property
    def served_endpoint(self) -> str | None:
        """The OpenAI-compatible base URL of a served model (OpenAI-protocol providers only), without a trailing
        slash; Ollama's is /v1 of the address litellm names, so `ollama/NAME` with litellm's api_base works."""
        if self.provider in OLLAMA_PROVIDERS:
            base = (self.api_base or OLLAMA_DEFAULT_BASE).rstrip("/")
            return base if base.endswith("/v1") else base + "/v1"
        if self.api_base and self.provider in OPENAI_COMPATIBLE_PROVIDERS:
            return self.api_base.rstrip("/")
        return None

    @property
    def resolved_identity(self) -> str:
        """The model as calls are cached and results stored: a checkpoint with its weights hash, a served
        model with its endpoint (a model without one keeps its bare name, as journals written before have it)."""
        if self.is_local:
            return model_identity(self.model)
        if self.identity:
            return self.identity
        endpoint = self.served_endpoint or (self.api_base.rstrip("/") if self.api_base else None)
        return f"{self.model}@{endpoint}" if endpoint else self.model

    @property
    def is_local(self) -> bool:
        return self.resolved_backend == "transformers"

    @property
    def resolved_few_shot(self) -> bool:
        return self.is_local if self.few_shot is None else self.few_shot

    @property
    def resolved_constraint(self) -> str | None:
        if self.constraint == "auto":
            return "grammar" if self.is_local else None
        return None if self.constraint == "none" else self.constraint

    @property
    def resolved_max_tokens(self) -> int:
        return self.max_tokens or (64 if self.is_local else 256)

    @property
    def prices(self) -> tuple[float, float] | None:
        if self.input_price_per_mtok is None or self.output_price_per_mtok is None:
            return None
        return self.input_price_per_mtok / 1e6, self.output_price_per_mtok / 1e6

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.model.startswith(("/", "./", "../", "~")) and not is_local_model(self.model):
            raise ValueError(f"no checkpoint folder at {self.model}")
        if self.constraint == "grammar" and not self.is_local:
            raise ValueError("constraint 'grammar' needs an in-process model; use 'regex' for a served model")
        if self.constraint == "regex" and self.is_local:
            raise ValueError("constraint 'regex' is for served models; in-process models use 'grammar'")
        if self.identity and self.is_local:
            raise ValueError("identity is for served models; an in-process checkpoint is known by its weights hash")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("name the API key's environment variable or its Secret block, not both")
        return self


class Workspace(BaseModel):
    """A config that names a database (`db`) and may name its work folder (`work_dir`)."""

    @property
    def resolved_work_dir(self) -> Path:
        """Journals and shards: `work_dir`, else `<db>.work` beside the database."""
        return Path(self.work_dir) if self.work_dir else Path(self.db).with_suffix(".work")


class ClusterConfig(BaseModel):
    """Where shards run: a local Dask cluster by default, or an existing scheduler."""

    address: str | None = Field(None, description="tls://HOST:PORT (or tcp://) of a running Dask scheduler")
    cluster_class: str | None = Field(None, description="e.g. dask_jobqueue.SLURMCluster; default distributed.LocalCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    n_workers: int | None = Field(None, ge=1, description="local workers; default 2 (1 for in-process models)")


class GenerateConfig(Workspace):
    """Parameters of the `generate` flow."""

    dataset: str = Field("demo-math", description="gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa")
    data_files: list[str] | None = Field(None, description="local JSONL/JSON/Parquet files; default: the Hub dataset")
    split: str = "train"
    hub_name: str | None = None
    hub_config: str | None = None
    limit: int | None = Field(None, ge=1)
    skip_invalid: bool = False
    samples: int = Field(5, ge=1, le=1000, description="trajectories per question (paper: 5)")
    max_steps: int | None = Field(None, ge=1, le=50, description="step cap; default 10 for math, 5 for QA")
    policy: ModelConfig = Field(default_factory=ModelConfig)
    corpus: str | None = Field(None, description="search corpus (JSONL/Parquet of title,text); 'seeds' = the questions' own context paragraphs; default: the dataset's own")
    search_k: int = Field(1, ge=1, le=20)
    db: str = "swirl.duckdb"
    work_dir: str | None = Field(None, description="journals and shards; default: <db>.work beside the database")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    shard_size: int = Field(8, ge=1, description="questions per shard")
    fsync: bool = Field(False, description="fsync the call journal after each response (power-loss safety)")
    progress: bool = True
    tools: bool = Field(True, description="False: no-tool mode, the answer in one message (the paper's Figure 6)")
    purpose: Literal["train", "eval"] = Field("train", description="eval runs never enter the curated training sets")

    @field_validator("data_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class CurateConfig(Workspace):
    """Parameters of the `curate` flow: process judge, outcome grading, curated views."""

    db: str = "swirl.duckdb"
    work_dir: str | None = Field(None, description="journals; default: <db>.work beside the database")
    judge: ModelConfig = Field(default_factory=lambda: ModelConfig(temperature=0.0))
    judge_samples: int = Field(1, ge=1, le=99, description="judge samples per step (majority vote)")
    max_reasks: int = Field(2, ge=0, le=10, description="re-asks when a verdict is unparseable")
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
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    shard_size: int = Field(64, ge=1, description="steps (or trajectories) per shard")
    fsync: bool = False
    progress: bool = True


class JudgeEvalConfig(Workspace):
    """Parameters of the `judge-eval` flow: a judge measured on labelled steps built from gold solutions."""

    db: str = "swirl.duckdb"
    work_dir: str | None = Field(None, description="journals; default: <db>.work beside the database")
    dataset: str = Field("demo-math", description="a dataset with gold steps: gsm8k, hotpotqa, musique, demo-math")
    data_files: list[str] | None = Field(None, description="local JSONL/JSON/Parquet files; default: the Hub dataset")
    split: str = "train"
    hub_name: str | None = None
    hub_config: str | None = None
    limit: int | None = Field(20, ge=1, description="seed questions to build labelled steps from")
    seed: int = Field(0, description="seed of the corruptions")
    judge: ModelConfig = Field(default_factory=lambda: ModelConfig(temperature=0.0))
    judge_samples: int = Field(1, ge=1, le=99, description="judge samples per step (majority vote, self-consistency)")
    max_reasks: int = Field(2, ge=0, le=10)
    n_resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples for the CIs")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    shard_size: int = Field(64, ge=1, description="steps per shard")

    @field_validator("data_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class PublishConfig(BaseModel):
    """Parameters of the `publish` flow. The Hub endpoint comes from HF_ENDPOINT as usual."""

    db: str = "swirl.duckdb"
    repo_id: str = Field(..., pattern=r"^[\w.-]+/[\w.-]+$", description="USER/NAME of the dataset repo")
    private: bool = True
    out_dir: str | None = Field(None, description="the exported Hub folder; default: <db>.work/hub/<name>")
    token_secret: str | None = Field(None, description="name of a Prefect Secret block holding the token; default: HF_TOKEN")
    eval_splits: list[str] = Field(default_factory=lambda: ["test", "validation", "dev"],
                                   description="question splits counted as evaluation data in the contamination check")
    dry_run: bool = Field(False, description="export and write the card, but do not upload")
    push_models: bool = Field(False, description="pipeline: also push each trained model to the model repo <repo_id>-<method>")

    @property
    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.db).with_suffix(".work") / "hub" / self.repo_id.replace("/", "__")


def parse_model_spec(spec: str, **overrides: Any) -> ModelConfig:
    """`MODEL[@API_BASE]`: a litellm name with an optional OpenAI-compatible endpoint, 'smollm2',
    or a local checkpoint folder, e.g. `openai/sft@http://127.0.0.1:8000/v1` or `./out/swirl`."""
    spec = spec.strip()
    model, sep, api_base = spec.rpartition("@")
    if not sep or not api_base.startswith(("http://", "https://")):
        model, api_base = spec, None
    if not model:
        raise ValueError(f"model spec {spec!r} names no model")
    return ModelConfig(model=model, api_base=api_base, **overrides)


class EvalModel(BaseModel):
    """One model under evaluation, with the label the report uses (base, sft, swirl, …)."""

    label: str = Field(..., pattern=r"^[\w.+-]{1,64}$")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(temperature=0.0))

    @model_validator(mode="before")
    @classmethod
    def _greedy_by_default(cls, data: Any) -> Any:
        # Evaluation decodes greedily unless told otherwise; generation's default (0.7) samples.
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "temperature" not in data["model"]:
            data = {**data, "model": {**data["model"], "temperature": 0.0}}
        return data

    @classmethod
    def parse(cls, text: str, **overrides: Any) -> EvalModel:
        """`LABEL=MODEL[@API_BASE]` from the command line."""
        label, sep, spec = text.partition("=")
        if not sep or not label.strip() or not spec.strip():
            raise ValueError(f"--model takes LABEL=SPEC (e.g. sft=openai/sft@http://127.0.0.1:8000/v1), got {text!r}")
        return cls(label=label.strip(), model=parse_model_spec(spec, **({"temperature": 0.0} | overrides)))


class EvalDataset(BaseModel):
    """One more dataset of an evaluation grid, with its own files (the paper: trained on HotPotQA, tested on GSM8K too)."""

    dataset: str = Field(..., description="gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa")
    data_files: list[str] | None = Field(None, description="local JSONL/JSON/Parquet files; default: the Hub dataset")
    split: str | None = Field(None, description="default: the evaluation's split")
    hub_name: str | None = None
    hub_config: str | None = None
    corpus: str | None = Field(None, description="search corpus; default: the dataset's own")

    @field_validator("data_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class EvalConfig(Workspace):
    """Parameters of the `evaluate` flow: the same agent loop and step caps for every model, on one dataset or a
    grid of several (`also`)."""

    db: str = "swirl.duckdb"
    dataset: str = Field("demo-math", description="gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa")
    data_files: list[str] | None = Field(None, description="local JSONL/JSON/Parquet files; default: the Hub dataset")
    split: str = Field("test", description="a split not used for training (the contamination check reports overlap)")
    hub_name: str | None = None
    hub_config: str | None = None
    limit: int | None = Field(None, ge=1)
    models: list[EvalModel] = Field(default_factory=lambda: [EvalModel(label="base")], min_length=1)
    tools: bool = Field(True, description="False: no-tool mode (the paper's Figure 6)")
    max_steps: int | None = Field(None, ge=1, le=50, description="step cap; default 10 for math, 5 for QA (1 without tools)")
    corpus: str | None = Field(None, description="search corpus; default: the dataset's own")
    search_k: int = Field(1, ge=1, le=20)
    grader: Literal["auto", "rule", "llm"] = Field(
        "auto", description="correctness: rule-based only, or also the judge's YES/NO; auto = llm for QA when a judge "
                            "is configured (exact match undercounts free-text answers), rule otherwise")
    judge: ModelConfig | None = Field(None, description="LLM grader and process judge; without it, no judge metrics")
    also: list[EvalDataset] = Field(default_factory=list, description="more datasets, each evaluated like the first: "
                                                                      "a table of model × dataset (cross-task transfer)")
    step_scores: bool = Field(True, description="mean process-judge step score (needs a judge)")
    n_resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples for the CIs")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    report: str | None = Field(None, description="markdown report path; default: <db>.work/eval/report-<run>.md")
    work_dir: str | None = None
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    shard_size: int = Field(16, ge=1, description="questions per shard (local models batch across a shard)")
    progress: bool = True

    @field_validator("data_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v

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
            shard_size=self.shard_size, progress=self.progress, tools=self.tools, purpose="eval",
        )


class PipelineConfig(Workspace):
    """Parameters of the `pipeline` flow: generate → curate → train (SFT, SWiRL) → evaluate → publish.

    `db`, `work_dir`, `cluster` and `progress` are set once here and hold for every stage; a stage that
    names another value is refused. Defaults are the offline demo: the shipped math questions, the
    in-process SmolLM2 as policy and judge, a few training steps of each method, and evaluation of
    base vs SFT vs SWiRL on the demo's held-out test split.
    """

    db: str = "swirl.duckdb"
    work_dir: str | None = Field(None, description="journals, checkpoints, reports; default: <db>.work beside the database")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    progress: bool = True
    generate: GenerateConfig = Field(default_factory=lambda: GenerateConfig(samples=4))
    curate: CurateConfig = Field(default_factory=CurateConfig)
    sft: TrainSettings | None = Field(
        default_factory=lambda: TrainSettings(method="sft", output_dir="", max_steps=4),
        description="the SFT baseline (None: skip); output_dir '' = <work_dir>/models/sft")
    swirl: TrainSettings | None = Field(
        default_factory=lambda: TrainSettings(method="swirl", output_dir="", max_steps=2, max_completion_length=32),
        description="SWiRL step-wise RL (None: skip); output_dir '' = <work_dir>/models/swirl")
    evaluate: EvalConfig | None = Field(
        default_factory=lambda: EvalConfig(models=[EvalModel(label="base", model=ModelConfig(temperature=0.0, max_tokens=48))]),
        description="held-out evaluation (None: skip); the trained checkpoints join `models` under their method's name")
    publish: PublishConfig | None = Field(None, description="Hub upload of the curated sets (None: skip)")

    @model_validator(mode="after")
    def _share(self) -> PipelineConfig:
        """Hand the shared settings to every stage; a stage that sets one differently is a mistake."""
        shared = {"db": self.db, "work_dir": self.work_dir, "cluster": self.cluster, "progress": self.progress}
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
