//! A user's usage in past periods, from the durable record (`usage_tracking`): what
//! `GET /v1/users/{id}/usage/history` answers and the usage page charts.
//!
//! Periods are taken as the rows carry them (`period_start`, `period_end`), never recomputed: a
//! user's month may run from any instant to the same instant a month later. A period is listed
//! when its row exists, so a month without any use (no row) is absent rather than 0; and the
//! current period's figure is the one last flushed, which trails Redis by up to the flush
//! interval. Lifetime types have no history and are left out.

use std::collections::BTreeMap;

use chrono::{DateTime, Months, Utc};
use uuid::Uuid;

use crate::db;
use crate::overage::Overage;
use crate::period::PeriodKind;
use crate::quota::{Quota, QuotaError};

/// Most months one history reaches back.
pub const MAX_MONTHS: u32 = 36;
/// How far a history reaches back when the request does not say.
pub const DEFAULT_MONTHS: u32 = 12;

/// A user's usage per period.
#[derive(Debug, Clone)]
pub struct History {
    /// The plan in force now (it decides whether overage is reported).
    pub plan: String,
    /// Periods that began after this instant are listed: `months` before `until`.
    pub since: DateTime<Utc>,
    /// Now, by the daemon's clock; no period that begins later is listed.
    pub until: DateTime<Utc>,
    /// Every configured type that is not a lifetime one, by name.
    pub types: BTreeMap<String, TypeHistory>,
}

/// One type's periods, oldest first.
#[derive(Debug, Clone, Default)]
pub struct TypeHistory {
    /// Whether the plan in force lets this type go past its limit (then overage is reported).
    pub has_overage: bool,
    /// The periods with a row in Postgres.
    pub periods: Vec<PeriodUsage>,
}

/// One period's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodUsage {
    /// The period's first instant.
    pub start: DateTime<Utc>,
    /// Its end (exclusive).
    pub end: DateTime<Utc>,
    /// The count.
    pub used: u64,
    /// Units counted past the limit.
    pub overage: u64,
}

impl Quota {
    /// `user`'s periods of the last `months` months (1 to [`MAX_MONTHS`]) before now.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn history(&self, user: Uuid, months: u32) -> Result<History, QuotaError> {
        let plans = self.plans.current();
        let until = self.clock.now();
        let since = until
            .checked_sub_months(Months::new(months))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let stored = self.get_plan(user).await?;
        let plan = plans.effective_plan(Some(&stored.plan)).to_owned();
        let mut types: BTreeMap<String, TypeHistory> = plans
            .types
            .values()
            .filter(|t| t.period != PeriodKind::Lifetime)
            .map(|t| {
                let history = TypeHistory {
                    has_overage: t.overage(&plan) != Overage::None,
                    periods: Vec::new(),
                };
                (t.name.clone(), history)
            })
            .collect();
        let names: Vec<String> = types.keys().cloned().collect();
        let rows = db::within(
            self.db_timeout,
            db::usage_history(&self.db, user, &names, since, until),
        )
        .await?;
        for row in rows {
            if let Some(t) = types.get_mut(&row.usage_type) {
                t.periods.push(PeriodUsage {
                    start: row.period_start,
                    end: row.period_end,
                    used: row.count.max(0) as u64,
                    overage: row.overage.max(0) as u64,
                });
            }
        }
        Ok(History {
            plan,
            since,
            until,
            types,
        })
    }
}
