-- Each trajectory stores its conversation once (the prompt, then per step in step order its message and the
-- observation it got), which `sub_trajectories` slices when read instead of building it for every query.
ALTER TABLE trajectories ADD COLUMN IF NOT EXISTS conversation STRUCT(role VARCHAR, content VARCHAR)[];
ALTER TABLE trajectories ADD COLUMN IF NOT EXISTS prompt_turns INTEGER;
UPDATE trajectories t SET conversation = c.conversation, prompt_turns = c.prompt_turns
FROM (SELECT t.trajectory_id,
             list_concat(from_json(t.prompt_messages, '[{"role":"VARCHAR","content":"VARCHAR"}]'),
                         coalesce(s.turns, [])) AS conversation,
             json_array_length(t.prompt_messages) AS prompt_turns
      FROM trajectories t
      LEFT JOIN (SELECT trajectory_id, flatten(list([{'role': 'assistant', 'content': message},
                                                     {'role': 'user', 'content': observation}] ORDER BY step_index)) AS turns
                 FROM steps GROUP BY trajectory_id) s USING (trajectory_id)
      WHERE t.conversation IS NULL) c
WHERE t.trajectory_id = c.trajectory_id;
