//! `GET /v1/users/{user_id}/usage/history`: a user's usage in past periods, from Postgres.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{short, ApiQuery, AppState, UserIdPath};
use crate::history::{PeriodUsage, DEFAULT_MONTHS, MAX_MONTHS};
use crate::http::error::{ApiError, ErrorBody};

/// Query of `GET /v1/users/{user_id}/usage/history`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// How many months back, 1 to 36; default 12. A whole number.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 36)]
    months: Option<String>,
}

/// One period of a type.
#[derive(Serialize, ToSchema)]
pub(crate) struct PeriodJson {
    /// The period's first instant, as its row in Postgres carries it.
    period_start: DateTime<Utc>,
    /// Its end (exclusive).
    period_end: DateTime<Utc>,
    /// The count.
    used: u64,
    /// Units counted past the limit; only for a type the plan lets go past its limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    overage: Option<u64>,
}

/// `GET /v1/users/{user_id}/usage/history` answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryJson {
    /// The user.
    user_id: Uuid,
    /// The plan in force now: types it lets go past their limit report `overage`.
    plan: String,
    /// How many months back.
    months: u32,
    /// Periods that began after this instant are listed.
    since: DateTime<Utc>,
    /// Now; no period that begins later is listed.
    until: DateTime<Utc>,
    /// Every configured type that is not a lifetime one: its periods with recorded use, oldest
    /// first (a period without a row, so without use, is not listed).
    history: BTreeMap<String, Vec<PeriodJson>>,
}

/// The months of a history query: a whole number from 1 to 36, 12 when absent.
fn parse_months(raw: Option<&str>) -> Result<u32, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_MONTHS);
    };
    raw.parse::<u32>()
        .ok()
        .filter(|m| raw.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_MONTHS).contains(m))
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_MONTHS",
                "months",
                format!(
                    "months must be a whole number from 1 to {MAX_MONTHS}; got {}.",
                    short(&format!("{raw:?}"))
                ),
            )
        })
}

/// `GET /v1/users/{user_id}/usage/history`: the user's use per period.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/usage/history",
    tag = "quota",
    description = "The user's use in each period of the last `months` months (those that began after now − months), per usage type, oldest first, read from Postgres: the current period's figure trails the live one (`GET /v1/users/{user_id}/usage`) by up to the flush interval (QUOTAD_FLUSH_INTERVAL_MS). A period with no recorded use has no row and is not listed. Periods are the rows' own (`period_start`, `period_end`), whatever their bounds. `overage` is given for the types the user's plan lets go past their limit. Lifetime types have no history and are left out.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid), HistoryQuery),
    responses(
        (status = 200, description = "The history (empty lists for a user with no recorded use)", body = HistoryJson),
        (status = 400, description = "Not a UUID (INVALID_USER_ID), months out of range (INVALID_MONTHS), or another query parameter (INVALID_QUERY)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage_history(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let months = parse_months(query.months.as_deref())?;
    let history = state.quota.history(user, months).await?;
    let periods = |has_overage: bool, list: &[PeriodUsage]| -> Vec<PeriodJson> {
        list.iter()
            .map(|p| PeriodJson {
                period_start: p.start,
                period_end: p.end,
                used: p.used,
                overage: has_overage.then_some(p.overage),
            })
            .collect()
    };
    let json = HistoryJson {
        user_id: user,
        plan: history.plan,
        months,
        since: history.since,
        until: history.until,
        history: history
            .types
            .iter()
            .map(|(name, t)| (name.clone(), periods(t.has_overage, &t.periods)))
            .collect(),
    };
    Ok(Json(json).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_a_whole_number_from_1_to_36() {
        assert_eq!(parse_months(None).unwrap(), 12);
        assert_eq!(parse_months(Some("1")).unwrap(), 1);
        assert_eq!(parse_months(Some("036")).unwrap(), 36);
        for bad in [
            "0",
            "37",
            "abc",
            "1e3",
            "+5",
            " 5",
            "",
            "-1",
            "99999999999",
            "3.0",
        ] {
            let e = parse_months(Some(bad)).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("INVALID_MONTHS", Some("months"))
            );
        }
    }
}
