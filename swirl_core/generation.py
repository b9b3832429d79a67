"""Generation as plain functions: plan the work, the shards' job, summarise a run.

The flow (`flows/generate.py`) runs the shards as one stage (`swirl_core/stage.py`) on Dask workers and is
the only DuckDB writer; shards only read seeds they are handed, call models and tools, and journal every
paid response.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import InstanceOf

from swirl_core.agent import Agent, PolicySpec
from swirl_core.config import GenerateConfig, ModelConfig
from swirl_core.constraints import ProbeResult, probe_constraint
from swirl_core.hashing import content_hash
from swirl_core.llm.chat_templates import checkpoint_tool_template
from swirl_core.llm.client import LLMClient
from swirl_core.llm.factory import served_key
from swirl_core.llm.local_models import resolve_local_model
from swirl_core.records import InvalidRow, Question, StepProtocol, TaskKind, Trajectory
from swirl_core.seeds import DATASETS, corpus_from_questions, load_seeds
from swirl_core.stage import Job, Shard, make_shards, shard_sizes, shards_per_worker
from swirl_core.store import query_dicts
from swirl_core.tools import Tool
from swirl_core.tools.calculator import Calculator
from swirl_core.tools.search import SearchTool, corpus_hash, load_corpus


class GenerateJob(Job):
    """Some (question, sample) pairs of one run and the policy that answers them."""

    stage = "generate"
    run_prefix = "shard"
    purpose = "policy"
    unit = "traj"

    policy: InstanceOf[PolicySpec]  # resolved by the plan, its fingerprint computed there and shipped with it
    questions: list[Question]
    work: list[tuple[int, int]]  # (index into questions, sample index)
    corpus_path: str | None
    search_k: int

    @property
    def size(self) -> int:
        return len(self.work)

    def tools(self) -> dict[str, Tool]:
        if not self.policy.tools:
            return {}
        if self.policy.task == "math":
            return {"math": Calculator()}
        return {"search": _search_tool(self.corpus_path, self.search_k)} if self.corpus_path else {}

    async def run(self, client: LLMClient) -> list[Trajectory]:
        work = [(self.questions[j], s) for j, s in self.work]
        return await Agent(client, self.policy, self.tools()).run_many(work, on_done=client.meter.unit_done)


@dataclass
class GenerationPlan:
    run_id: str
    task: TaskKind
    questions: list[Question]
    invalid: list[InvalidRow]
    policy: PolicySpec
    corpus_path: str | None
    work: list[tuple[Question, int, str]]  # (question, sample index, trajectory id)


def policy_spec(cfg: ModelConfig, task: TaskKind, max_steps: int, tools_fingerprint: str, tools: bool = True,
                protocol: StepProtocol = StepProtocol.TAGS) -> PolicySpec:
    served = cfg.resolved_constraint == "regex" and cfg.server_kind != "auto"
    native = protocol == StepProtocol.TOOLS
    # The tag grammar and the tag demonstrations are the in-process defaults of the tag protocol only.
    constraint = None if native and cfg.constraint == "auto" else cfg.resolved_constraint
    few_shot = False if native and cfg.few_shot is None else cfg.resolved_few_shot
    return PolicySpec(
        model=cfg.resolved_identity, task=task, max_steps=max_steps, few_shot=few_shot,
        constraint=constraint, temperature=cfg.temperature, top_p=cfg.top_p,
        max_tokens=cfg.resolved_max_tokens, tools_fingerprint=tools_fingerprint, tools=tools,
        server_kind=cfg.server_kind if served else None, protocol=protocol,
        tool_template=checkpoint_tool_template(resolve_local_model(cfg.model)) if native and cfg.is_local else None,
    )


def verify_constraint(cfg: ModelConfig) -> tuple[ModelConfig, ProbeResult | None]:
    """Probe a served model's constraint before anything is paid for: the policy with its server kind
    resolved, or (with `allow_unconstrained`) without the constraint it would not enforce; the probe's
    result, None when there was nothing to probe. Raises ValueError naming the server when it refuses."""
    if cfg.resolved_constraint != "regex":
        return cfg, None
    endpoint = cfg.served_endpoint
    if endpoint is None or cfg.resolved_backend != "openai_compat":
        raise ValueError(f"--constraint regex needs a model on an OpenAI-compatible endpoint, not {cfg.model}")
    result = asyncio.run(probe_constraint(endpoint, cfg.model.partition("/")[2], cfg.server_kind,
                                          api_key=served_key(cfg), timeout_s=cfg.timeout_s))
    if result.enforced:
        return cfg.model_copy(update={"server_kind": result.kind}), result
    if not cfg.allow_unconstrained:
        raise ValueError(result.refusal("--constraint regex"))
    return cfg.model_copy(update={"constraint": "none"}), result


def resolve_corpus(config: GenerateConfig, task: TaskKind, questions: list[Question]) -> str | None:
    """The corpus file for the search tool, writing one from the seeds' own paragraphs if asked."""
    corpus = config.corpus or DATASETS[config.dataset].default_corpus
    if corpus is None and task == "qa" and any(q.context for q in questions):
        corpus = "seeds"
    if corpus != "seeds":
        if corpus is None and task == "qa":
            raise ValueError(
                f"dataset {config.dataset!r} needs a search corpus: pass --corpus PATH "
                "(JSONL/Parquet with title,text) or --corpus seeds"
            )
        return corpus
    paragraphs = corpus_from_questions(questions)
    if not paragraphs:
        raise ValueError("--corpus seeds: the seed questions carry no context paragraphs")
    path = config.resolved_work_dir / f"corpus-{corpus_hash(paragraphs)[:16]}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist([p.model_dump() for p in paragraphs]), tmp)
        tmp.replace(path)
    return str(path)


def plan_generation(config: GenerateConfig) -> GenerationPlan:
    """Load and validate seeds (before any call is paid for) and list every trajectory to make."""
    spec = DATASETS.get(config.dataset)
    if spec is None:
        raise ValueError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    seeds = load_seeds(
        config.dataset, data_files=config.data_files, split=config.split, hub_name=config.hub_name,
        hub_config=config.hub_config, limit=config.limit, skip_invalid=config.skip_invalid,
    )
    if not seeds.questions:
        raise ValueError(f"no valid questions in {config.dataset!r} ({len(seeds.invalid)} invalid rows)")
    corpus_path = resolve_corpus(config, spec.task, seeds.questions) if config.tools else None
    tools_fp = content_hash("tools", corpus_hash(load_corpus(corpus_path)) if corpus_path else None, config.search_k)
    max_steps = config.max_steps or (spec.max_steps if config.tools else 1)
    policy = policy_spec(config.policy, spec.task, max_steps, tools_fp, config.tools, config.protocol)
    # Evaluation runs are kept apart from training data (the curated views read `generate` runs only).
    run_id = content_hash(
        "generate-run", config.dataset, config.split, sorted(q.question_id for q in seeds.questions),
        config.samples, policy.fingerprint, *(["eval"] if config.purpose == "eval" else []),
    )[:16]
    work = [
        (q, i, Trajectory.make_id(q.question_id, i, policy.fingerprint))
        for q in seeds.questions for i in range(config.samples)
    ]
    return GenerationPlan(run_id, spec.task, seeds.questions, seeds.invalid, policy, corpus_path, work)


def make_generate_shards(plan: GenerationPlan, config: GenerateConfig, todo: list[tuple[Question, int, str]],
                         processes: int = 1) -> list[Shard]:
    """Group pending pairs by question into shards of `shard_size` questions (contexts stripped); without one,
    sized by the work: `shard_sizes` trajectories over the `processes` that run them, largest first."""
    by_question: dict[str, list[int]] = {}
    questions: dict[str, Question] = {}
    for q, sample, _ in todo:
        by_question.setdefault(q.question_id, []).append(sample)
        questions[q.question_id] = q
    ids = list(by_question)
    if config.shard_size:
        chunks = [ids[start : start + config.shard_size] for start in range(0, len(ids), config.shard_size)]
    else:
        chunks, units = [[]], 0
        sizes = iter(shard_sizes(len(todo), processes, shards_per_worker(config.cluster, config.policy),
                                 config.policy.concurrency))
        target = next(sizes, 0)
        for qid in ids:  # whole questions, until each shard holds its size
            if units >= target:
                chunks.append([])
                units, target = 0, next(sizes, target)
            chunks[-1].append(qid)
            units += len(by_question[qid])
        chunks = [c for c in chunks if c]
    jobs = (GenerateJob(policy=plan.policy, questions=[questions[i].model_copy(update={"context": ()}) for i in chunk],
                        work=[(j, s) for j, qid in enumerate(chunk) for s in by_question[qid]],
                        corpus_path=plan.corpus_path, search_k=config.search_k) for chunk in chunks)
    return make_shards(jobs, run_id=plan.run_id, model=config.policy, fingerprint=plan.policy.fingerprint,
                       journal_dir=str(config.journal_dir), fsync=config.fsync)


@functools.lru_cache(maxsize=8)
def _search_tool(path: str, k: int) -> SearchTool:
    return SearchTool.from_file(path, k=k)


def run_summary(con, run_id: str, trajectory_ids: list[str]) -> dict[str, list[dict]]:
    """Tables for the run's artifacts over all its trajectories (including ones an earlier run made):
    status counts, steps per trajectory, actions, tokens and cost."""
    con.register("_plan", pa.table({"trajectory_id": pa.array(trajectory_ids, pa.string())}))

    def rows(sql: str) -> list[dict]:
        return query_dicts(con, sql)

    try:
        return {
            "status": rows("SELECT status, count(*) AS trajectories, round(avg(num_steps), 2) AS mean_steps "
                           "FROM trajectories JOIN _plan USING (trajectory_id) GROUP BY status ORDER BY status"),
            "steps_per_trajectory": rows("SELECT num_steps AS steps, count(*) AS trajectories FROM trajectories "
                                         "JOIN _plan USING (trajectory_id) GROUP BY num_steps ORDER BY num_steps"),
            "actions": rows("SELECT action_kind AS action, count(*) AS steps, count(*) FILTER (WHERE tool_error) AS tool_errors "
                            "FROM steps JOIN _plan USING (trajectory_id) GROUP BY 1 ORDER BY 1"),
            "cost": rows("SELECT c.model, count(*) AS calls, sum(c.prompt_tokens) AS prompt_tokens, "
                         "sum(c.completion_tokens) AS completion_tokens, sum(c.cost_usd) AS cost_usd, "
                         "count(*) FILTER (WHERE c.cost_usd IS NULL) AS unpriced_calls, round(avg(c.latency_s), 3) AS mean_latency_s "
                         "FROM llm_calls c WHERE c.call_key IN (SELECT call_key FROM steps JOIN _plan USING (trajectory_id)) "
                         "GROUP BY c.model"),
        }
    finally:
        con.unregister("_plan")
