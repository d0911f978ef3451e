//! The HTTP API: the router and the state every handler shares. Around it: `auth` (bearer tokens
//! and scopes), `layers` (readiness gate, load shedding, request tracing), `extract` (bodies,
//! paths and queries whose every fault is a clear 4xx), `error` (the one error type, and the
//! mapping of the domain's errors to status, code and sentence); the handlers: `quota` (decisions
//! and counters), `history` (a user's past periods), `reservations` (reserve, commit, cancel),
//! `accounts` (memberships, account plans and usage, limit overrides), `admin` (plans and
//! reconcile), `events` (the outbox), `export` (a period's totals, for invoicing), `ui` (the
//! usage page), `health`, `openapi`.

mod accounts;
mod admin;
mod auth;
pub mod error;
mod events;
mod export;
mod extract;
mod gate;
pub mod health;
mod history;
mod items;
mod layers;
pub mod openapi;
mod quota;
mod reservations;
pub mod ui;

use auth::authorize;
pub(crate) use auth::Bearer;
pub(crate) use auth::Scope;
pub use auth::Tokens;
pub use extract::{
    parse_account_id, parse_user_id, AccountIdPath, ApiJson, ApiQuery, OptionalJson, UserIdPath,
};
pub(crate) use extract::{parse_user_named, short, whole_number};
pub(crate) use layers::not_ready;
pub use layers::Limits;
use layers::{ready_gate, shed, trace_request};
pub(crate) use quota::{check_amount, check_idempotency_key, DecisionAnswer};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::middleware::{self};
use axum::routing::{any, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::http::error::ApiError;
use crate::quota::Quota;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// What every handler shares: one pointer, cloned by every layer and handler of every request
/// (one reference-count increment, however many handles it holds).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state of a daemon.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub struct Shared {
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
    /// The usage exports' connections and slots.
    pub exports: Arc<crate::export::Exports>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let gateway = Router::new()
        .route("/v1/consume", post(quota::consume))
        .route("/v1/check", post(quota::check))
        .route("/v1/track", post(quota::track))
        .route("/v1/refund", post(quota::refund))
        .route("/v1/release", post(quota::release))
        .route("/v1/reserve", post(reservations::reserve))
        .route(
            "/v1/reservations/{reservation_id}/commit",
            post(reservations::commit),
        )
        .route(
            "/v1/reservations/{reservation_id}/cancel",
            post(reservations::cancel),
        )
        .route("/v1/users/{user_id}/usage", get(quota::usage))
        .route(
            "/v1/users/{user_id}/usage/history",
            get(history::usage_history),
        )
        .route(
            "/v1/accounts/{account_id}/usage",
            get(accounts::account_usage),
        )
        .route("/v1/plans", get(quota::plans))
        .route("/v1/users/{user_id}/usage-link", post(ui::issue_link))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Gateway),
            authorize,
        ));
    let admin = Router::new()
        .route(
            "/v1/users/{user_id}/plan",
            get(admin::get_plan).put(admin::put_plan),
        )
        .route(
            "/v1/users/{user_id}/account",
            get(accounts::get_membership).put(accounts::put_membership),
        )
        .route(
            "/v1/accounts/{account_id}/plan",
            get(accounts::get_account_plan).put(accounts::put_account_plan),
        )
        .route(
            "/v1/users/{user_id}/limits",
            get(accounts::get_user_limits).put(accounts::put_user_limits),
        )
        .route(
            "/v1/accounts/{account_id}/limits",
            get(accounts::get_account_limits).put(accounts::put_account_limits),
        )
        .route("/v1/admin/reconcile", post(admin::reconcile))
        .route("/v1/admin/events", get(events::list))
        .route("/v1/admin/usage/export", get(export::usage_export))
        .route("/v1/admin/events/{id}/redeliver", post(events::redeliver))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Admin),
            authorize,
        ));
    // The gate answers gateways that only understand some statuses: its status rewrite is
    // outermost, around the token check, the readiness gate and shedding too.
    let gate = Router::new()
        .route(gate::GATE_PATH, any(gate::gate))
        .route("/v1/gate/", any(gate::gate))
        .route("/v1/gate/{*original}", any(gate::gate))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Gateway),
            authorize,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), ready_gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), shed))
        .route_layer(middleware::from_fn(gate::deny_as));
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
        .merge(gate)
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
