//! Handlers of reservations: `POST /v1/reserve`, `POST /v1/reservations/{id}/commit` and
//! `POST /v1/reservations/{id}/cancel` (see [`crate::reservations`]).

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::quota::{json_response, parse_amount, DecisionAnswer, DecisionJson, MAX_AMOUNT};
use super::{
    check_idempotency_key, parse_user_id, short, whole_number, ApiJson, AppState, OptionalJson,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::quota::{known_type, Action};
use crate::reservations::{Closed, ReservationId, ReserveInput, State as Closing, MAX_TTL_SECS};
use crate::store::Settle;

/// Body of reserve.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "ai_generation", "amount": 2000, "ttl_seconds": 300}))]
pub struct ReserveRequest {
    /// The user, a UUID.
    #[schema(format = Uuid)]
    user_id: String,
    /// A configured usage type (see `GET /v1/plans`).
    #[serde(rename = "type")]
    usage_type: String,
    /// How much to hold: the most the work may cost. 1 to 1,000,000; default 1. A whole number;
    /// `3.0` is the same as `3`.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000000)]
    amount: Option<Value>,
    /// How long to hold it, in seconds, 1 to 86,400 (a day): a reservation neither committed
    /// nor cancelled by then frees itself. A whole number; `300.0` is the same as `300`.
    #[schema(value_type = u64, minimum = 1, maximum = 86400)]
    ttl_seconds: Value,
    /// Makes a retry hold once: the same key for the same user finds the reservation the first
    /// call made (its answer again, with `Idempotent-Replayed: true`) for as long as that
    /// reservation is kept (until 24 hours after it closed or expired). 1 to 255 characters,
    /// none of them a control character.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    idempotency_key: Option<String>,
}

/// A reservation held: its id and expiry beside the decision (consume's answer: the counter
/// shows what is used and what is held after it).
#[derive(Serialize, ToSchema)]
pub(crate) struct ReservationJson<'a> {
    /// Commit or cancel the reservation with this id.
    #[schema(pattern = "^rsv_[0-9a-f]{32}_[0-9a-f]{32}$")]
    reservation_id: String,
    /// What it holds.
    amount: u64,
    /// When it frees itself if neither committed nor cancelled (Redis' clock).
    expires_at: DateTime<Utc>,
    #[serde(flatten)]
    decision: DecisionJson<'a>,
}

/// Body of commit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": 1240}))]
pub struct CommitRequest {
    /// What the work actually cost: 0 up to what the reservation holds (a whole number; at
    /// most 1,000,000). It is counted, and the rest of the hold freed.
    #[schema(value_type = u64, minimum = 0, maximum = 1000000)]
    amount: Value,
}

/// Body of cancel: none, or an empty object.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {}

/// How a reservation ended.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StateJson {
    /// Its actual amount counted.
    Committed,
    /// Nothing counted.
    Cancelled,
}

/// The account's pool after a close.
#[derive(Serialize, ToSchema)]
pub(crate) struct ClosedPoolJson {
    /// The account the reservation held in.
    account_id: Uuid,
    /// The pool's count of the type after the close.
    used: u64,
    /// What open reservations hold in the pool after the close.
    held: u64,
}

/// A committed or cancelled reservation. A repeated commit (same amount) or cancel answers the
/// same, with `Idempotent-Replayed: true`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"reservation_id": "rsv_7c9e6679742540de944be07fc1f90ae7_3f2a9c0d1b7e4e0f9a6b5c4d3e2f1a0b",
    "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "ai_generation", "state": "committed",
    "amount": 2000, "committed": 1240, "released": 760, "late": false, "expires_at": "2026-11-15T12:05:00Z",
    "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z", "used": 41240, "held": 0}))]
pub(crate) struct ClosedJson {
    /// The reservation.
    #[schema(pattern = "^rsv_[0-9a-f]{32}_[0-9a-f]{32}$")]
    reservation_id: String,
    /// The user.
    user_id: Uuid,
    /// Its usage type.
    #[serde(rename = "type")]
    usage_type: String,
    /// `committed` or `cancelled`.
    state: StateJson,
    /// What it held.
    amount: u64,
    /// What was counted (0 for a cancel).
    committed: u64,
    /// What the close freed unused (0 when its expiry had freed it already).
    released: u64,
    /// True for a commit after the reservation expired: its hold had been freed, and the amount
    /// was counted anyway (the work was done), without a limit check, as a track counts.
    late: bool,
    /// When it expired, or would have.
    expires_at: DateTime<Utc>,
    /// First instant of the month it held in; null for lifetime types.
    period_start: Option<DateTime<Utc>>,
    /// First instant after that month; null for lifetime types.
    period_end: Option<DateTime<Utc>>,
    /// The user's count of the type in that period after the close.
    used: u64,
    /// What the user's open reservations of the type hold after the close.
    held: u64,
    /// For a reservation held in an account's pool: the pool after the close.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<ClosedPoolJson>,
}

impl From<&Closed> for ClosedJson {
    fn from(c: &Closed) -> Self {
        let monthly = c.period.end().is_some();
        ClosedJson {
            reservation_id: c.id.to_string(),
            user_id: c.id.user,
            usage_type: c.usage_type.clone(),
            state: match c.state {
                Closing::Committed => StateJson::Committed,
                Closing::Cancelled => StateJson::Cancelled,
            },
            amount: c.amount,
            committed: c.committed,
            released: c.released,
            late: c.late,
            expires_at: c.expires_at,
            period_start: monthly.then(|| c.period.start()),
            period_end: c.period.end(),
            used: c.used,
            held: c.held,
            account: c.account.map(|(account_id, used, held)| ClosedPoolJson {
                account_id,
                used,
                held,
            }),
        }
    }
}

/// The `{reservation_id}` of a route's path, read strictly: anything but an id quotad writes is
/// 400 `INVALID_RESERVATION_ID` in the JSON error body.
pub struct ReservationIdPath(pub ReservationId);

impl<S: Send + Sync> FromRequestParts<S> for ReservationIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(raw)| raw)
            .unwrap_or_default();
        let id = ReservationId::parse(&raw).ok_or_else(|| {
            ApiError::invalid(
                "INVALID_RESERVATION_ID",
                "reservation_id",
                format!(
                    "{} is not a reservation id; send the reservation_id that POST /v1/reserve answered (rsv_ followed by two groups of 32 lowercase hex digits).",
                    short(&format!("{raw:?}"))
                ),
            )
        })?;
        tracing::Span::current().record("user", tracing::field::display(&id.user));
        Ok(ReservationIdPath(id))
    }
}

/// `POST /v1/reserve`: hold an amount against the limit until the work's cost is known.
#[utoipa::path(
    post,
    path = "/v1/reserve",
    tag = "quota",
    description = "Hold an amount against every level's limit (the user's, and a member's account pool) for ttl_seconds, counting nothing yet: it fits only where used + held + amount stays within the limit, as a consume of it would, and consumes and checks count what is held as taken. Commit the actual amount or cancel with the reservation_id; one neither committed nor cancelled frees itself at its expiry. When Redis does not answer, 503 whatever the type's fail policy: no hold is made.",
    request_body = ReserveRequest,
    responses((status = 200, description = "Held: the reservation, and the counter after it", body = ReservationJson, headers(("RateLimit-Limit" = u64, description = "The limit (absent when unlimited)"), ("RateLimit-Remaining" = u64, description = "What is left beside what is used and held"), ("RateLimit-Reset" = u64, description = "Seconds until the period resets (absent for lifetime types)"))), (status = 402, description = "Refused: the amount does not fit beside what is used and held; nothing held", body = DecisionJson, headers(("Retry-After" = u64, description = "Seconds until the period resets"))), (status = 409, description = "IDEMPOTENCY_KEY_REUSED: the idempotency key made a reservation of another type or amount; nothing held", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn reserve(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReserveRequest>,
) -> Result<Response, ApiError> {
    let plans = state.quota.plans.current();
    let user = parse_user_id(&body.user_id)?;
    let usage_type = known_type(&plans, &body.usage_type)?;
    let amount = parse_amount(body.amount.as_ref(), "amount")?;
    let ttl_secs = whole_number(&body.ttl_seconds)
        .filter(|n| (1..=MAX_TTL_SECS).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_TTL",
                "ttl_seconds",
                format!(
                    "ttl_seconds must be a whole number from 1 to {MAX_TTL_SECS} (a day); got {}.",
                    short(&body.ttl_seconds.to_string())
                ),
            )
        })?;
    if let Some(key) = &body.idempotency_key {
        check_idempotency_key(key, "idempotency_key")?;
    }
    let input = ReserveInput {
        user,
        usage_type,
        amount,
        ttl_secs,
        idempotency_key: body.idempotency_key,
    };
    let reserved = state.quota.reserve(&input, &plans).await?;
    let answer = DecisionAnswer::new(&reserved.decision, Action::Consume, amount, &plans);
    let (status, headers) = (answer.status, answer.headers.clone());
    let body = match (&reserved.id, reserved.expires_at) {
        (Some(id), Some(expires_at)) => serde_json::to_vec(&ReservationJson {
            reservation_id: id.to_string(),
            amount,
            expires_at,
            decision: answer.into_json(),
        }),
        _ => Ok(answer.body()),
    }
    .map_err(|e| ApiError::internal(&e))?;
    Ok(json_response(status, headers, body))
}

/// `POST /v1/reservations/{reservation_id}/commit`: count the actual amount, free the rest.
#[utoipa::path(
    post,
    path = "/v1/reservations/{reservation_id}/commit",
    tag = "quota",
    description = "Count what the work actually cost (0 up to what the reservation holds) at every level it holds at, exactly as a track of it would (so the flusher writes it to Postgres), and free the rest of the hold. Idempotent: the same commit again answers as the first. A reservation past its expiry is counted anyway (`late`: the work was done), its hold having been freed.",
    params(("reservation_id" = String, Path, description = "What POST /v1/reserve answered", pattern = "^rsv_[0-9a-f]{32}_[0-9a-f]{32}$")),
    request_body = CommitRequest,
    responses((status = 200, description = "Committed (or the first commit again, with Idempotent-Replayed: true)", body = ClosedJson), (status = 400, description = "Bad input (INVALID_RESERVATION_ID, INVALID_AMOUNT…); changes nothing", body = ErrorBody), (status = 404, description = "UNKNOWN_RESERVATION: never made, closed more than 24 hours ago, or lost (Redis lost its data, or the user's account changed while it was open)", body = ErrorBody), (status = 409, description = "RESERVATION_CANCELLED: it was cancelled; RESERVATION_COMMITTED: it was committed with another amount; COMMIT_EXCEEDS_HOLD: the amount is more than it holds. Nothing changed", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn commit(
    State(state): State<AppState>,
    ReservationIdPath(id): ReservationIdPath,
    ApiJson(body): ApiJson<CommitRequest>,
) -> Result<Response, ApiError> {
    let amount = whole_number(&body.amount)
        .filter(|n| *n <= MAX_AMOUNT)
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_AMOUNT",
                "amount",
                format!(
                    "amount must be a whole number from 0 to {MAX_AMOUNT} (at most what the reservation holds); got {}.",
                    short(&body.amount.to_string())
                ),
            )
        })?;
    let closed = state.quota.close(&id, Settle::Commit(amount)).await?;
    Ok(closed_response(&closed))
}

/// `POST /v1/reservations/{reservation_id}/cancel`: free all of it.
#[utoipa::path(
    post,
    path = "/v1/reservations/{reservation_id}/cancel",
    tag = "quota",
    description = "Free all a reservation holds, counting nothing. Idempotent: a cancel again answers as the first. One that expired is cancelled too (its hold was freed already: released 0).",
    params(("reservation_id" = String, Path, description = "What POST /v1/reserve answered", pattern = "^rsv_[0-9a-f]{32}_[0-9a-f]{32}$")),
    request_body(content = Option<CancelRequest>, description = "Optional: no body, or {}"),
    responses((status = 200, description = "Cancelled (or the first cancel again, with Idempotent-Replayed: true)", body = ClosedJson), (status = 400, description = "Bad input (INVALID_RESERVATION_ID, UNKNOWN_FIELD…); changes nothing", body = ErrorBody), (status = 404, description = "UNKNOWN_RESERVATION: never made, closed more than 24 hours ago, or lost", body = ErrorBody), (status = 409, description = "RESERVATION_COMMITTED: it was committed; nothing changed", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    ReservationIdPath(id): ReservationIdPath,
    OptionalJson(_body): OptionalJson<CancelRequest>,
) -> Result<Response, ApiError> {
    let closed = state.quota.close(&id, Settle::Cancel).await?;
    Ok(closed_response(&closed))
}

fn closed_response(closed: &Closed) -> Response {
    let mut response = (StatusCode::OK, Json(ClosedJson::from(closed))).into_response();
    if closed.replayed {
        response.headers_mut().insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    response
}
