//! `ShouldRateLimit`: one Envoy rate-limit request read into a consume, decided by the same
//! [`Quota::decide`](crate::quota::Quota::decide) (the same Lua call, the same idempotency), and
//! the decision written back as Envoy's answer, with the headers and the JSON body the HTTP
//! consume gives ([`DecisionAnswer`]).
//!
//! A request carries exactly one descriptor: one user, one usage type, an optional idempotency
//! key, and an amount (`hits_addend`). Several descriptors would be several consumes, and quotad
//! cannot yet make consumes of several types all-or-nothing, so they are refused rather than
//! half-counted. Every fault of a request is `INVALID_ARGUMENT` with a sentence, before anything
//! is counted.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::status_of;
use crate::http::error::ApiError;
use crate::http::{
    check_amount, check_idempotency_key, not_ready, parse_user_id, short, AppState, DecisionAnswer,
    Scope,
};
use crate::metrics as m;
use crate::plans::Plans;
use crate::quota::{known_type, Action, Decision, DecisionInput};

/// The domain quotad answers and the descriptor entry keys it reads
/// (`QUOTAD_GRPC_DOMAIN`, `QUOTAD_GRPC_USER_KEY`, `QUOTAD_GRPC_TYPE_KEY`,
/// `QUOTAD_GRPC_IDEMPOTENCY_KEY`).
#[derive(Debug, Clone)]
pub struct Names {
    /// The rate-limit domain.
    pub domain: String,
    /// The entry whose value is the user's UUID.
    pub user: String,
    /// The entry whose value is the usage type.
    pub usage_type: String,
    /// The entry whose value, when present, is the idempotency key.
    pub idempotency: String,
}

/// The rate-limit service: the daemon's state and the names it reads requests by.
pub struct RateLimiter {
    state: AppState,
    names: Arc<Names>,
}

impl RateLimiter {
    /// A service deciding with `state`'s quota.
    pub fn new(state: AppState, names: Names) -> RateLimiter {
        RateLimiter {
            state,
            names: Arc::new(names),
        }
    }

    /// Who may ask: any gateway or admin token in the `authorization` metadata; with no token
    /// configured, loopback peers only (as over HTTP).
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), ApiError> {
        self.state.tokens.admit(
            request.remote_addr(),
            request.metadata().as_ref(),
            Scope::Gateway,
            "Send a token in the metadata: `authorization: Bearer <token>` (in Envoy, initial_metadata of the rate_limit_service's grpc_service).",
        )
    }

    async fn answer(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<RateLimitResponse, Status> {
        let state = &self.state;
        self.authorize(&request).map_err(status_of)?;
        if let Some(refusal) = not_ready(state) {
            return Err(status_of(refusal));
        }
        let plans = state.quota.plans.current();
        let input = read(&self.names, request.get_ref(), &plans).map_err(status_of)?;
        tracing::Span::current().record("user", tracing::field::display(input.user));
        // The HTTP API's cap on requests in flight and its deadline. Boxed: the decision's
        // future is deep, and the service's future is sized at compile time through it.
        let decide = Box::pin(state.quota.decide(Action::Consume, &input, &plans));
        let decision = state
            .limits
            .bounded(decide)
            .await
            .map_err(status_of)?
            .map_err(|e| status_of(e.into()))?;
        Ok(respond(&decision, input.amount, &plans))
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimiter {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "grpc",
            method = "ShouldRateLimit",
            user = tracing::field::Empty,
            code = tracing::field::Empty,
            latency_us = tracing::field::Empty,
        );
        let result = self.answer(request).instrument(span.clone()).await;
        let code = match &result {
            Ok(r) if r.overall_code == Code::OverLimit as i32 => "OVER_LIMIT",
            Ok(_) => "OK",
            Err(status) => code_label(status.code()),
        };
        let elapsed = started.elapsed();
        span.record("code", code);
        span.record("latency_us", elapsed.as_micros() as u64);
        span.in_scope(|| tracing::info!(target: "quotad::access", "grpc request"));
        metrics::counter!(m::GRPC_REQUESTS, "code" => code).increment(1);
        metrics::histogram!(m::GRPC_SECONDS, "code" => code).record(elapsed);
        result.map(Response::new)
    }
}

/// A gRPC status as a metric label: a fixed set of names.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::Unauthenticated => "UNAUTHENTICATED",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::NotFound => "NOT_FOUND",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::Unavailable => "UNAVAILABLE",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::Cancelled => "CANCELLED",
        C::Internal => "INTERNAL",
        _ => "OTHER",
    }
}

/// Reads `request` into a consume under `plans`: the domain, exactly one descriptor, its
/// entries, the amount. Every fault is a 400-class [`ApiError`] naming what to change.
pub(crate) fn read<'p>(
    names: &Names,
    request: &RateLimitRequest,
    plans: &'p Plans,
) -> Result<DecisionInput<'p>, ApiError> {
    if request.domain != names.domain {
        return Err(ApiError::invalid(
            "WRONG_DOMAIN",
            "domain",
            format!(
                "This request is for domain {}; quotad answers domain {:?} (QUOTAD_GRPC_DOMAIN): set the rate-limit filter's domain to it.",
                short(&format!("{:?}", request.domain)),
                names.domain
            ),
        ));
    }
    let [descriptor] = request.descriptors.as_slice() else {
        return Err(ApiError::invalid(
            "ONE_DESCRIPTOR",
            "descriptors",
            format!(
                "The request carries {} descriptors; quotad takes exactly one (one user and one usage type). Consumes of several types cannot yet be all-or-nothing, so send each in a request of its own.",
                request.descriptors.len()
            ),
        ));
    };
    if descriptor.is_negative_hits {
        return Err(ApiError::invalid(
            "NEGATIVE_HITS",
            "is_negative_hits",
            "The descriptor asks to give quota back (is_negative_hits); quotad gives back one earlier consume by its idempotency key: use POST /v1/refund.",
        ));
    }
    if descriptor.limit.is_some() {
        return Err(ApiError::invalid(
            "LIMIT_OVERRIDE",
            "limit",
            "The descriptor carries a limit override; quotad's limits come from the user's plan and the overrides set through its API, so remove the route's limit override.",
        ));
    }
    let entries = Entries::of(names, descriptor)?;
    let user = parse_user_id(entries.user).map_err(|e| in_entry(&names.user, e))?;
    let usage_type =
        known_type(plans, entries.usage_type).map_err(|e| in_entry(&names.usage_type, e.into()))?;
    if let Some(key) = entries.idempotency {
        check_idempotency_key(key, &names.idempotency)?;
    }
    Ok(DecisionInput {
        user,
        usage_type,
        amount: amount(request, descriptor)?,
        idempotency_key: entries.idempotency.map(str::to_owned),
        plan: None,
        metadata: Vec::new(),
    })
}

/// The values of one descriptor's entries, each key at most once and every key known.
struct Entries<'r> {
    user: &'r str,
    usage_type: &'r str,
    idempotency: Option<&'r str>,
}

impl<'r> Entries<'r> {
    fn of(names: &Names, descriptor: &'r RateLimitDescriptor) -> Result<Entries<'r>, ApiError> {
        let (mut user, mut usage_type, mut idempotency) = (None, None, None);
        for entry in &descriptor.entries {
            let slot = if entry.key == names.user {
                &mut user
            } else if entry.key == names.usage_type {
                &mut usage_type
            } else if entry.key == names.idempotency {
                &mut idempotency
            } else {
                return Err(ApiError::invalid(
                    "UNKNOWN_DESCRIPTOR_KEY",
                    "descriptors",
                    format!(
                        "The descriptor entry {} is not one quotad reads; it takes {:?} (the user's UUID), {:?} (the usage type) and optionally {:?} (an idempotency key).",
                        short(&format!("{:?}", entry.key)),
                        names.user,
                        names.usage_type,
                        names.idempotency
                    ),
                ));
            };
            if slot.replace(entry.value.as_str()).is_some() {
                return Err(ApiError::invalid(
                    "DUPLICATE_DESCRIPTOR_KEY",
                    &entry.key,
                    format!(
                        "The descriptor carries the entry {:?} more than once; send it once.",
                        entry.key
                    ),
                ));
            }
        }
        let missing = |key: &str, what: &str| {
            ApiError::invalid(
                "MISSING_DESCRIPTOR_KEY",
                key,
                format!("The descriptor has no {key:?} entry ({what}); add it to the route's rate_limits actions."),
            )
        };
        Ok(Entries {
            user: user.ok_or_else(|| missing(&names.user, "the user's UUID"))?,
            usage_type: usage_type.ok_or_else(|| missing(&names.usage_type, "the usage type"))?,
            idempotency,
        })
    }
}

/// `e`, about the value of the descriptor entry `key`.
fn in_entry(key: &str, e: ApiError) -> ApiError {
    ApiError {
        message: format!("Descriptor entry {key:?}: {}", e.message),
        field: Some(key.to_owned()),
        ..e
    }
}

/// How much to count: the descriptor's `hits_addend` when set, else the request's; 0 (the
/// protocol's "not set") counts 1, as Envoy means it.
fn amount(request: &RateLimitRequest, descriptor: &RateLimitDescriptor) -> Result<u64, ApiError> {
    let sent = descriptor
        .hits_addend
        .as_ref()
        .map_or(u64::from(request.hits_addend), |h| h.value);
    check_amount(Some(sent.max(1)), "hits_addend", &sent.to_string())
}

/// The decision as Envoy's answer: `OK` or `OVER_LIMIT`, the descriptor's limit, what is left
/// and the time until the reset, the `RateLimit-*` headers (and on a refusal `Retry-After` and
/// the JSON body consume's 402 gives), built once by [`DecisionAnswer`].
pub(crate) fn respond(d: &Decision, amount: u64, plans: &Plans) -> RateLimitResponse {
    let answer = DecisionAnswer::new(d, Action::Consume, amount, plans);
    let refused = answer.status == StatusCode::PAYMENT_REQUIRED;
    let code = if refused { Code::OverLimit } else { Code::Ok } as i32;
    let saturate = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let monthly = answer.reset_seconds.is_some();
    let status = DescriptorStatus {
        code,
        current_limit: answer.limit.map(|limit| RateLimit {
            name: d.usage_type.clone(),
            requests_per_unit: saturate(limit),
            unit: if monthly { Unit::Month } else { Unit::Unknown } as i32,
        }),
        // No limit (unlimited, or unknown when degraded): all there is, as Envoy's own
        // rate-limit service says of an unlimited descriptor.
        limit_remaining: answer.remaining.map_or(u32::MAX, saturate),
        duration_until_reset: answer.reset_seconds.map(|s| ProtoDuration {
            seconds: i64::try_from(s).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        quota: None,
    };
    let mut headers: Vec<HeaderValue> = answer
        .headers
        .iter()
        .filter_map(|(name, value)| Some(header(name.as_str(), value.to_str().ok()?)))
        .collect();
    if d.degraded {
        headers.push(header("quotad-degraded", "true"));
    }
    if refused {
        headers.push(header("content-type", "application/json"));
    }
    RateLimitResponse {
        overall_code: code,
        statuses: vec![status],
        response_headers_to_add: headers,
        raw_body: if refused { answer.body() } else { Vec::new() },
        ..Default::default()
    }
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: value.to_owned(),
        ..Default::default()
    }
}
