//! Liveness, readiness and metrics.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::db;

/// `GET /healthz`: the process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "ops", description = "Alive.",
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"}))))]
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: Redis answers, Postgres answers, and every migration is applied.
#[utoipa::path(get, path = "/readyz", tag = "ops", description = "Ready: Redis and Postgres answer and migrations are applied.",
    responses(
        (status = 200, description = "Ready", body = Object,
            example = json!({"status": "ready", "redis": "ok", "postgres": "ok", "started": true})),
        (status = 503, description = "Not ready; the fields say which dependency", body = Object,
            example = json!({"status": "not ready", "redis": "redis unavailable: no answer within 100 ms", "postgres": "ok",
                "started": true, "code": "NOT_READY", "error": "quotad is not ready: see the redis and postgres fields."})),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let redis = match state.quota.store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let applied = db::migrations_applied(&state.quota.db);
    let postgres = match db::within(state.quota.db_timeout, applied).await {
        Ok(true) => "ok".to_owned(),
        Ok(false) => "migrations not applied".to_owned(),
        Err(e) => format!("unavailable: {e}"),
    };
    let started = state.ready.load(Ordering::Acquire);
    let ready = started && redis == "ok" && postgres == "ok";
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "redis": redis,
        "postgres": postgres,
        "started": started,
    });
    if ready {
        Json(body).into_response()
    } else {
        let mut body = body;
        body["code"] = json!("NOT_READY");
        body["error"] = json!("quotad is not ready: see the redis and postgres fields.");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
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
