"""The `train` flow (GPU work pool): SFT baseline or SWiRL step-wise RL on a curated set.

It reads DuckDB read-only and writes a checkpoint folder with a model card; loss and reward curves
are published as Prefect artifacts. The same code runs on CPU (tests, the offline demo) and GPU.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from swirl_core.hashing import content_hash
from swirl_core.plots import line_chart_png
from swirl_core.training.run import TrainConfig
from tasks.artifacts import png_markdown, publish_markdown, publish_tables
from tasks.train import train


# No log_prints: `datasets` fingerprints functions with dill, which reads `dis` output by swapping
# sys.stdout; a print patched into a log escapes that capture and floods the run log with bytecode.
@flow(name="train", log_prints=False)
def train_flow(config: TrainConfig) -> dict[str, Any]:
    run_id = content_hash("train-run", config.model_dump(mode="json"))[:16]
    result = train(config, run_id)
    _publish(run_id, config, result)
    return result | {"run_id": run_id}


def _publish(run_id: str, config: TrainConfig, result: dict) -> None:
    history = result["log_history"]
    curves = {k: [(h["step"], h[k]) for h in history if k in h] for k in ("loss", "reward", "kl")}
    publish_tables(f"train-{config.settings.method}", run_id, {"log": [
        {k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history]})
    lines = [f"# Training run `{run_id}` ({config.settings.method})",
             f"- base model `{config.settings.base_model}`, curated set **{config.resolved_filter}**, "
             f"{result['lineage']['rows']} training rows from {result['lineage']['trajectories']} trajectories",
             f"- {result['steps']} steps, {result['seconds_per_step']:.2f} s/step, checkpoint `{result['output_dir']}`"]
    if result.get("reward"):
        lines.append(f"- judge reward: {result['reward']}")
    for name, points in curves.items():
        if points:
            png = line_chart_png([p[0] for p in points], [float(p[1]) for p in points], title=name, xlabel="step")
            lines += ["", f"{name}:", "", png_markdown(png, name)]
    publish_markdown(f"train-{config.settings.method}", "\n".join(lines), f"training run {run_id}")
