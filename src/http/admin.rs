//! The admin calls: a user's plan (set and read) and reconcile.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, AppState, UserIdPath};
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
        (status = 403, description = "Needs an admin token", body = ErrorBody),
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

/// Body of a plan change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plan": "PRO"}))]
pub struct PlanRequest {
    /// A configured plan.
    pub(crate) plan: String,
}

/// A user's plan.
#[derive(Serialize, ToSchema)]
pub(crate) struct PlanJson {
    /// The user.
    user_id: Uuid,
    /// The plan in force.
    plan: String,
    /// No plan is stored; the default applies.
    is_default: bool,
    /// When it was last set.
    updated_at: Option<DateTime<Utc>>,
}

impl From<crate::quota::UserPlan> for PlanJson {
    fn from(p: crate::quota::UserPlan) -> Self {
        PlanJson {
            user_id: p.user,
            plan: p.plan,
            is_default: p.is_default,
            updated_at: p.updated_at,
        }
    }
}

/// `PUT /v1/users/{user_id}/plan`: set a user's plan; in force on the next request everywhere.
#[utoipa::path(
    put,
    path = "/v1/users/{user_id}/plan",
    tag = "admin",
    description = "Set a user's plan (admin). In force on the next request, on every replica.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    request_body = PlanRequest,
    responses((status = 200, description = "Stored and in force", body = PlanJson), (status = 403, description = "Needs an admin token", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn put_plan(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    ApiJson(body): ApiJson<PlanRequest>,
) -> Result<Response, ApiError> {
    let p = state.quota.set_plan(user, &body.plan).await?;
    Ok(Json(PlanJson::from(p)).into_response())
}

/// `GET /v1/users/{user_id}/plan`: a user's plan.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/plan",
    tag = "admin",
    description = "Read a user's plan (admin).",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    responses((status = 200, description = "The plan", body = PlanJson), (status = 400, description = "Not a UUID", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_plan(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
) -> Result<Response, ApiError> {
    let p = state.quota.get_plan(user).await?;
    Ok(Json(PlanJson::from(p)).into_response())
}
