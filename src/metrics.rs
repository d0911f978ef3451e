//! Prometheus metrics: names as constants, descriptions registered once, and the recorder.
//! Labels are type, plan, outcome, route and status: never a user id.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Decisions, by `type`, `plan` and `outcome` (allowed, denied, error, degraded).
pub const DECISIONS: &str = "quotad_decisions_total";
/// Rows written by usage exports (`GET /v1/admin/usage/export`), by `format`.
pub const EXPORT_ROWS: &str = "quotad_export_rows_total";
/// Usage exports that ended, by `format` and `outcome`: `completed` (every row sent) or `aborted`
/// (Postgres failed mid-stream; the body ended without its last chunk). A client that goes away
/// is neither.
pub const EXPORTS: &str = "quotad_exports_total";
/// Usage exports streaming now (at most 2 per daemon).
pub const EXPORTS_RUNNING: &str = "quotad_exports_running";
/// Usage events deleted from the outbox past `QUOTAD_EVENT_RETENTION_DAYS`.
pub const EVENTS_PRUNED: &str = "quotad_events_pruned_total";
/// Calls with items (several types in one call, all or nothing), by `action` (consume, check,
/// track) and `outcome` (allowed, denied, degraded, error). Each item is also counted in
/// `quotad_decisions_total`, with the call's outcome.
pub const ITEM_CALLS: &str = "quotad_item_calls_total";
/// Decisions that left a limited counter at 80 % or more of its limit, by `type` and `plan`.
pub const NEAR_LIMIT: &str = "quotad_near_limit_decisions_total";
/// Units counted past a limit as overage (consume and track; a replay counts none), by `type`,
/// `plan` and `level` (`user`, or `account` for an account's pool).
pub const OVERAGE_UNITS: &str = "quotad_overage_units_total";
/// Consumes and tracks that counted some overage, by `type` and `plan` (the user's).
pub const OVERAGE_DECISIONS: &str = "quotad_overage_decisions_total";
/// Drifting counters found by the last reconcile, by `period` and `kind`.
pub const RECONCILE_DRIFT: &str = "quotad_reconcile_drift_counters";
/// HTTP request latency, by `route`, `method` and `status`.
pub const REQUEST_SECONDS: &str = "quotad_http_request_duration_seconds";
/// Time spent in Redis for one decision (including any hydration), by `script`.
pub const REDIS_SCRIPT_SECONDS: &str = "quotad_redis_script_duration_seconds";
/// Failed Redis calls, by `kind` (unavailable: timeout or connection; error: Redis answered an error).
pub const REDIS_ERRORS: &str = "quotad_redis_errors_total";
/// Counters loaded from Postgres into Redis.
pub const HYDRATIONS: &str = "quotad_hydrations_total";
/// Batches of counter loads: each one Postgres statement and one Redis pipeline.
pub const HYDRATE_BATCHES: &str = "quotad_hydrate_batches_total";
/// Distinct counters loaded per batch.
pub const HYDRATE_BATCH_COUNTERS: &str = "quotad_hydrate_batch_counters";
/// Postgres rows written by the flusher.
pub const FLUSH_ROWS: &str = "quotad_flush_rows_total";
/// Failed flusher passes.
pub const FLUSH_ERRORS: &str = "quotad_flush_errors_total";
/// Counters the flusher could not write because Postgres refused their data; they stay dirty.
pub const FLUSH_REJECTED: &str = "quotad_flush_rejected_counters_total";
/// Counters Redis held at a lower version than Postgres, raised to Postgres' by the flusher.
pub const FLUSH_BEHIND: &str = "quotad_flush_behind_counters_total";
/// Counters read per flusher pass.
pub const FLUSH_BATCH: &str = "quotad_flush_batch_counters";
/// Duration of one flusher pass.
pub const FLUSH_SECONDS: &str = "quotad_flush_duration_seconds";
/// Counters changed in Redis and not yet written to Postgres.
pub const FLUSH_BACKLOG: &str = "quotad_flush_backlog_counters";
/// Age of the oldest change not yet written to Postgres.
pub const FLUSH_OLDEST_SECONDS: &str = "quotad_flush_oldest_dirty_age_seconds";
/// Refusals answered from the near-cache without a Redis call, by `type`.
pub const REFUSAL_CACHE_HITS: &str = "quotad_refusal_cache_hits_total";
/// 1 while the refusal cache is subscribed to invalidations (and so in use), else 0.
pub const REFUSAL_CACHE_LIVE: &str = "quotad_refusal_cache_live";
/// Plans-file reloads, by `result` (ok, error).
pub const PLAN_RELOADS: &str = "quotad_plan_reloads_total";
/// API requests (HTTP, and gRPC calls too, which share the cap) answered 503 (gRPC:
/// `UNAVAILABLE`) without running or finishing, by `reason`: `overloaded` (over
/// `QUOTAD_MAX_IN_FLIGHT`) or `timeout` (past `QUOTAD_REQUEST_TIMEOUT_MS`). The name keeps its
/// `http` for the dashboards and alerts that use it.
pub const SHED: &str = "quotad_http_shed_total";
/// Background tasks that stopped before the daemon did and were started again, by `task`
/// (flusher, invalidations, startup, reload) and `how` (panicked, returned).
pub const TASK_RESTARTS: &str = "quotad_task_restarts_total";
/// 1 while Redis's `maxmemory-policy` could evict counters (quotad then refuses to serve), else 0.
pub const REDIS_EVICTION_REFUSED: &str = "quotad_redis_eviction_policy_refused";
/// The Redis quotad talks to, by `mode` (`single` or `cluster`): the masters serving slots
/// (1 for a single Redis).
pub const REDIS_MASTERS: &str = "quotad_redis_masters";
/// Counting calls whose write Redis did not confirm on `QUOTAD_REDIS_WAIT_REPLICAS` replicas in
/// time: answered with the type's fail policy (the master may still hold the count).
pub const REDIS_UNREPLICATED: &str = "quotad_redis_unreplicated_decisions_total";

/// Envoy rate-limit calls (`ShouldRateLimit`) over gRPC, by `code`: `OK`, `OVER_LIMIT` (an
/// answered refusal), or the gRPC status of an error (`INVALID_ARGUMENT`, `UNAVAILABLE`, …).
pub const GRPC_REQUESTS: &str = "quotad_grpc_requests_total";
/// Latency of one `ShouldRateLimit` call, by `code` as in [`GRPC_REQUESTS`].
pub const GRPC_SECONDS: &str = "quotad_grpc_request_duration_seconds";

/// Reservations, by `type` and `outcome`: `opened`, `refused` (did not fit: 402), `committed`,
/// `committed_late` (after its expiry), `cancelled`, `expired` (freed by the sweeper, or by a
/// commit that found it due).
pub const RESERVATIONS: &str = "quotad_reservations_total";
/// Units of reservations, by `type` and `outcome`: `held` (put on hold by `opened` ones),
/// `committed` (counted by commits in time), `released` (freed unused by those commits and by
/// cancels), `expired` (freed by expiry), `committed_late` (counted by commits after expiry).
/// Held less committed, released and expired is what open reservations hold now (summed over
/// every replica).
pub const RESERVATION_UNITS: &str = "quotad_reservation_units_total";
/// Sweeper passes over the open reservations that failed (Redis did not answer).
pub const SWEEP_ERRORS: &str = "quotad_reservation_sweep_errors_total";
/// Threshold events new to Postgres' outbox, written by the flusher.
pub const EVENTS_RECORDED: &str = "quotad_events_recorded_total";
/// Webhook delivery attempts, by `result`: `delivered` (2xx), `failed` (any other answer, or
/// none in time: retried later), `gave_up` (the last attempt failed; the delivery is `failed`).
pub const WEBHOOK_ATTEMPTS: &str = "quotad_webhook_attempts_total";
/// Webhook deliveries not yet made (pending, retries included), as the dispatcher last counted.
pub const WEBHOOK_PENDING: &str = "quotad_webhook_pending_deliveries";
/// Webhook deliveries that failed every attempt and wait for an operator (status `failed`).
pub const WEBHOOK_FAILED: &str = "quotad_webhook_failed_deliveries";
/// Latency of one webhook attempt.
pub const WEBHOOK_SECONDS: &str = "quotad_webhook_attempt_duration_seconds";

/// Latency buckets, in seconds: fine below a millisecond, where quotad's answers live.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

/// Batch-size buckets, in counters: powers of two up to the largest batch.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the global recorder once per process and returns its handle (tests start many apps
/// in one process; they share it).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full(HYDRATE_BATCH_COUNTERS.into()),
                    &BATCH_BUCKETS,
                )
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(DECISIONS, "Quota decisions by type, plan and outcome.");
    metrics::describe_counter!(EXPORT_ROWS, "Rows written by usage exports, by format.");
    metrics::describe_counter!(
        EXPORTS,
        "Usage exports that ended, by format and outcome (completed, aborted)."
    );
    metrics::describe_gauge!(EXPORTS_RUNNING, "Usage exports streaming now.");
    metrics::describe_counter!(
        EVENTS_PRUNED,
        "Usage events deleted from the outbox past their retention."
    );
    metrics::describe_counter!(
        ITEM_CALLS,
        "Calls with items (several types, all or nothing) by action and outcome."
    );
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency."
    );
    metrics::describe_histogram!(
        REDIS_SCRIPT_SECONDS,
        metrics::Unit::Seconds,
        "Redis time of one decision."
    );
    metrics::describe_counter!(HYDRATIONS, "Counters loaded from Postgres into Redis.");
    metrics::describe_counter!(
        HYDRATE_BATCHES,
        "Batches of counter loads (one Postgres statement and one Redis pipeline each)."
    );
    metrics::describe_histogram!(
        HYDRATE_BATCH_COUNTERS,
        "Distinct counters loaded per batch."
    );
    metrics::describe_counter!(REDIS_ERRORS, "Failed Redis calls by kind.");
    metrics::describe_gauge!(
        REDIS_MASTERS,
        "Masters serving slots in the Redis quotad talks to, by mode (single, cluster)."
    );
    metrics::describe_counter!(
        REDIS_UNREPLICATED,
        "Counting calls whose write no replica confirmed within the wait (QUOTAD_REDIS_WAIT_REPLICAS); answered with the fail policy."
    );
    metrics::describe_counter!(
        NEAR_LIMIT,
        "Decisions leaving a limited counter at 80 % or more of its limit."
    );
    metrics::describe_counter!(
        OVERAGE_UNITS,
        "Units counted past a limit as overage, by type, plan and level (user, account)."
    );
    metrics::describe_counter!(
        OVERAGE_DECISIONS,
        "Consumes and tracks that counted some overage, by type and plan."
    );
    metrics::describe_gauge!(
        RECONCILE_DRIFT,
        "Drifting counters found by the last reconcile, by period and kind."
    );
    metrics::describe_counter!(
        REFUSAL_CACHE_HITS,
        "Refusals answered from the near-cache without a Redis call."
    );
    metrics::describe_gauge!(
        REFUSAL_CACHE_LIVE,
        "1 while the refusal cache is subscribed to invalidations, else 0."
    );
    metrics::describe_counter!(
        GRPC_REQUESTS,
        "Envoy rate-limit calls over gRPC, by code (OK, OVER_LIMIT, or the gRPC error status)."
    );
    metrics::describe_histogram!(
        GRPC_SECONDS,
        metrics::Unit::Seconds,
        "Latency of one Envoy rate-limit call over gRPC."
    );
    metrics::describe_counter!(PLAN_RELOADS, "Plans-file reloads by result.");
    metrics::describe_counter!(
        TASK_RESTARTS,
        "Background tasks that stopped before the daemon and were started again, by task and how."
    );
    metrics::describe_counter!(
        SHED,
        "API requests (HTTP and gRPC) answered 503 / UNAVAILABLE without running or finishing, by reason (overloaded, timeout)."
    );
    metrics::describe_gauge!(
        REDIS_EVICTION_REFUSED,
        "1 while Redis's maxmemory-policy could evict counters and quotad refuses to serve."
    );
    metrics::describe_counter!(
        RESERVATIONS,
        "Reservations by type and outcome (opened, refused, committed, committed_late, cancelled, expired)."
    );
    metrics::describe_counter!(
        RESERVATION_UNITS,
        "Units of reservations by type and outcome (held, committed, released, expired, committed_late)."
    );
    metrics::describe_counter!(
        SWEEP_ERRORS,
        "Sweeper passes over the open reservations that failed."
    );
    metrics::describe_counter!(
        EVENTS_RECORDED,
        "Threshold events new to the Postgres outbox (usage_events)."
    );
    metrics::describe_counter!(
        WEBHOOK_ATTEMPTS,
        "Webhook delivery attempts by result (delivered, failed: retried later, gave_up: the last attempt failed)."
    );
    metrics::describe_gauge!(
        WEBHOOK_PENDING,
        "Webhook deliveries not yet made, retries included."
    );
    metrics::describe_gauge!(
        WEBHOOK_FAILED,
        "Webhook deliveries that failed every attempt (status failed), waiting for a redelivery."
    );
    metrics::describe_histogram!(
        WEBHOOK_SECONDS,
        metrics::Unit::Seconds,
        "Latency of one webhook attempt."
    );
    metrics::describe_counter!(FLUSH_ROWS, "Postgres rows written by the flusher.");
    metrics::describe_counter!(FLUSH_ERRORS, "Failed flusher passes.");
    metrics::describe_counter!(
        FLUSH_REJECTED,
        "Counters Postgres refused to store for their data; left dirty, tried again last."
    );
    metrics::describe_counter!(
        FLUSH_BEHIND,
        "Counters Redis held at a lower version than Postgres, raised to Postgres' counts."
    );
    metrics::describe_histogram!(FLUSH_BATCH, "Counters read per flusher pass.");
    metrics::describe_histogram!(
        FLUSH_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one flusher pass."
    );
    metrics::describe_gauge!(
        FLUSH_BACKLOG,
        "Counters changed in Redis and not yet in Postgres."
    );
    metrics::describe_gauge!(
        FLUSH_OLDEST_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest unflushed change."
    );
}

/// Counts one decision.
pub fn decision(usage_type: &str, plan: &str, outcome: &'static str) {
    metrics::counter!(DECISIONS, "type" => usage_type.to_owned(), "plan" => plan.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// Counts one call with items.
pub fn items_call(action: &'static str, outcome: &'static str) {
    metrics::counter!(ITEM_CALLS, "action" => action, "outcome" => outcome).increment(1);
}

/// Counts one decision that left a counter at 80 % or more of its limit.
pub fn near_limit(usage_type: &str, plan: &str) {
    metrics::counter!(NEAR_LIMIT, "type" => usage_type.to_owned(), "plan" => plan.to_owned())
        .increment(1);
}

/// Counts the overage one consume or track counted: `user` units at the user's level (under
/// `plan`), and for a member the pool's plan and units. Nothing is recorded for a call that
/// counted none.
pub fn overage(usage_type: &str, plan: &str, user: u64, pool: Option<(&str, u64)>) {
    let pool_units = pool.map_or(0, |(_, n)| n);
    if user == 0 && pool_units == 0 {
        return;
    }
    if user > 0 {
        metrics::counter!(OVERAGE_UNITS, "type" => usage_type.to_owned(), "plan" => plan.to_owned(), "level" => "user")
            .increment(user);
    }
    if let Some((pool_plan, n)) = pool.filter(|(_, n)| *n > 0) {
        metrics::counter!(OVERAGE_UNITS, "type" => usage_type.to_owned(), "plan" => pool_plan.to_owned(), "level" => "account")
            .increment(n);
    }
    metrics::counter!(OVERAGE_DECISIONS, "type" => usage_type.to_owned(), "plan" => plan.to_owned())
        .increment(1);
}

/// Counts a reservation's outcome, and the units it moved (`units`: its `RESERVATION_UNITS`
/// outcome and how many; none when 0).
pub fn reservation(usage_type: &str, outcome: &'static str, units: &[(&'static str, u64)]) {
    metrics::counter!(RESERVATIONS, "type" => usage_type.to_owned(), "outcome" => outcome)
        .increment(1);
    for (kind, n) in units {
        if *n > 0 {
            metrics::counter!(RESERVATION_UNITS, "type" => usage_type.to_owned(), "outcome" => *kind)
                .increment(*n);
        }
    }
}
