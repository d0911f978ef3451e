-- Overage: units counted past a limit where the plan allows use past it (`{ limit = 50,
-- overage = 100 }` or `{ limit = 50, soft = true }` in the plans file), per counter, so billing can
-- read what to charge. Written by the flusher with the count, under the same version guard. A
-- constant default: Postgres adds the column without rewriting the table; a no-op where it exists.
ALTER TABLE usage_tracking ADD COLUMN IF NOT EXISTS overage bigint NOT NULL DEFAULT 0;
ALTER TABLE account_usage  ADD COLUMN IF NOT EXISTS overage bigint NOT NULL DEFAULT 0;
