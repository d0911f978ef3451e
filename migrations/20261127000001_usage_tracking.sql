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

-- One row per (user, type, period): the upsert target of the flusher, and the hydration lookup.
CREATE UNIQUE INDEX IF NOT EXISTS usage_tracking_user_type_period
    ON usage_tracking (user_id, type, period_start);

-- A user's plan. `version` grows on every change, so Redis never takes an older plan over a newer.
CREATE TABLE IF NOT EXISTS user_plans (
    user_id    uuid        PRIMARY KEY,
    plan       text        NOT NULL,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
