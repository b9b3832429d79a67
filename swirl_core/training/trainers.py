"""SFT and SWiRL RL with TRL: settings, the two training entry points, the saved checkpoint.

Both load the base model from a local folder (the offline default SmolLM2, a checkpoint of a
previous stage) or, with network, a Hub name; both save the final model and tokenizer as a plain
HF folder (LoRA merged) that `AutoModelForCausalLM.from_pretrained` and the project's in-process
backend load directly, so a trained policy can be evaluated by the same code as the base one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from swirl_core.config_base import StrictConfig
from swirl_core.constraints import STEP_TOKENS, ActionGrammar
from swirl_core.llm.chat_templates import renders_tools, shipped_template
from swirl_core.llm.local_models import DEFAULT_LOCAL_MODEL, is_local_model, resolve_local_model
from swirl_core.records import TaskKind

SUMMARY_FILE = "swirl_training.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Settings that change how a run is saved or watched, not what it trains: a finished or interrupted
# run with other values of these is still the same run.
RUNTIME_FIELDS = frozenset({"save_steps", "save_total_limit", "logging_steps", "report_to"})
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to value → the package it needs


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class TrainSettings(StrictConfig):
    """One training run. Defaults suit the 135M offline model; scale them for real runs."""

    method: Literal["sft", "swirl"]
    base_model: str = Field(DEFAULT_LOCAL_MODEL, description="'smollm2', a local checkpoint folder, or a Hub name (needs network)")
    output_dir: str
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    learning_rate: float | None = Field(None, gt=0, description="default 2e-5 for SFT, 1e-6 for SWiRL RL")
    per_device_batch_size: int = Field(4, ge=1, description="SFT: examples; SWiRL: completions (states × num_generations)")
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int | None = Field(2048, ge=16, description="SFT: longest tokenized state+action kept")
    num_generations: int = Field(4, ge=2, description="SWiRL: fresh actions sampled per state (the group)")
    max_completion_length: int = Field(64, ge=1, description="SWiRL: tokens of one sampled step")
    temperature: float = Field(1.0, gt=0, description="SWiRL: sampling temperature of the policy")
    beta: float = Field(0.04, ge=0, description="SWiRL: KL coefficient to the initial policy (must be > 0)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template file for the model; default: its own, or for tools-protocol data whose "
                          "model's template does not render tools, swirl's tool-calling template (Hermes/Qwen <tool_call> JSON)")
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    seed: int = 0
    bf16: bool | None = Field(None, description="default: on when CUDA is available")
    activation_checkpointing: bool = Field(False, description="trade compute for memory; off: small models need no help")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1, description="a checkpoint every N steps; rerunning an interrupted run resumes from the last")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (older ones are deleted)")
    num_processes: int = Field(1, ge=1, description="training processes under `accelerate launch` (one per GPU)")
    distributed: Literal["ddp", "zero2", "zero3", "fsdp"] = Field(
        "ddp", description="engine of several processes: DDP, DeepSpeed ZeRO-2/3 or FSDP (for models that do not fit one GPU)")
    use_vllm: bool = Field(False, description="SWiRL: sample the group with vLLM (GPU; needs the vllm package)")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM shares the training GPUs; server: a separate `trl vllm-serve`")
    vllm_server_base_url: str | None = Field(None, description="server mode: e.g. http://127.0.0.1:8000")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate mode: GPU memory share of vLLM")
    constraint: Literal["auto", "none"] = Field(
        "auto", description="SWiRL: sample under generation's action constraint (auto: the in-process grammar, or "
                            "vLLM's action regex), so a small policy's samples are steps the judge can rate; none: free text")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also log to these trackers (tensorboard writes under output_dir/runs, offline)")

    @property
    def resolved_bf16(self) -> bool:
        # TRL turns bf16 on by default; on CPU that is slow autocast for nothing, so only with CUDA.
        return _cuda() if self.bf16 is None else self.bf16

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate or (2e-5 if self.method == "sft" else 1e-6)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a finished one is skipped, an interrupted one resumed)."""
        return self.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.chat_template and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template {self.chat_template} is not a file")
        if self.use_vllm and self.method != "swirl":
            raise ValueError("use_vllm samples SWiRL's RL groups; SFT samples nothing")
        if self.vllm_server_base_url and self.vllm_mode != "server":
            raise ValueError("vllm_server_base_url is for vllm_mode 'server'")
        if self.use_vllm and self.constraint == "auto" and self.max_completion_length < STEP_TOKENS:
            raise ValueError(f"max_completion_length {self.max_completion_length} cannot hold a step with its reasoning "
                             f"under the action regex (up to about {STEP_TOKENS} tokens): raise it")
        if self.method == "swirl":
            if self.beta <= 0:
                raise ValueError("SWiRL RL needs a KL penalty to the initial policy: beta must be > 0")
            batch = self.per_device_batch_size * self.gradient_accumulation
            if batch % self.num_generations:
                # TRL's generation batch (batch size × accumulation) must hold whole groups of one state.
                raise ValueError(f"per_device_batch_size × gradient_accumulation ({batch}) must be divisible by "
                                 f"num_generations ({self.num_generations})")
        return self


@dataclass
class TrainResult:
    output_dir: str
    log_history: list[dict[str, Any]]  # one entry per logged optimizer step (loss, reward, kl, …)
    train_runtime_s: float
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)  # the trainer's end-of-run summary
    dropped_too_long: int = 0  # SFT pairs left out because state and action do not fit max_length
    resumed_from: int = 0  # the checkpoint's step this run continued from (0: trained from the start)
    world_size: int = 1

    @property
    def seconds_per_step(self) -> float:
        """Of the steps this run itself trained: a resumed run's runtime does not cover the earlier ones."""
        return self.train_runtime_s / max(self.steps - self.resumed_from, 1)


def load_policy(base_model: str, *, bf16: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a local folder / 'smollm2' (converted once, offline) or a Hub name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(resolve_local_model(base_model)) if is_local_model(base_model) else base_model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Explicit dtype: the converted SmolLM2 folder is stored in bf16, and AdamW on bf16 weights on
    # CPU loses most small updates; fp32 master weights unless bf16 mixed precision is on.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    return model, tokenizer


def choose_chat_template(tokenizer: Any, settings: TrainSettings, dataset: Any) -> None:
    """The template given in the settings, else, for tools-protocol data (a `tools` column) whose model's template
    does not render tools, the shipped tool-calling one; otherwise the model's own. A checkpoint saves it."""
    if settings.chat_template:
        tokenizer.chat_template = Path(settings.chat_template).read_text(encoding="utf-8")
    elif "tools" in dataset.column_names and not renders_tools(tokenizer):
        tokenizer.chat_template = shipped_template()


def _common_args(settings: TrainSettings, progress_bar: bool) -> dict[str, Any]:
    for name in settings.report_to:
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ValueError(f"report_to {name} needs the {REPORTERS[name]} package: pip install {REPORTERS[name]}")
    return {
        "output_dir": settings.output_dir,
        "max_steps": settings.max_steps,
        "learning_rate": settings.resolved_learning_rate,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation,
        "logging_steps": settings.logging_steps,
        "seed": settings.seed,
        "use_cpu": not _cuda(),
        "bf16": settings.resolved_bf16,
        # TRL defaults gradient checkpointing on; transformers 5 names it activation_checkpointing.
        "activation_checkpointing": settings.activation_checkpointing,
        # Optimizer, scheduler, RNG and data position too: an interrupted run resumes where it stopped.
        # The final model is saved separately (merged if LoRA), see `_finish`.
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": settings.save_total_limit,
        "report_to": list(settings.report_to) or "none",
        "disable_tqdm": not progress_bar,
    }


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder`: the trainer writes `trainer_state.json` last, so a
    checkpoint cut short by a kill lacks it and is passed over."""
    done = [p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*")
            if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def _run(trainer: Any, settings: TrainSettings, lineage: dict[str, Any] | None, dropped_too_long: int = 0) -> TrainResult:
    """Train from the last checkpoint of `output_dir` if there is one (the caller checked it is this run's)."""
    resume = last_checkpoint(settings.output_dir)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    resumed_from = int(resume.name.removeprefix(CHECKPOINT_PREFIX)) if resume else 0
    return _finish(trainer, output, trainer.processing_class, settings, lineage, resumed_from, dropped_too_long)


def _lora(settings: TrainSettings) -> Any:
    if not settings.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.05,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _finish(trainer: Any, output: Any, tokenizer: Any, settings: TrainSettings, lineage: dict[str, Any] | None,
            resumed_from: int, dropped_too_long: int = 0) -> TrainResult:
    """Save the final policy as a plain HF folder and summarise the run (the main process only, as the
    trainer does with its checkpoints)."""
    from peft import PeftModel

    out = Path(settings.output_dir)
    history = trainer.state.log_history
    steps = [h for h in history if "step" in h and "train_runtime" not in h]
    metrics = next((h for h in reversed(history) if "train_runtime" in h), dict(output.metrics))
    result = TrainResult(output_dir=str(out), log_history=steps, train_runtime_s=float(metrics.get("train_runtime", 0.0)),
                         steps=int(trainer.state.global_step), metrics=metrics, resumed_from=resumed_from,
                         dropped_too_long=dropped_too_long, world_size=trainer.accelerator.num_processes)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()  # a plain checkpoint: evaluation and the next stage need no peft
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        summary = {"settings": settings.identity(), "result": asdict(result), "lineage": lineage or {}}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    return result


def sft_trainer(settings: TrainSettings, dataset: Any, *, model: Any = None, tokenizer: Any = None,
                progress_bar: bool = False, callbacks: Sequence[Any] = ()) -> Any:
    """The configured `SFTTrainer` (not yet run): loss on the action tokens only.

    `dataset` has conversational `prompt` (the state's messages) and `completion` (the action as
    one assistant message) columns, as `data.sft_dataset` exports them; TRL applies the chat
    template and masks the prompt (completion-only loss), so the model learns the step, not the
    state. Pairs longer than `max_length` must be left out first (`fit_max_length`).
    """
    from trl import SFTConfig, SFTTrainer

    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    choose_chat_template(tokenizer, settings, dataset)
    config = SFTConfig(**_common_args(settings, progress_bar), max_length=settings.max_length, completion_only_loss=True)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=_lora(settings), callbacks=list(callbacks))


def fit_max_length(dataset: Any, tokenizer: Any, max_length: int | None) -> tuple[Any, int]:
    """The pairs whose whole conversation (state and action) fits `max_length` tokens, and how many did not.
    TRL truncates from the end, which cuts the action off; with the loss on the action only, such a pair
    would train on nothing."""
    if max_length is None:
        return dataset, 0

    def fits(row: dict[str, Any]) -> bool:
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tools=row.get("tools"), tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length

    kept = dataset.filter(fits)
    return kept, len(dataset) - len(kept)


def train_sft(settings: TrainSettings, dataset: Any, *, model: Any = None, tokenizer: Any = None,
              lineage: dict[str, Any] | None = None, progress_bar: bool = False, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Supervised fine-tuning on (state, action) pairs that fit `max_length` (see `sft_trainer`); resumes from the
    last checkpoint of `output_dir`, saves the final model."""
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    choose_chat_template(tokenizer, settings, dataset)  # before measuring: the template decides the lengths
    dataset, dropped = fit_max_length(dataset, tokenizer, settings.max_length)
    if len(dataset) == 0:
        raise ValueError(f"all {dropped} SFT pairs are longer than max_length {settings.max_length} tokens: "
                         "nothing to train on (raise max_length)")
    trainer = sft_trainer(settings, dataset, model=model, tokenizer=tokenizer, progress_bar=progress_bar, callbacks=callbacks)
    return _run(trainer, settings, lineage, dropped)


def grpo_config(settings: TrainSettings, *, progress_bar: bool = False, reward_weights: Sequence[float] | None = None,
                sampling_task: TaskKind | None = None) -> Any:
    """TRL's `GRPOConfig` for SWiRL's RL stage. With `use_vllm`, vLLM samples the group (colocated on the
    training GPUs, or a `trl vllm-serve` server) under the action regex of `sampling_task`, as guided generation does."""
    from trl import GRPOConfig

    vllm: dict[str, Any] = {}
    if settings.use_vllm:
        constrained = settings.constraint == "auto" and sampling_task is not None
        vllm = {"use_vllm": True, "vllm_mode": settings.vllm_mode,
                "vllm_gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
                "vllm_structured_outputs_regex": ActionGrammar.for_task(sampling_task).regex() if constrained else None}
        if settings.vllm_server_base_url:
            vllm["vllm_server_base_url"] = settings.vllm_server_base_url
    return GRPOConfig(
        **_common_args(settings, progress_bar), num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature, beta=settings.beta,
        reward_weights=list(reward_weights) if reward_weights is not None else None, **vllm,
    )


def sample_under_grammar(model: Any, tokenizer: Any, task: TaskKind, max_new_tokens: int) -> None:
    """Give the policy's `generate` the in-process action grammar generation uses: GRPO samples every group
    through it, so a small model's samples are one well-formed action each (it rarely writes a tag unaided).

    The loss still scores the sampled tokens under the unconstrained policy, as TRL does with vLLM's
    structured outputs: the update raises the policy's own probability of the good constrained steps."""
    from transformers import LogitsProcessorList

    from swirl_core.llm.transformers_backend import GrammarProcessor, grammar_tokenizer

    lltok, lark = grammar_tokenizer(tokenizer), ActionGrammar.for_task(task).lark(max_new_tokens)
    unconstrained = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        return unconstrained(*args, logits_processor=LogitsProcessorList([GrammarProcessor(lltok, lark)]), **kwargs)

    model.generate = generate


def swirl_trainer(settings: TrainSettings, dataset: Any, reward_funcs: Callable | Sequence[Callable], *,
                  model: Any = None, tokenizer: Any = None, reward_weights: Sequence[float] | None = None,
                  progress_bar: bool = False, callbacks: Sequence[Any] = (), sampling_task: TaskKind | None = None) -> Any:
    """The configured `GRPOTrainer` (not yet run) for SWiRL's RL stage; see `train_swirl`. `sampling_task` (one
    task per run) selects the action constraint the groups are sampled under."""
    from trl import GRPOTrainer

    if settings.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ValueError("use_vllm needs the vllm package (a GPU machine: pip install vllm)")
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    if sampling_task is not None and settings.constraint == "auto" and not settings.use_vllm:
        sample_under_grammar(model, tokenizer, sampling_task, settings.max_completion_length)
    funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
    config = grpo_config(settings, progress_bar=progress_bar, reward_weights=reward_weights, sampling_task=sampling_task)
    return GRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=_lora(settings), callbacks=list(callbacks))


def train_swirl(settings: TrainSettings, dataset: Any, reward_funcs: Callable | Sequence[Callable], *, model: Any = None,
                tokenizer: Any = None, reward_weights: Sequence[float] | None = None,
                lineage: dict[str, Any] | None = None, progress_bar: bool = False, callbacks: Sequence[Any] = (),
                sampling_task: TaskKind | None = None) -> TrainResult:
    """SWiRL's RL stage: J(θ) = E_{s∼T, a∼π_θ(s)}[R(a|s)] with a KL penalty to the initial policy.

    Each dataset row is a stored state s (conversational `prompt`); the trainer samples
    `num_generations` fresh actions a (one completion = one step, `max_completion_length` tokens)
    and the reward functions score them — the judge reward without executing any tool. Steps are
    independent: no return, no discount.

    Why GRPOTrainer rather than RLOOTrainer: both are REINFORCE estimators with a baseline built
    from K fresh samples of the same state, and both take a KL term to the reference policy via
    `beta`. GRPO's group-normalised advantage (r - mean_group) / std_group is a REINFORCE baseline
    with per-state scaling; with `num_iterations=1` the importance ratio is 1 at the sampling
    policy, so its clipped surrogate has exactly the policy-gradient gradient. GRPO adds the KL
    per token to the loss (the paper's "KL penalty to the initial policy"), where RLOO folds a
    sequence KL into the reward; and GRPOTrainer is TRL's main RL path (reward weights, async
    rewards, `log_metric` from rewards), so it is the better-maintained choice.
    """
    trainer = swirl_trainer(settings, dataset, reward_funcs, model=model, tokenizer=tokenizer, reward_weights=reward_weights,
                            progress_bar=progress_bar, callbacks=callbacks, sampling_task=sampling_task)
    try:
        return _run(trainer, settings, lineage)
    finally:
        # An async reward keeps one client open on TRL's event loop for the whole run; close it there.
        for func in trainer.reward_funcs:
            if getattr(trainer, "async_loop", None) is not None and hasattr(func, "aclose"):
                asyncio.run_coroutine_threadsafe(func.aclose(), trainer.async_loop).result()
