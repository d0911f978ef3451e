-- Accounts (organisations, teams): a plan and a pool per usage type, shared by their members.

-- An account's plan. `version` grows on every change, like user_plans'.
CREATE TABLE IF NOT EXISTS account_plans (
    account_id uuid        PRIMARY KEY,
    plan       text        NOT NULL,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Which account a user belongs to (at most one). A row stays when the user leaves (account_id
-- NULL), so its version keeps growing across changes.
CREATE TABLE IF NOT EXISTS account_members (
    user_id    uuid        PRIMARY KEY,
    account_id uuid,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS account_members_account ON account_members (account_id);

-- An account's totals, one row per (account, type, period): usage_tracking's shape, written by
-- the flusher the same way (absolute totals, guarded by version).
CREATE TABLE IF NOT EXISTS account_usage (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id   uuid        NOT NULL,
    type         text        NOT NULL,
    count        bigint      NOT NULL DEFAULT 0,
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version      bigint      NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, type, period_start)
);

-- Limits set for one customer (a user or an account), overriding their plan's: {"type": limit},
-- -1 = unlimited. `version` grows on every change, so Redis never takes an older set over a newer.
CREATE TABLE IF NOT EXISTS limit_overrides (
    owner      text        NOT NULL CHECK (owner IN ('user', 'account')),
    owner_id   uuid        NOT NULL,
    limits     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, owner_id)
);
