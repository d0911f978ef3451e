//! Handlers of the quota calls: parse and validate, ask [`Quota`], shape the answer.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::items::{items_response, parse_items, ItemRequest};
use super::{parse_user_id, whole_number, ApiJson, AppState, UserIdPath};
use crate::http::error::{ApiError, ErrorBody};
use crate::items::ItemsInput;
use crate::period::PeriodKind;
use crate::plans::{FailPolicy, Overage, Plans};
use crate::quota::{
    known_plan, known_type, AccountLevel, Action, CounterView, Decision, DecisionInput, Refund,
    Refunded, TypeUsage,
};
use crate::store::{Level, LimitSource, MetaValue};

pub use crate::plans::MAX_AMOUNT;
/// Most metadata entries one call may carry.
pub const MAX_METADATA_KEYS: usize = 16;
const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_META_NAME: usize = 64;
const MAX_META_TEXT: usize = 1024;

/// Body of consume, check and track.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "ai_generation", "amount": 1,
    "idempotency_key": "req-123", "metadata": {"prompt_tokens": 812, "completion_tokens": 240, "model": "m-1"}}))]
pub struct DecisionRequest {
    /// The user, a UUID.
    #[schema(format = Uuid)]
    user_id: String,
    /// A configured usage type (see `GET /v1/plans`). Required, unless the call carries `items`.
    #[serde(default, rename = "type")]
    usage_type: Option<String>,
    /// How much, 1 to 1,000,000; default 1. A whole number; `3.0` is the same as `3`.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000000)]
    amount: Option<Value>,
    /// Makes a retry count once: the same key for the same user within 24 h returns the first
    /// answer. 1 to 255 characters, none of them a control character.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    idempotency_key: Option<String>,
    /// A plan the caller vouches for, overriding the stored one for this call.
    #[serde(default)]
    plan: Option<String>,
    /// At most 16 entries; numbers are summed per counter, other values kept as the latest.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Map<String, Value>>,
    /// Several types in one call, all or nothing, in place of `type` and `amount` (and without
    /// `metadata`): consume counts every item only if every item fits; check says whether they
    /// would; track counts them all. 1 to 32 items, each type at most once. One idempotency key
    /// covers the whole call.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 32)]
    items: Option<Vec<ItemRequest>>,
}

/// A decision body, validated: one type, or several (`items`).
pub(crate) enum Validated<'p> {
    One(DecisionInput<'p>),
    Items(ItemsInput<'p>),
}

impl DecisionRequest {
    fn validate(mut self, plans: &Plans) -> Result<Validated<'_>, ApiError> {
        let user = parse_user_id(&self.user_id)?;
        if let Some(items) = self.items.take() {
            let alone = |field: &str, what: &str| {
                ApiError::invalid(
                    "INVALID_ITEMS",
                    field,
                    format!("{field} cannot be sent with items; {what}."),
                )
            };
            if self.usage_type.is_some() {
                return Err(alone("type", "each item names its type"));
            }
            if self.amount.is_some() {
                return Err(alone("amount", "each item carries its amount"));
            }
            if self.metadata.is_some() {
                return Err(alone(
                    "metadata",
                    "metadata is recorded with one type: send it on a call for that type alone",
                ));
            }
            let items = parse_items(items, plans)?;
            let (idempotency_key, plan) = self.key_and_plan(plans)?;
            return Ok(Validated::Items(ItemsInput {
                user,
                items,
                idempotency_key,
                plan,
            }));
        }
        let Some(name) = &self.usage_type else {
            return Err(ApiError::invalid(
                "MISSING_FIELD",
                "type",
                "The field \"type\" is required (or \"items\", for several types in one call).",
            ));
        };
        let usage_type = known_type(plans, name)?;
        let amount = parse_amount(self.amount.as_ref(), "amount")?;
        let (idempotency_key, plan) = self.key_and_plan(plans)?;
        let metadata = parse_metadata(self.metadata)?;
        Ok(Validated::One(DecisionInput {
            user,
            usage_type,
            amount,
            idempotency_key,
            plan,
            metadata,
        }))
    }

    /// The idempotency key and the plan, checked (both optional); taken out of the body.
    fn key_and_plan(
        &mut self,
        plans: &Plans,
    ) -> Result<(Option<String>, Option<String>), ApiError> {
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(key, "idempotency_key")?;
        }
        if let Some(plan) = &self.plan {
            known_plan(plans, plan)?;
        }
        Ok((self.idempotency_key.take(), self.plan.take()))
    }
}

/// An idempotency key as every front end takes it: 1 to 255 characters, none a control
/// character; `field` names where it came from.
pub(crate) fn check_idempotency_key(key: &str, field: &str) -> Result<(), ApiError> {
    if key.is_empty()
        || key.chars().count() > MAX_IDEMPOTENCY_KEY
        || key.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "INVALID_IDEMPOTENCY_KEY",
            field,
            format!("{field} must be 1 to {MAX_IDEMPOTENCY_KEY} characters, none of them a control character."),
        ));
    }
    Ok(())
}

/// An amount as every front end takes it: a whole number from 1 to [`MAX_AMOUNT`]. `n` is the
/// number read (`None`: not a whole number), `shown` what the caller sent, `field` its name.
pub(crate) fn check_amount(n: Option<u64>, field: &str, shown: &str) -> Result<u64, ApiError> {
    match n {
        Some(n) if (1..=MAX_AMOUNT).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            "INVALID_AMOUNT",
            field,
            format!(
                "{field} must be a whole number from 1 to {MAX_AMOUNT}; got {}.",
                super::short(shown)
            ),
        )),
    }
}

/// An optional amount of a body, sent as `field`: 1 when absent, else as [`check_amount`] takes it.
pub(crate) fn parse_amount(raw: Option<&Value>, field: &str) -> Result<u64, ApiError> {
    let Some(raw) = raw else { return Ok(1) };
    check_amount(whole_number(raw), field, &raw.to_string())
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
                // Postgres text and jsonb cannot hold U+0000 (the only character a UTF-8
                // database refuses): such a value would be counted here and refused by every
                // flush. Names are ASCII letters, digits and '_-.' already.
                Value::String(s) if s.contains('\0') => {
                    return Err(bad(format!("metadata {name:?} contains a NUL character (\\u0000), which cannot be stored; remove it.")))
                }
                Value::String(s) if s.chars().count() > MAX_META_TEXT => {
                    return Err(bad(format!("metadata {name:?} is over {MAX_META_TEXT} characters.")))
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

/// The JSON Schema of `metadata`, as [`parse_metadata`] checks it (the derive cannot say it):
/// at most [`MAX_METADATA_KEYS`] names of 1 to 64 letters, digits, `_`, `-` or `.`; each value a
/// number, a string of at most 1024 characters without NUL, a boolean or null.
pub(crate) fn metadata_schema() -> Value {
    serde_json::json!({
        "type": ["object", "null"],
        "description": "At most 16 entries; numbers are summed per counter, other values kept as the latest.",
        "maxProperties": MAX_METADATA_KEYS,
        "propertyNames": {"pattern": format!("^[A-Za-z0-9_.-]{{1,{MAX_META_NAME}}}$")},
        "additionalProperties": {
            "type": ["number", "string", "boolean", "null"],
            "maxLength": MAX_META_TEXT,
            "pattern": "^[^\\u0000]*$",
        },
    })
}

/// A counter in JSON: used, limit, remaining, unlimited, overage and the period bounds.
#[derive(Debug, Serialize, ToSchema)]
pub struct CounterJson {
    /// Units used in the period; null when Redis could not be asked (degraded).
    used: Option<u64>,
    /// Units held by open reservations (`POST /v1/reserve`), not yet used: they count as taken
    /// until committed, cancelled or expired. Absent where the answer does not read them (a
    /// refund, a release, a degraded decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<u64>,
    /// The plan's limit; null when unlimited.
    limit: Option<u64>,
    /// What is left before the limit beside what is held (0 once past it, in overage); null when
    /// unlimited.
    remaining: Option<u64>,
    /// The plan sets no limit (still counted).
    unlimited: bool,
    /// Units counted past the limit this period (overage, for the product to bill), where the
    /// plan allows use past the limit; 0 when none. Null when Redis could not be asked
    /// (degraded).
    overage: Option<u64>,
    /// How many units past `limit` the plan allows before a consume is refused: 0 for a hard
    /// limit; null when nothing is refused past it (a soft limit, or no limit), or when Redis
    /// could not be asked (degraded).
    overage_cap: Option<u64>,
    /// First instant of the month; null for lifetime types.
    period_start: Option<DateTime<Utc>>,
    /// First instant after the month (exclusive); null for lifetime types.
    period_end: Option<DateTime<Utc>>,
    /// When the count starts again from 0; null for lifetime types.
    resets_at: Option<DateTime<Utc>>,
}

impl From<&CounterView> for CounterJson {
    fn from(c: &CounterView) -> Self {
        let monthly = c.period.end().is_some();
        CounterJson {
            used: c.used,
            held: c.held,
            limit: c.limit,
            remaining: c.remaining(),
            unlimited: c.unlimited,
            overage: c.overage,
            // Without a limit (unlimited, or unknown when degraded) there is no cap to give.
            overage_cap: c.limit.and(c.overage_cap.cap()),
            period_start: monthly.then(|| c.period.start()),
            period_end: c.period.end(),
            resets_at: c.period.end(),
        }
    }
}

/// One level of a decision for a member of an account: the user's own, or the account's pool.
#[derive(Serialize, ToSchema)]
pub(crate) struct LevelJson<'a> {
    /// The account (on the account's level only).
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<Uuid>,
    /// The plan in force at this level.
    plan: Option<&'a str>,
    #[serde(flatten)]
    counter: CounterJson,
    /// Where the limit comes from: `plan`, `override` (set for this customer), or `account`
    /// (the user's level of a member with neither a plan of their own nor an override: only the
    /// pool limits them).
    limit_source: LimitSource,
    /// The units of this call that fell past this level's limit and were counted as overage
    /// (for check: that would be); 0 when none.
    overage_added: u64,
}

/// A decision. Its counter (used, limit, remaining…) is the level that binds: the one a refused
/// consume (402) ran out at, named by `limited_by`, else the one with the least left. A member of
/// an account gets both levels in `user` and `account`. A refused consume adds `code`,
/// `upgrade_url` and `error`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"allowed": true, "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "ai_generation",
    "plan": "FREE", "used": 12, "limit": 50, "remaining": 38, "unlimited": false, "limit_source": "plan",
    "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z", "resets_at": "2026-12-01T00:00:00Z"}))]
pub(crate) struct DecisionJson<'a> {
    /// Allowed (and, for consume and track, counted).
    allowed: bool,
    user_id: Uuid,
    #[serde(rename = "type")]
    usage_type: &'a str,
    /// The plan of the level shown.
    plan: Option<&'a str>,
    #[serde(flatten)]
    counter: CounterJson,
    /// Where the limit shown comes from: `plan`, `override` or `account` (see [`LevelJson`]).
    limit_source: LimitSource,
    /// On a refused consume: the level that ran out, `user` or `account`.
    #[serde(skip_serializing_if = "Option::is_none")]
    limited_by: Option<Level>,
    /// This call took the level shown past its limit (for check: would, if consumed now): the
    /// count after it is above `limit`. False for a refused call (nothing counted).
    over_limit: bool,
    /// The units of this call that fell past the limit of the level shown and were counted as
    /// overage (for check: would be); 0 when none. `overage` is the period's total.
    overage_added: u64,
    /// For a member of an account: the user's own level.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<LevelJson<'a>>,
    /// For a member of an account: the account's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<LevelJson<'a>>,
    /// Present and true when Redis could not answer and the type fails open: allowed, not counted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    degraded: bool,
    /// `USAGE_LIMIT_EXCEEDED` on a refused consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    /// Where to upgrade, on a refused consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_url: Option<&'a str>,
    /// A sentence for the user, on a refused consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<'a> LevelJson<'a> {
    fn account(a: &'a AccountLevel) -> LevelJson<'a> {
        LevelJson {
            account_id: Some(a.account),
            plan: Some(&a.plan),
            counter: (&a.counter).into(),
            limit_source: a.source,
            overage_added: a.overage_added,
        }
    }
}

/// The level of `d` that binds: the one a refusal names, else the account's pool when it has
/// less left before a refusal than the user (or nothing refuses at the user's level: no limit,
/// or a soft one), else the user's.
fn binding(d: &Decision) -> Level {
    if let Some(level) = d.limited_by {
        return level;
    }
    match &d.account {
        Some(a) => match (d.counter.headroom(), a.counter.headroom()) {
            (None, _) => Level::Account,
            (Some(user), Some(pool)) if pool < user => Level::Account,
            _ => Level::User,
        },
        None => Level::User,
    }
}

async fn decide(
    state: AppState,
    action: Action,
    body: DecisionRequest,
) -> Result<Response, ApiError> {
    let plans = state.quota.plans.current();
    match body.validate(&plans)? {
        Validated::One(input) => {
            let decision = state.quota.decide(action, &input, &plans).await?;
            Ok(decision_response(&decision, action, input.amount, &plans))
        }
        Validated::Items(input) => {
            let decision = state.quota.decide_items(action, &input, &plans).await?;
            let amounts: Vec<u64> = input.items.iter().map(|i| i.amount).collect();
            Ok(items_response(&decision, action, &amounts, &plans))
        }
    }
}

fn decision_response(d: &Decision, action: Action, amount: u64, plans: &Plans) -> Response {
    let answer = DecisionAnswer::new(d, action, amount, plans);
    let body = answer.body();
    json_response(answer.status, answer.headers, body)
}

/// A JSON body already serialized, with its status and headers.
pub(crate) fn json_response(status: StatusCode, headers: HeaderMap, body: Vec<u8>) -> Response {
    (
        status,
        headers,
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A decision as every front end answers it (HTTP, the gate, gRPC): the status consume would
/// answer, the `RateLimit-*` (and on a refusal `Retry-After`) headers, and the JSON body,
/// serialized only when asked for ([`Self::body`]: the gate and gRPC send none when allowed).
pub(crate) struct DecisionAnswer<'a> {
    /// 200, or 402 for a refused consume.
    pub status: StatusCode,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`, `Retry-After`,
    /// `Idempotent-Replayed`, as apply.
    pub headers: HeaderMap,
    /// The JSON body, as a value.
    json: DecisionJson<'a>,
    /// What the level shown has used; `None` when Redis could not be asked (degraded).
    pub used: Option<u64>,
    /// The level's overage in the period; `None` when Redis could not be asked (degraded).
    pub overage: Option<u64>,
    /// The count past which the level shown refuses (`RateLimit-Limit`): its limit plus its
    /// overage cap; `None` when nothing refuses (unlimited, a soft limit) or unknown.
    pub limit: Option<u64>,
    /// What is left at that level before a refusal (`RateLimit-Remaining`); `None` likewise.
    pub remaining: Option<u64>,
    /// Whole seconds until the period resets (`RateLimit-Reset`); `None` for lifetime types.
    pub reset_seconds: Option<u64>,
}

impl<'a> DecisionAnswer<'a> {
    pub(crate) fn new(
        d: &'a Decision,
        action: Action,
        amount: u64,
        plans: &'a Plans,
    ) -> DecisionAnswer<'a> {
        let refused = action == Action::Consume && !d.allowed;
        let level = binding(d);
        let (plan, counter, source, overage_added) = match (level, &d.account) {
            (Level::Account, Some(a)) => {
                (Some(a.plan.as_str()), &a.counter, a.source, a.overage_added)
            }
            _ => (d.plan.as_deref(), &d.counter, d.source, d.overage_added),
        };
        let per = match counter.period.end() {
            Some(_) => "per month",
            None => "in total",
        };
        let error = refused.then(|| {
        let (plan, limit, used) = (plan.unwrap_or(""), counter.limit.unwrap_or(0), counter.used.unwrap_or(0));
        let hard = counter.hard_limit().unwrap_or(limit);
        let over = match counter.overage_cap {
            Overage::Cap(cap) => format!(", and {cap} more as overage"),
            Overage::None | Overage::Soft => String::new(),
        };
        let mut text = match (level, source) {
            (Level::Account, _) => format!("Usage limit exceeded for {}. Your account's {plan} plan allows {limit} {per} for all its members{over}. Your account has used {used}.", d.usage_type),
            (Level::User, LimitSource::Override) => format!("Usage limit exceeded for {}. Your limit is {limit} {per}{over}. You've used {used}.", d.usage_type),
            _ => format!("Usage limit exceeded for {}. Your {plan} plan allows {limit} {per}{over}. You've used {used}.", d.usage_type),
        };
        let held = counter.held.unwrap_or(0);
        if held > 0 {
            text.push_str(&format!(" Open reservations hold {held} more."));
        }
        if used.saturating_add(held) < hard {
            text.push_str(&format!(" This request needs {amount}, and {} remain.", hard - used - held));
        }
        text
    });
        // The count after this call (for check: after it, if consumed) is past the limit.
        let over_limit = d.allowed
            && match (counter.used, counter.limit) {
                (Some(used), Some(limit)) if action == Action::Check => used + amount > limit,
                (Some(used), Some(limit)) => used > limit,
                _ => false,
            };
        let body = DecisionJson {
            allowed: d.allowed,
            user_id: d.user,
            usage_type: &d.usage_type,
            plan,
            counter: counter.into(),
            limit_source: source,
            limited_by: refused.then_some(level),
            over_limit,
            overage_added,
            user: d.account.as_ref().map(|_| LevelJson {
                account_id: None,
                plan: d.plan.as_deref(),
                counter: (&d.counter).into(),
                limit_source: d.source,
                overage_added: d.overage_added,
            }),
            account: d.account.as_ref().map(LevelJson::account),
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
        // The RateLimit-* headers (and gRPC's limit) say when a consume is refused: past the
        // limit plus its overage cap. A soft limit refuses nothing and sends none, as unlimited.
        let (limit, remaining) = (counter.hard_limit(), counter.headroom());
        let reset_seconds = counter.period.seconds_until_reset(d.now);
        let mut headers = HeaderMap::new();
        if action != Action::Track {
            if let (Some(limit), Some(remaining)) = (limit, remaining) {
                headers.insert(
                    HeaderName::from_static("ratelimit-limit"),
                    HeaderValue::from(limit),
                );
                headers.insert(
                    HeaderName::from_static("ratelimit-remaining"),
                    HeaderValue::from(remaining),
                );
            }
            if let Some(reset) = reset_seconds {
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
        DecisionAnswer {
            status,
            headers,
            json: body,
            used: counter.used,
            overage: counter.overage,
            limit,
            remaining,
            reset_seconds,
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json).expect("a decision serializes")
    }

    /// The sentence of a refused consume.
    pub(crate) fn error(&self) -> Option<&str> {
        self.json.error.as_deref()
    }

    /// The plan of the level shown.
    pub(crate) fn plan(&self) -> Option<&'a str> {
        self.json.plan
    }

    /// The JSON body, as a value to embed (a reservation's answer carries it).
    pub(crate) fn into_json(self) -> DecisionJson<'a> {
        self.json
    }
}

/// `POST /v1/consume`: check the limit and, if allowed, count.
#[utoipa::path(
    post,
    path = "/v1/consume",
    tag = "quota",
    description = "Atomically check the limit and, if allowed, count. The one call a gateway makes before the action. With `items` in place of `type` and `amount`, several types at once, all or nothing: every item is counted only if every item fits (one atomic step), and a 402 names in `refused` every item that did not fit; the answer is then `ItemsJson`.",
    request_body = DecisionRequest,
    responses((status = 200, description = "Allowed and counted (or the first answer again, for a repeated idempotency key)", body = DecisionJson, headers(("RateLimit-Limit" = u64, description = "The count past which a consume is refused: the limit plus its overage cap (absent when unlimited or a soft limit)"), ("RateLimit-Remaining" = u64, description = "What is left before a refusal"), ("RateLimit-Reset" = u64, description = "Seconds until the period resets (absent for lifetime types)"))), (status = 402, description = "Refused: the amount (with items: some item) does not fit; nothing counted", body = DecisionJson, headers(("Retry-After" = u64, description = "Seconds until the period resets"))), (status = 409, description = "IDEMPOTENCY_KEY_REUSED: the idempotency key was used for a different call; IDEMPOTENCY_KEY_REFUNDED: it names a call that was refunded. Nothing counted", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn consume(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Consume, body).await
}

/// `POST /v1/check`: the same decision, counting nothing.
#[utoipa::path(
    post,
    path = "/v1/check",
    tag = "quota",
    description = "The decision consume would make, counting nothing. 200 whether allowed or not; `allowed` says it. With `items`, whether all of them would fit.",
    request_body = DecisionRequest,
    responses((status = 200, description = "The decision", body = DecisionJson, headers(("RateLimit-Limit" = u64, description = "The count past which a consume is refused: the limit plus its overage cap (absent when unlimited or a soft limit)"), ("RateLimit-Remaining" = u64, description = "What is left before a refusal"), ("RateLimit-Reset" = u64, description = "Seconds until the period resets (absent for lifetime types)"))), (status = 409, description = "IDEMPOTENCY_KEY_REUSED: the idempotency key names an earlier consume or track (check records nothing under a key)", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn check(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Check, body).await
}

/// `POST /v1/track`: count without enforcing.
#[utoipa::path(
    post,
    path = "/v1/track",
    tag = "quota",
    description = "Count without enforcing, for actions that already happened; `used` may exceed `limit`. With `items`, every item counted in one atomic step.",
    request_body = DecisionRequest,
    responses((status = 200, description = "Counted", body = DecisionJson), (status = 409, description = "IDEMPOTENCY_KEY_REUSED: the idempotency key was used for a different call; IDEMPOTENCY_KEY_REFUNDED: it names a call that was refunded. Nothing counted", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn track(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Response, ApiError> {
    decide(state, Action::Track, body).await
}

/// Body of refund.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "idempotency_key": "req-123"}))]
pub struct RefundRequest {
    /// The user, a UUID.
    #[schema(format = Uuid)]
    user_id: String,
    /// The key the consume (or track) was sent with.
    idempotency_key: String,
}

/// A refund: the amount given back and the counter after it.
#[derive(Serialize, ToSchema)]
pub(crate) struct RefundJson<'a> {
    /// How much was given back: the call's amount, or less if the counter held less (a release
    /// lowered it meanwhile); 0 changes nothing.
    refunded: u64,
    #[serde(flatten)]
    counter: CounterOfUser<'a>,
    /// For a call that counted in the user's account's pool: the pool after the refund.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<PoolChangeJson>,
}

impl<'a> RefundJson<'a> {
    fn of(r: &'a Refund) -> RefundJson<'a> {
        RefundJson {
            refunded: r.amount,
            counter: CounterOfUser {
                user_id: r.user,
                usage_type: &r.usage_type,
                plan: &r.plan,
                counter: (&r.counter).into(),
            },
            account: PoolChangeJson::of(&r.account),
        }
    }
}

/// The refund of a call with items: every item given back.
#[derive(Serialize, ToSchema)]
pub(crate) struct RefundItemsJson<'a> {
    user_id: Uuid,
    /// Each item given back, sorted by type.
    items: Vec<RefundJson<'a>>,
}

/// An account's pool after a refund or a release.
#[derive(Serialize, ToSchema)]
pub(crate) struct PoolChangeJson {
    /// The account.
    account_id: Uuid,
    /// The pool's count after the change.
    used: u64,
    /// How much the pool got back (refund) or was lowered by (release).
    changed_by: u64,
    /// The pool's overage after the change (what is given back comes off it first).
    overage: u64,
}

impl PoolChangeJson {
    fn of(change: &Option<(Uuid, CounterView, u64)>) -> Option<PoolChangeJson> {
        change.as_ref().map(|(account, c, by)| PoolChangeJson {
            account_id: *account,
            used: c.used.unwrap_or(0),
            changed_by: *by,
            overage: c.overage.unwrap_or(0),
        })
    }
}

/// `POST /v1/refund`: give back one earlier consume, once.
#[utoipa::path(
    post,
    path = "/v1/refund",
    tag = "quota",
    description = "Give back exactly one earlier consume or track, named by its idempotency key. Once only. A call with items is given back whole: every item (the answer is then `RefundItemsJson`).",
    request_body = RefundRequest,
    responses((status = 200, description = "Given back", body = RefundJson), (status = 404, description = "Unknown or expired key", body = ErrorBody), (status = 409, description = "Refunded before", body = ErrorBody), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn refund(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefundRequest>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&body.user_id)?;
    Ok(
        match state.quota.refund(user, &body.idempotency_key).await? {
            Refunded::One(r) => Json(RefundJson::of(&r)).into_response(),
            Refunded::Items(items) => Json(RefundItemsJson {
                user_id: user,
                items: items.iter().map(RefundJson::of).collect(),
            })
            .into_response(),
        },
    )
}

/// Body of release.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "kb_file", "amount": 1}))]
pub struct ReleaseRequest {
    /// The user, a UUID.
    #[schema(format = Uuid)]
    user_id: String,
    /// A lifetime usage type.
    #[serde(rename = "type")]
    usage_type: String,
    /// How much, 1 to 1,000,000; default 1. A whole number; `3.0` is the same as `3`.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000000)]
    amount: Option<Value>,
}

/// One user's counter of one type, as refund and release answer it.
#[derive(Serialize, ToSchema)]
pub(crate) struct CounterOfUser<'a> {
    /// The user.
    user_id: Uuid,
    /// The usage type.
    #[serde(rename = "type")]
    usage_type: &'a str,
    /// The plan in force.
    plan: &'a str,
    #[serde(flatten)]
    counter: CounterJson,
}

/// A release: how much was lowered and the counter after it.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReleaseJson<'a> {
    /// How much was lowered: `amount`, or less if the counter held less; 0 changes nothing.
    released: u64,
    #[serde(flatten)]
    counter: CounterOfUser<'a>,
    /// For a member of an account: the pool after the release.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<PoolChangeJson>,
}

/// `POST /v1/release`: lower a lifetime counter.
#[utoipa::path(
    post,
    path = "/v1/release",
    tag = "quota",
    description = "Lower a lifetime counter by amount (a stored thing was deleted), never below 0. A month type is 400.",
    request_body = ReleaseRequest,
    responses((status = 200, description = "The counter after release, and how much was lowered", body = ReleaseJson), (status = 400, description = "Bad input; changes nothing", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn release(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReleaseRequest>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&body.user_id)?;
    let amount = parse_amount(body.amount.as_ref(), "amount")?;
    let r = state.quota.release(user, &body.usage_type, amount).await?;
    let json = ReleaseJson {
        released: r.released,
        counter: CounterOfUser {
            user_id: user,
            usage_type: &body.usage_type,
            plan: &r.plan,
            counter: (&r.counter).into(),
        },
        account: PoolChangeJson::of(&r.account),
    };
    Ok(Json(json).into_response())
}

/// One type's counter on the usage read.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageEntry {
    /// `month` or `lifetime`.
    period: PeriodKind,
    #[serde(flatten)]
    counter: CounterJson,
    /// Where the limit comes from: `plan`, `override` (set for this customer), or `account` (a
    /// member with neither a plan of their own nor an override: only the pool limits them).
    limit_source: LimitSource,
}

/// Every configured type's counter, by name.
pub(crate) fn usage_entries(
    counters: &BTreeMap<String, TypeUsage>,
) -> BTreeMap<String, UsageEntry> {
    counters
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                UsageEntry {
                    period: t.period,
                    counter: (&t.counter).into(),
                    limit_source: t.source,
                },
            )
        })
        .collect()
}

/// The pool of the user's account, on the user's usage read.
#[derive(Serialize, ToSchema)]
pub(crate) struct PoolJson {
    /// The account.
    account_id: Uuid,
    /// The account's plan in force.
    plan: String,
    /// The pool's counters by type name.
    usage: BTreeMap<String, UsageEntry>,
}

/// Every configured type's counter for one user.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageJson {
    /// The user.
    user_id: Uuid,
    /// The plan in force.
    plan: String,
    /// Counters by type name.
    usage: BTreeMap<String, UsageEntry>,
    /// For a member of an account: the account's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<PoolJson>,
}

/// `GET /v1/users/{user_id}/usage`: every configured type's counter.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/usage",
    tag = "quota",
    description = "Every configured type: used, limit, remaining, period, resets_at; and the plan.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    responses((status = 200, description = "The usage", body = UsageJson), (status = 400, description = "Not a UUID", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
) -> Result<Response, ApiError> {
    let usage = state.quota.usage(user).await?;
    let json = UsageJson {
        user_id: usage.user,
        plan: usage.plan,
        usage: usage_entries(&usage.counters),
        account: usage.account.map(|a| PoolJson {
            account_id: a.account,
            plan: a.plan,
            usage: usage_entries(&a.counters),
        }),
    };
    Ok(Json(json).into_response())
}

/// A usage type.
#[derive(Serialize, ToSchema)]
pub(crate) struct TypeJson {
    /// `month` or `lifetime`.
    period: PeriodKind,
    /// What happens when Redis does not answer: `open` or `closed`.
    fail: FailPolicy,
    /// Thresholds, in percent of the limit, at which a usage event is recorded (and sent to
    /// the webhooks); empty for none.
    notify: Vec<u32>,
}

/// The plans and types in force.
#[derive(Serialize, ToSchema)]
pub(crate) struct PlansJson<'a> {
    /// The plan of a user with none stored.
    default_plan: &'a str,
    /// Where refused users are sent.
    upgrade_url: &'a str,
    /// Usage types by name.
    types: BTreeMap<&'a str, TypeJson>,
    /// Limit per plan and type; `null` = unlimited.
    plans: BTreeMap<&'a str, BTreeMap<&'a str, Option<u64>>>,
    /// Per plan, the types whose use may go past their limit: the units allowed past it (the
    /// overage cap), or `null` for no cap (a soft limit: never refused). A plan or type not
    /// listed is refused at its limit.
    overage: BTreeMap<&'a str, BTreeMap<&'a str, Option<u64>>>,
}

/// `GET /v1/plans`: the plans and types in force.
#[utoipa::path(
    get,
    path = "/v1/plans",
    tag = "quota",
    description = "The plans and usage types in force.",
    responses((status = 200, description = "The plans", body = PlansJson)),
    security(("bearer" = []))
)]
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
                        notify: t.notify.clone(),
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
        overage: plans
            .plan_names
            .iter()
            .filter_map(|p| {
                let types: BTreeMap<&str, Option<u64>> = plans
                    .types
                    .values()
                    .filter(|t| t.overage(p) != Overage::None)
                    .map(|t| (t.name.as_str(), t.overage(p).cap()))
                    .collect();
                (!types.is_empty()).then_some((p.as_str(), types))
            })
            .collect(),
    };
    Json(json).into_response()
}
