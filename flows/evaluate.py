"""The `evaluate` flow: base vs SFT vs SWiRL on held-out questions, same agent loop and step caps, on one
dataset or a grid of several (the paper's cross-task table: trained on one task, tested on others).

Each model answers every question once (greedy) through the `generate` subflow, with tools executed
live; the `curate` subflow adds the LLM grader's YES/NO and the process judge's step verdicts when a
judge is configured. This flow joins them into `eval_results` and reports metrics with bootstrap
CIs and paired tests. Everything it calls is journaled, so a rerun pays for nothing twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.curate import run_curate
from flows.generate import run_generate
from flows.runtime import database_slot
from swirl_core.config import CurateConfig, EvalConfig, ModelConfig
from swirl_core.curation import rule_grade_rows
from swirl_core.evaluation import (
    METRIC_TITLES,
    eval_run_id,
    grid_markdown,
    grid_rows,
    metrics_for,
    report_markdown,
    summarize,
    write_results,
)
from swirl_core.generation import plan_generation
from swirl_core.hashing import content_hash
from swirl_core.plots import bar_chart_png
from swirl_core.store import Store
from tasks.artifacts import png_markdown, publish_markdown, publish_tables


@flow(name="evaluate", log_prints=True)
def evaluate(config: EvalConfig = EvalConfig()) -> dict[str, Any]:
    configs = config.per_dataset()
    # Seeds, corpora and checkpoints of every dataset and model are checked before the first call is paid for.
    plans = [{m.label: plan_generation(c.generate_config(m)) for m in c.models} for c in configs]
    configs = [c.model_copy(update={"grader": c.grader_for({q.task for p in ps.values() for q in p.questions})})
               for c, ps in zip(configs, plans, strict=True)]
    if len(configs) == 1:
        return _evaluate_dataset(configs[0], plans[0], "evaluate")
    results = [_evaluate_dataset(c, p, f"evaluate-{c.dataset}") for c, p in zip(configs, plans, strict=True)]
    run_id = content_hash("eval-grid", [r["run_id"] for r in results])[:16]
    rows = grid_rows(results)
    markdown = grid_markdown(run_id, results)
    report_path = Path(config.report) if config.report else config.resolved_work_dir / "eval" / f"grid-{run_id}.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(markdown + "\n")
    publish_tables("evaluate", run_id, {"grid": rows})
    publish_markdown("evaluate", markdown, f"evaluation grid {run_id}", name="grid")
    failures = [f for r in results for f in r["failures"]]
    return {"run_id": run_id, "status": "failed" if failures else "completed", "db": str(config.db),
            "report": str(report_path), "plot": results[0]["plot"], "grid": rows, "datasets": results,
            "generation_runs": {r["dataset"]: r["generation_runs"] for r in results},
            "metrics": [m for r in results for m in r["metrics"]],
            "comparisons": [c for r in results for c in r["comparisons"]], "failures": failures}


def _evaluate_dataset(config: EvalConfig, plans: dict, artifact_prefix: str) -> dict[str, Any]:
    logger = get_run_logger()
    generation_runs, failures = {}, []
    for m in config.models:
        logger.info("evaluating %s (%s) on %d %s questions", m.label, m.model.model, len(plans[m.label].questions),
                    config.dataset)
        result = run_generate(config.generate_config(m))
        generation_runs[m.label] = result["run_id"]
        failures += result["shard_failures"]

    curate_config = CurateConfig(
        db=config.db, work_dir=config.work_dir, judge=config.judge or ModelConfig(), grader=config.grader,
        skip_judge=config.judge is None or not config.step_scores, run_ids=sorted(generation_runs.values()),
        cluster=config.cluster, progress=config.progress, probe_limit=0,  # the judge is measured where it curates
    )
    judged, fingerprint = not curate_config.skip_judge, None
    if judged or config.grader == "llm":
        curated = run_curate(curate_config)
        failures += curated["shard_failures"]
        fingerprint = curated["fingerprint"] if judged else None  # a calibrated judge's depends on the data

    run_id = eval_run_id(config, generation_runs, fingerprint)
    with database_slot(config.db), Store(config.db) as store:
        store.start_run(run_id, "evaluate", config.model_dump(mode="json"), dataset=config.dataset,
                        model=",".join(generation_runs), prompt_version=next(iter(plans.values())).policy.prompt_version)
        store.upsert("grades", rule_grade_rows(store.con, curate_config, run_id))  # cheap, in this process
        n_rows = write_results(store.con, run_id, config, plans, fingerprint)
        overview, metric_rows, comparisons = summarize(store.con, run_id, config)
        metric_rows = [{"dataset": config.dataset, **r} for r in metric_rows]  # a grid's rows say where they are from
        store.finish_run(run_id, "failed" if failures else "completed",
                         n_questions=len(next(iter(plans.values())).questions), n_trajectories=n_rows)

    primary = metrics_for(config)[0]
    means = [r for r in metric_rows if r["metric"] == primary]
    png = bar_chart_png([r["label"] for r in means], [r["mean"] for r in means],
                        errors=[[r["mean"] - r["ci_low"] for r in means], [r["ci_high"] - r["mean"] for r in means]],
                        title=f"{config.dataset}: {METRIC_TITLES[primary]} ({config.confidence:.0%} CI)",
                        ylabel=METRIC_TITLES[primary])
    report_path = Path(config.report) if config.report else config.resolved_work_dir / "eval" / f"report-{run_id}.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path = report_path.with_suffix(".png")
    plot_path.write_bytes(png)
    report_path.write_text(report_markdown(run_id, config, overview, comparisons, f"![{primary}]({plot_path.name})") + "\n")

    publish_tables(artifact_prefix, run_id, {"results": metric_rows, "paired_comparisons": comparisons})
    publish_markdown(artifact_prefix, report_markdown(run_id, config, overview, comparisons, png_markdown(png, primary)),
                     f"evaluation run {run_id}")
    logger.info("evaluation %s: report at %s", run_id, report_path)
    return {"run_id": run_id, "status": "failed" if failures else "completed", "db": str(config.db), "dataset": config.dataset,
            "primary_metric": primary,
            "report": str(report_path), "plot": str(plot_path), "generation_runs": generation_runs,
            "overview": overview, "metrics": metric_rows, "comparisons": comparisons, "failures": failures}
