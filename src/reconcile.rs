//! Reconcile: compare Redis' counters with Postgres' rows for one period, report the drift, and
//! optionally repair it by writing the newer side over the older.
//!
//! A counter that differs only because the flusher has not written it yet (it waits in a dirty
//! set, and Redis' version is ahead) is *unflushed*, not drift. Rows of a month whose Redis hashes
//! have expired (35 days after the month) are *expired*, not drift. Rows of a user Redis holds no
//! counter of for the period (never used since a Redis restart, say) are *not loaded*, not drift:
//! Redis loads them from Postgres on their first use, so the two sides cannot disagree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{self, Table};
use crate::flusher::{FlushError, Flusher};
use crate::period::Period;
use crate::store::{CounterHash, Hydrated, Owner, RedisStore, StoreError, GRACE_DAYS};

/// The name of reconcile's Redis connection (`CLIENT LIST`).
pub const RECONCILE_CONNECTION: &str = "quotad-reconcile";

/// What reconcile found wrong with one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// Redis has it (and it is not waiting to be flushed); Postgres does not.
    MissingInPostgres,
    /// Both have it with different counts (or overage), and the difference is not an unflushed
    /// change.
    Different,
}

/// One side's view of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Side {
    /// The count.
    pub count: i64,
    /// The period's overage (units past the limit).
    pub overage: i64,
    /// The version (Redis: the hash's `v`; Postgres: the row's `version`).
    pub version: i64,
}

/// One drifting counter.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Drift {
    /// The user, for a user's counter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The account, for an account's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    /// The usage type.
    #[serde(rename = "type")]
    pub usage_type: String,
    /// What is wrong.
    pub kind: DriftKind,
    /// Redis' side (a counter Redis lacks is not loaded, not drift).
    pub redis: Side,
    /// Postgres' side, if it has one.
    pub postgres: Option<Side>,
}

/// The result of one reconcile.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Report {
    /// `2026-11` or `lifetime`.
    pub period: String,
    /// Counters looked at (the union of both sides).
    pub compared: u64,
    /// Counters equal on both sides.
    pub in_sync: u64,
    /// Counters ahead in Redis and waiting for the flusher.
    pub unflushed: u64,
    /// Postgres rows whose Redis hash has expired with its month.
    pub expired: u64,
    /// Postgres rows of users Redis holds no counter of for this period; Redis loads them from
    /// Postgres on first use.
    pub not_loaded: u64,
    /// Not-loaded counters a repair loaded from Postgres (so every replica forgets the users'
    /// remembered refusals, as after any load).
    pub loaded: u64,
    /// Everything else.
    pub drift: Vec<Drift>,
    /// Counters repaired (with `--repair`).
    pub repaired: u64,
}

/// Why reconcile could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] StoreError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    /// The repair's flush failed.
    #[error("flushing repairs: {0}")]
    Flush(#[from] FlushError),
}

/// Parses `2026-11` or `lifetime`.
pub fn parse_period(s: &str) -> Option<Period> {
    if s == "lifetime" {
        return Some(Period::Lifetime);
    }
    Period::parse_id(s).filter(|p| *p != Period::Lifetime)
}

/// The name reconcile reports a period by.
pub fn period_name(p: Period) -> String {
    match p {
        Period::Lifetime => "lifetime".into(),
        month => month.id(),
    }
}

/// Compares Redis and Postgres for `period` (users' counters with `usage_tracking`, accounts'
/// pools with `account_usage`); with `repair`, makes the older side match the newer.
pub async fn reconcile(
    store: &RedisStore,
    pool: &PgPool,
    period: Period,
    repair: bool,
    now: DateTime<Utc>,
) -> Result<Report, ReconcileError> {
    let store = store.dedicated(RECONCILE_CONNECTION, Duration::from_secs(30));
    let expired = period
        .expire_at(chrono::Duration::days(GRACE_DAYS))
        .is_some_and(|at| at <= now.timestamp());
    let mut report = Report {
        period: period_name(period),
        compared: 0,
        in_sync: 0,
        unflushed: 0,
        expired: 0,
        not_loaded: 0,
        loaded: 0,
        drift: Vec::new(),
        repaired: 0,
    };
    let mut drifting: Vec<(Owner, u16, Vec<Drift>)> = Vec::new();
    let mut unloaded = Vec::new();
    let scanned = store.scan_period(period).await?;
    for table in [Table::Users, Table::Accounts] {
        let live: Vec<_> = scanned
            .iter()
            .filter(|c| Table::of(c.owner) == table)
            .collect();
        let rows = db::period_totals(pool, table, period).await?;
        let mut pg: HashMap<Uuid, BTreeMap<String, Side>> = HashMap::new();
        for (id, ty, count, overage, version) in rows {
            pg.entry(id).or_default().insert(
                ty,
                Side {
                    count,
                    overage,
                    version,
                },
            );
        }
        let mut seen = BTreeSet::new();
        for counter in &live {
            let id = counter.owner.id();
            seen.insert(id);
            let v = counter.hash.version.unwrap_or(0);
            let theirs = pg.get(&id);
            let mut types: BTreeSet<&str> = counter.hash.types().collect();
            types.extend(theirs.iter().flat_map(|m| m.keys().map(String::as_str)));
            let mut found = Vec::new();
            for ty in types {
                report.compared += 1;
                let redis = Side {
                    count: counter.hash.count(ty),
                    overage: counter.hash.overage(ty),
                    version: v,
                };
                let postgres = theirs.and_then(|m| m.get(ty)).copied();
                let kind = match postgres {
                    Some(p) if p.count == redis.count && p.overage == redis.overage => None,
                    _ if counter.dirty && postgres.is_none_or(|p| v > p.version) => {
                        report.unflushed += 1;
                        continue;
                    }
                    None => Some(DriftKind::MissingInPostgres),
                    Some(_) => Some(DriftKind::Different),
                };
                match kind {
                    None => report.in_sync += 1,
                    Some(kind) => found.push(Drift {
                        user_id: matches!(counter.owner, Owner::User(_)).then_some(id),
                        account_id: matches!(counter.owner, Owner::Account(_)).then_some(id),
                        usage_type: ty.to_owned(),
                        kind,
                        redis,
                        postgres,
                    }),
                }
            }
            if !found.is_empty() {
                report.drift.extend(found.iter().cloned());
                drifting.push((counter.owner, counter.bucket, found));
            }
        }
        for (id, types) in &pg {
            if seen.contains(id) {
                continue;
            }
            let n = types.len() as u64;
            report.compared += n;
            if expired {
                report.expired += n;
            } else {
                report.not_loaded += n;
                unloaded.push((table.owner(*id), n));
            }
        }
    }
    for kind in [DriftKind::MissingInPostgres, DriftKind::Different] {
        let n = report.drift.iter().filter(|d| d.kind == kind).count();
        let label = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        metrics::gauge!(crate::metrics::RECONCILE_DRIFT, "period" => report.period.clone(), "kind" => label).set(n as f64);
    }
    if repair && !drifting.is_empty() {
        report.repaired = self::repair(&store, pool, period, &drifting).await?;
    }
    if repair {
        for (owner, n) in unloaded {
            let snap = db::snapshot(pool, owner, period).await?;
            // Loaded where the owner's counters live: a member's in their account's bucket.
            let (keys, believed) = match owner {
                Owner::User(user) => {
                    let keys = store.keys_in(user, snap.account);
                    (keys.own().clone(), keys.route_value())
                }
                Owner::Account(account) => (store.account_keys(account), String::new()),
            };
            if store.hydrate(&keys, period, &snap, now, &believed).await? == Hydrated::Filled {
                report.loaded += n;
            }
        }
    }
    Ok(report)
}

/// Writes the newer side over the older, per (owner, period): Postgres newer → overwrite Redis;
/// otherwise (Redis newer, or a tie) → bump Redis' version and flush it, so Postgres takes Redis'
/// counts. (Every drifting counter has a Redis side: one Redis lacks is only not loaded yet.)
async fn repair(
    store: &RedisStore,
    pool: &PgPool,
    period: Period,
    drifting: &[(Owner, u16, Vec<Drift>)],
) -> Result<u64, ReconcileError> {
    let mut repaired = 0;
    let mut touched = false;
    for (owner, bucket, items) in drifting {
        let snap = db::snapshot(pool, *owner, period).await?;
        let keys = store.keys_of(*owner, *bucket);
        let redis_v = items.iter().map(|d| d.redis.version).max().unwrap_or(0);
        let done = if snap.version > redis_v {
            // Every type Redis has must be set, so a type Postgres lacks goes to 0, and so does
            // an overage Postgres does not hold (a load leaves out an overage of 0).
            let mut fields: Vec<(String, String)> = snap
                .fields
                .iter()
                .filter(|(f, _)| !f.starts_with("o:"))
                .cloned()
                .collect();
            for d in items {
                if d.postgres.is_none() {
                    fields.extend(CounterHash::row_fields(
                        &d.usage_type,
                        0,
                        0,
                        serde_json::Value::Null,
                        false,
                    ));
                }
                let overage = CounterHash::overage_field(&d.usage_type);
                if !fields.iter().any(|(f, _)| *f == overage) {
                    fields.push((overage, "0".to_owned()));
                }
            }
            store
                .overwrite(&keys, period, snap.version, &fields)
                .await?
        } else {
            touched = true;
            store.touch(&keys, period).await?
        };
        if done {
            repaired += items.len() as u64;
        }
    }
    if touched {
        Flusher::new(store, pool).flush_once().await?;
    }
    Ok(repaired)
}

impl Report {
    /// A table for people: one line per drifting counter, then the totals.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for d in &self.drift {
            let side = |s: Option<Side>| {
                s.map_or("-".to_owned(), |s| match s.overage {
                    0 => format!("{} (v{})", s.count, s.version),
                    o => format!("{} +{o} over (v{})", s.count, s.version),
                })
            };
            let who = match (d.user_id, d.account_id) {
                (Some(u), _) => u.to_string(),
                (_, Some(a)) => format!("account {a}"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{}  {:<20} {:<20} redis {:<14} postgres {}\n",
                who,
                d.usage_type,
                format!("{:?}", d.kind),
                side(Some(d.redis)),
                side(d.postgres)
            ));
        }
        out.push_str(&format!(
            "period {}: {} compared, {} in sync, {} unflushed, {} expired in Redis, {} not loaded in Redis ({} loaded), {} drifting, {} repaired\n",
            self.period,
            self.compared,
            self.in_sync,
            self.unflushed,
            self.expired,
            self.not_loaded,
            self.loaded,
            self.drift.len(),
            self.repaired
        ));
        out
    }
}
