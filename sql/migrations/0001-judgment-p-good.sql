-- Judgments gain P(GOOD) (NULL for the older ones: no probability was recorded).
ALTER TABLE judgments ADD COLUMN IF NOT EXISTS p_good DOUBLE;
