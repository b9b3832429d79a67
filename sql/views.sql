-- Reports over the generation tables (curated views come with curation).

CREATE OR REPLACE VIEW run_report AS
SELECT r.run_id, r.kind, r.status, r.dataset, r.model, r.prompt_version, r.started_at, r.finished_at,
       count(DISTINCT t.question_id)                          AS questions,
       count(t.trajectory_id)                                 AS trajectories,
       count(*) FILTER (WHERE t.status = 'answered')          AS answered,
       count(*) FILTER (WHERE t.status = 'step_cap')          AS step_cap,
       count(*) FILTER (WHERE t.status = 'error')             AS errors,
       avg(t.num_steps)                                       AS mean_steps,
       sum(t.prompt_tokens)                                   AS prompt_tokens,
       sum(t.completion_tokens)                               AS completion_tokens
FROM runs r LEFT JOIN trajectories t USING (run_id)
GROUP BY ALL;

CREATE OR REPLACE VIEW cost_report AS
SELECT run_id, purpose, model, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens,
       sum(cost_usd) AS cost_usd,                              -- over priced calls only
       count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_calls,
       avg(latency_s) AS mean_latency_s, sum(attempts - 1) AS retries
FROM llm_calls GROUP BY ALL;

CREATE OR REPLACE VIEW step_parse_report AS
SELECT t.run_id, s.model, s."constraint", count(*) AS steps,
       count(*) FILTER (WHERE s.action_kind <> 'invalid') AS parsed,
       round(count(*) FILTER (WHERE s.action_kind <> 'invalid') / count(*), 4) AS parse_rate
FROM steps s JOIN trajectories t USING (trajectory_id)
GROUP BY ALL;

-- ---------------------------------------------------------------- curation (SWiRL stage 1)

-- Each trajectory's conversation: the policy's prompt, then per step (in step order) its assistant message and the
-- observation it got (a user message; content NULL for a step that got none: an answer), stored once with the
-- trajectory (`trajectories.conversation`). Read by the Hub export.
CREATE OR REPLACE VIEW conversations AS
SELECT trajectory_id, question_id, status, num_steps, model, conversation FROM trajectories;

-- Step-wise decomposition: a trajectory with K actions gives K (state, action) pairs. The state s_k is the
-- prompt plus every earlier action and tool result: the first `state_turns` messages of the stored conversation,
-- sliced only when a query reads it, so a query of the rows alone never reads the conversation
-- (benchmarks/curation_throughput.py).
CREATE OR REPLACE VIEW sub_trajectories AS
WITH cut AS (
    SELECT s.trajectory_id, t.question_id, s.step_index, t.conversation, t.prompt_turns,
           t.prompt_turns + 2 * s.step_index AS state_turns,
           s.message AS action, s.action_kind, s.step_index = t.num_steps - 1 AS is_last_step, t.model, s.prompt_version
    FROM steps s JOIN trajectories t USING (trajectory_id) WHERE t.status <> 'error'
)
SELECT trajectory_id, question_id, step_index, list_slice(conversation, 1, state_turns) AS state,
       list_slice(conversation, prompt_turns + 1, state_turns) AS history, action, action_kind, is_last_step, model,
       prompt_version, state_turns
FROM cut;

-- The one vote rule of a step's judge samples: the majority of the known votes; a tie or no known vote is UNKNOWN.
-- Used for curated steps (below) and for the judge probe's labelled steps (`store.step_votes`).
CREATE OR REPLACE MACRO step_vote(good, bad) AS
    CASE WHEN good > bad THEN 'GOOD' WHEN bad > good THEN 'BAD' ELSE 'UNKNOWN' END;

-- Majority vote of the judge samples of each step, per judge: every judge's verdicts stay queryable.
CREATE OR REPLACE VIEW step_verdicts_by_judge AS
SELECT judge_fingerprint, trajectory_id, step_index,
       count(*) FILTER (WHERE verdict = 'GOOD') AS good,
       count(*) FILTER (WHERE verdict = 'BAD') AS bad,
       count(*) AS votes,
       step_vote(good, bad) AS verdict
FROM judgments GROUP BY judge_fingerprint, trajectory_id, step_index;

-- The one judge each generation run's curated sets read: the judge its latest curation selected, else (judgments
-- written outside a curation) the judge of its latest judgment. Votes of two judges are never pooled.
CREATE OR REPLACE VIEW selected_judges AS
WITH latest AS (
    SELECT t.run_id, arg_max(j.judge_fingerprint, j.created_at) AS judge_fingerprint
    FROM judgments j JOIN trajectories t USING (trajectory_id) GROUP BY t.run_id
)
SELECT l.run_id, coalesce(s.judge_fingerprint, l.judge_fingerprint) AS judge_fingerprint
FROM latest l LEFT JOIN judge_selection s USING (run_id);

-- The verdicts of the selected judge: what every curated view and judge analytic below reads.
CREATE OR REPLACE VIEW step_verdicts AS
SELECT v.trajectory_id, v.step_index, v.good, v.bad, v.votes, v.verdict, v.judge_fingerprint
FROM step_verdicts_by_judge v
JOIN trajectories t USING (trajectory_id)
JOIN selected_judges s ON s.run_id = t.run_id AND s.judge_fingerprint = v.judge_fingerprint;

-- The outcome of each trajectory: the LLM grade when it parsed (YES or NO), else the rule-based grade.
CREATE OR REPLACE VIEW trajectory_outcomes AS
SELECT DISTINCT ON (trajectory_id) trajectory_id, method, correct, score
FROM grades WHERE method <> 'llm' OR correct IS NOT NULL
ORDER BY trajectory_id, (method = 'llm') DESC, method;

-- One row per finished training trajectory: process pass (every step judged GOOD, and each one exactly one
-- action: a message the parser found invalid fails whatever the judge said) and outcome pass.
CREATE OR REPLACE VIEW trajectory_labels AS
WITH judged AS (
    SELECT v.trajectory_id, count(*) AS judged_steps, bool_and(v.verdict = 'GOOD' AND s.action_kind <> 'invalid') AS all_good
    FROM step_verdicts v JOIN steps s USING (trajectory_id, step_index) GROUP BY v.trajectory_id
)
SELECT t.trajectory_id, t.question_id, q.dataset, t.status, t.num_steps,
       coalesce(j.judged_steps = t.num_steps AND j.all_good, false) AS process_pass,
       coalesce(o.correct, false) AS outcome_pass,
       j.judged_steps IS NOT NULL AND j.judged_steps = t.num_steps AS judged,
       o.trajectory_id IS NOT NULL AS graded
FROM trajectories t
JOIN questions q USING (question_id)
LEFT JOIN judged j USING (trajectory_id)
LEFT JOIN trajectory_outcomes o USING (trajectory_id)
WHERE t.status <> 'error' AND t.num_steps > 0
  -- evaluation runs' trajectories are judged and graded, but never become training data
  AND t.run_id NOT IN (SELECT run_id FROM runs WHERE kind = 'eval-generate');

-- The four curated sets of the paper, as sub-trajectories (SFT: state → action; RL: states): the views
-- curated_none, curated_process, curated_outcome, curated_process_outcome and `curation_retention` (each filter's
-- retention per dataset) are made by the store from `CuratedFilter` (swirl_core/records.py), their one home.

-- ---------------------------------------------------------------- judge-quality analytics

-- Does the step-wise judge agree with the final outcome? (judged and graded trajectories)
CREATE OR REPLACE VIEW judge_agreement AS
SELECT dataset, process_pass, outcome_pass, count(*) AS trajectories
FROM trajectory_labels WHERE judged AND graded GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW good_rate_by_step AS
SELECT v.step_index, count(*) AS steps, round(avg((v.verdict = 'GOOD')::INT), 4) AS good_rate
FROM step_verdicts v GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW good_rate_by_action AS
SELECT s.action_kind, count(*) AS steps, round(avg((v.verdict = 'GOOD')::INT), 4) AS good_rate
FROM step_verdicts v JOIN steps s USING (trajectory_id, step_index) GROUP BY ALL ORDER BY ALL;

-- With k > 1 judge samples: how often the samples agree on a step.
CREATE OR REPLACE VIEW judge_self_consistency AS
SELECT count(*) AS steps, round(avg((good = votes OR bad = votes)::INT), 4) AS unanimous_rate,
       round(avg(greatest(good, bad) / votes), 4) AS mean_majority_share
FROM step_verdicts WHERE votes > 1;

-- The judge probe's headline figures, one row per judge and dataset (CIs in judge_probe_metrics).
CREATE OR REPLACE VIEW judge_probe_summary AS
SELECT judge_fingerprint, dataset, split,
       max(n) FILTER (WHERE metric = 'accuracy') AS steps,
       max(value) FILTER (WHERE metric = 'accuracy') AS accuracy,
       max(value) FILTER (WHERE metric = 'balanced_accuracy') AS balanced_accuracy,
       max(ci_low) FILTER (WHERE metric = 'balanced_accuracy') AS balanced_accuracy_ci_low,
       max(ci_high) FILTER (WHERE metric = 'balanced_accuracy') AS balanced_accuracy_ci_high,
       max(value) FILTER (WHERE metric = 'precision_bad') AS precision_bad,
       max(value) FILTER (WHERE metric = 'recall_bad') AS recall_bad,
       max(value) FILTER (WHERE metric = 'f1_bad') AS f1_bad,
       max(value) FILTER (WHERE metric = 'auroc') AS auroc,
       max(value) FILTER (WHERE metric = 'self_consistency') AS self_consistency,
       max(value) FILTER (WHERE metric = 'threshold') AS threshold,
       max(value) FILTER (WHERE metric = 'cost_usd_per_1000_steps') AS cost_usd_per_1000_steps,
       max(value) FILTER (WHERE metric = 'calls_per_s') AS calls_per_s,
       coalesce(max(value) FILTER (WHERE metric = 'better_than_chance') = 1, false) AS better_than_chance
FROM judge_probe_metrics WHERE grp = 'all' GROUP BY ALL ORDER BY ALL;

-- ---------------------------------------------------------------- evaluation

-- Means per evaluation run and model (the flow's report adds bootstrap CIs and paired tests).
CREATE OR REPLACE VIEW eval_summary AS
SELECT eval_run_id, dataset, split, tools, label, model, count(*) AS questions,
       count(*) FILTER (WHERE status = 'answered') AS answered,
       -- an unparseable grade counts as wrong; NULL throughout means the run had no LLM grader
       round(CASE WHEN count(judge_correct) > 0 THEN avg(coalesce(judge_correct, false)::INT) END, 4) AS llm_judge,
       round(avg(coalesce(exact_match, false)::INT), 4) AS exact_match,
       round(avg(coalesce(f1, 0)), 4) AS f1,
       round(avg(step_score), 4) AS step_score,
       count(*) FILTER (WHERE in_training) AS in_training
FROM eval_results GROUP BY ALL ORDER BY eval_run_id, label;

-- ---------------------------------------------------------------- the tools protocol (native function calling)

-- Tools-protocol trajectories in TRL's conversational tool-calling format, for the Hub export and SFT. Every message
-- is one JSON object holding only its own keys: as an Arrow struct each message would get every key, NULL where it
-- has none, and chat templates that test `'tool_calls' in message` (Llama 3.1's) break on those. DuckDB writes JSON
-- as Parquet's JSON type, which `datasets` loads as its Json() feature: the dicts come back exactly as written.
-- `tool_definitions` (task, tools: the JSON-schema functions offered) is made by the store from `protocol.py`.

-- One tool call as TRL and the chat templates take it: `id`, `type`, `function.name`, and `function.arguments` as a
-- JSON object, since templates serialise the arguments themselves (`tojson`: a JSON string would be encoded twice).
-- Arguments the model wrote that are no JSON object (its step is `invalid`) stay the string it wrote.
CREATE OR REPLACE MACRO tool_call_json(c) AS json_object(
    'id', c->>'id', 'type', 'function', 'function', json_object('name', c->'function'->>'name', 'arguments', CASE
        WHEN json_type(c->'function'->'arguments') = 'OBJECT' THEN c->'function'->'arguments'
        WHEN json_valid(c->'function'->>'arguments') AND json_type((c->'function'->>'arguments')::JSON) = 'OBJECT'
            THEN (c->'function'->>'arguments')::JSON
        ELSE to_json(c->'function'->>'arguments') END));

-- Per step: the assistant message as sent (its text, which the parser kept as `reasoning` when the message made
-- calls and as the whole `message` when it made none, and its calls), then what answered it, as the agent sent it
-- (`_next_turns` in swirl_core/agent.py): a `tool` message per call id, or a user turn when no call had an id; none
-- after the answer. `before` counts the conversation's messages before the step, after the prompt.
CREATE OR REPLACE VIEW tool_turns AS
WITH parsed AS (  -- `with_id`: the calls a `tool` message can answer
    SELECT s.*, from_json(s.tool_calls, '["JSON"]') AS calls,
           list_filter(coalesce(calls, []), lambda c: coalesce(c->>'id', '') <> '') AS with_id
    FROM steps s JOIN trajectories t USING (trajectory_id) WHERE t.protocol = 'tools'
), turns AS (
    SELECT trajectory_id, step_index, action_kind, prompt_version,
           CASE WHEN calls IS NULL THEN json_object('role', 'assistant', 'content', message)
                ELSE json_object('role', 'assistant', 'content', reasoning,
                                 'tool_calls', list_transform(calls, lambda c: tool_call_json(c))) END AS assistant,
           CASE WHEN observation IS NULL THEN []::JSON[]
                WHEN len(with_id) = 0 THEN [json_object('role', 'user', 'content', observation)]
                ELSE list_transform(with_id, lambda c: json_object(
                    'role', 'tool', 'tool_call_id', c->>'id', 'name', c->'function'->>'name', 'content', observation))
           END AS results
    FROM parsed
)
SELECT *, list_concat([assistant], results) AS turns,
       coalesce(sum(1 + len(results)) OVER (PARTITION BY trajectory_id ORDER BY step_index
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::INTEGER AS before
FROM turns;

-- Each tools-protocol trajectory's whole conversation (`messages`: the prompt, then every step's turns in order)
-- and the `tools` it was offered: TRL's conversational language-modeling type.
CREATE OR REPLACE VIEW tool_conversations AS
WITH agg AS (SELECT trajectory_id, flatten(list(turns ORDER BY step_index)) AS turns FROM tool_turns GROUP BY trajectory_id)
SELECT t.trajectory_id, t.question_id, t.status, t.num_steps, t.model, t.prompt_version, len(t.prompt) AS np,
       list_concat(t.prompt, a.turns) AS messages, d.tools
FROM (SELECT *, from_json(prompt_messages, '["JSON"]') AS prompt FROM trajectories WHERE protocol = 'tools') t
JOIN agg a USING (trajectory_id)
JOIN questions q ON q.question_id = t.question_id
JOIN tool_definitions d ON d.task = q.task;

-- The step-wise decomposition in the same format (TRL's conversational prompt-completion type): `prompt` is the
-- conversation before the step (a slice of the trajectory's), `completion` the step's assistant message.
CREATE OR REPLACE VIEW tool_sub_trajectories AS
SELECT u.trajectory_id, c.question_id, u.step_index, list_slice(c.messages, 1, c.np + u.before) AS prompt,
       [u.assistant] AS completion, c.tools, u.action_kind, u.step_index = c.num_steps - 1 AS is_last_step, c.model,
       u.prompt_version
FROM tool_turns u JOIN tool_conversations c USING (trajectory_id)
WHERE c.status <> 'error';

-- The four curated sets in this format, `curated_<name>_tools`, are made by the store from `CuratedFilter` with the
-- tag-protocol ones.
