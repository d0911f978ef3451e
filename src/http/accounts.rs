//! The account calls: a user's membership, an account's plan and usage, and limit overrides for
//! users and accounts.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::admin::PlanRequest;
use super::quota::{usage_entries, UsageEntry};
use super::{parse_account_id, AccountIdPath, ApiJson, ApiQuery, AppState, UserIdPath};
use crate::accounts::{AccountPlan, Overrides, MAX_MEMBERS_LISTED};
use crate::db::Membership;
use crate::http::error::{ApiError, ErrorBody};
use crate::store::Owner;

/// Largest limit an override may set (a script's numbers are exact up to 2^53).
const MAX_LIMIT: i64 = (1 << 53) - 1;

/// Body of a membership change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"account_id": "0a6c2e2e-6f1c-4b8e-9d55-2f1f0b7c3a10"}))]
pub struct MembershipRequest {
    /// The account (a UUID), or null for none.
    #[schema(value_type = Option<String>, format = Uuid, required = true)]
    account_id: Value,
}

/// A user's account.
#[derive(Serialize, ToSchema)]
pub(crate) struct MembershipJson {
    /// The user.
    user_id: Uuid,
    /// The account; null for none.
    account_id: Option<Uuid>,
    /// When it last changed; null when it never did.
    updated_at: Option<DateTime<Utc>>,
}

fn membership_json(user: Uuid, m: Membership) -> Response {
    Json(MembershipJson {
        user_id: user,
        account_id: m.account,
        updated_at: m.updated_at,
    })
    .into_response()
}

/// `PUT /v1/users/{user_id}/account`: make a user a member of an account, or of none.
#[utoipa::path(
    put,
    path = "/v1/users/{user_id}/account",
    tag = "accounts",
    description = "Make a user a member of an account, or of none (admin). The user's live counters move to the account's bucket with them, and the next call on every replica counts in the account's pool: the pool counts the user's calls from now on, and an earlier pool keeps what it counted. A user belongs to at most one account. Repeating the call is harmless (and finishes a change a crash interrupted).",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    request_body = MembershipRequest,
    responses((status = 200, description = "In force", body = MembershipJson), (status = 400, description = "Bad input; changes nothing", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody), (status = 503, description = "Redis or Postgres unavailable; nothing changed, repeat it", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn put_membership(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    ApiJson(body): ApiJson<MembershipRequest>,
) -> Result<Response, ApiError> {
    let account = match &body.account_id {
        Value::Null => None,
        Value::String(s) => Some(parse_account_id(s, "account_id")?),
        other => {
            return Err(ApiError::invalid(
                "INVALID_ACCOUNT_ID",
                "account_id",
                format!(
                    "account_id must be a UUID string, or null for none; got {}.",
                    super::short(&other.to_string())
                ),
            ))
        }
    };
    let m = state.quota.set_account(user, account).await?;
    Ok(membership_json(user, m))
}

/// `GET /v1/users/{user_id}/account`: a user's account.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/account",
    tag = "accounts",
    description = "The account a user is a member of (admin); null for none.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    responses((status = 200, description = "The membership", body = MembershipJson), (status = 400, description = "Not a UUID", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_membership(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
) -> Result<Response, ApiError> {
    let m = state.quota.get_account(user).await?;
    Ok(membership_json(user, m))
}

/// An account's plan.
#[derive(Serialize, ToSchema)]
pub(crate) struct AccountPlanJson {
    /// The account.
    account_id: Uuid,
    /// The plan in force.
    plan: String,
    /// No plan is stored; the default applies.
    is_default: bool,
    /// When it was last set.
    updated_at: Option<DateTime<Utc>>,
}

impl From<AccountPlan> for AccountPlanJson {
    fn from(p: AccountPlan) -> Self {
        AccountPlanJson {
            account_id: p.account,
            plan: p.plan,
            is_default: p.is_default,
            updated_at: p.updated_at,
        }
    }
}

/// `PUT /v1/accounts/{account_id}/plan`: set an account's plan.
#[utoipa::path(
    put,
    path = "/v1/accounts/{account_id}/plan",
    tag = "accounts",
    description = "Set an account's plan (admin): its pool's limits. In force on the next request, on every replica.",
    params(("account_id" = String, Path, description = "The account, a UUID", format = Uuid)),
    request_body = PlanRequest,
    responses((status = 200, description = "Stored and in force", body = AccountPlanJson), (status = 400, description = "Bad input; changes nothing", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn put_account_plan(
    State(state): State<AppState>,
    AccountIdPath(account): AccountIdPath,
    ApiJson(body): ApiJson<PlanRequest>,
) -> Result<Response, ApiError> {
    let p = state.quota.set_account_plan(account, &body.plan).await?;
    Ok(Json(AccountPlanJson::from(p)).into_response())
}

/// `GET /v1/accounts/{account_id}/plan`: an account's plan.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/plan",
    tag = "accounts",
    description = "Read an account's plan (admin).",
    params(("account_id" = String, Path, description = "The account, a UUID", format = Uuid)),
    responses((status = 200, description = "The plan", body = AccountPlanJson), (status = 400, description = "Not a UUID", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_account_plan(
    State(state): State<AppState>,
    AccountIdPath(account): AccountIdPath,
) -> Result<Response, ApiError> {
    let p = state.quota.get_account_plan(account).await?;
    Ok(Json(AccountPlanJson::from(p)).into_response())
}

/// A customer's limit overrides.
#[derive(Serialize, ToSchema)]
pub(crate) struct LimitsJson {
    /// The user (on a user's overrides).
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<Uuid>,
    /// The account (on an account's overrides).
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<Uuid>,
    /// Type → limit in force instead of the plan's; -1 = unlimited. Types not listed follow the
    /// plan.
    overrides: BTreeMap<String, i64>,
    /// Grows on every change.
    version: i64,
    /// When they last changed; null when never.
    updated_at: Option<DateTime<Utc>>,
}

fn limits_json(o: Overrides) -> Response {
    let (user_id, account_id) = match o.owner {
        Owner::User(u) => (Some(u), None),
        Owner::Account(a) => (None, Some(a)),
    };
    Json(LimitsJson {
        user_id,
        account_id,
        overrides: o.stored.limits,
        version: o.stored.version,
        updated_at: o.stored.updated_at,
    })
    .into_response()
}

/// A limits body → the overrides to set and the types to clear.
fn parse_limits(
    body: serde_json::Map<String, Value>,
) -> Result<(BTreeMap<String, i64>, Vec<String>), ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "INVALID_LIMITS",
            "limits",
            "The body names no usage type; send {\"<type>\": <limit>}, with -1 for unlimited and null to go back to the plan.",
        ));
    }
    let mut set = BTreeMap::new();
    let mut clear = Vec::new();
    for (ty, value) in body {
        match value {
            Value::Null => clear.push(ty),
            // A whole number written as a float (`500.0`) is the same limit; every whole number
            // up to 2^53 is exact as a float.
            Value::Number(n) => match n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && (-1.0..=MAX_LIMIT as f64).contains(f))
                    .map(|f| f as i64)
            }) {
                Some(l) if (-1..=MAX_LIMIT).contains(&l) => {
                    set.insert(ty, l);
                }
                _ => return Err(bad_limit(&ty, &n.to_string())),
            },
            other => return Err(bad_limit(&ty, &other.to_string())),
        }
    }
    Ok((set, clear))
}

fn bad_limit(ty: &str, got: &str) -> ApiError {
    ApiError::invalid(
        "INVALID_LIMIT",
        "limits",
        format!(
            "The limit of {} must be a whole number from 0 to {MAX_LIMIT}, -1 for unlimited, or null to go back to the plan; got {}.",
            super::short(&format!("{ty:?}")),
            super::short(got)
        ),
    )
}

/// `PUT /v1/users/{user_id}/limits`: override a user's plan limits.
#[utoipa::path(
    put,
    path = "/v1/users/{user_id}/limits",
    tag = "accounts",
    description = "Override the plan's limit of some types for one user (admin): {\"ai_generation\": 500}; -1 = unlimited, null = back to the plan; types not named keep what they had. In force on the next request, on every replica. For a member of an account, an override limits the user inside the pool.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    request_body(content = Object, description = "Type → limit (-1 = unlimited, null = back to the plan)", example = json!({"ai_generation": 500, "export": null})),
    responses((status = 200, description = "Stored and in force: every override the user has now", body = LimitsJson), (status = 400, description = "Bad input; changes nothing", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn put_user_limits(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    ApiJson(body): ApiJson<serde_json::Map<String, Value>>,
) -> Result<Response, ApiError> {
    let (set, clear) = parse_limits(body)?;
    let o = state
        .quota
        .set_limits(Owner::User(user), &set, &clear)
        .await?;
    Ok(limits_json(o))
}

/// `GET /v1/users/{user_id}/limits`: a user's limit overrides.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/limits",
    tag = "accounts",
    description = "A user's limit overrides (admin).",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    responses((status = 200, description = "The overrides", body = LimitsJson), (status = 400, description = "Not a UUID", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_user_limits(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
) -> Result<Response, ApiError> {
    Ok(limits_json(
        state.quota.get_limits(Owner::User(user)).await?,
    ))
}

/// `PUT /v1/accounts/{account_id}/limits`: override an account's plan limits.
#[utoipa::path(
    put,
    path = "/v1/accounts/{account_id}/limits",
    tag = "accounts",
    description = "Override the plan's limit of some types for one account's pool (admin): as for a user.",
    params(("account_id" = String, Path, description = "The account, a UUID", format = Uuid)),
    request_body(content = Object, description = "Type → limit (-1 = unlimited, null = back to the plan)", example = json!({"ai_generation": 20000})),
    responses((status = 200, description = "Stored and in force: every override the account has now", body = LimitsJson), (status = 400, description = "Bad input; changes nothing", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn put_account_limits(
    State(state): State<AppState>,
    AccountIdPath(account): AccountIdPath,
    ApiJson(body): ApiJson<serde_json::Map<String, Value>>,
) -> Result<Response, ApiError> {
    let (set, clear) = parse_limits(body)?;
    let o = state
        .quota
        .set_limits(Owner::Account(account), &set, &clear)
        .await?;
    Ok(limits_json(o))
}

/// `GET /v1/accounts/{account_id}/limits`: an account's limit overrides.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/limits",
    tag = "accounts",
    description = "An account's limit overrides (admin).",
    params(("account_id" = String, Path, description = "The account, a UUID", format = Uuid)),
    responses((status = 200, description = "The overrides", body = LimitsJson), (status = 400, description = "Not a UUID", body = ErrorBody), (status = 403, description = "Needs an admin token", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_account_limits(
    State(state): State<AppState>,
    AccountIdPath(account): AccountIdPath,
) -> Result<Response, ApiError> {
    Ok(limits_json(
        state.quota.get_limits(Owner::Account(account)).await?,
    ))
}

/// Query of an account's usage.
#[derive(Debug, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AccountUsageQuery {
    /// Most members listed, 0 to 1000; default 100.
    #[serde(default)]
    #[param(minimum = 0, maximum = 1000)]
    limit: Option<usize>,
}

/// One member's use of the pool.
#[derive(Serialize, ToSchema)]
pub(crate) struct MemberJson {
    /// The member.
    user_id: Uuid,
    /// Their count per type in the period in force (their own counter).
    used: BTreeMap<String, u64>,
}

/// An account's pool and its members.
#[derive(Serialize, ToSchema)]
pub(crate) struct AccountUsageJson {
    /// The account.
    account_id: Uuid,
    /// The account's plan in force.
    plan: String,
    /// The pool's counters by type name.
    usage: BTreeMap<String, UsageEntry>,
    /// How many members the account has.
    member_count: usize,
    /// Members by what they used (all types summed), most first; at most `limit`.
    members: Vec<MemberJson>,
}

/// `GET /v1/accounts/{account_id}/usage`: an account's pool, with a per-member breakdown.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/usage",
    tag = "accounts",
    description = "The pool of an account per type (used, limit, remaining, period, limit_source) and its members by what they used, most first.",
    params(("account_id" = String, Path, description = "The account, a UUID", format = Uuid), AccountUsageQuery),
    responses((status = 200, description = "The usage", body = AccountUsageJson), (status = 400, description = "Bad input", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn account_usage(
    State(state): State<AppState>,
    AccountIdPath(account): AccountIdPath,
    ApiQuery(query): ApiQuery<AccountUsageQuery>,
) -> Result<Response, ApiError> {
    let top = query.limit.unwrap_or(100);
    if top > MAX_MEMBERS_LISTED {
        return Err(ApiError::invalid(
            "INVALID_QUERY",
            "limit",
            format!("limit must be 0 to {MAX_MEMBERS_LISTED}; got {top}."),
        ));
    }
    let u = state.quota.account_usage(account, top).await?;
    Ok(Json(AccountUsageJson {
        account_id: u.account,
        plan: u.plan,
        usage: usage_entries(&u.counters),
        member_count: u.member_count,
        members: u
            .members
            .into_iter()
            .map(|(user_id, used)| MemberJson { user_id, used })
            .collect(),
    })
    .into_response())
}
