//! The one error type of the HTTP API. Every error answers `{"error": "<sentence>", "code":
//! "<CODE>"}` plus `"field"` where one input is at fault. A 5xx logs its cause and tells the
//! client only what it can act on. The domain's errors ([`QuotaError`], [`StoreError`], Postgres')
//! get their status, code and sentence here, and only here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::quota::QuotaError;
use crate::reservations::ReservationError;
use crate::store::{StoreError, MAX_METADATA_NAMES};

/// An API error: status, machine-readable code, and a sentence a person can act on.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `INVALID_AMOUNT`.
    pub code: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// The request field at fault, if one is.
    pub field: Option<String>,
}

/// Every error's body.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": "amount must be a whole number from 1 to 1000000; got 0.", "code": "INVALID_AMOUNT", "field": "amount"}))]
pub struct ErrorBody<'a> {
    /// A sentence a person can act on.
    error: &'a str,
    /// A stable machine-readable code.
    code: &'a str,
    /// The request field at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 400, naming the field at fault.
    pub fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 401: no or unknown credentials.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403: credentials known, but not enough.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 413: the body is over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "The request body is over {} KiB; send a smaller body.",
                limit / 1024
            ),
        )
    }

    /// 503: a dependency is down; the client may retry.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// 500: logs the cause, tells the client nothing internal.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error.message = %cause, error.cause_chain = ?cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "quotad hit an internal error; it has been logged. Retry, and report it if it persists.",
        )
    }

    /// Redis is down or slow, for calls with no fail-open answer.
    pub fn redis_unavailable(cause: &StoreError) -> Self {
        tracing::warn!(error.message = %cause, "redis unavailable");
        Self::unavailable(
            "REDIS_UNAVAILABLE",
            "The usage store (Redis) is not answering; retry shortly.",
        )
    }

    /// Postgres is down or slow.
    pub fn db_unavailable(cause: &sqlx::Error) -> Self {
        tracing::warn!(error.message = %cause, "postgres unavailable");
        Self::unavailable(
            "DATABASE_UNAVAILABLE",
            "The database (Postgres) is not answering; retry shortly.",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Unavailable(_) => Self::redis_unavailable(&e),
            StoreError::Refused { reason, .. } => {
                tracing::warn!(error.message = %e, "redis refused a call");
                Self::unavailable(
                    "REDIS_UNAVAILABLE",
                    format!("The usage store (Redis) refused the call: {reason}. Nothing was counted; retry shortly."),
                )
            }
            StoreError::Redis(_) => Self::internal(&e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => Self::db_unavailable(&e),
            other => Self::internal(&other),
        }
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::UnknownType { name, known } => Self::invalid(
                "UNKNOWN_TYPE",
                "type",
                format!(
                    "{name:?} is not a configured usage type; use one of: {}.",
                    known.join(", ")
                ),
            ),
            QuotaError::UnknownPlan { name, known } => Self::invalid(
                "UNKNOWN_PLAN",
                "plan",
                format!(
                    "{name:?} is not a configured plan; use one of: {}.",
                    known.join(", ")
                ),
            ),
            QuotaError::NotALifetimeType(ty) => Self::invalid(
                "NOT_A_LIFETIME_TYPE",
                "type",
                format!("{ty} is counted per month and resets by itself; release only lowers lifetime types. To give back one consume, use /v1/refund."),
            ),
            QuotaError::TooManyMetadataNames => Self::invalid(
                "TOO_MANY_METADATA_KEYS",
                "metadata",
                format!(
                    "This counter already holds the most metadata names it may ({MAX_METADATA_NAMES}); send metadata under names it already has, or none."
                ),
            ),
            QuotaError::MetadataSumTooLarge(name) => Self::invalid(
                "INVALID_METADATA",
                "metadata",
                format!(
                    "The sum of {name} in this counter would exceed ±{:e}, the largest number it can hold; nothing was counted. Send a smaller value, or this value under a new name.",
                    f64::MAX
                ),
            ),
            QuotaError::KeyRefunded => Self::conflict(
                "IDEMPOTENCY_KEY_REFUNDED",
                "This idempotency_key was refunded; a refunded call is over — send the retry with a new key.",
            ),
            QuotaError::KeyReused => Self::conflict(
                "IDEMPOTENCY_KEY_REUSED",
                "This idempotency_key was used before for a different call (another endpoint, type or amount); use a new key for a new call.",
            ),
            QuotaError::UnknownKey(key) => Self::not_found(
                "UNKNOWN_IDEMPOTENCY_KEY",
                format!("No counted call of this user has idempotency_key {key:?} (refused calls are not remembered, and keys expire after 24 hours)."),
            ),
            QuotaError::AlreadyRefunded(key) => Self::conflict(
                "ALREADY_REFUNDED",
                format!("The call with idempotency_key {key:?} was refunded already; a call is refunded once."),
            ),
            QuotaError::NotLoaded => Self::unavailable(
                "REDIS_UNAVAILABLE",
                "The counter could not be loaded; retry shortly.",
            ),
            QuotaError::PlanNotInForce(_) => Self::unavailable(
                "REDIS_UNAVAILABLE",
                "The plan is stored, but the usage store (Redis) did not take it, so it is not in force yet; repeat this request.",
            ),
            QuotaError::Redis(e) => e.into(),
            QuotaError::Load(e) => Self::db_unavailable(&e),
            QuotaError::Db(e) => e.into(),
        }
    }
}

impl From<ReservationError> for ApiError {
    fn from(e: ReservationError) -> Self {
        match e {
            ReservationError::Unknown(id) => Self::not_found(
                "UNKNOWN_RESERVATION",
                format!("There is no reservation {id}: it was never made, it closed more than 24 hours ago, or it was lost (Redis lost its data, or the user's account changed while it was open). Whatever it held is free; count work that was done with /v1/track."),
            ),
            ReservationError::Cancelled => Self::conflict(
                "RESERVATION_CANCELLED",
                "This reservation was cancelled, so it cannot be committed; count work that was done with /v1/track.",
            ),
            ReservationError::Committed(amount) => Self::conflict(
                "RESERVATION_COMMITTED",
                format!("This reservation was committed already, with amount {amount}: it is committed once (the same commit again answers as the first), and cannot be cancelled after."),
            ),
            ReservationError::OverHold { held, asked } => ApiError {
                field: Some("amount".to_owned()),
                ..Self::conflict(
                    "COMMIT_EXCEEDS_HOLD",
                    format!("amount {asked} is more than the {held} this reservation holds; commit at most {held}, and count the rest with /v1/track."),
                )
            },
            ReservationError::Quota(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            code: self.code,
            field: self.field.as_deref(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
