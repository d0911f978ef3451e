//! Postgres: the durable record. Database creation, migrations, the hydration read and user plans.
//! Functions take an executor, so callers decide what is atomic.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgExecutor, PgPool, Postgres};
use uuid::Uuid;

use crate::period::Period;
use crate::store::Snapshot;

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pool that connects lazily, so the daemon starts (and answers /healthz) while Postgres is down.
pub fn lazy_pool(url: &str) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options))
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
    MIGRATOR.run(pool).await?;
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

/// What Postgres holds for one user and period: every type's count and metadata, the highest
/// version, and the user's plan. This is what a missing Redis counter is loaded from.
pub async fn snapshot(db: &PgPool, user: Uuid, period: Period) -> Result<Snapshot, sqlx::Error> {
    // COALESCE: rows written by the original product may hold NULLs there.
    let rows: Vec<(String, i64, i64, serde_json::Value)> = sqlx::query_as(
        r#"SELECT type, COALESCE(count, 0), version, COALESCE(metadata, '{}'::jsonb) FROM usage_tracking
           WHERE user_id = $1 AND period_start = $2"#,
    )
    .bind(user)
    .bind(period.start())
    .fetch_all(db)
    .await?;
    let mut snap = Snapshot {
        plan: get_plan(db, user).await?.map(|p| (p.plan, p.version)),
        ..Default::default()
    };
    for (ty, count, version, metadata) in rows {
        snap.version = snap.version.max(version);
        if let serde_json::Value::Object(fields) = metadata {
            if !fields.is_empty() {
                snap.fields
                    .push((format!("n:{ty}"), fields.len().to_string()));
            }
            for (name, value) in fields {
                match value {
                    serde_json::Value::Number(n) => {
                        snap.fields.push((format!("m:{ty}:{name}"), n.to_string()))
                    }
                    other => snap
                        .fields
                        .push((format!("s:{ty}:{name}"), other.to_string())),
                }
            }
        }
        snap.fields.push((ty, count.to_string()));
    }
    Ok(snap)
}

/// A user's stored plan.
#[derive(Debug, Clone)]
pub struct StoredPlan {
    /// Plan name.
    pub plan: String,
    /// Grows on every change.
    pub version: i64,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// The user's stored plan, if any.
pub async fn get_plan(
    db: impl PgExecutor<'_>,
    user: Uuid,
) -> Result<Option<StoredPlan>, sqlx::Error> {
    let row: Option<(String, i64, DateTime<Utc>)> =
        sqlx::query_as("SELECT plan, version, updated_at FROM user_plans WHERE user_id = $1")
            .bind(user)
            .fetch_optional(db)
            .await?;
    Ok(row.map(|(plan, version, updated_at)| StoredPlan {
        plan,
        version,
        updated_at,
    }))
}

/// Stores the user's plan and returns the row, whose version is higher than any before it.
pub async fn put_plan(
    db: impl PgExecutor<'_>,
    user: Uuid,
    plan: &str,
) -> Result<StoredPlan, sqlx::Error> {
    let (plan, version, updated_at): (String, i64, DateTime<Utc>) = sqlx::query_as(
        r#"INSERT INTO user_plans (user_id, plan, version, updated_at) VALUES ($1, $2, 1, now())
           ON CONFLICT (user_id) DO UPDATE
             SET plan = EXCLUDED.plan, version = user_plans.version + 1, updated_at = now()
           RETURNING plan, version, updated_at"#,
    )
    .bind(user)
    .bind(plan)
    .fetch_one(db)
    .await?;
    Ok(StoredPlan {
        plan,
        version,
        updated_at,
    })
}

/// Absolute totals to write, one entry per (user, type, period), as parallel columns so they go
/// to Postgres as one `UNNEST` statement however many there are.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// user_id of each row.
    pub users: Vec<Uuid>,
    /// type of each row.
    pub types: Vec<String>,
    /// count of each row.
    pub counts: Vec<i64>,
    /// period_start of each row.
    pub starts: Vec<DateTime<Utc>>,
    /// period_end of each row (`None` for lifetime).
    pub ends: Vec<Option<DateTime<Utc>>>,
    /// metadata of each row.
    pub metadata: Vec<serde_json::Value>,
    /// version of each row.
    pub versions: Vec<i64>,
}

impl Totals {
    /// Adds one row.
    pub fn push(
        &mut self,
        user: Uuid,
        ty: String,
        count: i64,
        period: Period,
        metadata: serde_json::Value,
        version: i64,
    ) {
        self.users.push(user);
        self.types.push(ty);
        self.counts.push(count);
        self.starts.push(period.start());
        self.ends.push(period.end());
        self.metadata.push(metadata);
        self.versions.push(version);
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Writes absolute totals in one statement. A row is only overwritten by a higher version, so
/// replaying a write, or two replicas writing at once, or an old total arriving late, never
/// moves a count backwards or counts twice. Returns the rows inserted or updated.
pub async fn upsert_totals(db: impl PgExecutor<'_>, t: &Totals) -> Result<u64, sqlx::Error> {
    if t.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        r#"INSERT INTO usage_tracking
             (id, user_id, type, count, period_start, period_end, metadata, version, created_at, updated_at)
           SELECT gen_random_uuid(), u, t, c, ps, pe, m, v, now(), now()
           FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::timestamptz[], $6::jsonb[], $7::int8[])
             AS x(u, t, c, ps, pe, m, v)
           ON CONFLICT (user_id, type, period_start) DO UPDATE
             SET count = EXCLUDED.count, metadata = EXCLUDED.metadata, version = EXCLUDED.version,
                 period_end = EXCLUDED.period_end, updated_at = now()
             WHERE usage_tracking.version < EXCLUDED.version"#,
    )
    .bind(&t.users)
    .bind(&t.types)
    .bind(&t.counts)
    .bind(&t.starts)
    .bind(&t.ends)
    .bind(&t.metadata)
    .bind(&t.versions)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
