-- The system of record. Keys are content hashes, so every write is an idempotent upsert.
-- No API key or secret is ever stored: configs are stored with key *names* only.
-- The tables as of the latest schema version: a new database gets them as they are here; an older one is brought
-- here by sql/migrations/ (the store applies them on open). Change a table here AND in a new migration.

-- One row per schema version the database reached (the highest is its version), and the swirl that took it there.
CREATE TABLE IF NOT EXISTS schema_version (
    version         INTEGER PRIMARY KEY,
    swirl_version   VARCHAR,
    applied_at      TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,   -- hash of the run's content-relevant config: a rerun resumes it
    kind            VARCHAR NOT NULL,      -- generate | curate | train | evaluate | publish
    status          VARCHAR NOT NULL,      -- running | completed | failed
    dataset         VARCHAR,
    model           VARCHAR,
    prompt_version  VARCHAR,
    config          JSON,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    attempts        INTEGER DEFAULT 1,
    n_questions     INTEGER,
    n_trajectories  INTEGER,
    n_errors        INTEGER,
    swirl_version   VARCHAR
);

CREATE TABLE IF NOT EXISTS questions (
    question_id     VARCHAR PRIMARY KEY,
    dataset         VARCHAR NOT NULL,
    split           VARCHAR NOT NULL,
    source_id       VARCHAR NOT NULL,
    task            VARCHAR NOT NULL,      -- qa | math
    question        VARCHAR NOT NULL,
    answer          VARCHAR NOT NULL,
    answer_aliases  VARCHAR[],
    metadata        JSON,
    source          VARCHAR,               -- file:line or hub:name/config/split:row
    first_run_id    VARCHAR
);

CREATE TABLE IF NOT EXISTS seed_errors (
    run_id          VARCHAR NOT NULL,
    source          VARCHAR NOT NULL,
    error           VARCHAR NOT NULL,
    PRIMARY KEY (run_id, source)
);

CREATE TABLE IF NOT EXISTS trajectories (
    trajectory_id       VARCHAR PRIMARY KEY,  -- hash(question, sample index, policy fingerprint)
    run_id              VARCHAR NOT NULL,
    question_id         VARCHAR NOT NULL,
    sample_index        INTEGER NOT NULL,
    model               VARCHAR NOT NULL,
    prompt_version      VARCHAR NOT NULL,
    policy_fingerprint  VARCHAR NOT NULL,
    status              VARCHAR NOT NULL,     -- answered | step_cap | error
    final_answer        VARCHAR,
    num_steps           INTEGER NOT NULL,
    num_invalid_steps   INTEGER NOT NULL,
    prompt_tokens       BIGINT,
    completion_tokens   BIGINT,
    error               VARCHAR,
    prompt_messages     JSON NOT NULL,        -- s_0: the messages before the first action
    protocol            VARCHAR DEFAULT 'tags',  -- tags (the paper's) | tools (native function calling)
    created_at          TIMESTAMPTZ DEFAULT current_timestamp,
    -- The prompt, then each step's message and the observation it got (content NULL for none), stored once:
    -- `sub_trajectories` slices every state out of it when read.
    conversation        STRUCT(role VARCHAR, content VARCHAR)[],
    prompt_turns        INTEGER                -- the prompt's messages at its head: where step 0's state ends
);

CREATE TABLE IF NOT EXISTS steps (
    trajectory_id     VARCHAR NOT NULL,
    step_index        INTEGER NOT NULL,
    message           VARCHAR NOT NULL,       -- the assistant message as it entered the conversation
    reasoning         VARCHAR,
    action_kind       VARCHAR NOT NULL,       -- search | math | answer | invalid
    action_input      VARCHAR,                -- query / expression / answer
    parse_error       VARCHAR,
    truncated         BOOLEAN,                -- text after the first action was cut off
    observation       VARCHAR,                -- `INPUT → RESULT` shown to the model next (NULL for answers)
    tool_error        BOOLEAN,
    call_key          VARCHAR,                -- → llm_calls.call_key
    model             VARCHAR NOT NULL,
    prompt_version    VARCHAR NOT NULL,
    "constraint"      VARCHAR,                -- decoding constraint that shaped this message, if any
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_s         DOUBLE,
    tool_calls        JSON,                   -- tools protocol: the message's tool calls as sent
    PRIMARY KEY (trajectory_id, step_index)
);

CREATE TABLE IF NOT EXISTS llm_calls (
    call_key          VARCHAR PRIMARY KEY,    -- hash of model, messages, sampling params, sample index, prompt version
    run_id            VARCHAR,
    purpose           VARCHAR,                -- policy | judge | grader
    model             VARCHAR NOT NULL,
    backend           VARCHAR,
    prompt_version    VARCHAR,
    sample_index      INTEGER,
    temperature       DOUBLE,
    max_tokens        INTEGER,
    "constraint"      VARCHAR,
    response_text     VARCHAR,
    finish_reason     VARCHAR,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cost_usd          DOUBLE,                 -- NULL = price unknown (never a silent 0)
    latency_s         DOUBLE,
    attempts          INTEGER,
    created_at        TIMESTAMPTZ
);

-- How much of each call journal `llm_calls` holds: an ingest reads only the bytes past `bytes`.
CREATE TABLE IF NOT EXISTS journal_ingested (
    path              VARCHAR PRIMARY KEY,    -- the journal file's name in the work directory's journal folder
    bytes             BIGINT NOT NULL         -- its first `bytes` bytes are in llm_calls (whole lines only)
);

CREATE TABLE IF NOT EXISTS judgments (
    judgment_id     VARCHAR PRIMARY KEY,      -- hash(trajectory, step, judge fingerprint, sample)
    run_id          VARCHAR,
    trajectory_id   VARCHAR NOT NULL,
    step_index      INTEGER NOT NULL,
    sample_index    INTEGER NOT NULL,         -- k judge samples per step for majority vote
    judge_model     VARCHAR NOT NULL,
    judge_fingerprint VARCHAR NOT NULL,       -- model, prompt versions, samples, decoding: a new judge re-judges
    prompt_version  VARCHAR NOT NULL,
    verdict         VARCHAR NOT NULL,         -- GOOD | BAD | UNKNOWN (unparseable after re-asks, or failed)
    reasoning       VARCHAR,
    attempts        INTEGER,
    call_keys       VARCHAR[],                -- → llm_calls.call_key
    created_at      TIMESTAMPTZ DEFAULT current_timestamp,
    p_good          DOUBLE,                   -- P(GOOD): in-process judges, served ones from verdict-token logprobs
    error           VARCHAR                   -- the call failed for good (verdict UNKNOWN): the next curation re-judges
);

-- The judge whose verdicts a generation run's curated sets and judge analytics read: set by its latest
-- curation (`swirl curate`, or `swirl curate --judge-id` to go back to an earlier judge).
CREATE TABLE IF NOT EXISTS judge_selection (
    run_id            VARCHAR PRIMARY KEY,    -- generation run
    judge_fingerprint VARCHAR NOT NULL,       -- → judgments.judge_fingerprint
    curate_run_id     VARCHAR,
    selected_at       TIMESTAMPTZ
);

-- Every judge a curation used: how it was asked (calibrated judges: the P(GOOD) thresholds and how they were
-- chosen) and the judge probe that measured it (→ judge_probe_metrics.judge_fingerprint), if any.
CREATE TABLE IF NOT EXISTS judges (
    judge_fingerprint VARCHAR PRIMARY KEY,
    judge_model       VARCHAR NOT NULL,
    spec              JSON NOT NULL,
    probe_fingerprint VARCHAR,
    created_at        TIMESTAMPTZ
);

-- The judge probe (`swirl judge-eval`): one row per labelled step and judge. The judge is identified as it is
-- asked before any threshold is set; a calibrated judge's verdict applies the threshold chosen on the steps
-- of the calibration fold, and only the evaluation fold is scored for it.
CREATE TABLE IF NOT EXISTS judge_probe_results (
    probe_step_id     VARCHAR NOT NULL,
    judge_fingerprint VARCHAR NOT NULL,
    probe_run_id      VARCHAR,
    judge_model       VARCHAR NOT NULL,
    probe_version     VARCHAR NOT NULL,
    dataset           VARCHAR NOT NULL,
    split             VARCHAR NOT NULL,
    question_id       VARCHAR NOT NULL,
    task              VARCHAR NOT NULL,
    action_kind       VARCHAR NOT NULL,       -- math | search | answer
    corruption        VARCHAR,                -- NULL for gold steps
    label             VARCHAR NOT NULL,       -- GOOD | BAD
    verdict           VARCHAR NOT NULL,       -- GOOD | BAD | UNKNOWN
    p_good            DOUBLE,                 -- NULL when the judge reports no probabilities
    threshold         DOUBLE,                 -- a calibrated judge's P(GOOD) threshold
    fold              VARCHAR NOT NULL,       -- calibration | evaluation
    scored            BOOLEAN NOT NULL,       -- counted in the figures
    good_votes        INTEGER,
    bad_votes         INTEGER,
    votes             INTEGER,
    message           VARCHAR NOT NULL,
    state             JSON NOT NULL,          -- the turns before the step
    reasoning         VARCHAR,
    call_keys         VARCHAR[],
    created_at        TIMESTAMPTZ DEFAULT current_timestamp,
    error             VARCHAR,                -- a sample's call failed for good: the next probe run re-judges the step
    PRIMARY KEY (probe_step_id, judge_fingerprint)
);

-- The probe's figures with their bootstrap CIs, per judge, dataset and group (all, action=…, corruption=…).
CREATE TABLE IF NOT EXISTS judge_probe_metrics (
    judge_fingerprint VARCHAR NOT NULL,
    dataset           VARCHAR NOT NULL,
    split             VARCHAR NOT NULL,
    grp               VARCHAR NOT NULL,
    metric            VARCHAR NOT NULL,
    n                 INTEGER,
    value             DOUBLE,
    ci_low            DOUBLE,
    ci_high           DOUBLE,
    probe_run_id      VARCHAR,
    PRIMARY KEY (judge_fingerprint, dataset, split, grp, metric)
);

CREATE TABLE IF NOT EXISTS grades (
    trajectory_id   VARCHAR NOT NULL,
    method          VARCHAR NOT NULL,         -- numeric | exact_match (rule-based) | llm
    correct         BOOLEAN,                  -- NULL: the LLM grader gave no parseable YES/NO
    score           DOUBLE,                   -- F1 for QA, 1/0 for numeric
    detail          VARCHAR,
    grader_model    VARCHAR,
    prompt_version  VARCHAR,
    call_key        VARCHAR,
    run_id          VARCHAR,
    created_at      TIMESTAMPTZ DEFAULT current_timestamp,
    PRIMARY KEY (trajectory_id, method)
);

-- One row per evaluated question × model of an evaluation run (docs/architecture.md, "Evaluation").
-- The trajectory itself lives in `trajectories`/`steps` like generation's, from an eval-generate run.
CREATE TABLE IF NOT EXISTS eval_results (
    eval_run_id     VARCHAR NOT NULL,
    label           VARCHAR NOT NULL,         -- the name given on the command line: base, sft, swirl, …
    model           VARCHAR NOT NULL,         -- the model as called (a checkpoint folder carries its weights' hash)
    question_id     VARCHAR NOT NULL,
    dataset         VARCHAR NOT NULL,
    split           VARCHAR NOT NULL,
    tools           BOOLEAN NOT NULL,         -- false: no-tool mode
    trajectory_id   VARCHAR NOT NULL,         -- → trajectories
    status          VARCHAR NOT NULL,         -- answered | step_cap | error
    final_answer    VARCHAR,
    num_steps       INTEGER,
    judge_correct   BOOLEAN,                  -- the LLM grader's YES/NO; NULL without --grader llm or when unparseable
    exact_match     BOOLEAN,                  -- QA: normalized EM (aliases count); math: numeric equality
    f1              DOUBLE,                   -- QA: max token F1; math: 1/0
    step_score      DOUBLE,                   -- share of steps the process judge rated GOOD; NULL without a judge
    judged_steps    INTEGER,
    in_training     BOOLEAN NOT NULL,         -- the question (or a 13-gram of it) is in the training trajectories
    PRIMARY KEY (eval_run_id, label, question_id)
);
