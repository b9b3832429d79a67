"""Throughput of curation: SQL decomposition into sub-trajectories, and process-judge calls.

What it measures
----------------
1. Decomposition (the ``sub_trajectories`` view of ``sql/views.sql``). A fresh DuckDB file gets the
   project's schema and views (``Store(path)``) and T synthetic trajectories (default 100,000), inserted
   in bulk by SQL alone (``INSERT ... SELECT ... FROM range(T)``; no Python objects): 1-6 steps each
   (uniform), one ~600-char user message in ``prompt_messages`` (the size of the real policy prompt),
   ~80-char assistant messages, ~300-char observations; 1 % of the trajectories have status 'error'
   (the view leaves them out) and one ``questions`` row per 5 samples. Each trajectory's stored conversation
   (``trajectories.conversation``) is filled by migration 0004's statement, as an older database gets it (part
   of the set-up, not timed). Then, per variant and repeat:

   * decompose -- ``SELECT count(*), sum(state_turns) FROM (<variant>)``: every sub-trajectory and where its state
                  ends; no state list is built (the goal's query: the view slices a state only when it is read).
   * states    -- ``SELECT count(*), sum(len(state)) FROM (<variant>)``: every state list is built, nothing
                  is stored (what a reader of every state pays on top).
   * CTAS      -- ``CREATE TEMP TABLE ... AS <variant>``: the view materialised (state and history lists
                  written to a temporary table).

   rows/s = sub-trajectories produced / wall. DuckDB runs with its default threads (one per core).
   Every variant's materialised output is checked against the view's (row count and a hash over all
   columns). ``output-copy floor`` is ``CREATE TEMP TABLE AS SELECT * FROM <the view's materialised
   output>``: what writing the output alone costs, whatever computes it.

   The plain Python loop does the same decomposition from the same data fetched as Python rows
   (trajectories, then steps ordered by trajectory and step): per trajectory ``json.loads`` of the
   prompt once, then per step ``state = prompt + history`` (a new list) and ``history`` grown by the
   step's (assistant, user) pair, exactly the view's rows. Fetch and loop are timed separately; the
   loop's output is checked against DuckDB's (count, total state length, and the full rows of a sample
   of trajectories). factor = SQL rows/s / loop rows/s.

   ``--variant`` adds alternative formulations (their SQL is below, in ``VARIANTS``) to compare with
   the shipped view, which is always measured. They build every state from ``steps`` and ``prompt_messages`` on
   each query, as the view did before the conversation was stored:

   * parse_once -- parse ``prompt_messages`` once per trajectory (a CTE) instead of once per step row,
                   run the window over ``steps`` alone (no 600-char prompt carried through its sort) and
                   join the parsed prompt afterwards.
   * slice      -- no window: a per-trajectory ordered list of all turns (GROUP BY), then per step
                   ``list_slice(turns, 1, 2 * step_index)``.
   * unnest     -- no window, no ordered aggregate: per trajectory, unordered ``list()`` aggregates put in
                   step order with ``list_select(pairs, list_grade_up(step_indexes))``, one list prompt + all
                   turns built once, rows re-created with ``unnest(range(K))`` and cut with ``list_slice``:
                   the view shipped before migration 0004 (tests/test_store.py checks the view against it).

2. Judge calls/s. The scripted server (``tests/scripted_server.py``) runs in its own process with a
   fixed latency L and the reply "Reasonable step. GOOD"; the client is the real curation path:
   ``build_client(ModelConfig(model="openai/judge", api_base=..., concurrency=C), journal_dir=<fresh>)``
   and ``StepJudge(client, JudgeSpec(model="openai/judge")).judge_many(items)`` over N distinct
   ``StepToJudge`` items (after a warm-up on other items). calls/s = N / wall; with latency L the bound
   is C / L (64 / 0.2 s = 320/s). At latency 0 (C=32) throughput is CPU-bound: the table gives the
   client's and the server's CPU per call. Each run checks: N judgments, all GOOD in one attempt, N
   calls sent and no cache hit, and the server saw each request body exactly once (all 200s).

Progress goes to stderr, the tables to stdout. Figures are best | median of the repeats; "other
processes' load" is the CPU used meanwhile by everything else on the machine (above ~0.25 cores the
figures are low and noisy). The exit status is 1 when the shipped view misses the goal (>= 2M
sub-trajectories/s) on the decompose query.

    cd /work/main && .venv/bin/python benchmarks/curation_throughput.py          # all variants, ~2 min
    .venv/bin/python benchmarks/curation_throughput.py --quick                     # small sizes, ~30 s
    .venv/bin/python benchmarks/curation_throughput.py --variant parse_once --repeats 5 --skip-judge
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch anything

import duckdb  # noqa: E402
from scripted_server import fetch_stats, start_subprocess  # noqa: E402

from swirl_core.config import ModelConfig  # noqa: E402
from swirl_core.judging import JudgeSpec, StepJudge, StepToJudge  # noqa: E402
from swirl_core.llm import cache as llm_cache  # noqa: E402
from swirl_core.llm.factory import build_client, tune_gc  # noqa: E402
from swirl_core.store import Store, migrations  # noqa: E402

GOAL_ROWS_PER_S = 2_000_000
GOAL_QUERY = "decompose"  # the sub-trajectories with their states' bounds; a state is sliced when it is read
JUDGE_MODEL = "openai/judge"
JUDGE_REPLY = "Reasonable step. GOOD"
MESSAGES_TYPE = """'[{"role":"VARCHAR","content":"VARCHAR"}]'"""

# -- synthetic data, in SQL only ------------------------------------------------------------------------
BUILD_SQL = [
    # one question per 5 samples
    """
    INSERT INTO questions
    SELECT md5('question' || q), 'bench', 'train', q::VARCHAR, 'math',
           'A crate holds ' || q || ' apples and ' || (q % 7 + 2) || ' pears. How many pieces of fruit are in '
               || (q % 5 + 2) || ' crates?',
           ((q + q % 7 + 2) * (q % 5 + 2))::VARCHAR, [], '{{}}', 'bench:' || q, 'bench'
    FROM range(({n} + 4) // 5) r(q)
    """,
    # 1-6 steps each; 6 = the step cap; 1 % errors
    """
    INSERT INTO trajectories (trajectory_id, run_id, question_id, sample_index, model, prompt_version,
                              policy_fingerprint, status, final_answer, num_steps, num_invalid_steps,
                              prompt_tokens, completion_tokens, error, prompt_messages)
    SELECT md5('trajectory' || i), 'bench', md5('question' || (i // 5)), (i % 5)::INTEGER, 'openai/bench',
           'policy-math-v1', 'bench-fingerprint',
           CASE WHEN i % 100 = 99 THEN 'error' WHEN n = 6 THEN 'step_cap' ELSE 'answered' END,
           CASE WHEN i % 100 <> 99 AND n < 6 THEN ((n - 1) * 37 + n)::VARCHAR END,
           n, 0, 250 * n, 24 * n, CASE WHEN i % 100 = 99 THEN 'LLMError: scripted failure' END,
           json_array(json_object('role', 'user', 'content',
               'Solve the problem by reasoning step by step. In every message write one short reasoning '
               || 'sentence and then exactly one action: <math_exp>EXPRESSION</math_exp> to have the calculator '
               || 'evaluate an arithmetic expression, or <answer>NUMBER</answer> when you know the final answer. '
               || 'Use the calculator for all arithmetic; check intermediate values before answering. '
               || 'Never write more than one action in a message, and never answer before the computation is done. '
               || 'Question: A crate holds ' || i || ' apples and ' || (i % 7 + 2) || ' pears. How many pieces '
               || 'of fruit are in ' || (i % 5 + 2) || ' crates? Give the answer as a single number.'))
    FROM (SELECT i, (1 + hash(i) % 6)::INTEGER AS n FROM range({n}) r(i))
    """,
    # the last step of an answered trajectory answers (no observation); every other step calls the calculator
    """
    INSERT INTO steps (trajectory_id, step_index, message, reasoning, action_kind, action_input, parse_error,
                       truncated, observation, tool_error, call_key, model, prompt_version, "constraint",
                       prompt_tokens, completion_tokens, latency_s)
    SELECT trajectory_id, k,
           CASE WHEN answers THEN 'So the crates hold ' || (k * 37 + num_steps) || ' pieces of fruit in total. <answer>'
                                  || (k * 37 + num_steps) || '</answer>'
                ELSE 'Step ' || (k + 1) || ': multiply the fruit per crate by the crates. <math_exp>' || k
                     || ' * 37 + ' || num_steps || '</math_exp>' END,
           NULL, CASE WHEN answers THEN 'answer' ELSE 'math' END,
           CASE WHEN answers THEN (k * 37 + num_steps)::VARCHAR ELSE k || ' * 37 + ' || num_steps END,
           NULL, false,
           CASE WHEN NOT answers THEN k || ' * 37 + ' || num_steps || ' → ' || (k * 37 + num_steps)
                || '. The calculator evaluated the expression exactly as written, with the usual precedence of '
                || 'operators, and returned an exact result. Intermediate values are kept at full precision; use '
                || 'this value in the next step, or answer if it completes the computation. (step ' || (k + 1)
                || ' of trajectory ' || trajectory_id || ')' END,
           false, md5(trajectory_id || k), 'openai/bench', 'policy-math-v1', NULL, 250 + 40 * k, 24, 0.2
    FROM (SELECT trajectory_id, num_steps, k, status = 'answered' AND k = num_steps - 1 AS answers
          FROM (SELECT trajectory_id, num_steps, status, unnest(range(num_steps)) AS k FROM trajectories))
    """,
]

# -- the formulations of the decomposition ------------------------------------------------------------
PAIR = ("[{'role': 'assistant', 'content': message}, {'role': 'user', 'content': observation}]")
COLUMNS = "trajectory_id, question_id, step_index, state, history, action, action_kind, is_last_step, model, prompt_version"

VARIANTS: dict[str, str] = {
    # the shipped view (sql/views.sql): steps ⋈ trajectories, each state a slice of the stored conversation
    "view": "SELECT * FROM sub_trajectories",
    "parse_once": f"""
WITH t AS (
    SELECT trajectory_id, question_id, num_steps, model, from_json(prompt_messages, {MESSAGES_TYPE}) AS prompt
    FROM trajectories WHERE status <> 'error'
), h AS (
    SELECT trajectory_id, step_index, message, action_kind, prompt_version,
           coalesce(flatten(list({PAIR}) OVER earlier), []) AS history
    FROM steps
    WINDOW earlier AS (PARTITION BY trajectory_id ORDER BY step_index
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
)
SELECT h.trajectory_id, t.question_id, h.step_index, list_concat(t.prompt, h.history) AS state, h.history,
       h.message AS action, h.action_kind, h.step_index = t.num_steps - 1 AS is_last_step, t.model, h.prompt_version,
       len(t.prompt) + 2 * h.step_index AS state_turns
FROM h JOIN t USING (trajectory_id)""",
    "slice": f"""
WITH t AS (
    SELECT trajectory_id, question_id, num_steps, model, from_json(prompt_messages, {MESSAGES_TYPE}) AS prompt
    FROM trajectories WHERE status <> 'error'
), u AS (
    SELECT trajectory_id, flatten(list({PAIR} ORDER BY step_index)) AS turns
    FROM steps GROUP BY trajectory_id
)
SELECT s.trajectory_id, t.question_id, s.step_index,
       list_concat(t.prompt, list_slice(u.turns, 1, 2 * s.step_index)) AS state,
       list_slice(u.turns, 1, 2 * s.step_index) AS history,
       s.message AS action, s.action_kind, s.step_index = t.num_steps - 1 AS is_last_step, t.model, s.prompt_version,
       len(t.prompt) + 2 * s.step_index AS state_turns
FROM steps s JOIN t USING (trajectory_id) JOIN u USING (trajectory_id)""",
    "unnest": f"""
WITH agg AS (
    SELECT trajectory_id, list(step_index) AS idx, list({PAIR}) AS pairs,
           list(message) AS msg, list(action_kind) AS kinds, list(prompt_version) AS pv
    FROM steps GROUP BY trajectory_id
), per_traj AS (
    SELECT a.trajectory_id, t.question_id, t.num_steps, t.model, len(t.prompt) AS np, list_grade_up(a.idx) AS ord,
           list_concat(t.prompt, flatten(list_select(a.pairs, list_grade_up(a.idx)))) AS full_,
           a.msg, a.kinds, a.pv
    FROM agg a
    JOIN (SELECT trajectory_id, question_id, num_steps, model, from_json(prompt_messages, {MESSAGES_TYPE}) AS prompt
          FROM trajectories WHERE status <> 'error') t USING (trajectory_id)
), r AS (
    SELECT *, unnest(range(len(ord))) AS k FROM per_traj
)
SELECT trajectory_id, question_id, k::INTEGER AS step_index,
       list_slice(full_, 1, np + 2 * k) AS state, list_slice(full_, np + 1, np + 2 * k) AS history,
       msg[ord[k + 1]] AS action, kinds[ord[k + 1]] AS action_kind, k = num_steps - 1 AS is_last_step, model,
       pv[ord[k + 1]] AS prompt_version, np + 2 * k AS state_turns
FROM r""",
}
CHECKSUM_SQL = f"SELECT count(*), sum(hash({COLUMNS})) FROM {{table}}"

# What building the states from the steps costs, part by part (the variants' work, and the view's before the stored
# conversation; each builds and consumes its lists; the sum keeps it from being pruned).
_GROWING = "OVER (PARTITION BY trajectory_id ORDER BY step_index ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
_LIVE = "FROM steps s JOIN trajectories t USING (trajectory_id) WHERE t.status <> 'error'"
_PAIR_S = PAIR.replace("message", "s.message").replace("observation", "s.observation")
_GROWING_S = _GROWING.replace("trajectory_id", "s.trajectory_id").replace("step_index", "s.step_index")
COMPONENTS: dict[str, str] = {
    "scan + join steps ⋈ trajectories":
        f"SELECT count(*), sum(len(s.message) + len(t.prompt_messages)) {_LIVE}",
    "from_json(prompt) on every step row":
        f"SELECT count(*), sum(len(from_json(t.prompt_messages, {MESSAGES_TYPE}))) {_LIVE}",
    "from_json(prompt) once per trajectory":
        f"SELECT count(*), sum(len(from_json(prompt_messages, {MESSAGES_TYPE}))) FROM trajectories WHERE status <> 'error'",
    "window count(*) (sort + frames, no list)":
        f"SELECT count(*), sum(h) FROM (SELECT count(*) {_GROWING} AS h FROM steps)",
    "window list(message) (strings, no structs)":
        f"SELECT count(*), sum(len(h)) FROM (SELECT list(message) {_GROWING} AS h FROM steps)",
    "window flatten(list(pair)), steps alone":
        f"SELECT count(*), sum(len(h)) FROM (SELECT flatten(list({PAIR}) {_GROWING}) AS h FROM steps)",
    "window flatten(list(pair)), steps ⋈ traj (first view)":
        f"SELECT count(*), sum(len(h) + len(p)) FROM (SELECT t.prompt_messages AS p, "
        f"flatten(list({_PAIR_S}) {_GROWING_S}) AS h {_LIVE})",
    "per-trajectory flatten(list(pair ORDER BY step))":
        f"SELECT count(*), sum(len(u)) FROM (SELECT flatten(list({PAIR} ORDER BY step_index)) AS u "
        "FROM steps GROUP BY trajectory_id)",
    "per-trajectory list(...) unordered x3":
        "SELECT count(*), sum(len(a) + len(b) + len(c)) FROM (SELECT list(step_index) AS a, list(message) AS b, "
        "list(observation) AS c FROM steps GROUP BY trajectory_id)",
}


# -- measuring ------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never via a proxy


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have spent busy, from /proc/stat."""
    try:
        parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return sum(int(parts[i]) for i in (1, 2, 3, 6, 7, 8)) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class Measure:
    """Wall, this process's CPU (all threads, DuckDB's included), a server's CPU, and other processes' load."""

    def __init__(self, server_pid: int | None = None, collect: bool = True) -> None:
        self.pid, self.collect = server_pid, collect

    def __enter__(self) -> Measure:
        if self.collect:
            gc.collect()
        self.s0 = proc_cpu_s(self.pid) if self.pid else None
        self.m0, self.o0 = machine_busy_s(), proc_cpu_s(os.getpid())
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        s1 = proc_cpu_s(self.pid) if self.pid else None
        m1, o1 = machine_busy_s(), proc_cpu_s(os.getpid())
        self.server_cpu = None if self.s0 is None or s1 is None else s1 - self.s0
        self.foreign_cores = None
        if None not in (self.m0, m1, self.o0, o1):
            busy = m1 - self.m0 - (o1 - self.o0) - (self.server_cpu or 0.0)  # type: ignore[operator]
            self.foreign_cores = max(0.0, busy) / self.wall


@dataclass
class Timing:
    label: str
    query: str
    rows: int
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)

    def add(self, m: Measure) -> None:
        self.walls.append(m.wall)
        self.cpus.append(m.cpu)
        if m.foreign_cores is not None:
            self.foreign.append(m.foreign_cores)

    @property
    def best_rate(self) -> float:
        return self.rows / min(self.walls)

    @property
    def median_rate(self) -> float:
        return self.rows / statistics.median(self.walls)

    @property
    def cores(self) -> float:
        return statistics.median(c / w for c, w in zip(self.cpus, self.walls))


# -- part 1: decomposition -----------------------------------------------------------------------------
def build_database(path: Path, n: int, log) -> tuple[duckdb.DuckDBPyConnection, Store]:
    t0 = time.perf_counter()
    store = Store(path)  # schema.sql + views.sql
    con = store.con
    con.execute("BEGIN TRANSACTION")
    for sql in BUILD_SQL:
        con.execute(sql.format(n=n))
    con.execute(migrations()[4].read_text(encoding="utf-8"))  # the stored conversations, as an older database gets them
    con.execute("COMMIT")
    con.execute("CHECKPOINT")
    log(f"  built {n} trajectories in {time.perf_counter() - t0:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    return con, store


def data_profile(con: duckdb.DuckDBPyConnection) -> dict:
    (traj, errors, prompt_chars), = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'error'), "
        f"avg(len(from_json(prompt_messages, {MESSAGES_TYPE})[1].content)) FROM trajectories").fetchall()
    (steps, msg, obs, n_obs), = con.execute(
        "SELECT count(*), avg(len(message)), avg(len(observation)), count(observation) FROM steps").fetchall()
    (expected,) = con.execute(
        "SELECT count(*) FROM steps JOIN trajectories USING (trajectory_id) WHERE status <> 'error'").fetchone()
    mix = con.execute("SELECT num_steps, count(*) FROM trajectories GROUP BY ALL ORDER BY 1").fetchall()
    return {"trajectories": traj, "errors": errors, "steps": steps, "rows": expected, "prompt_chars": prompt_chars,
            "message_chars": msg, "observation_chars": obs, "observations": n_obs, "mix": mix}


def time_sql(con: duckdb.DuckDBPyConnection, name: str, repeats: int, log) -> tuple[list[Timing], tuple]:
    sql = VARIANTS[name]
    decompose = Timing(name, "decompose", 0)
    states = Timing(name, "states", 0)
    ctas = Timing(name, "CTAS", 0)
    for r in range(repeats):
        with Measure() as m:
            (decompose.rows, state_turns), = con.execute(f"SELECT count(*), sum(state_turns) FROM ({sql})").fetchall()
        decompose.add(m)
        with Measure() as m:
            (rows, state_len), = con.execute(f"SELECT count(*), sum(len(state)) FROM ({sql})").fetchall()
        states.rows = rows
        states.add(m)
        con.execute("DROP TABLE IF EXISTS bench_sub")
        with Measure() as m:
            con.execute(f"CREATE TEMP TABLE bench_sub AS {sql}")
        (ctas.rows,) = con.execute("SELECT count(*) FROM bench_sub").fetchone()
        ctas.add(m)
        log(f"  [{name}] repeat {r + 1}/{repeats}: decompose {decompose.walls[-1]:.3f} s, states {states.walls[-1]:.3f} s, "
            f"CTAS {ctas.walls[-1]:.3f} s ({rows} rows, {state_len} state messages)")
        if state_turns != state_len:
            raise AssertionError(f"{name}: state_turns add up to {state_turns}, the states hold {state_len} messages")
    checksum = con.execute(CHECKSUM_SQL.format(table="bench_sub")).fetchone()
    return [decompose, states, ctas], (checksum, state_len)


def output_copy_floor(con: duckdb.DuckDBPyConnection, repeats: int) -> Timing:
    """CTAS from the already materialised output: the cost of writing the rows, whatever computes them."""
    t = Timing("(output copy)", "CTAS", con.execute("SELECT count(*) FROM bench_sub").fetchone()[0])
    for _ in range(repeats):
        con.execute("DROP TABLE IF EXISTS bench_copy")
        with Measure() as m:
            con.execute("CREATE TEMP TABLE bench_copy AS SELECT * FROM bench_sub")
        t.add(m)
    con.execute("DROP TABLE IF EXISTS bench_copy")
    return t


def time_components(con: duckdb.DuckDBPyConnection, repeats: int) -> list[tuple[str, int, float]]:
    out = []
    for label, sql in COMPONENTS.items():
        walls = []
        for _ in range(repeats):
            with Measure() as m:
                (rows, _),  = con.execute(sql).fetchall()
            walls.append(m.wall)
        out.append((label, rows, min(walls)))
    return out


def profile_operators(con: duckdb.DuckDBPyConnection, sql: str, path: Path) -> list[tuple[int, str, float, int, str]]:
    """DuckDB's per-operator CPU time (summed over threads) for one run of `sql`: (depth, name, s, rows, detail)."""
    con.execute("PRAGMA enable_profiling = 'json'")
    con.execute(f"PRAGMA profiling_output = '{path}'")
    try:
        con.execute(sql).fetchall()
    finally:
        con.execute("PRAGMA disable_profiling")
    tree = json.loads(path.read_text())
    out: list[tuple[int, str, float, int, str]] = []

    def walk(node: dict, depth: int) -> None:
        info = node.get("extra_info") or {}
        detail = info.get("Projections") or info.get("Aggregates") or info.get("Function") or info.get("Conditions") or ""
        if isinstance(detail, list):
            detail = ", ".join(map(str, detail))
        out.append((depth, str(node.get("name")), float(node.get("timing") or 0.0),
                    int(node.get("intermediate_rows") or node.get("operator_cardinality") or 0), str(detail)))
        for child in node.get("children", []):
            walk(child, depth + 1)

    for root in tree.get("operator") or tree.get("children") or []:
        walk(root, 0)
    return out


FETCH_TRAJ = """SELECT trajectory_id, question_id, num_steps, model, prompt_messages FROM trajectories
                WHERE status <> 'error'"""
FETCH_STEPS = """SELECT trajectory_id, step_index, message, observation, action_kind, prompt_version FROM steps
                 WHERE trajectory_id IN (SELECT trajectory_id FROM trajectories WHERE status <> 'error')
                 ORDER BY trajectory_id, step_index"""


def python_fetch(con: duckdb.DuckDBPyConnection) -> tuple[list, list]:
    return con.execute(FETCH_TRAJ).fetchall(), con.execute(FETCH_STEPS).fetchall()


def python_decompose(traj_rows: list, step_rows: list) -> list[tuple]:
    """The view's rows, by a plain loop: state = prompt + earlier (assistant, user) pairs, a new list per step."""
    meta = {r[0]: r for r in traj_rows}
    out = []
    current = None
    prompt: list = []
    history: list = []
    for tid, k, message, observation, kind, version in step_rows:
        if tid != current:
            current = tid
            _, qid, n, model, prompt_json = meta[tid]
            prompt = json.loads(prompt_json)
            history = []
        out.append((tid, qid, k, prompt + history, history, message, kind, k == n - 1, model, version))
        history = history + [{"role": "assistant", "content": message}, {"role": "user", "content": observation}]
    return out


def check_python(con: duckdb.DuckDBPyConnection, rows: list[tuple], expected_rows: int, state_len: int) -> str:
    if len(rows) != expected_rows:
        raise AssertionError(f"python loop made {len(rows)} rows, the view {expected_rows}")
    py_len = sum(len(r[3]) for r in rows)
    if py_len != state_len:
        raise AssertionError(f"python loop: {py_len} state messages, the view {state_len}")
    sample = sorted({r[0] for r in rows[:: max(1, len(rows) // 500)]})
    got = con.execute(f"SELECT {COLUMNS} FROM bench_sub WHERE trajectory_id IN (SELECT unnest(?::VARCHAR[])) "
                      "ORDER BY trajectory_id, step_index", [sample]).fetchall()
    wanted = set(sample)
    mine = [r for r in rows if r[0] in wanted]
    if [tuple(r) for r in got] != mine:
        bad = next(i for i, (a, b) in enumerate(zip(got, mine)) if tuple(a) != b) if len(got) == len(mine) else -1
        raise AssertionError(f"python loop and the view differ on sampled trajectories (row {bad})")
    return f"{len(sample)} trajectories ({len(mine)} rows) compared in full"


@dataclass
class DecompResult:
    profile: dict
    threads: str
    sql: list[Timing]
    floor: Timing
    fetch: Timing
    loop: Timing
    loop_nogc: Timing
    loop_gc_s: float
    check: str
    agree: list[str]
    components: list[tuple[str, int, float]]
    profiles: dict[str, list[tuple[int, str, float, int, str]]]


def run_decomposition(n: int, variants: list[str], repeats: int, tmp: Path, log) -> DecompResult:
    con, store = build_database(tmp / "curation-bench.duckdb", n, log)
    try:
        profile = data_profile(con)
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        log(f"  {profile['rows']} sub-trajectories expected from {profile['steps']} steps; DuckDB threads {threads}")
        timings: list[Timing] = []
        reference = None
        agree = []
        for name in variants:
            queries, (checksum, state_len) = time_sql(con, name, repeats, log)
            if any(t.rows != profile["rows"] for t in queries):
                raise AssertionError(f"{name}: {[t.rows for t in queries]} rows, expected {profile['rows']}")
            if reference is None:
                reference = (checksum, state_len)
                floor = output_copy_floor(con, repeats)  # on the view's output
                (profile["state_msgs"], profile["history_msgs"], profile["state_mb"], profile["history_mb"]), = con.execute(
                    "SELECT sum(len(state)), sum(len(history)), "
                    "sum(list_sum(list_transform(state, lambda m: len(m.content)))) / 1e6, "
                    "sum(list_sum(list_transform(history, lambda m: len(m.content)))) / 1e6 FROM bench_sub").fetchall()
                ref_state_len = state_len
            elif (checksum, state_len) != reference:
                raise AssertionError(f"variant {name} does not produce the view's rows: {checksum} vs {reference[0]}")
            else:
                agree.append(name)
            timings += queries
        # the Python loop, compared with the view's materialised output (re-made: variants replaced it)
        con.execute("DROP TABLE IF EXISTS bench_sub")
        con.execute(f"CREATE TEMP TABLE bench_sub AS {VARIANTS['view']}")
        fetch = Timing("python", "fetch rows", profile["rows"])
        loop = Timing("python", "loop", profile["rows"])
        loop_nogc = Timing("python", "loop, GC off", profile["rows"])
        gc_s = []
        for r in range(repeats):
            with Measure() as m:
                traj_rows, step_rows = python_fetch(con)
            fetch.add(m)
            t_gc = _gc_time()
            with Measure() as m:
                rows = python_decompose(traj_rows, step_rows)
            loop.add(m)
            gc_s.append(_gc_time() - t_gc)
            del rows
            gc.collect()
            gc.disable()
            try:
                with Measure(collect=False) as m:
                    rows = python_decompose(traj_rows, step_rows)
            finally:
                gc.enable()
            loop_nogc.add(m)
            log(f"  [python] repeat {r + 1}/{repeats}: fetch {fetch.walls[-1]:.3f} s, loop {loop.walls[-1]:.3f} s "
                f"(of which GC {gc_s[-1]:.3f} s), loop with GC off {loop_nogc.walls[-1]:.3f} s")
            if r == repeats - 1:
                check = check_python(con, rows, profile["rows"], ref_state_len)
            del rows, traj_rows, step_rows
        log("  components and operator profiles ...")
        components = time_components(con, repeats)
        fastest = min((t for t in timings if t.query == "states"), key=lambda t: statistics.median(t.walls)).label
        profiles = {name: profile_operators(con, f"SELECT count(*), sum(len(state)) FROM ({VARIANTS[name]})",
                                            tmp / f"profile-{name}.json")
                    for name in dict.fromkeys(["view", fastest])}
        return DecompResult(profile, str(threads), timings, floor, fetch, loop, loop_nogc, statistics.median(gc_s),
                            check, agree, components, profiles)
    finally:
        store.close()


class _GCTimer:
    def __init__(self) -> None:
        self.total_s, self._start = 0.0, 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._start


_GC = _GCTimer()


def _gc_time() -> float:
    return _GC.total_s


# -- part 2: judge calls/s ------------------------------------------------------------------------------
def make_items(n: int, prefix: str) -> list[StepToJudge]:
    items = []
    for i in range(n):
        question = (f"A crate holds {i} apples and {i % 7 + 2} pears. "
                    f"How many pieces of fruit are in {i % 5 + 2} crates? ({prefix})")
        k = i % 4
        turns = []
        for j in range(k):
            turns += [{"role": "assistant", "content": f"Step {j + 1}: compute. <math_exp>{i} * {j + 2}</math_exp>"},
                      {"role": "user", "content": f"{i} * {j + 2} → {i * (j + 2)}"}]
        items.append(StepToJudge(
            trajectory_id=f"{prefix}-{i:07d}", step_index=k, task="math", question=question, turns=turns,
            action_message=f"Step {k + 1}: add the pears. <math_exp>{i} + {i % 7 + 2}</math_exp>",
        ))
    return items


def reset_server(base_url: str) -> None:
    req = urllib.request.Request(base_url.rstrip("/") + "/_reset", data=b"{}", method="POST")
    with _OPENER.open(req, timeout=5) as resp:
        resp.read()


def forget_journal(journal_dir: Path) -> None:
    j = llm_cache._journals.pop(journal_dir.resolve(), None)
    if j is not None:
        j.close()


@dataclass
class JudgeRun:
    calls: int
    wall: float
    cpu: float
    server_cpu: float | None
    foreign: float | None

    @property
    def rate(self) -> float:
        return self.calls / self.wall


async def judge_run(base_url: str, items: list[StepToJudge], concurrency: int, journal_dir: Path,
                    server_pid: int, verify: bool = True) -> JudgeRun:
    reset_server(base_url)
    tune_gc()  # as run_shard does
    cfg = ModelConfig(model=JUDGE_MODEL, api_base=base_url, concurrency=concurrency)
    client = build_client(cfg, journal_dir=journal_dir, tags={"run_id": "bench", "purpose": "judge"})
    judge = StepJudge(client, JudgeSpec(model=JUDGE_MODEL))
    try:
        with Measure(server_pid) as m:
            judgments = await judge.judge_many(items)
    finally:
        await client.aclose()
        forget_journal(journal_dir)
    n = len(items)
    if verify:
        bad = [j for j in judgments if j.verdict != "GOOD" or j.attempts != 1]
        if len(judgments) != n or bad:
            raise AssertionError(f"{len(judgments)} judgments for {n} items, {len(bad)} not GOOD at the first "
                                 f"attempt, e.g. {bad[:1]!r:.300}")
        if [(j.trajectory_id, j.step_index) for j in judgments] != [(i.trajectory_id, i.step_index) for i in items]:
            raise AssertionError("judgments do not match the items")
        st = client.stats
        if st["sent"] != n or st["cache_hits"] or st["retries"] or st["failures"]:
            raise AssertionError(f"expected {n} calls sent, no cache hits, retries or failures: {st}")
        stats = fetch_stats(base_url)
        by_body = stats["by_body"]
        repeated = sum(1 for v in by_body.values() if v != 1)
        if stats["completed"] != n or len(by_body) != n or repeated or stats["statuses"] != {200: n}:
            raise AssertionError(f"server did not see each body exactly once: completed={stats['completed']} "
                                 f"distinct={len(by_body)} repeated={repeated} statuses={stats['statuses']}")
    return JudgeRun(n, m.wall, m.cpu, m.server_cpu, m.foreign_cores)


@dataclass
class JudgeResult:
    latency: float
    concurrency: int
    calls: int
    runs: list[JudgeRun]

    @property
    def bound(self) -> float | None:
        return self.concurrency / self.latency if self.latency > 0 else None


async def judge_scenario(latency: float, concurrency: int, calls: int, repeats: int, tmp: Path, log) -> JudgeResult:
    proc, base_url = start_subprocess(latency=latency, default=JUDGE_REPLY)
    runs = []
    try:
        tag = f"L{latency:g}-C{concurrency}"
        await judge_run(base_url, make_items(2 * concurrency, f"warm-{tag}"), concurrency, tmp / f"j-warm-{tag}",
                        proc.pid)
        for r in range(repeats):
            items = make_items(calls, f"run{r}-{tag}")  # distinct bodies in every run
            runs.append(await judge_run(base_url, items, concurrency, tmp / f"j-{tag}-{r}", proc.pid))
            log(f"  [judge latency {latency * 1000:.0f} ms, C={concurrency}] repeat {r + 1}/{repeats}: "
                f"{runs[-1].rate:7.1f} calls/s ({runs[-1].wall:.2f} s)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()
    return JudgeResult(latency, concurrency, calls, runs)


# -- report ---------------------------------------------------------------------------------------------
def _table(head: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _m(rate: float) -> str:
    return f"{rate / 1e6:.2f}M" if rate >= 1e5 else f"{rate / 1e3:.0f}k"


def decomposition_report(res: DecompResult, repeats: int) -> str:
    p = res.profile
    med = lambda t: statistics.median(t.walls)  # noqa: E731
    view = {t.query: t for t in res.sql if t.label == "view"}
    head = ("variant", "query", "rows", "wall s best | med", "rows/s best | med", "vs view best (med)", "cores",
            "goal", "result")
    rows = []
    for t in res.sql:
        goal = t.query == GOAL_QUERY
        rows.append((t.label, t.query, f"{t.rows:,}", f"{min(t.walls):.3f} | {med(t):.3f}",
                     f"{_m(t.best_rate)} | {_m(t.median_rate)}",
                     f"{min(view[t.query].walls) / min(t.walls):.2f}x ({med(view[t.query]) / med(t):.2f}x)",
                     f"{t.cores:.2f}", f">= {_m(GOAL_ROWS_PER_S)}/s" if goal else "",
                     ("PASS" if t.median_rate >= GOAL_ROWS_PER_S else "FAIL") if goal else ""))
    for t in (res.floor, res.fetch, res.loop, res.loop_nogc):
        rows.append((t.label, t.query, f"{t.rows:,}", f"{min(t.walls):.3f} | {med(t):.3f}",
                     f"{_m(t.best_rate)} | {_m(t.median_rate)}", "", f"{t.cores:.2f}", "", ""))
    mix = ", ".join(f"{k}:{v}" for k, v in p["mix"])
    out = [
        f"decomposition: {p['trajectories']:,} trajectories ({p['errors']:,} errors, left out), {p['steps']:,} steps "
        f"-> {p['rows']:,} sub-trajectories; DuckDB {duckdb.__version__}, {res.threads} threads, {repeats} repeats",
        f"  data: prompt message {p['prompt_chars']:.0f} chars, action {p['message_chars']:.0f} chars, observation "
        f"{p['observation_chars']:.0f} chars; trajectories by number of steps {mix}",
        f"  output: {p['state_msgs']:,} messages in the states ({p['state_mb']:.0f} MB of text), {p['history_msgs']:,} in the "
        f"histories ({p['history_mb']:.0f} MB): {p['state_msgs'] / p['rows']:.1f} messages and "
        f"{1e6 * (p['state_mb'] + p['history_mb']) / p['rows']:.0f} chars per sub-trajectory",
        "  decompose = SELECT count(*), sum(state_turns) FROM (<variant>);  states = SELECT count(*), sum(len(state)) "
        "FROM (<variant>);  CTAS = CREATE TEMP TABLE ... AS <variant>",
        "",
        *_table(head, rows),
        "",
    ]
    loop, nogc, fetch = med(res.loop), med(res.loop_nogc), med(res.fetch)
    for q in ("states", "CTAS"):
        v = med(view[q])
        alt = min((t for t in res.sql if t.query == q), key=med)
        out.append(f"  factor over the Python loop ({q}, medians): view {loop / v:.1f}x the loop, {nogc / v:.1f}x the "
                   f"loop with GC off, {(loop + fetch) / v:.1f}x fetch + loop"
                   + (f"; fastest variant {alt.label}: {loop / med(alt):.1f}x / {nogc / med(alt):.1f}x / "
                      f"{(loop + fetch) / med(alt):.1f}x" if alt.label != "view" else ""))
    out.append(f"  output-copy floor: writing the view's rows alone takes {med(res.floor) / med(view['CTAS']):.0%} of "
               f"the view's CTAS ({_m(res.floor.median_rate)} rows/s): no formulation can materialise faster")
    out.append(f"  Python loop: GC {res.loop_gc_s:.3f} s of {loop:.3f} s; checked against the view: {res.check}")
    if res.agree:
        out.append(f"  variants checked equal to the view (rows + hash of every column): {', '.join(res.agree)}")
    foreign = [f for t in [*res.sql, res.floor, res.fetch, res.loop] for f in t.foreign]
    if foreign:
        warn = "  <-- the machine was not idle: figures are low and noisy" if max(foreign) > 0.25 else ""
        out.append(f"  other processes' load: median {statistics.median(foreign):.2f} cores, up to {max(foreign):.2f}{warn}")
    out += ["", "where the time goes when the states are built from the steps (the variants; the view before the stored "
            "conversation), part by part (best of the repeats; rows/s = sub-trajectories "
            "/ wall)", ""]
    comp = [(label, f"{n:,}", f"{w:.3f}", _m(p["rows"] / w)) for label, n, w in res.components]
    out += _table(("component", "input rows", "wall s", "rows/s"), comp)
    for name, ops in res.profiles.items():
        out += ["", f"operator CPU time (s, summed over threads) of the states query, {name}:"]
        for depth, op, secs, n, detail in ops:
            if op in ("RESULT_COLLECTOR", "UNGROUPED_AGGREGATE") and secs < 0.005:
                continue
            out.append(f"  {'  ' * depth}{op:<14} {secs:7.3f}  {n:>9,} rows  {detail[:110]}")
    return "\n".join(out)


def judge_report(results: list[JudgeResult]) -> str:
    head = ("latency", "C", "calls", "calls/s best | med", "bound C/L", "ratio med (best)", "client CPU/call",
            "server CPU/call", "cores busy")
    rows = []
    foreign = []
    for res in results:
        best = max(r.rate for r in res.runs)
        med = statistics.median(r.rate for r in res.runs)
        cpu = statistics.median(1e6 * r.cpu / r.calls for r in res.runs)
        srv = [r.server_cpu for r in res.runs]
        srv_txt = f"{statistics.median(1e6 * s / r.calls for s, r in zip(srv, res.runs)):.0f} us" if None not in srv else "n/a"
        busy = (f"{statistics.median((r.cpu + r.server_cpu) / r.wall for r in res.runs):.2f}"  # type: ignore[operator]
                if None not in srv else "n/a")
        bound = res.bound
        rows.append((f"{res.latency * 1000:.0f} ms", str(res.concurrency), str(res.calls), f"{best:6.1f} | {med:6.1f}",
                     f"{bound:.0f}/s" if bound else "- (CPU-bound)",
                     f"{med / bound:.3f} ({best / bound:.3f})" if bound else "-", f"{cpu:.0f} us", srv_txt, busy))
        foreign += [r.foreign for r in res.runs if r.foreign is not None]
    out = ["judge calls/s: StepJudge.judge_many -> openai_compat client -> scripted server (own process), "
           f"reply {JUDGE_REPLY!r}, fresh journal per run", "", *_table(head, rows), "",
           "  every run: all items GOOD at the first attempt, each request body seen once by the server, no cache hit"]
    if foreign:
        warn = "  <-- the machine was not idle: figures are low and noisy" if max(foreign) > 0.25 else ""
        out.append(f"  other processes' load: median {statistics.median(foreign):.2f} cores, up to {max(foreign):.2f}{warn}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=None, help="synthetic trajectories (default 100000; --quick 20000)")
    p.add_argument("--variant", default="all", choices=["all", *VARIANTS],
                   help="decomposition formulation to compare with the shipped view (default: all)")
    p.add_argument("--calls", type=int, default=None, help="judge calls per run (default 2000; --quick 400)")
    p.add_argument("--concurrency", type=int, default=64, help="judge concurrency C at latency L (default 64)")
    p.add_argument("--latency", type=float, default=0.2, help="server latency L in seconds (default 0.2)")
    p.add_argument("--cpu-concurrency", type=int, default=32, help="judge concurrency at latency 0 (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of every measurement (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--skip-judge", action="store_true")
    p.add_argument("--skip-decomposition", action="store_true")
    args = p.parse_args(argv)

    n = args.trajectories or (20_000 if args.quick else 100_000)
    calls = args.calls or (400 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    variants = list(VARIANTS) if args.variant == "all" else list(dict.fromkeys(["view", args.variant]))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="swirl-curation-bench-"))
    t0 = time.perf_counter()
    decomp = None
    judges: list[JudgeResult] = []
    try:
        if not args.skip_decomposition:
            log(f"decomposition: {n} trajectories, variants {', '.join(variants)}")
            decomp = run_decomposition(n, variants, repeats, tmp, log)
        if not args.skip_judge:
            for latency, conc in ((args.latency, args.concurrency), (0.0, args.cpu_concurrency)):
                log(f"judge: latency {latency * 1000:.0f} ms, concurrency {conc}, {calls} calls per run")
                judges.append(asyncio.run(judge_scenario(latency, conc, calls, repeats, tmp, log)))
        print()
        print(f"curation throughput ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"{time.perf_counter() - t0:.0f} s)")
        if decomp:
            print()
            print(decomposition_report(decomp, repeats))
        if judges:
            print()
            print(judge_report(judges))
    finally:
        for name in list(llm_cache._journals):
            if str(name).startswith(str(tmp.resolve())):
                forget_journal(Path(name))
        shutil.rmtree(tmp, ignore_errors=True)
    if decomp is None:
        return 0
    view_ok = all(t.median_rate >= GOAL_ROWS_PER_S for t in decomp.sql if t.label == "view" and t.query == GOAL_QUERY)
    return 0 if view_ok else 1


if __name__ == "__main__":
    sys.exit(main())
