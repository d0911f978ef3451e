//! What runs around every request: the readiness gate, load shedding, and request tracing.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use super::AppState;
use crate::http::error::ApiError;
use crate::metrics as m;

/// The header a request id travels in.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Load shedding: how many API requests may run at once, and for how long each.
pub struct Limits {
    in_flight: tokio::sync::Semaphore,
    request_timeout: Duration,
}

impl Limits {
    /// At most `max_in_flight` requests at once, each answered within `request_timeout`.
    pub fn new(max_in_flight: usize, request_timeout: Duration) -> Limits {
        Limits {
            in_flight: tokio::sync::Semaphore::new(max_in_flight),
            request_timeout,
        }
    }

    /// Runs `work` as one request of every front end (HTTP, gRPC): refused at once with
    /// `OVERLOADED` when `QUOTAD_MAX_IN_FLIGHT` are running, never queued (a queue only turns
    /// overload into timeouts for everyone); answered `TIMEOUT` when still running at
    /// `QUOTAD_REQUEST_TIMEOUT_MS`. Each refusal is counted in `quotad_shed_total` by reason.
    pub(crate) async fn bounded<T>(&self, work: impl Future<Output = T>) -> Result<T, ApiError> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            metrics::counter!(m::SHED, "reason" => "overloaded").increment(1);
            return Err(overloaded());
        };
        tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| {
                metrics::counter!(m::SHED, "reason" => "timeout").increment(1);
                tracing::warn!(
                    timeout_ms = self.request_timeout.as_millis() as u64,
                    "request deadline passed"
                );
                timed_out(self.request_timeout)
            })
    }
}

/// Until start-up has reached Postgres and Redis, the API answers 503 rather than half-working;
/// and so it does while Redis's eviction policy could delete counters.
pub(super) async fn ready_gate(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match not_ready(&state) {
        Some(refusal) => refusal.into_response(),
        None => next.run(request).await,
    }
}

/// Why quotad does not count yet (start-up, or an evicting Redis), for every front end.
pub(crate) fn not_ready(state: &AppState) -> Option<ApiError> {
    if !state.ready.load(Ordering::Acquire) {
        return Some(ApiError::unavailable(
            "NOT_READY",
            "quotad is starting and waiting for Redis and Postgres; retry shortly (see /readyz).",
        ));
    }
    if state.eviction.refused() {
        return Some(ApiError::unavailable(
            "NOT_READY",
            "quotad refuses to count while Redis's maxmemory-policy could evict counters; set it to noeviction (see /readyz).",
        ));
    }
    None
}

/// The refusal of a request over `QUOTAD_MAX_IN_FLIGHT`.
fn overloaded() -> ApiError {
    ApiError::unavailable(
        "OVERLOADED",
        "quotad has as many requests in flight as it takes (QUOTAD_MAX_IN_FLIGHT); retry after a second.",
    )
}

/// The answer to a request still running at `QUOTAD_REQUEST_TIMEOUT_MS`.
fn timed_out(limit: Duration) -> ApiError {
    ApiError::unavailable(
        "TIMEOUT",
        format!(
            "quotad could not answer within {} ms (QUOTAD_REQUEST_TIMEOUT_MS); the call may or may not have taken effect: retry it with the same idempotency_key.",
            limit.as_millis()
        ),
    )
}

/// Past `QUOTAD_MAX_IN_FLIGHT` requests a request is answered 503 `OVERLOADED` at once, never
/// queued (a queue only turns overload into timeouts for everyone); a request still running at
/// `QUOTAD_REQUEST_TIMEOUT_MS` is answered 503 `TIMEOUT`.
///
/// What a TIMEOUT means for counting: the request's Redis call has a deadline of its own, and
/// config validation makes the request deadline longer than all of a consume's Redis and
/// Postgres deadlines together, so a request only reaches this one when something without a
/// deadline of its own was slow. Its work is dropped where it stood: a script already sent may
/// still have counted. A client retries with the same `idempotency_key` to learn which.
pub(super) async fn shed(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.limits.bounded(next.run(request)).await {
        Ok(response) => response,
        Err(refusal) => {
            let mut response = refusal.into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// One span per request (method, route, request id; user, status and latency recorded as they
/// become known), one `quotad::access` line when it ends, the latency histogram, and the
/// `x-request-id` header: the caller's when it sent a sane one, else a new UUID, echoed back.
pub(super) async fn trace_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
    let span = tracing::info_span!(
        "request",
        method = %method,
        route = %route,
        request_id = %request_id,
        user = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_us = tracing::field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("status", status);
    span.record("latency_us", elapsed.as_micros() as u64);
    span.in_scope(|| tracing::info!(target: "quotad::access", "request"));
    metrics::histogram!(
        m::REQUEST_SECONDS,
        "route" => route,
        "method" => method_label(&method),
        "status" => status.to_string()
    )
    .record(elapsed);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// The method as a metric label. A client may send any token as a method; each distinct label is
/// a new series in /metrics (memory, scrape size) for anyone to create, so only the standard
/// methods are named and every other one is `other`. The other labels are bounded too: `route`
/// is a matched route or `unmatched`, `status` one of the few codes quotad answers.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}
