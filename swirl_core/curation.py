"""Curation as plain functions: what is left to judge or grade, judge/grade shards, rule grading.

Decomposition itself is the SQL view `sub_trajectories` (sql/views.sql); this module feeds its
rows to the process judge on Dask workers and writes verdicts and grades back (single writer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import pyarrow as pa

from swirl_core.config import CurateConfig, JudgeEvalConfig
from swirl_core.grading import rule_grade
from swirl_core.hashing import content_hash
from swirl_core.judging import (
    CALIBRATION_SAMPLE,
    GRADE_CONSTRAINT,
    GRADER_PROMPT_VERSION,
    JUDGE_PROMPT_VERSION,
    JudgeSpec,
    Judgment,
    LLMGrade,
    OutcomeGrader,
    StepJudge,
    StepToJudge,
    TrajectoryToGrade,
    calibrate_thresholds,
)
from swirl_core.llm.base import Choice
from swirl_core.llm.client import LLMClient
from swirl_core.records import GradeRow, JudgmentRow
from swirl_core.seeds import DATASETS
from swirl_core.stage import Job, Shard, make_shards
from swirl_core.store import query_dicts


def judge_spec(config: CurateConfig) -> JudgeSpec:
    return JudgeSpec.for_model(config.judge, config.judge_samples, config.max_reasks)


def judge_fingerprint(spec: JudgeSpec) -> str:
    """Records how the judge is asked, P(GOOD) from served logprobs included; a judge that does not read
    them keeps the fingerprint it had before they were recorded (its judgments stay its own)."""
    unset = {"served_probabilities"} if not spec.served_probabilities else set()
    asked = spec.model_dump(exclude=unset | ({"server_kind"} if spec.server_kind is None else set()))
    asked["constraint"] = spec.constraint.label if spec.constraint else None  # as when constraints were strings
    return content_hash("judge", asked, JUDGE_PROMPT_VERSION)[:16]


class JudgeJob(Job):
    """Sub-trajectories for the process judge, and how it is asked."""

    stage = "judge"
    run_prefix = "judge"
    purpose = "judge"
    unit = "step"

    spec: JudgeSpec
    items: list[StepToJudge]

    @property
    def size(self) -> int:
        return len(self.items)

    async def run(self, client: LLMClient) -> list[Judgment]:
        return await StepJudge(client, self.spec).judge_many(self.items, on_done=client.meter.unit_done)


class CalibrationJob(JudgeJob):
    """The sampled steps whose median P(GOOD) sets a calibrated judge's thresholds."""

    stage = "calibrate"
    run_prefix = "calibrate"

    async def run(self, client: LLMClient) -> dict[str, float]:
        return await calibrate_thresholds(client, self.spec, self.items, on_done=client.meter.unit_done)


class GradeJob(Job):
    """Final answers for the LLM outcome grader, and how it is asked."""

    stage = "grade"
    run_prefix = "grade"
    purpose = "grader"
    unit = "traj"

    grader_model: str
    max_reasks: int
    max_tokens: int
    constraint: Choice | None
    items: list[TrajectoryToGrade]

    @property
    def size(self) -> int:
        return len(self.items)

    async def run(self, client: LLMClient) -> list[LLMGrade]:
        grader = OutcomeGrader(client, self.grader_model, self.max_reasks, max_tokens=self.max_tokens,
                               constraint=self.constraint)
        return await grader.grade_many(self.items, on_done=client.meter.unit_done)


def _scope(config: CurateConfig, alias: str = "t") -> tuple[str, list]:
    """SQL conditions restricting curation to some generation runs and/or one dataset."""
    clauses, params = [], []
    if config.run_ids:
        clauses.append(f"{alias}.run_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(config.run_ids)
    else:  # evaluation runs are curated only when named (the evaluate flow does): they are no training data
        clauses.append(f"{alias}.run_id NOT IN (SELECT run_id FROM runs WHERE kind = 'eval-generate')")
    if config.dataset:
        clauses.append("q.dataset = ?")
        params.append(config.dataset)
    return (" AND " + " AND ".join(clauses)) if clauses else "", params


def _steps(con, config: CurateConfig, condition: str, params: list, tail: str) -> pa.Table:
    where, scope_params = _scope(config)
    return con.sql(
        f"""
        SELECT s.trajectory_id, s.step_index, s.question_id, q.task, q.question,
               to_json(s.history)::VARCHAR AS history, s.action
        FROM sub_trajectories s
        JOIN trajectories t USING (trajectory_id)
        JOIN questions q ON q.question_id = s.question_id
        WHERE {condition}{where}
        {tail}
        """,
        params=[*params, *scope_params],
    ).to_arrow_table()


def pending_steps(con, config: CurateConfig, fingerprint: str) -> pa.Table:
    """Sub-trajectories this judge has not judged yet, or whose judging failed (one Arrow table, one query)."""
    return _steps(con, config, """NOT EXISTS (SELECT 1 FROM judgments j WHERE j.trajectory_id = s.trajectory_id
                  AND j.step_index = s.step_index AND j.judge_fingerprint = ? AND j.error IS NULL)""", [fingerprint],
                  "ORDER BY s.question_id, s.trajectory_id, s.step_index")


def calibration_steps(con, config: CurateConfig) -> list[StepToJudge]:
    """Up to CALIBRATION_SAMPLE sub-trajectories per task of everything in scope, chosen by content hash."""
    pick = "md5(s.trajectory_id || ':' || s.step_index)"
    table = _steps(con, config, "true", [], f"QUALIFY row_number() OVER (PARTITION BY q.task ORDER BY {pick}) <= "
                                            f"{CALIBRATION_SAMPLE} ORDER BY q.task, {pick}")
    return _items(table.to_pylist())


def by_question(rows: list[dict], size: int) -> Iterator[list[dict]]:
    """Chunks of about `size` rows that never split a question: samples of one question often share
    identical sub-trajectories, and identical requests are paid once only within one process."""
    chunk: list[dict] = []
    for row in rows:
        if len(chunk) >= size and row["question_id"] != chunk[-1]["question_id"]:
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


def _items(rows: list[dict]) -> list[StepToJudge]:
    return [StepToJudge(trajectory_id=r["trajectory_id"], step_index=r["step_index"], task=r["task"],
                        question=r["question"], turns=json.loads(r["history"]), action_message=r["action"])
            for r in rows]


def judge_shards(chunks: Iterable[list[StepToJudge]], config: CurateConfig | JudgeEvalConfig, spec: JudgeSpec, run_id: str,
                 fingerprint: str | None, *, fsync: bool = False, job: type[JudgeJob] = JudgeJob) -> list[Shard]:
    """A shard per chunk of steps; `fingerprint` (the judge's) is what their verdicts are stored under."""
    return make_shards((job(spec=spec, items=chunk) for chunk in chunks), run_id=run_id, model=config.judge,
                       fingerprint=fingerprint, journal_dir=str(config.journal_dir), fsync=fsync)


def pending_shards(table: pa.Table, config: CurateConfig, spec: JudgeSpec, run_id: str, fingerprint: str) -> list[Shard]:
    """The pending steps (`pending_steps`) in shards of about `shard_size` that never split a question."""
    chunks = (_items(chunk) for chunk in by_question(table.to_pylist(), config.shard_size))
    return judge_shards(chunks, config, spec, run_id, fingerprint, fsync=config.fsync)


def calibration_shard(con, config: CurateConfig, spec: JudgeSpec) -> Shard | None:
    """The steps that set a calibrated judge's thresholds, or None when the judge needs none."""
    if spec.calibration == "none":
        return None
    return judge_shards([calibration_steps(con, config)], config, spec, "calibration", None, fsync=config.fsync,
                        job=CalibrationJob)[0]


def judgment_rows(judgments: list[Judgment], run_id: str, fingerprint: str) -> pa.Table:
    """Rows for `judgments`. A failed call (not an unparseable verdict) is stored too, as UNKNOWN with its
    `error`, so the failure and its reason are on record; `pending_steps` hands its step to the next run,
    whose judgment replaces the row (same `judgment_id`)."""
    return JudgmentRow.arrow_table([
        {"judgment_id": content_hash(j.trajectory_id, j.step_index, fingerprint, j.sample_index),
         "run_id": run_id, "trajectory_id": j.trajectory_id, "step_index": j.step_index,
         "sample_index": j.sample_index, "judge_model": j.judge_model, "judge_fingerprint": fingerprint,
         "prompt_version": j.prompt_version, "verdict": j.verdict, "reasoning": j.reasoning,
         "attempts": j.attempts, "call_keys": j.call_keys, "p_good": j.p_good, "error": j.error}
        for j in judgments
    ])


def select_judge(con, config: CurateConfig, fingerprint: str, run_id: str) -> list[str]:
    """Make `fingerprint` the judge whose verdicts the curated sets of every generation run in scope read
    (the runs it judged a step of); returns those runs."""
    where, params = _scope(config)
    runs = [r[0] for r in con.execute(
        f"""SELECT DISTINCT t.run_id FROM judgments j JOIN trajectories t USING (trajectory_id)
            JOIN questions q ON q.question_id = t.question_id
            WHERE j.judge_fingerprint = ?{where} ORDER BY 1""", [fingerprint, *params]).fetchall()]
    if runs:
        con.execute("""INSERT OR REPLACE INTO judge_selection
                       SELECT unnest(?::VARCHAR[]), ?, ?, current_timestamp""", [runs, fingerprint, run_id])
    return runs


def probe_configs(con, config: CurateConfig) -> dict[str, JudgeEvalConfig]:
    """Per task, the judge probe of the curated data's own seeds: those of the first generation run in scope
    (its stored config names the dataset and files). Judging settings are curation's."""
    where, params = _scope(config)
    rows = con.execute(f"""SELECT r.config FROM runs r WHERE r.kind IN ('generate', 'eval-generate') AND r.run_id IN (
                               SELECT t.run_id FROM trajectories t JOIN questions q USING (question_id) WHERE true{where})
                           ORDER BY r.run_id""", params).fetchall()
    out: dict[str, JudgeEvalConfig] = {}
    for (raw,) in rows:
        gen = json.loads(raw)
        spec = DATASETS.get(gen.get("dataset"))
        if spec is None or spec.task in out:
            continue
        out[spec.task] = JudgeEvalConfig(
            db=config.db, work_dir=config.work_dir, dataset=gen["dataset"], data_files=gen.get("data_files"),
            split=gen.get("split", "train"), hub_name=gen.get("hub_name"), hub_config=gen.get("hub_config"),
            limit=config.probe_limit, judge=config.judge, judge_samples=config.judge_samples,
            max_reasks=config.max_reasks, shard_size=config.shard_size)
    return out


def scope_tasks(con, config: CurateConfig) -> set[str]:
    where, params = _scope(config)
    return {r[0] for r in con.execute(f"SELECT DISTINCT q.task FROM trajectories t JOIN questions q USING (question_id) "
                                      f"WHERE true{where}", params).fetchall()}


def register_judge(con, fingerprint: str, spec: JudgeSpec, probe_fingerprint: str | None) -> None:
    con.execute("""INSERT INTO judges VALUES (?, ?, ?, ?, current_timestamp)
                   ON CONFLICT DO UPDATE SET probe_fingerprint = coalesce(EXCLUDED.probe_fingerprint, judges.probe_fingerprint)""",
                [fingerprint, spec.model, spec.model_dump_json(), probe_fingerprint])


def _ungraded(con, config: CurateConfig, methods: tuple[str, ...]) -> list[dict]:
    where, params = _scope(config)
    return query_dicts(
        con,
        f"""
        SELECT t.trajectory_id, t.question_id, q.task, q.question, q.answer, q.answer_aliases AS aliases, t.final_answer
        FROM trajectories t JOIN questions q USING (question_id)
        WHERE t.status <> 'error' AND NOT EXISTS (
            SELECT 1 FROM grades g WHERE g.trajectory_id = t.trajectory_id
            AND g.method IN (SELECT unnest(?::VARCHAR[]))){where}
        ORDER BY t.question_id, t.trajectory_id
        """,
        [list(methods), *params],
    )


def rule_grade_rows(con, config: CurateConfig, run_id: str) -> pa.Table:
    """Exact match / F1 for QA, numeric equivalence for math: cheap, so done in the flow process."""
    rows = []
    for r in _ungraded(con, config, ("numeric", "exact_match")):
        g = rule_grade(r["task"], r["final_answer"], r["answer"], r["aliases"] or ())
        rows.append({"trajectory_id": r["trajectory_id"], "method": g.method, "correct": g.correct,
                     "score": g.score, "detail": g.detail, "grader_model": None, "prompt_version": None,
                     "call_key": None, "run_id": run_id})
    return GradeRow.arrow_table(rows)


def grade_shards(con, config: CurateConfig, run_id: str) -> list[Shard]:
    cfg = config.judge
    jobs = (GradeJob(grader_model=cfg.resolved_identity, max_reasks=config.max_reasks, max_tokens=cfg.resolved_max_tokens,
                     constraint=GRADE_CONSTRAINT if cfg.is_local else None, items=[
                         TrajectoryToGrade(trajectory_id=r["trajectory_id"], task=r["task"], question=r["question"],
                                           answer=r["answer"], aliases=list(r["aliases"] or []),
                                           prediction=r["final_answer"])
                         for r in chunk])
            for chunk in by_question(_ungraded(con, config, ("llm",)), config.shard_size))
    return make_shards(jobs, run_id=run_id, model=cfg, fingerprint=None,
                       journal_dir=str(config.journal_dir), fsync=config.fsync)


def llm_grade_rows(grades: list[LLMGrade], run_id: str) -> pa.Table:
    """Rows for `grades`; failed calls are left out so a rerun retries them."""
    return GradeRow.arrow_table([
        {"trajectory_id": g.trajectory_id, "method": "llm", "correct": g.correct,
         "score": None if g.correct is None else float(g.correct), "detail": g.reasoning[:2000],
         "grader_model": g.grader_model, "prompt_version": g.prompt_version or GRADER_PROMPT_VERSION,
         "call_key": g.call_key, "run_id": run_id}
        for g in grades if g.error is None
    ])


def curation_report(con) -> dict[str, list[dict]]:
    """The tables a curation run publishes: retention, agreement, GOOD rates, self-consistency."""

    def rows(sql: str) -> list[dict]:
        return query_dicts(con, sql)

    return {
        "retention": rows("SELECT * FROM curation_retention"),
        "agreement": rows("SELECT * FROM judge_agreement"),
        "good_rate_by_step": rows("SELECT * FROM good_rate_by_step"),
        "good_rate_by_action": rows("SELECT * FROM good_rate_by_action"),
        "self_consistency": [r for r in rows("SELECT * FROM judge_self_consistency") if r["steps"]],
    }
