"""The `generate` flow: seeds → multi-step tool-use trajectories → DuckDB.

Shards run on Dask workers; this flow process is the single DuckDB writer and ingests each
shard's trajectories as soon as it finishes. A rerun of the same config resumes the same run:
finished trajectories are skipped, and unfinished ones replay their journaled calls for free.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from flows.runtime import database_slot, task_runner
from swirl_core.config import GenerateConfig
from swirl_core.generation import make_generate_shards, plan_generation, run_summary, verify_constraint
from swirl_core.llm.chat_templates import ToolTemplate
from swirl_core.progress import CallTally
from swirl_core.records import Trajectory
from swirl_core.stage import Shard, ShardFailure, run_stage
from swirl_core.store import Store
from tasks.artifacts import publish_markdown, publish_tables
from tasks.stage import on_task_runner, worker_processes


def run_generate(config: GenerateConfig) -> dict[str, Any]:
    """Run the flow on the cluster its config names (the task runner is chosen per run)."""
    runner = task_runner(config.cluster, config.policy, config.resolved_work_dir / "dask")
    return generate.with_options(task_runner=runner)(config)


@flow(name="generate-on-cluster", log_prints=True)
def generate_on_cluster(config: GenerateConfig = GenerateConfig()) -> dict[str, Any]:
    """Deployment entrypoint: starts the Dask cluster the config names, then runs `generate` on it."""
    return run_generate(config)


@flow(name="generate", log_prints=True)
def generate(config: GenerateConfig = GenerateConfig()) -> dict[str, Any]:
    logger = get_run_logger()
    plan = plan_generation(config)  # validates every seed before anything is paid for
    policy, probe = verify_constraint(config.policy)  # one request: does the server enforce the constraint?
    if probe is not None:
        logger.info("constraint probe of %s (%s): %s in %.2fs", probe.endpoint, probe.kind,
                    "enforced" if probe.enforced else "NOT enforced, continuing unconstrained", probe.latency_s)
        config = config.model_copy(update={"policy": policy})
        plan = plan_generation(config)
    journal_dir = config.journal_dir
    with database_slot(config.db), Store(config.db) as store:
        if journal_dir.exists():  # calls paid by an interrupted earlier attempt join the ledger first
            store.ingest_journals(journal_dir)
        stored_config = config.model_dump(mode="json") | {"resolved_policy": {
            "max_steps": plan.policy.max_steps, "few_shot": plan.policy.few_shot, "constraint": plan.policy.constraint,
            "max_tokens": plan.policy.max_tokens, "corpus": plan.corpus_path, "fingerprint": plan.policy.fingerprint,
            "constraint_probe": asdict(probe) if probe else None, "tool_template": plan.policy.tool_template}}
        if plan.policy.tool_template == ToolTemplate.SWIRL:
            logger.info("%s's chat template ignores `tools`: the tools are rendered with swirl's %s template",
                        config.policy.model, ToolTemplate.SWIRL.value)
        attempt = store.start_run(
            plan.run_id, "generate" if config.purpose == "train" else "eval-generate", stored_config, dataset=config.dataset,
            model=config.policy.model, prompt_version=plan.policy.prompt_version,
        )
        store.upsert_questions(plan.questions, plan.run_id)
        store.record_seed_errors(plan.invalid, plan.run_id)
        done = store.completed_trajectory_ids(tid for _, _, tid in plan.work)
        todo = [w for w in plan.work if w[2] not in done]
        shards = make_generate_shards(plan, config, todo, processes=worker_processes())
        logger.info(
            "run %s (attempt %d): %d questions × %d samples; %d trajectories already done, %d to generate in %d shards",
            plan.run_id, attempt, len(plan.questions), config.samples, len(done), len(todo), len(shards),
        )

        def write(shard: Shard, trajectories: list[Trajectory]) -> int:
            store.write_trajectories(trajectories, shard.run_id, shard.fingerprint)
            return len(trajectories)

        calls = CallTally()
        failures = run_stage(shards, on_task_runner, write, progress=config.progress, logger=logger, calls=calls)
        if shards:
            store.compact_journals(journal_dir)
        summary = run_summary(store.con, plan.run_id, [tid for _, _, tid in plan.work])
        n_traj = sum(r["trajectories"] for r in summary["status"])
        n_err = sum(r["trajectories"] for r in summary["status"] if r["status"] == "error")
        status = "failed" if failures else "completed"
        store.finish_run(plan.run_id, status, n_questions=len(plan.questions), n_trajectories=n_traj, n_errors=n_err)
    publish_tables("generate", plan.run_id, summary)
    publish_markdown("generate", _markdown(plan.run_id, config, summary, calls, failures), f"generate run {plan.run_id}")
    return {"run_id": plan.run_id, "status": status, "db": str(config.db), "trajectories": n_traj,
            "errors": n_err, "shard_failures": failures, "summary": summary, "calls": calls}


def _markdown(run_id: str, config: GenerateConfig, summary: dict, calls: CallTally, failures: list[ShardFailure]) -> str:
    lines = [
        f"# Generation run `{run_id}`",
        f"- dataset: **{config.dataset}** ({config.split}), samples per question: {config.samples}",
        f"- policy: `{config.policy.model}`, database: `{config.db}`",
        f"- this run: {calls.describe()}",
        "",
        "| status | trajectories | mean steps |",
        "|---|---|---|",
        *[f"| {r['status']} | {r['trajectories']} | {r['mean_steps']} |" for r in summary["status"]],
        "",
        "| action | steps | tool errors |",
        "|---|---|---|",
        *[f"| {r['action']} | {r['steps']} | {r['tool_errors']} |" for r in summary["actions"]],
    ]
    if failures:
        lines += ["", f"**{len(failures)} shard(s) failed**: rerun the same command to resume."]
    return "\n".join(lines)
