"""The `curate` flow: process judge per step, outcome grades per trajectory, the four curated sets.

Judge and grader calls run in shards on Dask workers; this process is the only DuckDB writer and
stores each shard's verdicts as it arrives. A rerun judges only what is missing, and every call a
crashed run already paid for replays from the call journal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from tqdm.auto import tqdm

from flows.runtime import database_slot, task_runner
from swirl_core.config import CurateConfig
from swirl_core.curation import (
    calibration_shard,
    curation_report,
    grade_shards,
    judge_fingerprint,
    judge_shards,
    judge_spec,
    judgment_rows,
    llm_grade_rows,
    pending_steps,
    rule_grade_rows,
)
from swirl_core.hashing import content_hash
from swirl_core.judging import Judgment, LLMGrade
from swirl_core.plots import bar_chart_png
from swirl_core.store import Store
from tasks.artifacts import png_markdown, publish_markdown, publish_tables
from tasks.curate import calibrate_judge, grade_shard, judge_shard


def run_curate(config: CurateConfig) -> dict[str, Any]:
    """Run the flow on the cluster its config names (the task runner is chosen per run)."""
    workers = config.cluster.n_workers or (1 if config.judge.is_local else 2)
    runner = task_runner(config.cluster, workers, config.resolved_work_dir / "dask")
    return curate.with_options(task_runner=runner)(config)


@flow(name="curate-on-cluster", log_prints=True)
def curate_on_cluster(config: CurateConfig = CurateConfig()) -> dict[str, Any]:
    """Deployment entrypoint: starts the Dask cluster the config names, then runs `curate` on it."""
    return run_curate(config)


@flow(name="curate", log_prints=True)
def curate(config: CurateConfig = CurateConfig()) -> dict[str, Any]:
    logger = get_run_logger()
    journal_dir = config.resolved_work_dir / "journal"
    failures: list[str] = []
    with database_slot(config.db), Store(config.db) as store:
        spec = judge_spec(config)
        if not config.skip_judge and (shard := calibration_shard(store.con, config, spec)) is not None:
            spec = spec.model_copy(update={"thresholds": calibrate_judge.submit(shard).result()})
            logger.info("judge calibrated on %d sampled steps: P(GOOD) thresholds %s", len(shard.items), spec.thresholds)
        fingerprint = judge_fingerprint(spec)
        run_id = content_hash("curate-run", fingerprint, config.grader, config.run_ids, config.dataset)[:16]
        store.start_run(run_id, "curate", config.model_dump(mode="json"), dataset=config.dataset,
                        model=config.judge.model, prompt_version=spec.model_dump_json())
        rule_rows = rule_grade_rows(store.con, config, run_id)
        store.upsert("grades", rule_rows)
        pending = pending_steps(store.con, config, fingerprint) if not config.skip_judge else None
        n_pending = pending.num_rows if pending is not None else 0
        logger.info("curate run %s: %d steps to judge, %d trajectories rule-graded", run_id, n_pending, rule_rows.num_rows)
        if n_pending:

            def write_judgments(rows: list[dict]) -> int:
                judgments = [Judgment.model_validate(r) for r in rows]
                store.upsert("judgments", judgment_rows(judgments, run_id, fingerprint))
                return len({(j.trajectory_id, j.step_index) for j in judgments})

            futures = judge_shard.map(list(judge_shards(pending, config, spec, run_id)))
            failures += _collect(futures, n_pending, "judge steps", config.progress, logger, write_judgments)
        if config.grader == "llm":

            def write_grades(rows: list[dict]) -> int:
                store.upsert("grades", llm_grade_rows([LLMGrade.model_validate(r) for r in rows], run_id))
                return len(rows)

            shards = list(grade_shards(store.con, config, run_id))
            if shards:
                futures = grade_shard.map(shards)
                failures += _collect(futures, sum(len(s.items) for s in shards), "grade trajectories",
                                     config.progress, logger, write_grades)
        if journal_dir.exists():
            store.ingest_journals(journal_dir)
        report = curation_report(store.con)
        status = "failed" if failures else "completed"
        store.finish_run(run_id, status, n_trajectories=sum(r["trajectories"] for r in report["retention"]
                                                             if r["filter"] == "none"))
    _publish(run_id, config, report, failures)
    return {"run_id": run_id, "status": status, "db": str(config.db), "judged_steps": n_pending, "fingerprint": fingerprint,
            "shard_failures": failures, "report": report}


def _collect(futures, total: int, what: str, progress: bool, logger, write) -> list[str]:
    """Write each shard's results the moment it finishes; a failed shard is reported, not fatal."""
    failures = []
    bar = tqdm(total=total, desc=what, disable=not progress)
    for future in as_completed(futures):
        try:
            rows = future.result()
        except Exception as exc:
            failures.append(f"{what}: {exc.__class__.__name__}: {exc}")
            logger.error("%s shard failed: %s", what, exc)
            continue
        bar.update(write(rows))
    bar.close()
    return failures


def _publish(run_id: str, config: CurateConfig, report: dict, failures: list[str]) -> None:
    publish_tables("curate", run_id, report)
    by_step = report["good_rate_by_step"]
    lines = [f"# Curation run `{run_id}`", f"- judge: `{config.judge.model}` × {config.judge_samples} sample(s), "
             f"grader: {config.grader}, database: `{config.db}`", "",
             "| dataset | filter | trajectories | sub-trajectories | retention |", "|---|---|---|---|---|",
             *[f"| {r['dataset']} | {r['filter']} | {r['trajectories']} | {r['sub_trajectories']} | {r['retention']:.1%} |"
               for r in report["retention"]], "",
             "Process (judge) vs outcome (grade), trajectories:", "",
             "| dataset | process pass | outcome pass | trajectories |", "|---|---|---|---|",
             *[f"| {r['dataset']} | {r['process_pass']} | {r['outcome_pass']} | {r['trajectories']} |"
               for r in report["agreement"]]]
    if by_step:
        png = bar_chart_png([str(r["step_index"]) for r in by_step], [float(r["good_rate"]) for r in by_step],
                            title="Judge GOOD rate by step", ylabel="GOOD rate")
        plot_path = Path(config.resolved_work_dir) / f"good_rate_by_step-{run_id}.png"
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_path.write_bytes(png)
        lines += ["", "GOOD rate by step index:", "", png_markdown(png, "GOOD rate by step")]
    if failures:
        lines += ["", f"**{len(failures)} shard(s) failed**: rerun the same command to resume."]
    publish_markdown("curate", "\n".join(lines), f"curation run {run_id}")
