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
