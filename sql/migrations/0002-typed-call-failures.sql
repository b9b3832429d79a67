-- A judgment (or probe step) whose call failed for good records why in `error`; releases before this one wrote
-- the reason into `reasoning` behind the prefix 'LLMError: '.
ALTER TABLE judgments ADD COLUMN IF NOT EXISTS error VARCHAR;
UPDATE judgments SET error = substr(reasoning, 11), reasoning = '' WHERE starts_with(reasoning, 'LLMError: ');
ALTER TABLE judge_probe_results ADD COLUMN IF NOT EXISTS error VARCHAR;
UPDATE judge_probe_results SET error = substr(reasoning, 11), reasoning = '' WHERE starts_with(reasoning, 'LLMError: ');
