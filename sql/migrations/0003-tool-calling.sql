-- The tools protocol (native function calling): each trajectory records its protocol (rows before it are the
-- paper's tag protocol), each step the tool calls its message made.
ALTER TABLE trajectories ADD COLUMN IF NOT EXISTS protocol VARCHAR DEFAULT 'tags';
UPDATE trajectories SET protocol = 'tags' WHERE protocol IS NULL;
ALTER TABLE steps ADD COLUMN IF NOT EXISTS tool_calls JSON;
