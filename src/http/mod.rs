//! The HTTP API: the router, shared state, authentication, and the JSON body extractor that turns
//! every malformed request into a clear 4xx.

mod admin;
pub mod error;
pub mod health;
pub mod openapi;
mod quota;
pub mod ui;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use uuid::Uuid;

use crate::http::error::ApiError;
use crate::metrics as m;
use crate::quota::Quota;

/// The header a request id travels in.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// What every handler shares. Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct AppState {
    /// The quota service.
    pub quota: Quota,
    /// Bearer tokens by scope.
    pub tokens: Arc<Tokens>,
    /// Set once Postgres is migrated and Redis answers; until then /v1 answers 503.
    pub ready: Arc<AtomicBool>,
    /// Renders /metrics.
    pub metrics: PrometheusHandle,
    /// Signs usage-page links.
    pub links: Arc<ui::LinkSigner>,
    /// The cap on requests in flight and the deadline of each.
    pub limits: Arc<Limits>,
    /// Whether Redis's eviction policy could delete counters (quotad then refuses to serve).
    pub eviction: Arc<health::EvictionCheck>,
}

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
}

/// Bearer tokens of the two scopes. With none, quotad serves loopback peers only.
#[derive(Debug, Default)]
pub struct Tokens {
    /// consume, check, track, refund, release, usage and plans reads.
    pub gateway: Vec<String>,
    /// Everything.
    pub admin: Vec<String>,
}

/// What the bearer token of a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bearer {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token quotad does not know.
    Unknown,
    /// A gateway token.
    Gateway,
    /// An admin token.
    Admin,
}

impl Tokens {
    /// No token configured: quotad then serves loopback peers only, without tokens.
    pub(crate) fn open(&self) -> bool {
        self.gateway.is_empty() && self.admin.is_empty()
    }

    /// Which token, if any, the request carries (compared in constant time).
    pub(crate) fn identify(&self, headers: &axum::http::HeaderMap) -> Bearer {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(presented) = presented else {
            return Bearer::Missing;
        };
        let known = |list: &[String]| {
            list.iter()
                .any(|t| constant_time_eq(t.as_bytes(), presented.as_bytes()))
        };
        if known(&self.admin) {
            Bearer::Admin
        } else if known(&self.gateway) {
            Bearer::Gateway
        } else {
            Bearer::Unknown
        }
    }
}

/// The refusal for a non-loopback peer when no token is configured.
pub(crate) fn loopback_only() -> ApiError {
    ApiError::forbidden(
        "LOOPBACK_ONLY",
        "quotad has no tokens configured and serves loopback clients only; configure QUOTAD_GATEWAY_TOKENS or QUOTAD_ADMIN_TOKENS.",
    )
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Gateway,
    Admin,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let gateway = Router::new()
        .route("/v1/consume", post(quota::consume))
        .route("/v1/check", post(quota::check))
        .route("/v1/track", post(quota::track))
        .route("/v1/refund", post(quota::refund))
        .route("/v1/release", post(quota::release))
        .route("/v1/users/{user_id}/usage", get(quota::usage))
        .route("/v1/plans", get(quota::plans))
        .route("/v1/users/{user_id}/usage-link", post(ui::issue_link))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Gateway),
            authorize,
        ));
    let admin = Router::new()
        .route(
            "/v1/users/{user_id}/plan",
            get(quota::get_plan).put(quota::put_plan),
        )
        .route("/v1/admin/reconcile", post(admin::reconcile))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Admin),
            authorize,
        ));
    // The page checks its own access: an admin token or a signed link.
    let page = Router::new().route("/ui/users/{user_id}", get(ui::usage_page));
    // Shedding is outermost, so a saturated daemon refuses before any other work; /healthz,
    // /readyz and /metrics are outside it and stay answerable when the API is saturated.
    let api = gateway
        .merge(admin)
        .merge(page)
        .route_layer(middleware::from_fn_with_state(state.clone(), ready_gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), shed));
    Router::new()
        .merge(api)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(trace_request))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Checks the bearer token against the route's scope; with no tokens configured, admits loopback
/// peers only.
async fn authorize(
    State((state, scope)): State<(AppState, Scope)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let tokens = &state.tokens;
    if tokens.open() {
        if !peer.ip().is_loopback() {
            return loopback_only().into_response();
        }
        return next.run(request).await;
    }
    match (tokens.identify(request.headers()), scope) {
        (Bearer::Admin, _) | (Bearer::Gateway, Scope::Gateway) => next.run(request).await,
        (Bearer::Gateway, Scope::Admin) => ApiError::forbidden(
            "FORBIDDEN",
            "This call needs an admin token; the token sent has the gateway scope.",
        )
        .into_response(),
        (Bearer::Missing, _) => ApiError::unauthorized(
            "UNAUTHORIZED",
            "Send a token: `Authorization: Bearer <token>`.",
        )
        .into_response(),
        (Bearer::Unknown, _) => ApiError::unauthorized(
            "INVALID_TOKEN",
            "The bearer token is not one quotad knows; check QUOTAD_GATEWAY_TOKENS / QUOTAD_ADMIN_TOKENS.",
        )
        .into_response(),
    }
}

/// Compares without an early exit, so response time does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Until start-up has reached Postgres and Redis, the API answers 503 rather than half-working;
/// and so it does while Redis's eviction policy could delete counters.
async fn ready_gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::unavailable(
            "NOT_READY",
            "quotad is starting and waiting for Redis and Postgres; retry shortly (see /readyz).",
        )
        .into_response();
    }
    if state.eviction.refused() {
        return ApiError::unavailable(
            "NOT_READY",
            "quotad refuses to count while Redis's maxmemory-policy could evict counters; set it to noeviction (see /readyz).",
        )
        .into_response();
    }
    next.run(request).await
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
async fn shed(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limits = &state.limits;
    let Ok(_permit) = limits.in_flight.try_acquire() else {
        metrics::counter!(m::SHED, "reason" => "overloaded").increment(1);
        let mut response = ApiError::unavailable(
            "OVERLOADED",
            "quotad has as many requests in flight as it takes (QUOTAD_MAX_IN_FLIGHT); retry after a second.",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!(m::SHED, "reason" => "timeout").increment(1);
            tracing::warn!(
                timeout_ms = limits.request_timeout.as_millis() as u64,
                "request deadline passed"
            );
            let mut response = ApiError::unavailable(
                "TIMEOUT",
                format!(
                    "quotad could not answer within {} ms (QUOTAD_REQUEST_TIMEOUT_MS); the call may or may not have taken effect: retry it with the same idempotency_key.",
                    limits.request_timeout.as_millis()
                ),
            )
            .into_response();
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
async fn trace_request(request: Request, next: Next) -> Response {
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

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(
        "NOT_FOUND",
        format!("There is no {method} {}; the API is under /v1.", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "METHOD_NOT_ALLOWED",
        message: format!("{} does not take {method}.", uri.path()),
        field: None,
    }
}

/// A JSON body whose every fault is an [`ApiError`]: 413 over the size limit, 400 for malformed
/// JSON, unknown fields, missing fields and wrong types, naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], for a body whose every field has a default: no body, an empty one, or JSON
/// `null` is the default.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        if bytes.trim_ascii().is_empty() || bytes.trim_ascii() == b"null" {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(MAX_BODY)
        } else {
            ApiError::bad_request(
                "UNREADABLE_BODY",
                format!("The request body could not be read: {rejection}."),
            )
        }
    })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from an array too; a request body is an object.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::invalid(
            "NOT_AN_OBJECT",
            "body",
            "The body must be a JSON object, e.g. {\"user_id\": \"…\", \"type\": \"…\"}.",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| {
        ApiError::bad_request(
            "MALFORMED_JSON",
            format!("The body is not valid JSON: {e}."),
        )
    })?;
    Ok(value)
}

/// The `{user_id}` of a route's path, as a UUID; a value that is not one (percent-encoded bytes
/// that are not UTF-8 included) is 400 `INVALID_USER_ID` in the JSON error body.
pub struct UserIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for UserIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => parse_user_id(&raw).map(UserIdPath),
            Err(_) => Err(ApiError::invalid(
                "INVALID_USER_ID",
                "user_id",
                "The user id in the path is not a UUID (it is not even text once decoded); send one like \"7c9e6679-7425-40de-944b-e07fc1f90ae7\".",
            )),
        }
    }
}

/// A query string whose faults are 400 `INVALID_QUERY` in the JSON error body, naming the
/// parameter where it can.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let field = e.path().to_string();
                let field = if field == "." {
                    "query".to_owned()
                } else {
                    field
                };
                let inner = short(&e.into_inner().to_string());
                ApiError::invalid(
                    "INVALID_QUERY",
                    &field,
                    format!("The query parameter {field} is not valid: {inner}."),
                )
            })
    }
}

/// A JSON number that is a whole number from 0 up, as JSON Schema's `integer` reads it: `3` and
/// `3.0` alike (a float only while it is exact, up to 2^53). `None` for anything else.
pub(crate) fn whole_number(value: &serde_json::Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    (f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&f)).then_some(f as u64)
}

/// At most 120 characters of `text`, for echoing client input back in an error.
pub(crate) fn short(text: &str) -> String {
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::bad_request(
            "MALFORMED_JSON",
            format!("The body is not valid JSON: {inner}."),
        );
    }
    let text = inner.to_string();
    let quoted = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|r| r.split('`').next())
            .map(str::to_owned)
    };
    if let Some(field) = quoted("unknown field `") {
        // The path already ends with the unknown field's name.
        let location = if path == "." { field.clone() } else { path };
        return ApiError::invalid("UNKNOWN_FIELD", &location, format!("Unknown field {field:?}; remove it (see /openapi.json for the fields each call takes)."));
    }
    if let Some(field) = quoted("missing field `") {
        return ApiError::invalid(
            "MISSING_FIELD",
            &field,
            format!("The field {field:?} is required."),
        );
    }
    let field = if path == "." { "body".to_owned() } else { path };
    ApiError::invalid(
        "INVALID_FIELD",
        &field,
        format!("{field} is not valid: {inner}."),
    )
}

/// Parses a user id, in any of the usual UUID spellings, and records it on the request's span.
pub fn parse_user_id(raw: &str) -> Result<Uuid, ApiError> {
    let parsed = Uuid::parse_str(raw.trim());
    if let Ok(user) = &parsed {
        tracing::Span::current().record("user", tracing::field::display(user));
    }
    parsed.map_err(|_| {
        ApiError::invalid(
            "INVALID_USER_ID",
            "user_id",
            format!(
                "user_id {} is not a UUID; send one like \"7c9e6679-7425-40de-944b-e07fc1f90ae7\".",
                short(&format!("{raw:?}"))
            ),
        )
    })
}
