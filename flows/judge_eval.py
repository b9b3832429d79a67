"""The `judge-eval` flow: how well a judge tells GOOD steps from BAD ones, measured on labelled steps.

The labelled steps are built from the seed dataset's gold solutions (swirl_core/judge_probe.py) and judged
through the same client, call journal and cache as curation, so a rerun pays nothing; steps this judge
already rated are not asked again. `run_probe` is shared with the curate flow, which measures its judge first.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.runtime import database_slot
from swirl_core.config import JudgeEvalConfig
from swirl_core.curation import judge_fingerprint, judge_shards
from swirl_core.hashing import content_hash
from swirl_core.judge_probe import (
    PROBE_VERSION,
    LabelledStep,
    better_than_chance,
    choose_threshold,
    headline,
    labelled_steps,
    probe_metrics,
    reliability,
)
from swirl_core.judging import JudgeSpec, Judgment, verify_judge
from swirl_core.plots import bar_chart_png
from swirl_core.records import ProbeMetricRow, ProbeResultRow
from swirl_core.seeds import load_seeds
from swirl_core.stage import Shard, StageFailed, run_stage
from swirl_core.store import Store, query_dicts, step_votes
from tasks.artifacts import png_markdown, publish_markdown, publish_tables
from tasks.stage import on_task_runner


def probe_spec(config: JudgeEvalConfig) -> JudgeSpec:
    """The judge as the probe asks it: before any threshold is set (a calibrated judge reports P(GOOD))."""
    return JudgeSpec.for_model(config.judge, config.judge_samples, config.max_reasks)


def build_steps(config: JudgeEvalConfig) -> list[LabelledStep]:
    questions = load_seeds(config.dataset, data_files=config.data_files, split=config.split, hub_name=config.hub_name,
                           hub_config=config.hub_config, limit=config.limit).questions
    steps = labelled_steps(questions, config.seed)
    if not steps:
        raise ValueError(f"no labelled steps can be built from {config.dataset!r} ({len(questions)} questions): the probe "
                         "needs GSM8K-style <<expr=value>> solutions or HotpotQA-style supporting paragraphs")
    return steps


def _judged(step: LabelledStep, judgments: list[Judgment]) -> dict[str, Any]:
    votes = Counter(j.verdict for j in judgments)
    probs = [j.p_good for j in judgments if j.p_good is not None]
    return {"p_good": sum(probs) / len(probs) if len(probs) == len(judgments) else None,
            "good_votes": votes["GOOD"], "bad_votes": votes["BAD"], "votes": len(judgments),
            "reasoning": judgments[0].reasoning[:2000],
            # a failed call's error, if any sample failed: the step is then judged again by the next run
            "error": next((j.error for j in judgments if j.error is not None), None),
            "call_keys": [k for j in judgments for k in j.call_keys]}


def run_probe(store: Store, config: JudgeEvalConfig, logger) -> dict[str, Any]:
    """Judge the labelled steps this judge has not rated yet, then score every one; returns the figures."""
    steps = build_steps(config)
    spec, judge_probe = verify_judge(config.judge, probe_spec(config))  # one request, before any is paid for
    fingerprint = judge_fingerprint(spec)
    run_id = content_hash("probe-run", fingerprint, PROBE_VERSION, config.dataset, config.data_files, config.split,
                          config.hub_name, config.hub_config, config.limit, config.seed)[:16]
    run_config = config.model_dump(mode="json") | ({"judge_probe": judge_probe} if judge_probe else {})
    store.start_run(run_id, "judge-eval", run_config, dataset=config.dataset,
                    model=config.judge.model, prompt_version=spec.model_dump_json())
    ids = [s.probe_step_id for s in steps]
    known = {r["probe_step_id"]: r for r in query_dicts(
        store.con, "SELECT * FROM judge_probe_results WHERE judge_fingerprint = ? AND probe_step_id IN "
                   "(SELECT unnest(?::VARCHAR[])) AND error IS NULL",
        [fingerprint, ids])}
    todo = [s for s in steps if s.probe_step_id not in known]
    judged: dict[str, dict[str, Any]] = {i: r for i, r in known.items()}
    started, calls = time.perf_counter(), 0
    if todo:
        chunks = ([s.to_judge() for s in todo[i:i + config.shard_size]] for i in range(0, len(todo), config.shard_size))
        shards = judge_shards(chunks, config, spec, run_id, fingerprint)
        by_step: dict[str, list[Judgment]] = {}

        def keep(shard: Shard, judgments: list[Judgment]) -> int:
            for judgment in judgments:
                by_step.setdefault(judgment.trajectory_id, []).append(judgment)
            return shard.job.size

        failures = run_stage(shards, on_task_runner, keep, logger=logger)
        store.compact_journals(config.journal_dir)
        if failures:  # every labelled step is scored: a missing one would bias the figures
            raise StageFailed(failures)
        for s in todo:
            judged[s.probe_step_id] = _judged(s, by_step[s.probe_step_id])
        fresh = [judged[s.probe_step_id] for s in todo]
        for r, verdict in zip(fresh, step_votes(store.con, [(r["good_votes"], r["bad_votes"]) for r in fresh]), strict=True):
            r["verdict"] = verdict
        calls = sum(len(r["call_keys"]) for i, r in judged.items() if i in by_step)
    elapsed = time.perf_counter() - started

    calibrated = spec.calibration != "none"
    threshold = None
    if calibrated:
        cal = [(judged[s.probe_step_id]["p_good"], s.label) for s in steps
               if s.fold == "calibration" and judged[s.probe_step_id]["p_good"] is not None]
        threshold = choose_threshold([p for p, _ in cal], [label for _, label in cal])
    rows = []
    for s in steps:
        r = judged[s.probe_step_id]
        verdict = r["verdict"] if not calibrated else (
            "UNKNOWN" if threshold is None or r["p_good"] is None else "GOOD" if r["p_good"] >= threshold else "BAD")
        rows.append({"probe_step_id": s.probe_step_id, "judge_fingerprint": fingerprint, "probe_run_id": run_id,
                     "judge_model": spec.model, "probe_version": PROBE_VERSION, "dataset": s.dataset, "split": s.split,
                     "question_id": s.question_id, "task": s.task, "action_kind": s.action_kind,
                     "corruption": s.corruption, "label": s.label, "verdict": verdict, "p_good": r["p_good"],
                     "threshold": threshold, "fold": s.fold, "scored": not calibrated or s.fold == "evaluation",
                     "good_votes": r["good_votes"], "bad_votes": r["bad_votes"], "votes": r["votes"],
                     "message": s.action_message, "state": json.dumps(s.turns, ensure_ascii=False),
                     "reasoning": r["reasoning"], "error": r["error"], "call_keys": list(r["call_keys"])})
    store.write(ProbeResultRow, rows)

    scored = [r for r in rows if r["scored"]]
    metrics = probe_metrics(scored, n_resamples=config.n_resamples, confidence=config.confidence, seed=config.seed)
    better = better_than_chance(metrics)
    keys = [k for r in rows for k in r["call_keys"]]
    priced, cost = store.query("SELECT count(cost_usd), sum(cost_usd) FROM llm_calls WHERE call_key IN "
                               "(SELECT unnest(?::VARCHAR[]))", [keys])[0]
    extra = {"better_than_chance": float(better), "threshold": threshold,
             # unknown when any call is unpriced: a partial sum would understate it
             "cost_usd_per_1000_steps": cost * 1000 / len(rows) if keys and priced == len(set(keys)) else None}
    if calls:
        extra |= {"calls_per_s": calls / elapsed, "seconds_per_1000_steps": elapsed * 1000 / len(todo)}
    metrics += [{"grp": "all", "metric": k, "n": len(rows), "value": v, "ci_low": None, "ci_high": None}
                for k, v in extra.items()]
    store.write(ProbeMetricRow, [
        {"judge_fingerprint": fingerprint, "dataset": config.dataset, "split": config.split, "probe_run_id": run_id, **m}
        for m in metrics])
    store.finish_run(run_id, "completed", n_questions=len({s.question_id for s in steps}), n_trajectories=len(rows))
    summary = query_dicts(store.con, "SELECT * FROM judge_probe_summary WHERE judge_fingerprint = ? AND dataset = ? "
                                     "AND split = ?", [fingerprint, config.dataset, config.split])
    result = {"run_id": run_id, "fingerprint": fingerprint, "judge_model": spec.model, "dataset": config.dataset,
              "task": steps[0].task, "steps": len(rows), "scored_steps": len(scored), "judged_now": len(todo),
              "calls": calls, "threshold": threshold, "better_than_chance": better, "metrics": metrics,
              "summary": summary[0], "reliability": reliability(scored)}
    result["headline"] = headline(result)
    (logger.info if better else logger.warning)("%s", result["headline"])
    return result


def publish_probe(result: dict[str, Any], work_dir: Path) -> None:
    """The figures as a table artifact and a markdown summary with the reliability plot."""
    publish_tables("judge-eval", result["run_id"], {"metrics": result["metrics"], "reliability": result["reliability"]})
    lines = [f"# Judge probe `{result['run_id']}`", "", result["headline"], "",
             "| group | metric | n | value | 95% CI |", "|---|---|---|---|---|",
             *[f"| {m['grp']} | {m['metric']} | {m['n']} | {_fmt(m['value'])} | {_ci(m)} |" for m in result["metrics"]]]
    if result["reliability"]:
        bins = result["reliability"]
        png = bar_chart_png([b["bin"] for b in bins], [b["good_share"] for b in bins],
                            title="Reliability: share GOOD per P(GOOD) bin", ylabel="labelled GOOD")
        path = work_dir / f"judge_reliability-{result['run_id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        lines += ["", png_markdown(png, "reliability")]
    publish_markdown("judge-eval", "\n".join(lines), f"judge probe {result['run_id']}")


def _fmt(value: float | None) -> str:
    return "NULL" if value is None else f"{value:.4g}"


def _ci(metric: dict[str, Any]) -> str:
    return "" if metric["ci_low"] is None else f"[{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


@flow(name="judge-eval", log_prints=True)
def judge_eval(config: JudgeEvalConfig = JudgeEvalConfig()) -> dict[str, Any]:
    with database_slot(config.db), Store(config.db) as store:
        result = run_probe(store, config, get_run_logger())
    publish_probe(result, config.resolved_work_dir)
    return result
