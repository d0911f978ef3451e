//! Bearer tokens and who may call what: the gateway and admin scopes, and loopback-only
//! serving when no token is configured.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::http::error::ApiError;

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
pub(crate) enum Scope {
    Gateway,
    Admin,
}

/// Checks the bearer token against the route's scope; with no tokens configured, admits loopback
/// peers only.
pub(super) async fn authorize(
    State((state, scope)): State<(AppState, Scope)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let how = "Send a token: `Authorization: Bearer <token>`.";
    match state
        .tokens
        .admit(Some(peer), request.headers(), scope, how)
    {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

impl Tokens {
    /// Whether a call from `peer` carrying `headers` (HTTP headers, or gRPC metadata) may use
    /// `scope`: the token's scope is enough, or, with no tokens configured, the peer is on
    /// loopback (an unknown peer is not). `how` tells a caller without a token where to send one.
    pub(crate) fn admit(
        &self,
        peer: Option<SocketAddr>,
        headers: &axum::http::HeaderMap,
        scope: Scope,
        how: &str,
    ) -> Result<(), ApiError> {
        if self.open() {
            return match peer {
                Some(peer) if peer.ip().is_loopback() => Ok(()),
                _ => Err(loopback_only()),
            };
        }
        match (self.identify(headers), scope) {
            (Bearer::Admin, _) | (Bearer::Gateway, Scope::Gateway) => Ok(()),
            (Bearer::Gateway, Scope::Admin) => Err(ApiError::forbidden(
                "FORBIDDEN",
                "This call needs an admin token; the token sent has the gateway scope.",
            )),
            (Bearer::Missing, _) => Err(ApiError::unauthorized("UNAUTHORIZED", how)),
            (Bearer::Unknown, _) => Err(ApiError::unauthorized(
                "INVALID_TOKEN",
                "The bearer token is not one quotad knows; check QUOTAD_GATEWAY_TOKENS / QUOTAD_ADMIN_TOKENS.",
            )),
        }
    }
}

/// Compares without an early exit, so response time does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
