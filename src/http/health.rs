//! Liveness, readiness and metrics, and the check of Redis's eviction policy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::db;
use crate::metrics as m;
use crate::store::RedisStore;
use deadpool_redis::redis;

/// `GET /healthz`: the process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "ops", description = "Alive.",
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"}))))]
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: Redis answers, Postgres answers, and every migration is applied.
///
/// Anyone may ask, so the body says only which dependency is at fault, in a fixed sentence;
/// the driver's own text (which can carry hosts, users and source locations) goes to the log.
#[utoipa::path(get, path = "/readyz", tag = "ops", description = "Ready: Redis and Postgres answer, migrations are applied, and Redis will not evict counters.",
    responses(
        (status = 200, description = "Ready", body = Object,
            example = json!({"status": "ready", "redis": "ok", "postgres": "ok", "started": true,
                "redis_mode": "cluster", "redis_masters": 3})),
        (status = 503, description = "Not ready; the fields say which dependency", body = Object,
            example = json!({"status": "not ready", "redis": "redis: not answering", "postgres": "ok",
                "started": true, "code": "NOT_READY", "error": "quotad is not ready: see the redis and postgres fields."})),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let redis = match state.quota.store.ping().await {
        Ok(()) => match state.eviction.refusal() {
            Some(why) => why,
            None => "ok".to_owned(),
        },
        Err(e) => {
            tracing::warn!(error.message = %e, "readiness: redis did not answer");
            "redis: not answering".to_owned()
        }
    };
    let applied = db::migrations_applied(&state.quota.db);
    let postgres = match db::within(state.quota.db_timeout, applied).await {
        Ok(true) => "ok".to_owned(),
        Ok(false) => "postgres: migrations not applied".to_owned(),
        Err(e) => {
            tracing::warn!(error.message = %e, "readiness: postgres did not answer");
            "postgres: not answering".to_owned()
        }
    };
    let started = state.ready.load(Ordering::Acquire);
    let ready = started && redis == "ok" && postgres == "ok";
    let mut body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "redis": redis,
        "postgres": postgres,
        "started": started,
    });
    // One Redis or a cluster, as found at the first connection.
    if let Some(t) = state.quota.store.topology() {
        body["redis_mode"] = json!(t.mode);
        body["redis_masters"] = json!(t.masters);
    }
    if ready {
        Json(body).into_response()
    } else {
        body["code"] = json!("NOT_READY");
        body["error"] = json!("quotad is not ready: see the redis and postgres fields.");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Redis's `maxmemory-policy`, as quotad last saw it.
///
/// Anything but `noeviction` is refused: an evicting Redis deletes counters silently (a user's
/// spent quota comes back; the `volatile-*` policies pick exactly the month hashes, which carry an
/// expiry), and the month-start marker relies on keys staying until they expire. While refused,
/// the API answers 503 `NOT_READY` and `/readyz` says why; the check runs again every few seconds,
/// so fixing Redis is enough. A Redis that does not allow `CONFIG GET` (managed services rename
/// it) cannot be checked: quotad logs a warning and goes on.
#[derive(Default)]
pub struct EvictionCheck {
    refused: AtomicBool,
    policy: Mutex<Option<String>>,
}

/// What one look at the policy found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// `noeviction`.
    Safe,
    /// A policy that evicts keys.
    Evicting(String),
    /// Redis refused `CONFIG GET`: cannot be verified.
    Unverifiable,
    /// Redis did not answer; nothing learned.
    Unknown,
}

impl EvictionCheck {
    /// Whether quotad currently refuses to serve because of the policy.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// The `/readyz` sentence while refused.
    fn refusal(&self) -> Option<String> {
        if !self.refused() {
            return None;
        }
        let policy = self.policy.lock().ok()?.clone()?;
        Some(format!(
            "redis: maxmemory-policy is {policy}, which could evict counters; set it to noeviction"
        ))
    }

    /// Asks Redis for its policy (within `timeout`) and records the answer; logs a change.
    pub async fn run(&self, store: &RedisStore, timeout: Duration) -> Policy {
        let policy = look(store, timeout).await;
        let was = self.refused();
        match &policy {
            Policy::Safe => self.refused.store(false, Ordering::Release),
            Policy::Evicting(name) => {
                if let Ok(mut p) = self.policy.lock() {
                    *p = Some(name.clone());
                }
                self.refused.store(true, Ordering::Release);
                if !was {
                    tracing::error!(policy = %name, "redis maxmemory-policy is {name}: it could evict counters and month-start markers; quotad refuses to count until it is noeviction (CONFIG SET maxmemory-policy noeviction)");
                }
            }
            Policy::Unverifiable => self.refused.store(false, Ordering::Release),
            Policy::Unknown => {}
        }
        if was && !self.refused() {
            tracing::info!("redis maxmemory-policy is acceptable again; serving");
        }
        metrics::gauge!(m::REDIS_EVICTION_REFUSED).set(if self.refused() { 1.0 } else { 0.0 });
        policy
    }
}

/// The policy of the one Redis, or the worst of a cluster's masters.
async fn look(store: &RedisStore, timeout: Duration) -> Policy {
    let asked = store
        .ask_each_master::<Vec<String>>(
            redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
            timeout,
        )
        .await
        .ok_or(())
        .map(|r| {
            r.map(|pairs| {
                // Any master that evicts is reason enough; else the first's answer.
                pairs
                    .iter()
                    .find(|p| p.get(1).is_some_and(|p| p != "noeviction"))
                    .or(pairs.first())
                    .cloned()
                    .unwrap_or_default()
            })
        });
    match asked {
        Ok(Ok(pair)) => match pair.get(1) {
            Some(p) if p == "noeviction" => Policy::Safe,
            // Only a policy name goes into the state and /readyz, never other text.
            Some(p)
                if !p.is_empty()
                    && p.len() <= 32
                    && p.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') =>
            {
                Policy::Evicting(p.clone())
            }
            _ => {
                tracing::warn!("redis did not report its maxmemory-policy; cannot verify that counters are never evicted");
                Policy::Unverifiable
            }
        },
        // An error reply (unknown command, NOPERM): Redis answers, but will not say.
        Ok(Err(e)) if e.code().is_some_and(|c| c != "LOADING" && c != "BUSY") => {
            tracing::warn!(error.message = %e, "redis does not allow CONFIG GET maxmemory-policy; cannot verify that counters are never evicted (make sure it is noeviction)");
            Policy::Unverifiable
        }
        Ok(Err(e)) => {
            tracing::debug!(error.message = %e, "redis did not answer CONFIG GET");
            Policy::Unknown
        }
        Err(_) => Policy::Unknown,
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", description = "Prometheus text format.",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}
