-- The outbox of usage events: written by the flusher in the same statement as the totals of the
-- counter that recorded them, read by the webhook dispatcher.

-- One row per event. `id` is derived from what the event is about (user, type, period,
-- threshold, limit), so recording the same crossing again keeps the first row.
CREATE TABLE IF NOT EXISTS usage_events (
    id           text        PRIMARY KEY,
    type         text        NOT NULL,
    user_id      uuid        NOT NULL,
    usage_type   text        NOT NULL,
    threshold    integer     NOT NULL,
    used         bigint      NOT NULL,
    "limit"      bigint      NOT NULL,
    plan         text        NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS usage_events_user ON usage_events (user_id, occurred_at);
CREATE INDEX IF NOT EXISTS usage_events_recorded ON usage_events (recorded_at, id);

-- One row per (event, webhook endpoint), made with the event for every endpoint configured then.
--   pending    to be sent at next_attempt_at (attempts > 0: it failed before, and is retried)
--   delivered  the endpoint answered 2xx
--   failed     every attempt failed; no more are made until an operator redelivers it
CREATE TABLE IF NOT EXISTS event_deliveries (
    event_id        text        NOT NULL REFERENCES usage_events (id) ON DELETE CASCADE,
    endpoint        text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS event_deliveries_due
    ON event_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS event_deliveries_status ON event_deliveries (status);
