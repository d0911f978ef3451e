//! Postgres: the durable record. Database creation, migrations, the hydration read, plans,
//! accounts and limit overrides.
//! Functions take an executor, so callers decide what is atomic.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgExecutor, PgPool, Postgres};
use uuid::Uuid;

use crate::events::ThresholdEvent;
use crate::period::Period;

use crate::store::counter::Row;
use crate::store::{CounterHash, Owner, Snapshot};

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pool that connects lazily, so the daemon starts (and answers /healthz) while Postgres is down.
///
/// With `timeout`, every statement on its connections is bounded by the server too
/// (`statement_timeout` and `lock_timeout`, sent as connection options): a query stuck behind a
/// lock, or on a server that hangs, is abandoned by Postgres as well as by quotad's own deadline
/// ([`within`]). `None` (the `reconcile` and `migrate` commands) leaves statements unbounded.
pub fn lazy_pool(url: &str, timeout: Option<Duration>) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(match timeout {
        Some(t) => PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(t)
            .connect_lazy_with(bounded(options, t)),
        None => PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options),
    })
}

/// A pool of its own on the same server and database as `pool`, with `max_connections` and its
/// own statement deadline (the flusher's: its batches are far bigger than one request's reads,
/// and they must not take the request path's connections).
pub fn pool_like(pool: &PgPool, timeout: Duration, max_connections: u32) -> PgPool {
    let options = (*pool.connect_options()).clone();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_lazy_with(bounded(options, timeout))
}

/// `options` with the server-side deadlines set to `timeout` (a later `-c` wins over an earlier).
fn bounded(options: PgConnectOptions, timeout: Duration) -> PgConnectOptions {
    let ms = timeout.as_millis().max(1).to_string();
    options.options([("statement_timeout", &ms), ("lock_timeout", &ms)])
}

/// Runs `work` under `timeout`, enforced here as well as by the server: past it, or when the
/// server gave up first (`statement_timeout`, `lock_timeout`), the error is an I/O timeout, which
/// callers treat as Postgres being unavailable (the fail policy; 503 `DATABASE_UNAVAILABLE`).
pub async fn within<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let timed_out = || {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("postgres did not answer within {} ms", timeout.as_millis()),
        ))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Err(e)) if sqlstate(&e).is_some_and(|c| c == "57014" || c == "55P03") => {
            Err(timed_out())
        }
        Ok(result) => result,
        Err(_) => Err(timed_out()),
    }
}

/// The SQLSTATE of an error the server answered with.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether Postgres refused a statement for the data it carried (SQLSTATE class 22, data
/// exception: e.g. a `\u0000` in jsonb; class 23, integrity constraint violation), rather than
/// for being unreachable, overloaded or out of time. Such a statement fails the same way every
/// time it is sent; sending the other rows without the bad one succeeds.
pub fn is_data_refusal(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

/// Creates the database named in `url` if it does not exist, then applies every migration.
pub async fn prepare(url: &str, pool: &PgPool) -> Result<(), sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        // Two daemons may race to create it; the loser's "already exists" is not an error.
        if let Err(e) = Postgres::create_database(url).await {
            if !Postgres::database_exists(url).await? {
                return Err(e);
            }
        }
    }
    // On a connection of their own without the pool's statement deadline: a migration may
    // rewrite a large table, or wait for the flushers' row locks to take a table lock.
    let options = (*pool.connect_options())
        .clone()
        .options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut conn = PgConnection::connect_with(&options).await?;
    let migrated = MIGRATOR.run_direct(None, &mut conn, false).await;
    let _ = conn.close().await;
    migrated?;
    Ok(())
}

/// Whether every embedded migration is applied.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// Which table holds an owner's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `usage_tracking`: users' totals.
    Users,
    /// `account_usage`: accounts' totals.
    Accounts,
}

impl Table {
    /// The table of `owner`'s totals.
    pub fn of(owner: Owner) -> Table {
        match owner {
            Owner::User(_) => Table::Users,
            Owner::Account(_) => Table::Accounts,
        }
    }

    /// The table's name and its owner column: fixed names, never input.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Table::Users => ("usage_tracking", "user_id"),
            Table::Accounts => ("account_usage", "account_id"),
        }
    }

    /// The owner of `id` in this table.
    pub fn owner(self, id: Uuid) -> Owner {
        match self {
            Table::Users => Owner::User(id),
            Table::Accounts => Owner::Account(id),
        }
    }
}

/// A statement built from a fixed template and [`Table::names`] (never from input).
fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

/// What Postgres holds for one owner and period: every type's count and metadata, the highest
/// version, the owner's plan and overrides, and (for a user) their account. This is what a
/// missing Redis counter is loaded from.
pub async fn snapshot(db: &PgPool, owner: Owner, period: Period) -> Result<Snapshot, sqlx::Error> {
    let mut snaps = snapshots(db, &[(owner, period)]).await?;
    snaps.pop().unwrap_or_else(|| Ok(Snapshot::default()))
}

/// [`snapshot`] for many (owner, period) pairs: one statement for the users among them and one
/// for the accounts (the pairs go as arrays through `UNNEST`). Returns one entry per pair, in
/// order: its snapshot, or the error decoding one of its rows, so a row that cannot be read fails
/// its own pair only. The outer error is a statement's: then no pair has an answer. Also returns
/// how many statements were sent.
pub async fn snapshots(
    db: &PgPool,
    pairs: &[(Owner, Period)],
) -> Result<Vec<Result<Snapshot, sqlx::Error>>, sqlx::Error> {
    Ok(snapshots_counted(db, pairs).await?.0)
}

/// [`snapshots`], and how many statements it sent.
pub async fn snapshots_counted(
    db: &PgPool,
    pairs: &[(Owner, Period)],
) -> Result<(Vec<Result<Snapshot, sqlx::Error>>, u64), sqlx::Error> {
    let mut snaps: Vec<Result<Snapshot, sqlx::Error>> =
        pairs.iter().map(|_| Ok(Snapshot::default())).collect();
    let mut statements = 0;
    for table in [Table::Users, Table::Accounts] {
        let picked: Vec<usize> = (0..pairs.len())
            .filter(|i| Table::of(pairs[*i].0) == table)
            .collect();
        if picked.is_empty() {
            continue;
        }
        statements += 1;
        let ids: Vec<Uuid> = picked.iter().map(|i| pairs[*i].0.id()).collect();
        let starts: Vec<DateTime<Utc>> = picked.iter().map(|i| pairs[*i].1.start()).collect();
        let (usage, id) = table.names();
        let (plans, kind, membership) = match table {
            Table::Users => (
                "user_plans p ON p.user_id = w.u",
                "user",
                "LEFT JOIN account_members am ON am.user_id = w.u",
            ),
            Table::Accounts => ("account_plans p ON p.account_id = w.u", "account", ""),
        };
        let member_of = if membership.is_empty() {
            "NULL::uuid"
        } else {
            "am.account_id"
        };
        // One row per (pair, type) Postgres holds, or one with a NULL type for a pair it has none
        // of; each with the owner's plan, overrides and account (NULL when none is stored).
        let rows = sqlx::query(sql(format!(
            r#"SELECT w.i, t.type, COALESCE(t.count, 0) AS count, t.overage, t.version,
                      COALESCE(t.metadata, '{{}}'::jsonb) AS metadata, p.plan, p.version AS plan_version,
                      o.limits, o.version AS overrides_version, {member_of} AS account
               FROM UNNEST($1::uuid[], $2::timestamptz[]) WITH ORDINALITY AS w(u, ps, i)
               LEFT JOIN {usage} t ON t.{id} = w.u AND t.period_start = w.ps
               LEFT JOIN {plans}
               LEFT JOIN limit_overrides o ON o.owner = '{kind}' AND o.owner_id = w.u
               {membership}"#
        )))
        .bind(&ids)
        .bind(&starts)
        .fetch_all(db)
        .await?;
        for row in rows {
            use sqlx::Row;
            let i: i64 = row.try_get("i")?;
            let Some(at) = usize::try_from(i - 1).ok().and_then(|i| picked.get(i)) else {
                continue;
            };
            let slot = &mut snaps[*at];
            let Ok(snap) = slot else { continue };
            let read = || -> Result<_, sqlx::Error> {
                Ok((
                    row.try_get::<Option<String>, _>("type")?,
                    row.try_get::<i64, _>("count")?,
                    row.try_get::<Option<i64>, _>("overage")?,
                    row.try_get::<Option<i64>, _>("version")?,
                    row.try_get::<serde_json::Value, _>("metadata")?,
                    row.try_get::<Option<String>, _>("plan")?,
                    row.try_get::<Option<i64>, _>("plan_version")?,
                    row.try_get::<Option<serde_json::Value>, _>("limits")?,
                    row.try_get::<Option<i64>, _>("overrides_version")?,
                    row.try_get::<Option<Uuid>, _>("account")?,
                ))
            };
            match read() {
                Ok((
                    ty,
                    count,
                    overage,
                    version,
                    metadata,
                    plan,
                    plan_version,
                    limits,
                    ov,
                    account,
                )) => {
                    if let (Some(plan), Some(pv)) = (plan, plan_version) {
                        snap.plan = Some((plan, pv));
                    }
                    snap.account = account;
                    if let (Some(limits), Some(ov)) = (limits, ov) {
                        if snap.overrides_version != ov {
                            snap.overrides_version = ov;
                            snap.fields.extend(
                                overrides_of(&limits)
                                    .into_iter()
                                    .map(|(t, l)| (format!("o:{t}"), l.to_string())),
                            );
                        }
                    }
                    if let Some(ty) = ty {
                        snap.version = snap.version.max(version.unwrap_or(0));
                        snap.fields.extend(CounterHash::row_fields(
                            &ty,
                            count,
                            overage.unwrap_or(0),
                            metadata,
                            table == Table::Users,
                        ));
                    }
                }
                Err(e) => *slot = Err(e),
            }
        }
    }
    Ok((snaps, statements))
}

/// Every row of `period` in `table` (owner, type, count, overage, version): what reconcile
/// compares Redis with.
pub async fn period_totals(
    db: &PgPool,
    table: Table,
    period: Period,
) -> Result<Vec<(Uuid, String, i64, i64, i64)>, sqlx::Error> {
    let (usage, id) = table.names();
    sqlx::query_as(sql(format!(
        "SELECT {id}, type, COALESCE(count, 0), overage, version FROM {usage} WHERE period_start = $1"
    )))
    .bind(period.start())
    .fetch_all(db)
    .await
}

/// A user's or an account's stored plan.
#[derive(Debug, Clone)]
pub struct StoredPlan {
    /// Plan name.
    pub plan: String,
    /// Grows on every change.
    pub version: i64,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// The plans table of `owner` and its id column.
fn plans_of(owner: Owner) -> (&'static str, &'static str) {
    match owner {
        Owner::User(_) => ("user_plans", "user_id"),
        Owner::Account(_) => ("account_plans", "account_id"),
    }
}

/// The owner's stored plan, if any.
pub async fn get_plan(
    db: impl PgExecutor<'_>,
    owner: Owner,
) -> Result<Option<StoredPlan>, sqlx::Error> {
    let (table, id) = plans_of(owner);
    let row: Option<(String, i64, DateTime<Utc>)> = sqlx::query_as(sql(format!(
        "SELECT plan, version, updated_at FROM {table} WHERE {id} = $1"
    )))
    .bind(owner.id())
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(plan, version, updated_at)| StoredPlan {
        plan,
        version,
        updated_at,
    }))
}

/// Stores the owner's plan and returns the row, whose version is higher than any before it.
pub async fn put_plan(
    db: impl PgExecutor<'_>,
    owner: Owner,
    plan: &str,
) -> Result<StoredPlan, sqlx::Error> {
    let (table, id) = plans_of(owner);
    let (plan, version, updated_at): (String, i64, DateTime<Utc>) = sqlx::query_as(sql(format!(
        r#"INSERT INTO {table} ({id}, plan, version, updated_at) VALUES ($1, $2, 1, now())
           ON CONFLICT ({id}) DO UPDATE
             SET plan = EXCLUDED.plan, version = {table}.version + 1, updated_at = now()
           RETURNING plan, version, updated_at"#
    )))
    .bind(owner.id())
    .bind(plan)
    .fetch_one(db)
    .await?;
    Ok(StoredPlan {
        plan,
        version,
        updated_at,
    })
}

/// An owner's limit overrides as stored: type → limit (-1 = unlimited), their version and when
/// they were last changed (version 0 and no time when none were ever set).
#[derive(Debug, Clone, Default)]
pub struct StoredOverrides {
    /// Type → limit, -1 = unlimited.
    pub limits: BTreeMap<String, i64>,
    /// Grows on every change.
    pub version: i64,
    /// When they were last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

/// `{"type": limit}` as stored → pairs (entries that are not whole numbers are skipped: quotad
/// writes none).
fn overrides_of(limits: &serde_json::Value) -> BTreeMap<String, i64> {
    limits
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The owner's limit overrides.
pub async fn get_overrides(
    db: impl PgExecutor<'_>,
    owner: Owner,
) -> Result<StoredOverrides, sqlx::Error> {
    let row: Option<(serde_json::Value, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT limits, version, updated_at FROM limit_overrides WHERE owner = $1 AND owner_id = $2",
    )
    .bind(owner.kind())
    .bind(owner.id())
    .fetch_optional(db)
    .await?;
    Ok(row
        .map(|(limits, version, updated_at)| StoredOverrides {
            limits: overrides_of(&limits),
            version,
            updated_at: Some(updated_at),
        })
        .unwrap_or_default())
}

/// Changes the owner's limit overrides: each of `set` is set (-1 = unlimited), each of `clear`
/// removed; the others stay. Returns the whole set after the change, with its new version.
pub async fn put_overrides(
    db: impl PgExecutor<'_>,
    owner: Owner,
    set: &BTreeMap<String, i64>,
    clear: &[String],
) -> Result<StoredOverrides, sqlx::Error> {
    let set = serde_json::to_value(set).unwrap_or_default();
    let (limits, version, updated_at): (serde_json::Value, i64, DateTime<Utc>) = sqlx::query_as(
        r#"INSERT INTO limit_overrides (owner, owner_id, limits, version, updated_at)
             VALUES ($1, $2, $3::jsonb - $4::text[], 1, now())
           ON CONFLICT (owner, owner_id) DO UPDATE
             SET limits = (limit_overrides.limits || $3::jsonb) - $4::text[],
                 version = limit_overrides.version + 1, updated_at = now()
           RETURNING limits, version, updated_at"#,
    )
    .bind(owner.kind())
    .bind(owner.id())
    .bind(set)
    .bind(clear)
    .fetch_one(db)
    .await?;
    Ok(StoredOverrides {
        limits: overrides_of(&limits),
        version,
        updated_at: Some(updated_at),
    })
}

/// A user's account as stored.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The account; `None` = none.
    pub account: Option<Uuid>,
    /// Grows on every change (0 = never set).
    pub version: i64,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The user's account.
pub async fn get_membership(
    db: impl PgExecutor<'_>,
    user: Uuid,
) -> Result<Membership, sqlx::Error> {
    let row: Option<(Option<Uuid>, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT account_id, version, updated_at FROM account_members WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        Some((account, version, updated_at)) => Membership {
            account,
            version,
            updated_at: Some(updated_at),
        },
        None => Membership {
            account: None,
            version: 0,
            updated_at: None,
        },
    })
}

/// Locks the user's membership row for the rest of `tx` (creating it, without an account, if
/// missing) and returns it: membership changes of one user are applied one at a time.
pub async fn lock_membership(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    user: Uuid,
) -> Result<Membership, sqlx::Error> {
    sqlx::query(
        "INSERT INTO account_members (user_id, account_id, version) VALUES ($1, NULL, 0)
         ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(user)
    .execute(&mut **tx)
    .await?;
    let (account, version, updated_at): (Option<Uuid>, i64, DateTime<Utc>) = sqlx::query_as(
        "SELECT account_id, version, updated_at FROM account_members WHERE user_id = $1 FOR UPDATE",
    )
    .bind(user)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Membership {
        account,
        version,
        updated_at: Some(updated_at),
    })
}

/// Sets the user's account (in `tx`, after [`lock_membership`]).
pub async fn put_membership(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    user: Uuid,
    account: Option<Uuid>,
) -> Result<Membership, sqlx::Error> {
    let (account, version, updated_at): (Option<Uuid>, i64, DateTime<Utc>) = sqlx::query_as(
        "UPDATE account_members SET account_id = $2, version = version + 1, updated_at = now()
         WHERE user_id = $1 RETURNING account_id, version, updated_at",
    )
    .bind(user)
    .bind(account)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Membership {
        account,
        version,
        updated_at: Some(updated_at),
    })
}

/// The members of `account`.
pub async fn members(db: impl PgExecutor<'_>, account: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM account_members WHERE account_id = $1 ORDER BY user_id")
        .bind(account)
        .fetch_all(db)
        .await
}

/// Absolute totals to write, one entry per (user, type, period), as parallel columns so they go
/// to Postgres as one `UNNEST` statement however many there are.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// The owner of each row (user_id, or account_id in account_usage).
    pub users: Vec<Uuid>,
    /// type of each row.
    pub types: Vec<String>,
    /// count of each row.
    pub counts: Vec<i64>,
    /// overage of each row.
    pub overages: Vec<i64>,
    /// period_start of each row.
    pub starts: Vec<DateTime<Utc>>,
    /// period_end of each row (`None` for lifetime).
    pub ends: Vec<Option<DateTime<Utc>>>,
    /// metadata of each row.
    pub metadata: Vec<serde_json::Value>,
    /// version of each row.
    pub versions: Vec<i64>,
    /// The threshold events each row's counter recorded for its type that Postgres may not have
    /// yet: written to the outbox in the same statement as the row.
    pub events: Vec<Vec<ThresholdEvent>>,
}

impl Totals {
    /// Adds one row without overage.
    pub fn push(
        &mut self,
        user: Uuid,
        ty: String,
        count: i64,
        period: Period,
        metadata: serde_json::Value,
        version: i64,
    ) {
        let row = Row {
            usage_type: ty,
            count,
            overage: 0,
            metadata,
        };
        self.push_row(user, row, period, version);
    }

    /// Adds one row: `row` of `user`'s counter of `period` at `version`.
    pub fn push_row(&mut self, user: Uuid, row: Row, period: Period, version: i64) {
        self.users.push(user);
        self.types.push(row.usage_type);
        self.counts.push(row.count);
        self.overages.push(row.overage);
        self.starts.push(period.start());
        self.ends.push(period.end());
        self.metadata.push(row.metadata);
        self.versions.push(version);
        self.events.push(Vec::new());
    }

    /// Gives the row pushed last the threshold events to write with it.
    pub fn attach(&mut self, events: Vec<ThresholdEvent>) {
        if let Some(last) = self.events.last_mut() {
            *last = events;
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Puts the rows in (user_id, type, period_start) order. Every writer sends its rows in
    /// this one order, so two upserts that share rows take their row locks in the same order and
    /// cannot deadlock (in `HashMap` order, two replicas' upserts could each hold a row the
    /// other waits for).
    /// Returns, for each row now, the index it had before.
    pub fn sort(&mut self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by(|&a, &b| {
            (self.users[a], &self.types[a], self.starts[a]).cmp(&(
                self.users[b],
                &self.types[b],
                self.starts[b],
            ))
        });
        *self = self.pick(order.iter().copied());
        order
    }

    /// The rows at `rows`, in that order.
    pub fn pick(&self, rows: impl IntoIterator<Item = usize>) -> Totals {
        let mut t = Totals::default();
        for i in rows {
            t.users.push(self.users[i]);
            t.types.push(self.types[i].clone());
            t.counts.push(self.counts[i]);
            t.overages.push(self.overages[i]);
            t.starts.push(self.starts[i]);
            t.ends.push(self.ends[i]);
            t.metadata.push(self.metadata[i].clone());
            t.versions.push(self.versions[i]);
            t.events.push(self.events[i].clone());
        }
        t
    }
}

/// A row Postgres holds at a higher version than the one just sent for it.
#[derive(Debug, Clone, PartialEq)]
pub struct AheadRow {
    /// The owner's id (a user's, or an account's).
    pub user: Uuid,
    /// The type.
    pub usage_type: String,
    /// The row's period_start.
    pub period_start: DateTime<Utc>,
    /// Postgres' count.
    pub count: i64,
    /// Postgres' overage.
    pub overage: i64,
    /// Postgres' version.
    pub version: i64,
    /// Postgres' metadata.
    pub metadata: serde_json::Value,
}

/// Every row of each (user, period) of which Postgres holds some row of `t` at a higher
/// version than `t`'s, or at the same version with another count or overage: the counters whose
/// Redis side
/// is older than Postgres (a Redis restored from an older dump, or a replica that lagged). The
/// upsert refused those rows. Also lists the same (user, period)'s other rows, so a repair sees
/// every type Postgres has.
pub async fn ahead_of(
    db: impl PgExecutor<'_>,
    table: Table,
    t: &Totals,
) -> Result<Vec<AheadRow>, sqlx::Error> {
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let (usage, id) = table.names();
    #[allow(clippy::type_complexity)]
    let rows: Vec<(Uuid, String, DateTime<Utc>, i64, i64, i64, serde_json::Value)> =
        sqlx::query_as(sql(format!(
            r#"WITH sent AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::int8[], $5::int8[], $6::int8[])
               AS x(u, t, ps, c, v, o)),
           ahead AS (
             SELECT DISTINCT sent.u, sent.ps FROM sent JOIN {usage} p
               ON p.{id} = sent.u AND p.type = sent.t AND p.period_start = sent.ps
             WHERE p.version > sent.v
                OR (p.version = sent.v AND (COALESCE(p.count, 0) <> sent.c OR p.overage <> sent.o)))
           SELECT r.{id}, r.type, r.period_start, COALESCE(r.count, 0), r.overage, r.version,
                  COALESCE(r.metadata, '{{}}'::jsonb)
           FROM {usage} r JOIN ahead ON r.{id} = ahead.u AND r.period_start = ahead.ps
           ORDER BY r.{id}, r.type, r.period_start"#
        )))
        .bind(&t.users)
        .bind(&t.types)
        .bind(&t.starts)
        .bind(&t.counts)
        .bind(&t.versions)
        .bind(&t.overages)
        .fetch_all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(user, usage_type, period_start, count, overage, version, metadata)| AheadRow {
                user,
                usage_type,
                period_start,
                count,
                overage,
                version,
                metadata,
            },
        )
        .collect())
}

/// Writes absolute totals to `table` in one statement, in the order given (see
/// [`Totals::sort`]). A row is only overwritten by a higher version, so replaying a write, or two
/// replicas writing at once, or an old total arriving late, never moves a count backwards or
/// counts twice. Returns the rows inserted or updated.
pub async fn upsert_totals(
    db: impl PgExecutor<'_>,
    table: Table,
    t: &Totals,
) -> Result<u64, sqlx::Error> {
    Ok(write_totals(db, table, t, &[]).await?.rows)
}

/// The outbox part of a statement (common table expressions `ev`, the events new to
/// `usage_events`, and `deliveries`), its parameters numbered from `$first` in the order
/// [`bind_events`] binds them.
fn events_cte(first: usize) -> String {
    let p: Vec<String> = (first..first + 12).map(|i| format!("${i}")).collect();
    format!(
        r#"ev AS (
             INSERT INTO usage_events (id, type, user_id, usage_type, threshold, used, "limit", plan,
                                       period_start, period_end, occurred_at)
             SELECT i, {}, u, ty, th, us, li, pl, ps, pe, oc
             FROM UNNEST({}::text[], {}::uuid[], {}::text[], {}::int4[], {}::int8[], {}::int8[],
                         {}::text[], {}::timestamptz[], {}::timestamptz[], {}::timestamptz[])
               AS e(i, u, ty, th, us, li, pl, ps, pe, oc)
             ON CONFLICT (id) DO NOTHING
             RETURNING id),
           deliveries AS (
             INSERT INTO event_deliveries (event_id, endpoint)
             SELECT ev.id, endpoint FROM ev CROSS JOIN UNNEST({}::text[]) AS endpoint
             ON CONFLICT DO NOTHING)"#,
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]
    )
}

/// Binds the parameters of [`events_cte`].
fn bind_events<'q, O>(
    q: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    events: &[&ThresholdEvent],
    endpoints: &'q [String],
) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(crate::events::THRESHOLD)
        .bind(events.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.user).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.usage_type.clone())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.threshold).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.used).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.limit).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.plan.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.period_start).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.period_end).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(endpoints)
}

/// Writes threshold events to the outbox without their rows (whose totals Postgres refused for
/// their data: the events are true all the same). Returns how many were new.
pub async fn record_events(
    db: impl PgExecutor<'_>,
    events: &[&ThresholdEvent],
    endpoints: &[String],
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let (new,): (i64,) = bind_events(
        sqlx::query_as(sql(format!(
            "WITH {} SELECT count(*) FROM ev",
            events_cte(1)
        ))),
        events,
        endpoints,
    )
    .fetch_one(db)
    .await?;
    Ok(new as u64)
}

/// What [`write_totals`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TotalsWritten {
    /// Rows inserted or updated.
    pub rows: u64,
    /// Events new to the outbox.
    pub events: u64,
}

/// [`upsert_totals`], and the rows' threshold events into the outbox in the same statement (so
/// in one transaction): each event new to `usage_events` gets a pending delivery for every one
/// of `endpoints`; an event the outbox has already (written by an earlier flush, or recorded
/// again after a Redis loss) changes nothing. Events are written whether or not the version
/// guard takes their row: an event is true once recorded.
pub async fn write_totals(
    db: impl PgExecutor<'_>,
    table: Table,
    t: &Totals,
    endpoints: &[String],
) -> Result<TotalsWritten, sqlx::Error> {
    if t.is_empty() {
        return Ok(TotalsWritten::default());
    }
    let (usage, id) = table.names();
    let upsert = format!(
        r#"INSERT INTO {usage}
             (id, {id}, type, count, period_start, period_end, metadata, version, overage, created_at, updated_at)
           SELECT gen_random_uuid(), u, t, c, ps, pe, m, v, o, now(), now()
           FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::timestamptz[], $6::jsonb[], $7::int8[], $8::int8[])
             AS x(u, t, c, ps, pe, m, v, o)
           ON CONFLICT ({id}, type, period_start) DO UPDATE
             SET count = EXCLUDED.count, metadata = EXCLUDED.metadata, version = EXCLUDED.version,
                 overage = EXCLUDED.overage, period_end = EXCLUDED.period_end, updated_at = now()
             WHERE {usage}.version < EXCLUDED.version"#
    );
    // One statement either way: the events' CTEs only when the rows carry some.
    let events: Vec<&ThresholdEvent> = t.events.iter().flatten().collect();
    let statement = if events.is_empty() {
        format!("WITH up AS ({upsert} RETURNING 1) SELECT (SELECT count(*) FROM up), 0::int8")
    } else {
        format!(
            "WITH {}, up AS ({upsert} RETURNING 1) SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM ev)",
            events_cte(9)
        )
    };
    let totals = sqlx::query_as(sql(statement))
        .bind(&t.users)
        .bind(&t.types)
        .bind(&t.counts)
        .bind(&t.starts)
        .bind(&t.ends)
        .bind(&t.metadata)
        .bind(&t.versions)
        .bind(&t.overages);
    let query = if events.is_empty() {
        totals
    } else {
        bind_events(totals, &events, endpoints)
    };
    let (rows, new): (i64, i64) = query.fetch_one(db).await?;
    Ok(TotalsWritten {
        rows: rows as u64,
        events: new as u64,
    })
}

/// A delivery of the outbox, with its event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event.
    pub event: ThresholdEvent,
    /// Where it goes.
    pub endpoint: String,
    /// Attempts made, this one included when claimed.
    pub attempts: u32,
}

/// The columns of an event, in [`event_of`]'s order.
const EVENT_COLUMNS: &str = r#"e.id, e.user_id, e.usage_type, e.threshold, e.used, e."limit", e.plan,
    e.period_start, e.period_end, e.occurred_at"#;

/// An event's columns, then two more.
type EventRow<A, B> = (
    String,
    Uuid,
    String,
    i32,
    i64,
    i64,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    A,
    B,
);

/// The event of a row, and the row's two further columns.
fn event_of<A, B>(r: EventRow<A, B>) -> (ThresholdEvent, A, B) {
    let event = ThresholdEvent {
        id: r.0,
        user: r.1,
        usage_type: r.2,
        threshold: r.3,
        used: r.4,
        limit: r.5,
        plan: r.6,
        period_start: r.7,
        period_end: r.8,
        occurred_at: r.9,
    };
    (event, r.10, r.11)
}

/// Claims up to `limit` pending deliveries to `endpoints` that are due, oldest first, for one
/// attempt each: counts the attempt and moves `next_attempt_at` past `lease`, so no other
/// dispatcher takes them meanwhile, and a dispatcher that dies mid-attempt leaves them to be
/// claimed again when the lease ends. Rows another dispatcher holds are skipped, not waited for.
pub async fn claim_deliveries(
    db: impl PgExecutor<'_>,
    endpoints: &[String],
    limit: i64,
    lease: Duration,
) -> Result<Vec<Delivery>, sqlx::Error> {
    let rows: Vec<EventRow<String, i32>> = sqlx::query_as(sql(format!(
        r#"WITH due AS (
             SELECT event_id, endpoint FROM event_deliveries
             WHERE status = 'pending' AND next_attempt_at <= now() AND endpoint = ANY($1)
             ORDER BY next_attempt_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED),
           claimed AS (
             UPDATE event_deliveries d
             SET attempts = d.attempts + 1, last_attempt_at = now(),
                 next_attempt_at = now() + make_interval(secs => $3)
             FROM due WHERE d.event_id = due.event_id AND d.endpoint = due.endpoint
             RETURNING d.event_id, d.endpoint, d.attempts)
           SELECT {EVENT_COLUMNS}, c.endpoint, c.attempts
           FROM claimed c JOIN usage_events e ON e.id = c.event_id
           ORDER BY e.recorded_at, e.id"#
    )))
    .bind(endpoints)
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let (event, endpoint, attempts) = event_of(r);
            Delivery {
                event,
                endpoint,
                attempts: attempts.max(0) as u32,
            }
        })
        .collect())
}

/// Records a delivery as made.
pub async fn delivered(
    db: impl PgExecutor<'_>,
    event: &str,
    endpoint: &str,
    status: u16,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE event_deliveries SET status = 'delivered', delivered_at = now(), last_status = $3,
           last_error = NULL
         WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'",
    )
    .bind(event)
    .bind(endpoint)
    .bind(i32::from(status))
    .execute(db)
    .await?;
    Ok(())
}

/// Records a failed attempt: the delivery is tried again after `delay`, or (`gave_up`) is
/// `failed`.
pub async fn attempt_failed(
    db: impl PgExecutor<'_>,
    event: &str,
    endpoint: &str,
    status: Option<u16>,
    error: &str,
    gave_up: bool,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE event_deliveries
         SET status = CASE WHEN $5 THEN 'failed' ELSE 'pending' END, last_status = $3,
             last_error = $4, next_attempt_at = now() + make_interval(secs => $6)
         WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'",
    )
    .bind(event)
    .bind(endpoint)
    .bind(status.map(i32::from))
    .bind(error)
    .bind(gave_up)
    .bind(delay.as_secs_f64())
    .execute(db)
    .await?;
    Ok(())
}

/// Deliveries pending (retries included) and failed.
pub async fn delivery_counts(db: impl PgExecutor<'_>) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed')
         FROM event_deliveries WHERE status <> 'delivered'",
    )
    .fetch_one(db)
    .await
}

/// A delivery as the events API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeliveryState {
    /// The webhook URL.
    pub endpoint: String,
    /// `pending` (not tried yet), `retrying` (failed before, tried again at `next_attempt_at`),
    /// `delivered` or `failed` (every attempt failed).
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it is tried next (pending and retrying).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the last attempt began.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The status the endpoint answered last, if it answered.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// What the events API lists events by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Some delivery not tried yet.
    Pending,
    /// Some delivery failed and will be tried again.
    Retrying,
    /// Some delivery made.
    Delivered,
    /// Some delivery that failed every attempt.
    Failed,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// The newest events (by when the outbox got them), at most `limit`, optionally only those with
/// a delivery in `status` and only `user`'s, each with its deliveries.
pub async fn list_events(
    db: impl PgExecutor<'_>,
    status: Option<DeliveryStatus>,
    user: Option<Uuid>,
    limit: i64,
) -> Result<Vec<(ThresholdEvent, DateTime<Utc>, Vec<DeliveryState>)>, sqlx::Error> {
    let rows: Vec<EventRow<DateTime<Utc>, sqlx::types::Json<Vec<DeliveryState>>>> =
        sqlx::query_as(sql(format!(
            r#"SELECT {EVENT_COLUMNS}, e.recorded_at,
                  COALESCE((SELECT json_agg(json_build_object(
                      'endpoint', d.endpoint, 'status', {state}, 'attempts', d.attempts,
                      'next_attempt_at', CASE WHEN d.status = 'pending' THEN d.next_attempt_at END,
                      'last_attempt_at', d.last_attempt_at, 'last_status', d.last_status,
                      'last_error', d.last_error, 'delivered_at', d.delivered_at)
                      ORDER BY d.endpoint)
                    FROM event_deliveries d WHERE d.event_id = e.id), '[]'::json)
               FROM usage_events e
               WHERE ($1::text IS NULL OR EXISTS (
                       SELECT 1 FROM event_deliveries d WHERE d.event_id = e.id AND {state} = $1))
                 AND ($2::uuid IS NULL OR e.user_id = $2)
               ORDER BY e.recorded_at DESC, e.id
               LIMIT $3"#,
            state = "(CASE WHEN d.status = 'pending' AND d.last_error IS NOT NULL THEN 'retrying' ELSE d.status END)"
        )))
        .bind(status.map(DeliveryStatus::as_str))
        .bind(user)
        .bind(limit)
        .fetch_all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let (event, recorded, deliveries) = event_of(r);
            (event, recorded, deliveries.0)
        })
        .collect())
}

/// Puts an event's failed deliveries back to pending, due now, with a fresh count of attempts.
/// `None` when there is no such event; else how many deliveries were put back.
pub async fn redeliver(db: &PgPool, event: &str) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let exists: Option<(String,)> =
        sqlx::query_as("SELECT id FROM usage_events WHERE id = $1 FOR SHARE")
            .bind(event)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let done = sqlx::query(
        "UPDATE event_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),
           last_error = NULL, last_status = NULL
         WHERE event_id = $1 AND status = 'failed'",
    )
    .bind(event)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(done.rows_affected()))
}

/// Deletes up to `batch` usage events recorded before `before` none of whose deliveries is still
/// pending (their deliveries go with them); returns how many it deleted. Rows another daemon is
/// deleting at the same time are skipped.
pub async fn prune_events(
    db: &PgPool,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM usage_events WHERE id IN (
           SELECT e.id FROM usage_events e
           WHERE e.recorded_at < $1
             AND NOT EXISTS (SELECT 1 FROM event_deliveries d
                             WHERE d.event_id = e.id AND d.status = 'pending')
           ORDER BY e.recorded_at
           LIMIT $2
           FOR UPDATE SKIP LOCKED)",
    )
    .bind(before)
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// One past period of one type of a user, as `usage_tracking` holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PeriodTotal {
    /// The usage type.
    #[sqlx(rename = "type")]
    pub usage_type: String,
    /// The count.
    pub count: i64,
    /// Units counted past the limit.
    pub overage: i64,
    /// The period's first instant, as the row carries it.
    pub period_start: DateTime<Utc>,
    /// The period's end (exclusive), as the row carries it.
    pub period_end: DateTime<Utc>,
}

/// The user's rows of `types` whose period started after `after` and not after `until`, by type
/// and then oldest first. Lifetime rows (no end) are left out: they have no history.
pub async fn usage_history(
    db: impl PgExecutor<'_>,
    user: Uuid,
    types: &[String],
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<PeriodTotal>, sqlx::Error> {
    sqlx::query_as(
        "SELECT type, COALESCE(count, 0) AS count, overage, period_start, period_end
         FROM usage_tracking
         WHERE user_id = $1 AND type = ANY($2) AND period_end IS NOT NULL
           AND period_start > $3 AND period_start <= $4
         ORDER BY type, period_start",
    )
    .bind(user)
    .bind(types)
    .bind(after)
    .bind(until)
    .fetch_all(db)
    .await
}

/// The name of the export's cursor (one per transaction).
const EXPORT_CURSOR: &str = "usage_export";

/// Which `usage_tracking` rows an export reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportRange {
    /// Rows of a period that began in `[start, end)` (lifetime rows left out).
    Began {
        /// First instant.
        start: DateTime<Utc>,
        /// First instant after.
        end: DateTime<Utc>,
    },
    /// The lifetime rows (no end).
    Lifetime,
}

/// One row of an export: a user's total of one type in one period, with the user's plan.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    /// The user.
    pub user_id: Uuid,
    /// The user's plan in force now.
    pub plan: String,
    /// The usage type.
    #[sqlx(rename = "type")]
    pub usage_type: String,
    /// The count.
    pub used: i64,
    /// Units counted past the limit.
    pub overage: i64,
    /// The summed numeric metadata (and the latest other values), as the flusher wrote them.
    pub metadata: serde_json::Value,
    /// The period's first instant.
    pub period_start: DateTime<Utc>,
    /// The period's end (exclusive); `None` for lifetime rows.
    pub period_end: Option<DateTime<Utc>>,
}

/// Opens the export's cursor in `tx` (a transaction: a cursor lives until it ends): every row of
/// `range` by user, type and period, with the user's stored plan where it is one of `plans`, else
/// `default_plan` (the plan quotad applies). Reading it is [`fetch_export`]'s.
pub async fn declare_export(
    tx: &mut PgConnection,
    range: ExportRange,
    plans: &[String],
    default_plan: &str,
) -> Result<(), sqlx::Error> {
    let (filter, start, end) = match range {
        ExportRange::Began { start, end } => (
            "u.period_end IS NOT NULL AND u.period_start >= $3 AND u.period_start < $4",
            Some(start),
            Some(end),
        ),
        // $3 and $4 are bound (null) either way, so both statements take the same parameters.
        ExportRange::Lifetime => (
            "u.period_end IS NULL AND $3::timestamptz IS NULL AND $4::timestamptz IS NULL",
            None,
            None,
        ),
    };
    sqlx::query(sql(format!(
        "DECLARE {EXPORT_CURSOR} NO SCROLL CURSOR FOR
         SELECT u.user_id,
                CASE WHEN p.plan = ANY($1) THEN p.plan ELSE $2 END AS plan,
                u.type, COALESCE(u.count, 0) AS used, u.overage,
                COALESCE(u.metadata, '{{}}'::jsonb) AS metadata,
                u.period_start, u.period_end
         FROM usage_tracking u LEFT JOIN user_plans p ON p.user_id = u.user_id
         WHERE {filter}
         ORDER BY u.user_id, u.type, u.period_start"
    )))
    .bind(plans)
    .bind(default_plan)
    .bind(start)
    .bind(end)
    .execute(tx)
    .await?;
    Ok(())
}

/// The next `n` rows of the cursor [`declare_export`] opened; none once it is read to the end.
pub async fn fetch_export(tx: &mut PgConnection, n: u32) -> Result<Vec<ExportRow>, sqlx::Error> {
    sqlx::query_as(sql(format!("FETCH FORWARD {n} FROM {EXPORT_CURSOR}")))
        .fetch_all(tx)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_written_in_user_type_period_order_whatever_order_they_came_in() {
        let (a, b): (Uuid, Uuid) = (
            "00000000-0000-4000-8000-000000000001".parse().unwrap(),
            "ffffffff-0000-4000-8000-000000000001".parse().unwrap(),
        );
        let month = Period::Month {
            year: 2026,
            month: 3,
        };
        let mut t = Totals::default();
        for (user, ty, period, v) in [
            (b, "export", Period::Lifetime, 1),
            (a, "kb_file", Period::Lifetime, 2),
            (b, "ai_generation", month, 3),
            (a, "ai_generation", month, 4),
            (a, "ai_generation", Period::Lifetime, 5),
        ] {
            let row = Row {
                usage_type: ty.into(),
                count: v * 10,
                overage: v,
                metadata: serde_json::json!({"v": v}),
            };
            t.push_row(user, row, period, v);
        }
        t.sort();
        let rows: Vec<(Uuid, &str, DateTime<Utc>, i64, i64)> = (0..t.len())
            .map(|i| {
                (
                    t.users[i],
                    t.types[i].as_str(),
                    t.starts[i],
                    t.counts[i],
                    t.versions[i],
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (a, "ai_generation", Period::Lifetime.start(), 50, 5),
                (a, "ai_generation", month.start(), 40, 4),
                (a, "kb_file", Period::Lifetime.start(), 20, 2),
                (b, "ai_generation", month.start(), 30, 3),
                (b, "export", Period::Lifetime.start(), 10, 1),
            ]
        );
        // Every column moved with its row.
        assert_eq!(t.metadata[0], serde_json::json!({"v": 5}));
        assert_eq!(t.overages, [5, 4, 2, 3, 1]);
        assert_eq!(t.ends[1], month.end());
    }
}
