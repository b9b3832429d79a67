"""The `curate` flow: process judge per step, outcome grades per trajectory, the four curated sets.

Judge and grader calls run in shards on Dask workers; this process is the only DuckDB writer and
stores each shard's verdicts as it arrives. A rerun judges only what is missing, and every call a
crashed run already paid for replays from the call journal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.judge_eval import publish_probe, run_probe
from flows.runtime import database_slot, task_runner
from swirl_core.config import CurateConfig
from swirl_core.curation import (
    calibration_shard,
    curation_report,
    grade_shards,
    judge_fingerprint,
    judge_spec,
    judgment_rows,
    llm_grade_rows,
    pending_shards,
    pending_steps,
    probe_configs,
    register_judge,
    rule_grade_rows,
    scope_tasks,
    select_judge,
)
from swirl_core.hashing import content_hash
from swirl_core.judging import Judgment, LLMGrade, verify_judge
from swirl_core.plots import bar_chart_png
from swirl_core.progress import CallTally
from swirl_core.stage import Shard, ShardFailure, StageFailed, run_stage
from swirl_core.store import Store
from tasks.artifacts import png_markdown, publish_markdown, publish_tables
from tasks.stage import on_task_runner


def run_curate(config: CurateConfig) -> dict[str, Any]:
    """Run the flow on the cluster its config names (the task runner is chosen per run)."""
    runner = task_runner(config.cluster, config.judge, config.resolved_work_dir / "dask")
    return curate.with_options(task_runner=runner)(config)


@flow(name="curate-on-cluster", log_prints=True)
def curate_on_cluster(config: CurateConfig = CurateConfig()) -> dict[str, Any]:
    """Deployment entrypoint: starts the Dask cluster the config names, then runs `curate` on it."""
    return run_curate(config)


@flow(name="curate", log_prints=True)
def curate(config: CurateConfig = CurateConfig()) -> dict[str, Any]:
    logger = get_run_logger()
    journal_dir = config.journal_dir
    failures: list[ShardFailure] = []
    probes: list[dict[str, Any]] = []
    calls = CallTally()  # of judging and grading
    with database_slot(config.db), Store(config.db) as store:
        spec, judge_probe = verify_judge(config.judge, judge_spec(config))  # one request, before any is paid for
        judging = not config.skip_judge and config.judge_id is None
        if judging:
            probes = _measure_judge(store, config, logger)
            labelled = {p["task"]: p["threshold"] for p in probes if p["threshold"] is not None}
            if spec.calibration != "none" and labelled and labelled.keys() >= scope_tasks(store.con, config):
                spec = spec.model_copy(update={"calibration": "labelled", "thresholds": labelled})
                logger.info("judge P(GOOD) thresholds chosen on the probe's labelled steps: %s", labelled)
            elif (shard := calibration_shard(store.con, config, spec)) is not None:
                spec = spec.model_copy(update={"thresholds": _calibrate(shard)})
                logger.warning("no labelled steps for every task: judge calibrated on the median P(GOOD) of %d sampled "
                               "steps, %s (half the steps GOOD by construction)", shard.job.size, spec.thresholds)
        fingerprint = config.judge_id or judge_fingerprint(spec)
        run_id = content_hash("curate-run", fingerprint, config.grader, config.run_ids, config.dataset)[:16]
        # With --judge-id the run records the judge it selects (as registered by its curation), not --judge.
        known = store.query("SELECT judge_model, spec FROM judges WHERE judge_fingerprint = ?", [fingerprint])
        model, asked = (config.judge.model, spec.model_dump_json()) if not config.judge_id else (
            known[0] if known else (None, None))
        run_config = config.model_dump(mode="json") | ({"judge_probe": judge_probe} if judge_probe else {})
        store.start_run(run_id, "curate", run_config, dataset=config.dataset, model=model,
                        prompt_version=asked)
        if judging:
            register_judge(store.con, fingerprint, spec, probes[0]["fingerprint"] if probes else None)
        elif config.judge_id and not select_judge(store.con, config, config.judge_id, run_id):
            raise ValueError(f"judge {config.judge_id} judged no step in scope; judges in this database: "
                             + (", ".join(r[0] for r in store.query("SELECT DISTINCT judge_fingerprint FROM judgments "
                                                                     "ORDER BY 1")) or "none"))
        rule_rows = rule_grade_rows(store.con, config, run_id)
        store.upsert("grades", rule_rows)
        pending = pending_steps(store.con, config, fingerprint) if judging else None
        n_pending = pending.num_rows if pending is not None else 0
        logger.info("curate run %s: %d steps to judge, %d trajectories rule-graded", run_id, n_pending, rule_rows.num_rows)

        def write_judgments(shard: Shard, judgments: list[Judgment]) -> int:
            store.upsert("judgments", judgment_rows(judgments, shard.run_id, shard.fingerprint))
            return len({(j.trajectory_id, j.step_index) for j in judgments})

        def write_grades(shard: Shard, grades: list[LLMGrade]) -> int:
            store.upsert("grades", llm_grade_rows(grades, shard.run_id))
            return len(grades)

        if n_pending:
            shards = pending_shards(pending, config, spec, run_id, fingerprint)
            failures += run_stage(shards, on_task_runner, write_judgments, progress=config.progress, logger=logger,
                                  calls=calls)
        if config.grader == "llm":
            shards = grade_shards(store.con, config, run_id)
            failures += run_stage(shards, on_task_runner, write_grades, progress=config.progress, logger=logger,
                                  calls=calls)
        if judging:
            select_judge(store.con, config, fingerprint, run_id)  # the latest curation's judge is the one its sets read
        store.compact_journals(journal_dir)
        report = curation_report(store.con)
        status = "failed" if failures else "completed"
        store.finish_run(run_id, status, n_trajectories=sum(r["trajectories"] for r in report["retention"]
                                                             if r["filter"] == "none"))
    _publish(run_id, config, report, calls, failures, probes)
    return {"run_id": run_id, "status": status, "db": str(config.db), "judged_steps": n_pending, "fingerprint": fingerprint,
            "shard_failures": failures, "report": report, "probes": probes, "calls": calls}


def _measure_judge(store: Store, config: CurateConfig, logger) -> list[dict[str, Any]]:
    """The judge probe on the curated data's own seeds, per task (reused when already run); refuses a judge below
    `min_judge_f1`. A dataset without gold steps, or seeds no longer readable, leave the judge unmeasured."""
    probes = []
    for task, probe_config in (probe_configs(store.con, config) if config.probe_limit else {}).items():
        try:
            probe = run_probe(store, probe_config, logger)
        except (ValueError, FileNotFoundError) as exc:  # SeedError is a ValueError
            logger.warning("the judge is not measured on %s (%s): %s", probe_config.dataset, task, exc)
            continue
        probes.append(probe)
        publish_probe(probe, config.resolved_work_dir)
        f1 = probe["summary"]["f1_bad"]
        if config.min_judge_f1 is not None and (f1 is None or f1 < config.min_judge_f1):
            raise ValueError(f"the judge's F1 for BAD steps on {probe['scored_steps']} labelled steps of "
                             f"{probe['dataset']} is {'unknown' if f1 is None else f'{f1:.3f}'}, below --min-judge-f1 "
                             f"{config.min_judge_f1}: not curating with it ({probe['headline']})")
    if config.min_judge_f1 is not None and not probes:
        raise ValueError("--min-judge-f1 needs the judge probe, but no labelled steps could be built for the curated data")
    return probes


def _calibrate(shard: Shard) -> dict[str, float]:
    thresholds: dict[str, float] = {}

    def keep(shard: Shard, found: dict[str, float]) -> int:
        thresholds.update(found)
        return shard.job.size

    if failures := run_stage([shard], on_task_runner, keep):
        raise StageFailed(failures)
    return thresholds


def _publish(run_id: str, config: CurateConfig, report: dict, calls: CallTally, failures: list[ShardFailure],
             probes: list[dict]) -> None:
    publish_tables("curate", run_id, report)
    by_step = report["good_rate_by_step"]
    lines = [f"# Curation run `{run_id}`", f"- judge: `{config.judge.model}` × {config.judge_samples} sample(s), "
             f"grader: {config.grader}, database: `{config.db}`", f"- judging and grading in this run: {calls.describe()}", "",
             "| dataset | filter | trajectories | sub-trajectories | retention |", "|---|---|---|---|---|",
             *[f"| {r['dataset']} | {r['filter']} | {r['trajectories']} | {r['sub_trajectories']} | {r['retention']:.1%} |"
               for r in report["retention"]], "",
             "Process (judge) vs outcome (grade), trajectories:", "",
             "| dataset | process pass | outcome pass | trajectories |", "|---|---|---|---|",
             *[f"| {r['dataset']} | {r['process_pass']} | {r['outcome_pass']} | {r['trajectories']} |"
               for r in report["agreement"]],
             "", "Judge probe (labelled steps):", "", *[f"- {p['headline']}" for p in probes]]
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
