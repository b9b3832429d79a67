"""The `pipeline` flow: the whole factory in one run, from seeds to an evaluated, published model.

generate → curate → train (SFT baseline, SWiRL RL) → evaluate (base vs SFT vs SWiRL) → publish (optional).
Every stage is the same flow that runs alone, as a subflow, so the Prefect UI shows each one with its
artifacts. Each stage only does the work that is missing: a rerun replays journaled calls, skips judged
steps and finished training runs, so an interrupted pipeline resumes by running it again.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from flows.curate import run_curate
from flows.evaluate import evaluate
from flows.generate import run_generate
from flows.publish import publish
from flows.runtime import database_slot
from flows.train import train_flow
from swirl_core.config import EvalModel, ModelConfig, PipelineConfig
from swirl_core.generation import plan_generation
from swirl_core.store import Store, query_dicts
from swirl_core.training.run import TrainConfig
from swirl_core.training.trainers import TrainSettings
from tasks.artifacts import publish_markdown, publish_tables


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    logger = get_run_logger()
    stages: list[dict[str, Any]] = []
    check_inputs(config)

    def stage(name: str, run, summary) -> Any:
        started = time.perf_counter()
        result = run()
        stages.append({"stage": name, "seconds": round(time.perf_counter() - started, 1), **summary(result)})
        logger.info("%s: %s", name, stages[-1])
        return result

    gen = stage("generate", lambda: run_generate(config.generate),
                lambda r: {"status": r["status"], "detail": f"{r['trajectories']} trajectories, {r['errors']} errors; "
                                                            + r["calls"].describe()})
    # This run's trajectories only: the calibration sample, and so the verdicts, must not shift with other data.
    cur = stage("curate", lambda: run_curate(config.curate.model_copy(update={"run_ids": [gen["run_id"]]})),
                lambda r: {"status": r["status"], "detail": f"{r['judged_steps']} steps judged; {r['calls'].describe()}"
                           + "".join(f"; judge probe balanced accuracy {p['summary']['balanced_accuracy']:.2f}"
                                     + ("" if p["better_than_chance"] else " (not better than chance)") for p in r["probes"])})
    checkpoints: dict[str, str] = {}
    for settings in (config.sft, config.swirl):
        if settings is None:
            continue
        result = stage(f"train-{settings.method}", lambda c=train_config(config, settings, gen["run_id"]): train_flow(c),
                       lambda r: {"status": "skipped (already trained on this data)" if r["skipped"] else "completed",
                                  "detail": f"{r['steps']} steps on {r['lineage']['rows']} rows"
                                            + (f" ({r['dropped_too_long']} over max_length left out)" if r["dropped_too_long"] else "")})
        checkpoints[settings.method] = result["output_dir"]
    report = None
    if config.evaluate is not None:
        eval_config = config.evaluate.model_copy(update={"models": _eval_models(config, checkpoints)})
        ev = stage("evaluate", lambda: evaluate(eval_config),
                   lambda r: {"status": r["status"], "detail": f"report {r['report']}"})
        report = ev["report"]
        metrics = ev["metrics"]
    else:
        metrics = []
    if config.publish is not None:
        stage("publish", lambda: publish(config.publish),
              lambda r: {"status": "uploaded" if r["uploaded"] else "exported", "detail": r["folder"]})

    with database_slot(config.db), Store(config.db, read_only=True) as store:
        parsed = query_dicts(store.con, "SELECT * FROM step_parse_report WHERE run_id = ?", [gen["run_id"]])
        retention = query_dicts(store.con, "SELECT dataset, filter, trajectories, sub_trajectories FROM curation_retention "
                                           "WHERE dataset = ? ORDER BY filter", [config.generate.dataset])
    status = "completed" if all(s["status"] != "failed" for s in stages) else "failed"
    publish_tables("pipeline", gen["run_id"], {"stages": stages, "retention": retention, "metrics": metrics})
    publish_markdown("pipeline", _markdown(config, stages, retention, metrics, report), "the pipeline run")
    return {"status": status, "db": config.db, "generation_run": gen["run_id"], "curation_run": cur["run_id"],
            "probes": cur["probes"],
            "stages": stages, "step_parse": parsed, "retention": retention, "checkpoints": checkpoints,
            "metrics": metrics, "report": report}


def check_inputs(config: PipelineConfig) -> None:
    """Seeds and options of both ends, before the first call is paid for (the checkpoints come later)."""
    plan_generation(config.generate)
    if config.evaluate is not None:
        plan_generation(config.evaluate.generate_config(config.evaluate.models[0]))


def train_config(config: PipelineConfig, settings: TrainSettings, run_id: str) -> TrainConfig:
    """One training stage's config: the pipeline's shared settings, on its own generation run only (older runs with
    other policies or prompts must not leak into training)."""
    pub = config.publish
    return TrainConfig(db=config.db, work_dir=config.work_dir, protocol=config.protocol, settings=settings,
                       dataset=config.generate.dataset, run_ids=[run_id],
                       judge=config.curate.judge if settings.method == "swirl" else None,
                       progress=config.progress, dataset_repo_id=pub.repo_id if pub else None,
                       push_to_hub=f"{pub.repo_id}-{settings.method}" if pub and pub.push_models and not pub.dry_run else None,
                       private=pub.private if pub else True, token_secret=pub.token_secret if pub else None)


def _eval_models(config: PipelineConfig, checkpoints: dict[str, str]) -> list[EvalModel]:
    """The configured models (the base model by default), then each trained checkpoint under its method's name,
    decoded like the base model."""
    models = list(config.evaluate.models)
    like = models[0].model if models else ModelConfig(temperature=0.0)
    taken = {m.label for m in models}
    for method, folder in checkpoints.items():
        if method not in taken:
            models.append(EvalModel(label=method, model=like.model_copy(update={"model": folder})))
    return models


def _markdown(config: PipelineConfig, stages: list[dict], retention: list[dict], metrics: list[dict],
              report: str | None) -> str:
    lines = [f"# Pipeline on `{config.generate.dataset}` → `{config.db}`", "",
             "| stage | status | seconds | detail |", "|---|---|---|---|",
             *[f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in stages], "",
             "| curated set | trajectories | sub-trajectories |", "|---|---|---|",
             *[f"| {r['filter']} | {r['trajectories']} | {r['sub_trajectories']} |" for r in retention]]
    if metrics:
        lines += ["", "| dataset | model | metric | mean | 95% CI |", "|---|---|---|---|---|",
                  *[f"| {m['dataset']} | {m['label']} | {m['metric']} | {m['mean']:.3f} | [{m['ci_low']:.3f}, {m['ci_high']:.3f}] |"
                    for m in metrics]]
    if report:
        lines += ["", f"Evaluation report: `{report}`"]
    return "\n".join(lines)
