//! The admin view of the outbox: usage events and their webhook deliveries, and redelivery.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{parse_user_id, ApiQuery, AppState};
use crate::db::{self, DeliveryState, DeliveryStatus};
use crate::http::error::{ApiError, ErrorBody};

/// Most events one listing returns.
const MAX_LISTED: i64 = 1000;
/// Longest event id accepted (ids are `evt_` and 32 hex digits).
const MAX_ID: usize = 64;

/// Query of `GET /v1/admin/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a delivery in this state.
    #[serde(default)]
    #[param(inline)]
    status: Option<DeliveryStatus>,
    /// Only this user's events (a UUID).
    #[serde(default)]
    user_id: Option<String>,
    /// Most events listed, 1 to 1000; default 100.
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// What a threshold event says: the webhook body's `data`.
#[derive(Serialize, ToSchema)]
pub(crate) struct EventData {
    user_id: Uuid,
    usage_type: String,
    /// Percent of the limit.
    threshold: i32,
    /// The count the crossing call reached.
    used: i64,
    /// The limit in force then.
    limit: i64,
    plan: String,
    period_start: DateTime<Utc>,
    /// `null` for lifetime counters.
    period_end: Option<DateTime<Utc>>,
}

/// One event with its deliveries.
#[derive(Serialize, ToSchema)]
pub(crate) struct EventJson {
    /// The stable id, sent as `webhook-id`.
    id: String,
    /// `usage.threshold`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// When the crossing call was counted.
    timestamp: DateTime<Utc>,
    /// When the outbox got it.
    recorded_at: DateTime<Utc>,
    data: EventData,
    /// One per webhook endpoint configured when it was recorded (none without endpoints).
    deliveries: Vec<DeliveryState>,
}

/// `GET /v1/admin/events` answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct EventsJson {
    /// Newest first.
    events: Vec<EventJson>,
}

/// `GET /v1/admin/events`: the outbox.
#[utoipa::path(
    get,
    path = "/v1/admin/events",
    tag = "admin",
    description = "Usage events (threshold crossings) newest first, with each webhook delivery's state (admin). `status=failed` lists those whose delivery failed every attempt; `status=retrying` those failing now.",
    params(EventsQuery),
    responses(
        (status = 200, description = "The events", body = EventsJson),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 403, description = "Needs an admin token", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LISTED).contains(&limit) {
        return Err(ApiError::invalid(
            "INVALID_QUERY",
            "limit",
            format!("limit must be 1 to {MAX_LISTED}; got {limit}."),
        ));
    }
    let user = query.user_id.as_deref().map(parse_user_id).transpose()?;
    let rows = db::within(
        state.quota.db_timeout,
        db::list_events(&state.quota.db, query.status, user, limit),
    )
    .await?;
    let events = rows
        .into_iter()
        .map(|(e, recorded_at, deliveries)| EventJson {
            kind: crate::events::THRESHOLD,
            timestamp: e.occurred_at,
            recorded_at,
            data: EventData {
                user_id: e.user,
                usage_type: e.usage_type,
                threshold: e.threshold,
                used: e.used,
                limit: e.limit,
                plan: e.plan,
                period_start: e.period_start,
                period_end: e.period_end,
            },
            id: e.id,
            deliveries,
        })
        .collect();
    Ok(Json(EventsJson { events }).into_response())
}

/// `POST /v1/admin/events/{id}/redeliver` answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct RedeliverJson {
    id: String,
    /// Failed deliveries put back to pending (0 when none had failed).
    requeued: u64,
}

/// `POST /v1/admin/events/{id}/redeliver`: tries an event's failed deliveries again.
#[utoipa::path(
    post,
    path = "/v1/admin/events/{id}/redeliver",
    tag = "admin",
    description = "Put an event's failed webhook deliveries back to pending, due now, with a fresh count of attempts (admin). Delivered and pending ones are left as they are.",
    params(("id" = String, Path, description = "The event id, evt_ and 32 hex digits")),
    responses(
        (status = 200, description = "Put back", body = RedeliverJson),
        (status = 400, description = "Not an event id", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 403, description = "Needs an admin token", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let valid = id.len() <= MAX_ID
        && id
            .strip_prefix("evt_")
            .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return Err(ApiError::invalid(
            "INVALID_EVENT_ID",
            "id",
            format!(
                "{} is not an event id; ids are evt_ and 32 hex digits, as GET /v1/admin/events lists them.",
                super::short(&format!("{id:?}"))
            ),
        ));
    }
    match db::within(state.quota.db_timeout, db::redeliver(&state.quota.db, &id)).await? {
        Some(requeued) => Ok(Json(RedeliverJson { id, requeued }).into_response()),
        None => Err(ApiError::not_found(
            "EVENT_NOT_FOUND",
            format!("There is no event {id}."),
        )),
    }
}
