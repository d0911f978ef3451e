//! Admin calls beyond plans: reconcile.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{ApiJson, AppState};
use crate::http::error::{ApiError, ErrorBody};
use crate::period::{Period, PeriodKind};
use crate::reconcile::{self, ReconcileError, Report};

/// Body of `POST /v1/admin/reconcile`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"period": "2026-11", "repair": false}))]
pub struct ReconcileRequest {
    /// `2026-11` or `lifetime`; the current month when absent.
    #[serde(default)]
    #[schema(pattern = r"^(lifetime|[0-9]{4}-(0[1-9]|1[0-2]))$")]
    period: Option<String>,
    /// Write the newer side over the older.
    #[serde(default)]
    repair: bool,
}

/// `POST /v1/admin/reconcile`: the drift between Redis and Postgres for one period.
#[utoipa::path(
    post,
    path = "/v1/admin/reconcile",
    tag = "admin",
    description = "Compare Redis with Postgres for one period (admin); with repair, write the newer side over the older.",
    request_body = ReconcileRequest,
    responses(
        (status = 200, description = "The report", body = Report),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Needs an admin token", body = ErrorBody),
        (status = 503, description = "Starting, overloaded (OVERLOADED), past the request deadline (TIMEOUT), or a dependency is down", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn reconcile(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReconcileRequest>,
) -> Result<Response, ApiError> {
    let now = state.quota.clock.now();
    let period = match &body.period {
        Some(p) => reconcile::parse_period(p).ok_or_else(|| {
            ApiError::invalid(
                "INVALID_PERIOD",
                "period",
                format!("period {p:?} is not a month such as \"2026-11\", or \"lifetime\"."),
            )
        })?,
        None => Period::current(PeriodKind::Month, now),
    };
    let report = reconcile::reconcile(
        &state.quota.store,
        &state.quota.db,
        period,
        body.repair,
        now,
    )
    .await
    .map_err(|e| match e {
        ReconcileError::Redis(e) => ApiError::from(e),
        ReconcileError::Db(e) => ApiError::from(e),
        ReconcileError::Flush(e) => ApiError::internal(&e),
    })?;
    if report.repaired + report.loaded > 0 {
        // Other replicas forget on the repair scripts' pub/sub messages.
        state.quota.refusals.forget_all();
    }
    Ok(Json(report).into_response())
}
