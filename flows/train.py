"""The `train` flow (GPU work pool): SFT baseline or SWiRL step-wise RL on a curated set.

It reads DuckDB read-only and writes a checkpoint folder with a model card; with several processes it
supervises `accelerate launch`. A progress artifact follows the run; loss, reward, KL and the share of
zero-variance reward groups are published as artifacts at the end. The same code runs on CPU (tests,
the offline demo) and GPU. With `push_to_hub` the final model and its card go to a Hub model repo.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from swirl_core.hashing import content_hash
from swirl_core.plots import line_chart_png
from swirl_core.training.progress import WATCHED_METRICS
from swirl_core.training.run import TrainConfig
from tasks.artifacts import png_markdown, publish_markdown, publish_tables
from tasks.publish import hub_token
from tasks.train import push_model, train

# Run-level settings that do not change what is trained: the same run, the same id.
_NOT_IN_RUN_ID = {"progress", "push_to_hub", "private", "token_secret", "license", "dataset_repo_id"}


# No log_prints: `datasets` fingerprints functions with dill, which reads `dis` output by swapping
# sys.stdout; a print patched into a log escapes that capture and floods the run log with bytecode.
@flow(name="train", log_prints=False)
def train_flow(config: TrainConfig) -> dict[str, Any]:
    run_id = content_hash("train-run", config.model_dump(mode="json", exclude=_NOT_IN_RUN_ID))[:16]
    result = train(config, run_id)
    if config.push_to_hub:
        result["hub"] = push_model(result["output_dir"], config.push_to_hub, config.private, hub_token(config.token_secret))
    _publish(run_id, config, result)
    return result | {"run_id": run_id}


def run_mean(history: list[dict], key: str) -> float | None:
    """The mean of a logged metric over the run's steps, None when it was never logged (SFT)."""
    values = [h[key] for h in history if key in h]
    return sum(values) / len(values) if values else None


def rl_signals(history: list[dict]) -> list[str]:
    """What a reader of an RL run must know: how many groups taught nothing (all rewards equal — most of them
    with a binary judge), and how many sampled steps were cut at max_completion_length (their tag never closes)."""
    lines = []
    if (share := run_mean(history, "frac_reward_zero_std")) is not None:
        lines.append(f"groups with zero reward variance (no learning signal): {share:.1%} on average")
    if (clipped := run_mean(history, "completions/clipped_ratio")) is not None:
        lines.append(f"sampled steps cut at max_completion_length: {clipped:.1%}"
                     + (" — raise it so a step fits with its reasoning" if clipped > 0.2 else ""))
    return lines


def _publish(run_id: str, config: TrainConfig, result: dict) -> None:
    history = result["log_history"]
    curves = {k: [(h["step"], h[k]) for h in history if k in h] for k in WATCHED_METRICS}
    publish_tables(f"train-{config.settings.method}", run_id, {"log": [
        {k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history]})
    lines = [f"# Training run `{run_id}` ({config.settings.method})",
             f"- base model `{config.settings.base_model}`, curated set **{config.resolved_filter}**, "
             f"{result['lineage']['rows']} training rows from {result['lineage']['trajectories']} trajectories",
             f"- {result['steps']} steps, {result['seconds_per_step']:.2f} s/step, {result['world_size']} process(es), "
             f"checkpoint `{result['output_dir']}`"]
    if result["resumed_from"]:
        lines.append(f"- resumed from the checkpoint at step {result['resumed_from']}")
    lines += [f"- {line}" for line in rl_signals(history)]
    if result.get("reward"):
        lines.append(f"- judge reward: {result['reward']}")
    if result.get("hub"):
        lines.append(f"- pushed to the Hub: `{result['hub']['repo_id']}` ({result['hub']['commit']})")
    for name, points in curves.items():
        if points:
            png = line_chart_png([p[0] for p in points], [float(p[1]) for p in points], title=name, xlabel="step")
            lines += ["", f"{name}:", "", png_markdown(png, name)]
    publish_markdown(f"train-{config.settings.method}", "\n".join(lines), f"training run {run_id}")
