"""SFT and SWiRL RL with TRL: settings, the two training entry points, the saved checkpoint.

Both load the base model from a local folder (the offline default SmolLM2, a checkpoint of a
previous stage) or, with network, a Hub name; both save the final model and tokenizer as a plain
HF folder (LoRA merged) that `AutoModelForCausalLM.from_pretrained` and the project's in-process
backend load directly, so a trained policy can be evaluated by the same code as the base one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from swirl_core.llm.local_models import DEFAULT_LOCAL_MODEL, is_local_model, resolve_local_model

SUMMARY_FILE = "swirl_training.json"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class TrainSettings(BaseModel):
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
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    seed: int = 0
    bf16: bool | None = Field(None, description="default: on when CUDA is available")
    activation_checkpointing: bool = Field(False, description="trade compute for memory; off: small models need no help")
    logging_steps: int = Field(1, ge=1)

    @property
    def resolved_bf16(self) -> bool:
        # TRL turns bf16 on by default; on CPU that is slow autocast for nothing, so only with CUDA.
        return _cuda() if self.bf16 is None else self.bf16

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate or (2e-5 if self.method == "sft" else 1e-6)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
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

    @property
    def seconds_per_step(self) -> float:
        return self.train_runtime_s / max(self.steps, 1)


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


def _common_args(settings: TrainSettings) -> dict[str, Any]:
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
        "save_strategy": "no",  # only the final model is kept, saved below (merged if LoRA)
        "report_to": "none",
        "disable_tqdm": True,
    }


def _lora(settings: TrainSettings) -> Any:
    if not settings.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.05,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _finish(trainer: Any, output: Any, tokenizer: Any, settings: TrainSettings, lineage: dict[str, Any] | None,
            dropped_too_long: int = 0) -> TrainResult:
    """Save the final policy as a plain HF folder and summarise the run."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # a plain checkpoint: evaluation and the next stage need no peft
    out = Path(settings.output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    history = trainer.state.log_history
    steps = [h for h in history if "step" in h and "train_runtime" not in h]
    metrics = next((h for h in reversed(history) if "train_runtime" in h), dict(output.metrics))
    result = TrainResult(output_dir=str(out), log_history=steps, train_runtime_s=float(metrics.get("train_runtime", 0.0)),
                         steps=int(trainer.state.global_step), metrics=metrics, dropped_too_long=dropped_too_long)
    summary = {"settings": settings.model_dump(), "result": asdict(result), "lineage": lineage or {}}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return result


def sft_trainer(settings: TrainSettings, dataset: Any, *, model: Any = None, tokenizer: Any = None) -> Any:
    """The configured `SFTTrainer` (not yet run): loss on the action tokens only.

    `dataset` has conversational `prompt` (the state's messages) and `completion` (the action as
    one assistant message) columns, as `data.sft_dataset` exports them; TRL applies the chat
    template and masks the prompt (completion-only loss), so the model learns the step, not the
    state. Pairs longer than `max_length` must be left out first (`fit_max_length`).
    """
    from trl import SFTConfig, SFTTrainer

    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    config = SFTConfig(**_common_args(settings), max_length=settings.max_length, completion_only_loss=True)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=_lora(settings))


def fit_max_length(dataset: Any, tokenizer: Any, max_length: int | None) -> tuple[Any, int]:
    """The pairs whose whole conversation (state and action) fits `max_length` tokens, and how many did not.
    TRL truncates from the end, which cuts the action off; with the loss on the action only, such a pair
    would train on nothing."""
    if max_length is None:
        return dataset, 0

    def fits(row: dict[str, Any]) -> bool:
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length

    kept = dataset.filter(fits)
    return kept, len(dataset) - len(kept)


def train_sft(settings: TrainSettings, dataset: Any, *, model: Any = None, tokenizer: Any = None,
              lineage: dict[str, Any] | None = None) -> TrainResult:
    """Supervised fine-tuning on (state, action) pairs that fit `max_length` (see `sft_trainer`); saves the final model."""
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    dataset, dropped = fit_max_length(dataset, tokenizer, settings.max_length)
    if len(dataset) == 0:
        raise ValueError(f"all {dropped} SFT pairs are longer than max_length {settings.max_length} tokens: "
                         "nothing to train on (raise max_length)")
    trainer = sft_trainer(settings, dataset, model=model, tokenizer=tokenizer)
    output = trainer.train()
    return _finish(trainer, output, trainer.processing_class, settings, lineage, dropped)


def swirl_trainer(settings: TrainSettings, dataset: Any, reward_funcs: Callable | Sequence[Callable], *,
                  model: Any = None, tokenizer: Any = None, reward_weights: Sequence[float] | None = None) -> Any:
    """The configured `GRPOTrainer` (not yet run) for SWiRL's RL stage; see `train_swirl`."""
    from trl import GRPOConfig, GRPOTrainer

    if model is None or tokenizer is None:
        model, tokenizer = load_policy(settings.base_model, bf16=settings.resolved_bf16)
    funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
    config = GRPOConfig(
        **_common_args(settings), num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature, beta=settings.beta,
        reward_weights=list(reward_weights) if reward_weights is not None else None,
    )
    return GRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=_lora(settings))


def train_swirl(settings: TrainSettings, dataset: Any, reward_funcs: Callable | Sequence[Callable], *, model: Any = None,
                tokenizer: Any = None, reward_weights: Sequence[float] | None = None,
                lineage: dict[str, Any] | None = None) -> TrainResult:
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
    trainer = swirl_trainer(settings, dataset, reward_funcs, model=model, tokenizer=tokenizer,
                            reward_weights=reward_weights)
    output = trainer.train()
    return _finish(trainer, output, trainer.processing_class, settings, lineage)
