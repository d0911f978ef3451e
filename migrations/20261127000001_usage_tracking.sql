-- The durable record of usage. Written so that it also upgrades a database that already has the
-- original product's usage_tracking table (id, user_id, type, count, period_start, period_end,
-- metadata): every statement only adds what is missing and keeps existing rows.
CREATE TABLE IF NOT EXISTS usage_tracking (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid        NOT NULL,
    type         text        NOT NULL,
    count        bigint      NOT NULL DEFAULT 0,
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version      bigint      NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE usage_tracking ADD COLUMN IF NOT EXISTS version    bigint      NOT NULL DEFAULT 0;
ALTER TABLE usage_tracking ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE usage_tracking ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE usage_tracking ADD COLUMN IF NOT EXISTS metadata   jsonb       NOT NULL DEFAULT '{}'::jsonb;
-- Lifetime counters have no end.
ALTER TABLE usage_tracking ALTER COLUMN period_end DROP NOT NULL;
-- Totals can pass 2^31 (token sums do; counts may); a no-op where it is bigint already.
ALTER TABLE usage_tracking ALTER COLUMN count TYPE bigint;

-- One row per (user, type, period): the upsert target of the flusher, and the hydration lookup.
-- The original table may carry such a unique constraint already (under another name): then it
-- serves, and a second index would only slow writes.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        WHERE i.indrelid = 'usage_tracking'::regclass
          AND i.indisunique
          AND i.indnkeyatts = 3
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
               FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
              = ARRAY['period_start', 'type', 'user_id']
    ) THEN
        CREATE UNIQUE INDEX usage_tracking_user_type_period
            ON usage_tracking (user_id, type, period_start);
    END IF;
END
$$;

-- A user's plan. `version` grows on every change, so Redis never takes an older plan over a newer.
CREATE TABLE IF NOT EXISTS user_plans (
    user_id    uuid        PRIMARY KEY,
    plan       text        NOT NULL,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
