//! Handlers of the quota calls: parse and validate, ask [`Quota`], shape the answer.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{parse_user_id, ApiJson, AppState};
use crate::error::ApiError;
use crate::period::PeriodKind;
use crate::plans::{FailPolicy, Plans};
use crate::quota::{known_type, unknown_plan, Action, CounterView, Decision, DecisionInput};
use crate::store::MetaValue;

/// Largest `amount` of one call.
pub const MAX_AMOUNT: u64 = 1_000_000;
/// Most metadata entries one call may carry.
pub const MAX_METADATA_KEYS: usize = 16;
const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_META_NAME: usize = 64;
const MAX_META_TEXT: usize = 1024;

/// Body of consume, check and track.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    user_id: String,
    #[serde(rename = "type")]
    usage_type: String,
    #[serde(default)]
    amount: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

impl DecisionRequest {
    fn validate(self, plans: &Plans) -> Result<DecisionInput, ApiError> {
        let user = parse_user_id(&self.user_id)?;
        known_type(plans, &self.usage_type)?;
        let amount = parse_amount(self.amount.as_ref())?;
        if let Some(key) = &self.idempotency_key {
            if key.is_empty()
                || key.len() > MAX_IDEMPOTENCY_KEY
                || key.chars().any(char::is_control)
            {
                return Err(ApiError::invalid(
                    "INVALID_IDEMPOTENCY_KEY",
                    "idempotency_key",
                    format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes without control characters."),
                ));
            }
        }
        if let Some(plan) = &self.plan {
            if !plans.has_plan(plan) {
                return Err(unknown_plan(plans, plan));
            }
        }
        let metadata = parse_metadata(self.metadata)?;
        Ok(DecisionInput {
            user,
            usage_type: self.usage_type,
            amount,
            idempotency_key: self.idempotency_key,
            plan: self.plan,
            metadata,
        })
    }
}

fn parse_amount(raw: Option<&Value>) -> Result<u64, ApiError> {
    let Some(raw) = raw else { return Ok(1) };
    match raw.as_u64() {
        Some(n) if (1..=MAX_AMOUNT).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            "INVALID_AMOUNT",
            "amount",
            format!("amount must be a whole number from 1 to {MAX_AMOUNT}; got {raw}."),
        )),
    }
}

fn parse_metadata(
    raw: Option<serde_json::Map<String, Value>>,
) -> Result<Vec<(String, MetaValue)>, ApiError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let bad = |msg: String| ApiError::invalid("INVALID_METADATA", "metadata", msg);
    if raw.len() > MAX_METADATA_KEYS {
        return Err(bad(format!(
            "metadata has {} keys; at most {MAX_METADATA_KEYS} are taken.",
            raw.len()
        )));
    }
    raw.into_iter()
        .map(|(name, value)| {
            let name_ok = (1..=MAX_META_NAME).contains(&name.len())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !name_ok {
                return Err(bad(format!(
                    "metadata key {name:?} must be 1 to {MAX_META_NAME} letters, digits, '_', '-' or '.'."
                )));
            }
            let value = match value {
                Value::Number(n) => MetaValue::Number(n.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                    bad(format!("metadata {name:?}: {n} is not a finite number."))
                })?),
                Value::String(s) if s.len() > MAX_META_TEXT => {
                    return Err(bad(format!("metadata {name:?} is over {MAX_META_TEXT} bytes.")))
                }
                v @ (Value::String(_) | Value::Bool(_) | Value::Null) => MetaValue::Text(v.to_string()),
                Value::Array(_) | Value::Object(_) => {
                    return Err(bad(format!("metadata {name:?} is nested; values are numbers, strings, booleans or null.")))
                }
            };
            Ok((name, value))
        })
        .collect()
}

/// A counter in JSON: used, limit, remaining, unlimited and the period bounds.
#[derive(Debug, Serialize)]
pub struct CounterJson {
    used: Option<u64>,
    limit: Option<u64>,
    remaining: Option<u64>,
    unlimited: bool,
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    resets_at: Option<DateTime<Utc>>,
}

impl From<&CounterView> for CounterJson {
    fn from(c: &CounterView) -> Self {
        let monthly = c.period.end().is_some();
        CounterJson {
            used: c.used,
            limit: c.limit,
            remaining: c.remaining(),
            unlimited: c.unlimited,
            period_start: monthly.then(|| c.period.start()),
            period_end: c.period.end(),
            resets_at: c.period.end(),
        }
    }
}

#[derive(Serialize)]
struct DecisionJson<'a> {
    allowed: bool,
    user_id: Uuid,
    #[serde(rename = "type")]
    usage_type: &'a str,
    plan: Option<&'a str>,
    #[serde(flatten)]
    counter: CounterJson,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    degraded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn decide(
    state: AppState,
    action: Action,
    body: DecisionRequest,
) -> Result<Response, ApiError> {
    let plans = state.quota.plans.current();
    let input = body.validate(&plans)?;
    let decision = state.quota.decide(action, &input).await?;
    Ok(decision_response(&decision, action, input.amount, &plans))
}

fn decision_response(d: &Decision, action: Action, amount: u64, plans: &Plans) -> Response {
    let refused = action == Action::Consume && !d.allowed;
    let counter = &d.counter;
    let per = match counter.period.end() {
        Some(_) => "per month",
        None => "in total",
    };
    let error = refused.then(|| {
        let (plan, limit, used) = (d.plan.as_deref().unwrap_or(""), counter.limit.unwrap_or(0), counter.used.unwrap_or(0));
        let mut text = format!("Usage limit exceeded for {}. Your {plan} plan allows {limit} {per}. You've used {used}.", d.usage_type);
        if used < limit {
            text.push_str(&format!(" This request needs {amount}, and {} remain.", limit - used));
        }
        text
    });
    let body = DecisionJson {
        allowed: d.allowed,
        user_id: d.user,
        usage_type: &d.usage_type,
        plan: d.plan.as_deref(),
        counter: counter.into(),
        degraded: d.degraded,
        code: refused.then_some("USAGE_LIMIT_EXCEEDED"),
        upgrade_url: refused.then_some(plans.upgrade_url.as_str()),
        error,
    };
    let status = if refused {
        StatusCode::PAYMENT_REQUIRED
    } else {
        StatusCode::OK
    };
    let mut headers = HeaderMap::new();
    if action != Action::Track {
        if let (Some(limit), Some(remaining)) = (counter.limit, counter.remaining()) {
            headers.insert(
                HeaderName::from_static("ratelimit-limit"),
                HeaderValue::from(limit),
            );
            headers.insert(
                HeaderName::from_static("ratelimit-remaining"),
                HeaderValue::from(remaining),
            );
        }
        if let Some(reset) = counter.period.seconds_until_reset(d.now) {
            headers.insert(
                HeaderName::from_static("ratelimit-reset"),
                HeaderValue::from(reset),
            );
            if refused {
                headers.insert(
                    HeaderName::from_static("retry-after"),
                    HeaderValue::from(reset),
                );
            }
        }
    }
    if d.replayed {
        headers.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    (status, headers, Json(body)).into_response()
}

/// `POST /v1/consume`: check the limit and, if allowed, count.
pub async fn consume(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Consume, body).await
}

/// `POST /v1/check`: the same decision, counting nothing.
pub async fn check(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Check, body).await
}

/// `POST /v1/track`: count without enforcing.
pub async fn track(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Track, body).await
}

/// Body of refund.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    user_id: String,
    idempotency_key: String,
}

#[derive(Serialize)]
struct RefundJson<'a> {
    refunded: u64,
    #[serde(flatten)]
    counter: CounterOfUser<'a>,
}

/// `POST /v1/refund`: give back one earlier consume, once.
pub async fn refund(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefundRequest>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&body.user_id)?;
    let r = state.quota.refund(user, &body.idempotency_key).await?;
    let json = RefundJson {
        refunded: r.amount,
        counter: CounterOfUser {
            user_id: r.user,
            usage_type: &r.usage_type,
            plan: &r.plan,
            counter: (&r.counter).into(),
        },
    };
    Ok(Json(json).into_response())
}

/// Body of release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    user_id: String,
    #[serde(rename = "type")]
    usage_type: String,
    #[serde(default)]
    amount: Option<Value>,
}

/// One user's counter of one type, as refund and release answer it.
#[derive(Serialize)]
struct CounterOfUser<'a> {
    user_id: Uuid,
    #[serde(rename = "type")]
    usage_type: &'a str,
    plan: &'a str,
    #[serde(flatten)]
    counter: CounterJson,
}

/// `POST /v1/release`: lower a lifetime counter.
pub async fn release(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReleaseRequest>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&body.user_id)?;
    let amount = parse_amount(body.amount.as_ref())?;
    let (plan, counter) = state.quota.release(user, &body.usage_type, amount).await?;
    let json = CounterOfUser {
        user_id: user,
        usage_type: &body.usage_type,
        plan: &plan,
        counter: (&counter).into(),
    };
    Ok(Json(json).into_response())
}

#[derive(Serialize)]
struct UsageEntry {
    period: PeriodKind,
    #[serde(flatten)]
    counter: CounterJson,
}

#[derive(Serialize)]
struct UsageJson {
    user_id: Uuid,
    plan: String,
    usage: BTreeMap<String, UsageEntry>,
}

/// `GET /v1/users/{user_id}/usage`: every configured type's counter.
pub async fn usage(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&user_id)?;
    let usage = state.quota.usage(user).await?;
    let json = UsageJson {
        user_id: usage.user,
        plan: usage.plan,
        usage: usage
            .counters
            .iter()
            .map(|(name, (period, c))| {
                (
                    name.clone(),
                    UsageEntry {
                        period: *period,
                        counter: c.into(),
                    },
                )
            })
            .collect(),
    };
    Ok(Json(json).into_response())
}

#[derive(Serialize)]
struct TypeJson {
    period: PeriodKind,
    fail: FailPolicy,
}

#[derive(Serialize)]
struct PlansJson<'a> {
    default_plan: &'a str,
    upgrade_url: &'a str,
    types: BTreeMap<&'a str, TypeJson>,
    /// Limit per plan and type; `null` = unlimited.
    plans: BTreeMap<&'a str, BTreeMap<&'a str, Option<u64>>>,
}

/// `GET /v1/plans`: the plans and types in force.
pub async fn plans(State(state): State<AppState>) -> Response {
    let plans = state.quota.plans.current();
    let json = PlansJson {
        default_plan: &plans.default_plan,
        upgrade_url: &plans.upgrade_url,
        types: plans
            .types
            .values()
            .map(|t| {
                (
                    t.name.as_str(),
                    TypeJson {
                        period: t.period,
                        fail: t.fail,
                    },
                )
            })
            .collect(),
        plans: plans
            .plan_names
            .iter()
            .map(|p| {
                (
                    p.as_str(),
                    plans
                        .types
                        .values()
                        .map(|t| (t.name.as_str(), t.limit(p)))
                        .collect(),
                )
            })
            .collect(),
    };
    Json(json).into_response()
}

/// Body of a plan change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    plan: String,
}

#[derive(Serialize)]
struct PlanJson {
    user_id: Uuid,
    plan: String,
    is_default: bool,
    updated_at: Option<DateTime<Utc>>,
}

/// `PUT /v1/users/{user_id}/plan`: set a user's plan; in force on the next request everywhere.
pub async fn put_plan(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson<PlanRequest>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&user_id)?;
    let p = state.quota.set_plan(user, &body.plan).await?;
    Ok(Json(PlanJson {
        user_id: p.user,
        plan: p.plan,
        is_default: p.is_default,
        updated_at: p.updated_at,
    })
    .into_response())
}

/// `GET /v1/users/{user_id}/plan`: a user's plan.
pub async fn get_plan(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&user_id)?;
    let p = state.quota.get_plan(user).await?;
    Ok(Json(PlanJson {
        user_id: p.user,
        plan: p.plan,
        is_default: p.is_default,
        updated_at: p.updated_at,
    })
    .into_response())
}
