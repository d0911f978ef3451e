//! Redis: the hot counters. [`RedisStore`] owns the connections, builds every key, runs the Lua
//! scripts under a deadline, and speaks the domain (consume, check, refund…) to its callers.
//!
//! # Key format (schema version 1)
//!
//! ```text
//! <prefix>:1:{<b>}:c:<user>:<period>   hash: counts by type, v, p, pv, m:<type>:<name>,
//!                                      s:<type>:<name>, n:<type>, x:next (set once the next
//!                                      month's counter was created: it never starts fresh
//!                                      again). Months expire 35 days after their end; a
//!                                      lifetime hash loaded with nothing expires after 24 h
//!                                      until something is counted in it
//! <prefix>:1:{<b>}:dirty               sorted set of "<user>:<period>" changed since their last
//!                                      flush, scored by the time (ms) of the first such change
//! <prefix>:1:{<b>}:i:<user>:<key>      hash: an idempotent call's answer, 24 h
//! <prefix>:1:{<b>}:since              string: the time (ms) since which the bucket has
//!                                      held its data without a gap (set by the first load from
//!                                      Postgres; lets a new month's counter start without one)
//! <prefix>:1:changes                   pub/sub channel: users whose counts went down or whose
//!                                      plan changed (refusal-cache invalidation)
//! ```
//!
//! `<b>` is `crc16(user) % 1024`, written in braces as a Redis Cluster hash tag: all of one user's
//! keys, and the dirty set that lists them, live in one slot, so each script touches one slot.
//! `<period>` is `2026-11` or `life`. The `1` is the schema version: a later layout takes a new
//! number and migrates, instead of silently reading empty counters.

pub mod counter;
mod dirty;
pub mod keys;
mod scan;
pub mod scripts;

pub use counter::CounterHash;
pub use dirty::{DirtyMember, DirtyScan};
pub use keys::UserKeys;
pub use scan::LiveCounter;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use deadpool_redis::redis::{self, AsyncCommands, RedisError, ScriptInvocation};
use uuid::Uuid;

use crate::period::Period;
use crate::plans::UsageType;

/// The schema version carried in every key.
pub const SCHEMA: u32 = 1;
/// Number of hash-tag buckets users are spread over.
pub const BUCKETS: u16 = 1024;
/// How long an idempotent call's answer is remembered.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
/// How long after its month ends a counter stays in Redis (to flush and reconcile it).
pub const GRACE_DAYS: i64 = 35;
/// Most distinct metadata names one counter (user, type, period) may collect.
pub const MAX_METADATA_NAMES: usize = 64;
/// How long a lifetime counter loaded with nothing (a user Postgres does not know) stays in Redis
/// unless something is counted in it: reads of random users must not grow memory without bound.
/// A day keeps a real new user's first reads and first consume on one load.
pub const EMPTY_LIFETIME_TTL_SECS: u64 = 24 * 3600;
/// Clock skew allowed between replicas, in ms: a month counter starts fresh without a Postgres
/// read only if its bucket's marker is older than the month's start by more than this.
pub const SKEW_MARGIN_MS: i64 = 60_000;

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer in time, could not be reached, or ran a script only after the
    /// call's deadline (and so refused it): the fail policy decides.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered that it cannot take the call now (out of memory, loading, a read-only
    /// replica, busy with a script…); the call did nothing. The fail policy decides.
    #[error("redis refused the call: {reason} ({detail})")]
    Refused {
        /// Why, in words a person can act on ("it is out of memory (maxmemory reached)").
        reason: &'static str,
        /// Redis' own error text.
        detail: String,
    },
    /// Redis answered with an error (a script fault, a wrong type): a bug, not an outage.
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
}

impl StoreError {
    /// Whether this is an outage (the fail policy applies), rather than a bug.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Refused { .. }
        )
    }
}

/// What a counting script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Counted (consume, track), or would fit (check).
    Ok,
    /// Does not fit; nothing counted.
    Denied,
    /// An idempotent call answered before; nothing counted.
    Replay,
    /// An idempotency key reused for a different call (or, for check, used by any call).
    Conflict,
    /// The idempotency key names a call that was refunded; nothing counted.
    Refunded,
    /// The call's metadata would take the counter past [`MAX_METADATA_NAMES`]; nothing counted.
    MetaLimit,
    /// The sum of a numeric metadata value ([`Reply::detail`] names it) would not be a finite
    /// number; nothing counted.
    MetaSum,
    /// The counter must be loaded from Postgres first.
    Hydrate,
}

/// A counting script's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The decision.
    pub status: Status,
    /// The count after the call (or as first answered, for a replay).
    pub used: u64,
    /// The plan the decision was made under.
    pub plan: String,
    /// The limit it applied; `None` = unlimited.
    pub limit: Option<u64>,
    /// The period counted in (for a replay: the period of the first answer).
    pub period: Option<Period>,
    /// For [`Status::MetaSum`], the metadata name at fault; else empty.
    pub detail: String,
}

/// Whether a consume enforces its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Check the limit, then count.
    Consume,
    /// Count without checking.
    Track,
}

/// One metadata entry of a counting call.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Summed per counter.
    Number(f64),
    /// Kept as the latest value (JSON text).
    Text(String),
}

/// A consume or track call.
#[derive(Debug)]
pub struct CountCall<'a> {
    /// Consume or track.
    pub mode: Mode,
    /// The user's keys.
    pub keys: &'a UserKeys,
    /// The usage type and its plan limits.
    pub usage_type: &'a UsageType,
    /// How much to count.
    pub amount: u64,
    /// The period to count in.
    pub period: Period,
    /// A caller-supplied plan, overriding the stored one.
    pub plan_override: Option<&'a str>,
    /// The default plan.
    pub default_plan: &'a str,
    /// The idempotency key, if any.
    pub idempotency_key: Option<&'a str>,
    /// Metadata to sum or keep.
    pub metadata: &'a [(String, MetaValue)],
}

/// A refund's outcome.
#[derive(Debug, Clone)]
pub enum RefundReply {
    /// Given back; the counter's new total, the stored plan, the type, and the amount actually
    /// given back (less than the call's when the counter held less; 0 changed nothing).
    Refunded {
        used: u64,
        stored_plan: Option<String>,
        usage_type: String,
        amount: u64,
        period: Period,
    },
    /// No record under that key.
    Missing,
    /// Refunded before.
    AlreadyRefunded,
    /// The counter must be loaded from Postgres first.
    Hydrate(Period),
}

/// What Postgres holds for one (user, period): the input of a hydration.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Highest version among the rows (0 when none).
    pub version: i64,
    /// Field, value pairs to load: counts by type, and metadata fields.
    pub fields: Vec<(String, String)>,
    /// The user's stored plan and its version, if any.
    pub plan: Option<(String, i64)>,
}

/// How often the offset between the daemon's wall clock and Redis' is measured again (besides
/// every readiness check): clocks kept by NTP drift far less than the grace in this time.
const CLOCK_RESYNC_MS: i64 = 60_000;

/// The daemon's estimate of Redis' clock, for script deadlines (see [`RedisStore::arm`]).
#[derive(Debug, Default)]
struct ServerClock {
    /// Redis' `TIME` minus the daemon's wall clock, in ms (0 until measured: a Redis on the same
    /// host shares the daemon's clock).
    offset_ms: AtomicI64,
    /// When (daemon wall clock, ms) the next measurement is due.
    next_sync_ms: AtomicI64,
    /// Whether `offset_ms` has been measured.
    measured: AtomicBool,
}

/// The Redis side of quotad.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    /// One multiplexed connection: it pipelines every concurrent request over one socket (more
    /// sockets measured no faster, and each one more is one more client for Redis to serve).
    conn: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    /// The name its connections carry (`CLIENT SETNAME`), so `CLIENT LIST` tells them apart.
    name: &'static str,
    clock: Arc<ServerClock>,
}

/// The name of the request path's connections.
pub const REQUESTS_CONNECTION: &str = "quotad-requests";

impl RedisStore {
    /// A store for `url`; connects lazily, and reconnects by itself after Redis comes back.
    /// Its connections serve the request path, named [`REQUESTS_CONNECTION`].
    ///
    /// Not a checkout pool: a pool would check each connection on checkout (deadpool-redis sends
    /// UNWATCH and PING), which made every consume three commands instead of one.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("QUOTAD_REDIS_URL: {e}"))?;
        let conn = Self::connect(&client, timeout).map_err(|e| format!("QUOTAD_REDIS_URL: {e}"))?;
        Ok(RedisStore {
            client,
            conn,
            prefix: prefix.into(),
            timeout,
            name: REQUESTS_CONNECTION,
            clock: Arc::default(),
        })
    }

    /// The same Redis and keys on connections of its own, named `name`, with deadline
    /// `timeout`: for the flusher and reconcile, whose large pipelines would otherwise queue on
    /// the request path's connection ahead of consumes.
    pub fn dedicated(&self, name: &'static str, timeout: Duration) -> RedisStore {
        RedisStore {
            // Lazy: nothing to fail here (the client was opened already).
            conn: Self::connect(&self.client, timeout).unwrap_or_else(|_| self.conn.clone()),
            timeout,
            name,
            ..self.clone()
        }
    }

    fn connect(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, RedisError> {
        // No response timeout of the client's own (its default is 500 ms): each call has its
        // deadline (`timeout`, or the flusher's and reconcile's longer ones for big pipelines).
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        ConnectionManager::new_lazy_with_config(client.clone(), config)
    }

    /// `CLIENT SETNAME` for this store's connections, to send ahead of other commands in a
    /// pipeline. A reconnected connection has no name until the next such pipeline: the
    /// readiness check's, for the request path (a consume stays one command), and every flusher
    /// batch's.
    fn set_name(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("CLIENT").arg("SETNAME").arg(self.name).ignore();
    }

    /// The client, for connections of their own (the invalidation subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The keys of `user`: build them once per request and pass them down.
    pub fn keys(&self, user: Uuid) -> UserKeys {
        UserKeys::new(&self.prefix, user)
    }

    /// The keys and arguments that let a missing month counter start fresh: previous month's
    /// hash and the bucket's marker; month start (ms), skew margin, EXPIREAT.
    fn fresh_start(keys: &UserKeys, period: Period) -> ([String; 2], [i64; 3]) {
        let prev = period.previous().unwrap_or(period);
        let month_start = match period {
            Period::Month { .. } => period.start().timestamp_millis(),
            Period::Lifetime => 0,
        };
        let expire_at = period
            .expire_at(chrono::Duration::days(GRACE_DAYS))
            .unwrap_or(0);
        (
            [keys.counter(prev), keys.since()],
            [month_start, SKEW_MARGIN_MS, expire_at],
        )
    }

    /// The pub/sub channel on which scripts announce users whose counts went down or whose plan
    /// changed (see [`crate::refusals`]).
    pub fn changes_channel(&self) -> String {
        keys::changes_channel(&self.prefix)
    }

    /// The connection (a cheap handle to the shared one).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs `f` with the connection, under the Redis deadline, once.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = attempt(deadline, f(self.conn())).await;
        self.settle(result)
    }

    /// Like [`Self::with_conn`], but a call that failed at the connection (typically one Redis
    /// had already closed: a restarted or failed-over server) is sent once more, on a reconnected
    /// connection, within the same deadline. Without this the first request after a Redis restart
    /// would get the fail policy's answer. The resend could double a count only if Redis ran the
    /// first send and then lost the connection before answering; a Redis that crashes there
    /// loses the write too unless it persists every write (appendfsync always). A script's resend
    /// carries the first send's deadline, so it cannot run later than the first could have.
    ///
    /// Refusals (OOM, LOADING, READONLY…) are not resent: nothing ran, but the condition outlasts
    /// a deadline of milliseconds, and a resend would only add load to a struggling server.
    async fn with_retry<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = self.conn();
        let mut result = attempt(deadline, f(conn.clone())).await;
        if matches!(&result, Some(Err(e)) if is_connection_fault(e))
            && tokio::time::Instant::now() < deadline
        {
            // The manager reconnects in the background; this send waits for it.
            result = attempt(deadline, f(conn)).await;
        }
        self.settle(result)
    }

    /// Classifies a call's outcome (`None` = no answer by its deadline) and counts its failure.
    fn settle<T>(&self, result: Option<Result<T, RedisError>>) -> Result<T, StoreError> {
        let result = match result {
            Some(r) => r.map_err(classify),
            None => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        if let Err(e) = &result {
            let kind = match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Refused { .. } => "refused",
                StoreError::Redis(_) => "error",
            };
            metrics::counter!(crate::metrics::REDIS_ERRORS, "kind" => kind).increment(1);
        }
        result
    }

    /// How much of the Redis deadline is kept back, after a script's own deadline, for its reply
    /// to reach quotad: a quarter (25 ms at the default 100 ms). A script starts by 3/4 of the
    /// timeout or not at all, and quotad waits the full timeout for the answer. The grace covers
    /// the script's run (well under 1 ms), the reply's way back (µs on one host, under 1 ms on a
    /// LAN), the error of the clock offset (at most half the round trip that measured it, which
    /// must be under the grace to be used) and the daemon being slow to poll the reply.
    fn grace(&self) -> Duration {
        self.timeout / 4
    }

    /// Appends the call's deadline (ms, in Redis' clock) as the invocation's last argument and
    /// returns how long quotad waits for the answer. The prologue of `lua/common.lua` takes the
    /// deadline off `ARGV` and, once Redis' clock is past it, refuses the call without touching
    /// anything: a script sent to a Redis that hangs (SIGSTOP, a long fork) and answered as
    /// failed does not count when Redis resumes. Every script that includes `common.lua` must be
    /// sent armed, by [`Self::run_script`] or (the bench, pipelines) by calling this.
    ///
    /// The script's deadline is `timeout - grace` after now; quotad waits `timeout`. A call
    /// answered as failed can still have counted only if Redis ran it before its deadline and
    /// its reply then took longer than the grace to arrive (Redis stopped between running the
    /// script and writing the reply, or the daemon did not poll it for that long).
    pub fn arm(&self, inv: &mut ScriptInvocation<'_>) -> tokio::time::Instant {
        let until = tokio::time::Instant::now() + self.timeout;
        let now_ms = wall_ms(SystemTime::now());
        let budget = self.timeout.saturating_sub(self.grace());
        inv.arg(now_ms + self.clock.offset_ms.load(Ordering::Relaxed) + budget.as_millis() as i64);
        self.resync_when_due(now_ms);
        until
    }

    /// Measures the clock offset again in the background when the last measurement is older
    /// than [`CLOCK_RESYNC_MS`] (one measurement at a time).
    fn resync_when_due(&self, now_ms: i64) {
        let due = self.clock.next_sync_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self
                .clock
                .next_sync_ms
                .compare_exchange(
                    due,
                    now_ms + CLOCK_RESYNC_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            rt.spawn(async move {
                if let Err(e) = store.ping().await {
                    tracing::debug!(error.message = %e, "redis clock offset not measured");
                }
            });
        }
    }

    /// Runs a script invocation, armed with its deadline (EVALSHA; on NOSCRIPT it loads the
    /// script and runs it again).
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let until = self.arm(inv);
        let inv = &*inv;
        self.with_retry(until, |mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }

    /// Sends a pipeline, one round trip. Pipelines carry no script that includes `common.lua`
    /// (only reads, `ZREM`s and `lua/unmark.lua`, which can do no harm when run late).
    async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.with_retry(
            deadline,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
    }

    /// The consume script's invocation for `call`: what [`RedisStore::count`] sends (the bench's
    /// raw-Redis ceiling sends the same).
    pub fn count_invocation(&self, call: &CountCall<'_>) -> ScriptInvocation<'static> {
        let keys = call.keys;
        let (fresh_keys, fresh_args) = Self::fresh_start(keys, call.period);
        let mut inv = scripts::CONSUME.prepare_invoke();
        inv.key(keys.counter(call.period))
            .key(keys.dirty())
            .key(&fresh_keys);
        if let Some(k) = call.idempotency_key {
            inv.key(keys.idempotency(k));
        }
        inv.arg(match call.mode {
            Mode::Consume => "consume",
            Mode::Track => "track",
        })
        .arg(&call.usage_type.name)
        .arg(call.amount)
        .arg(keys.member(call.period))
        .arg(call.plan_override.unwrap_or(""))
        .arg(call.default_plan)
        .arg(IDEMPOTENCY_TTL_SECS)
        .arg(call.period.id())
        .arg(MAX_METADATA_NAMES)
        .arg(&fresh_args)
        .arg(call.metadata.len());
        for (name, value) in call.metadata {
            match value {
                MetaValue::Number(n) => inv.arg("n").arg(name).arg(n.to_string()),
                MetaValue::Text(t) => inv.arg("s").arg(name).arg(t),
            };
        }
        inv.arg(&call.usage_type.script_limits);
        inv
    }

    /// Consume or track: one EVALSHA.
    pub async fn count(&self, call: &CountCall<'_>) -> Result<Reply, StoreError> {
        let mut inv = self.count_invocation(call);
        let raw: (String, i64, String, i64, String, String) = self.run_script(&mut inv).await?;
        let mut reply = to_reply(
            raw.0.as_str(),
            raw.1,
            raw.2,
            raw.3,
            Period::parse_id(&raw.4),
        );
        reply.detail = raw.5;
        Ok(reply)
    }

    /// Check: the decision without counting. With an `idempotency_key` that names an earlier
    /// consume or track, [`Status::Conflict`] (the key belongs to another call); still one
    /// EVALSHA.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        keys: &UserKeys,
        usage_type: &UsageType,
        amount: u64,
        period: Period,
        plan_override: Option<&str>,
        default_plan: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Reply, StoreError> {
        let (fresh_keys, fresh_args) = Self::fresh_start(keys, period);
        let mut inv = scripts::CHECK.prepare_invoke();
        inv.key(keys.counter(period)).key(&fresh_keys);
        if let Some(k) = idempotency_key {
            inv.key(keys.idempotency(k));
        }
        inv.arg(&usage_type.name)
            .arg(amount)
            .arg(plan_override.unwrap_or(""))
            .arg(default_plan)
            .arg(&fresh_args)
            .arg(&usage_type.script_limits);
        let raw: (String, i64, String, i64) = self.run_script(&mut inv).await?;
        Ok(to_reply(raw.0.as_str(), raw.1, raw.2, raw.3, Some(period)))
    }

    /// Refund the call recorded under `key`: reads the record's period, then refunds atomically.
    pub async fn refund(&self, keys: &UserKeys, key: &str) -> Result<RefundReply, StoreError> {
        let idem = keys.idempotency(key);
        let idem_read = idem.clone();
        let period: Option<String> = self
            .with_conn(|mut c| async move { c.hget(idem_read, "pe").await })
            .await?;
        let Some(period) = period.as_deref().and_then(Period::parse_id) else {
            return Ok(RefundReply::Missing);
        };
        let mut inv = scripts::REFUND.prepare_invoke();
        inv.key(idem)
            .key(keys.counter(period))
            .key(keys.dirty())
            .arg(period.id())
            .arg(keys.member(period))
            .arg(self.changes_channel())
            .arg(keys.user().to_string());
        let (status, used, plan, usage_type, amount): (String, i64, String, String, i64) =
            self.run_script(&mut inv).await?;
        Ok(match status.as_str() {
            "ok" => RefundReply::Refunded {
                used: used.max(0) as u64,
                stored_plan: (!plan.is_empty()).then_some(plan),
                usage_type,
                amount: amount.max(0) as u64,
                period,
            },
            "refunded" => RefundReply::AlreadyRefunded,
            "hydrate" => RefundReply::Hydrate(period),
            _ => RefundReply::Missing,
        })
    }

    /// Lower a lifetime counter by `amount`, never below 0. `None` = hydrate first; else the new
    /// total, the stored plan and how much was lowered (0 when the counter was at 0: then
    /// nothing changed).
    pub async fn release(
        &self,
        keys: &UserKeys,
        usage_type: &str,
        amount: u64,
    ) -> Result<Option<(u64, Option<String>, u64)>, StoreError> {
        let period = Period::Lifetime;
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(keys.counter(period))
            .key(keys.dirty())
            .arg(usage_type)
            .arg(amount)
            .arg(keys.member(period))
            .arg(self.changes_channel())
            .arg(keys.user().to_string());
        let (status, used, plan, released): (String, i64, String, i64) =
            self.run_script(&mut inv).await?;
        Ok((status == "ok").then(|| {
            (
                used.max(0) as u64,
                (!plan.is_empty()).then_some(plan),
                released.max(0) as u64,
            )
        }))
    }

    /// The hydrate script's invocation: fill (user, period) from `snap` unless it is loaded
    /// already, and set the bucket's marker to `now` unless it is set. A month's load also marks
    /// the previous month's hash (so this month never starts fresh again); a lifetime counter
    /// loaded with nothing expires after [`EMPTY_LIFETIME_TTL_SECS`].
    pub fn hydrate_invocation(
        &self,
        keys: &UserKeys,
        period: Period,
        snap: &Snapshot,
        now: DateTime<Utc>,
    ) -> ScriptInvocation<'static> {
        let expire_at = period
            .expire_at(chrono::Duration::days(GRACE_DAYS))
            .unwrap_or(0);
        let mut inv = scripts::HYDRATE.prepare_invoke();
        let (plan, plan_version) = snap.plan.clone().unwrap_or_default();
        inv.key(keys.counter(period)).key(keys.since());
        if let Some(prev) = period.previous() {
            inv.key(keys.counter(prev));
        }
        inv.arg(expire_at)
            .arg(snap.version)
            .arg(plan)
            .arg(plan_version)
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(now.timestamp_millis())
            .arg(EMPTY_LIFETIME_TTL_SECS)
            .arg(
                period
                    .end()
                    .map_or(0, |end| end.timestamp_millis() - SKEW_MARGIN_MS),
            );
        for (field, value) in &snap.fields {
            inv.arg(field).arg(value);
        }
        inv
    }

    /// Fill the counter hash of (user, period) from `snap` unless it is loaded already; `now`
    /// is the daemon's clock.
    pub async fn hydrate(
        &self,
        keys: &UserKeys,
        period: Period,
        snap: &Snapshot,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut inv = self.hydrate_invocation(keys, period, snap, now);
        let filled: i64 = self.run_script(&mut inv).await?;
        Ok(filled == 1)
    }

    /// Write a user's plan (with its Postgres version) into the counter hashes of `periods` (those
    /// in force now: created if missing), and of `adjacent` (the months next to the current one:
    /// written only if they exist, so a plan change just before midnight reaches a next month
    /// another replica already counts in).
    pub async fn set_plan(
        &self,
        keys: &UserKeys,
        plan: &str,
        version: i64,
        periods: &[Period],
        adjacent: &[Period],
    ) -> Result<(), StoreError> {
        let mut inv = scripts::SET_PLAN.prepare_invoke();
        for p in periods.iter().chain(adjacent) {
            inv.key(keys.counter(*p));
        }
        inv.arg(plan)
            .arg(version)
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(periods.len());
        for p in periods {
            inv.arg(p.expire_at(chrono::Duration::days(GRACE_DAYS)).unwrap_or(0));
        }
        let _: i64 = self.run_script(&mut inv).await?;
        Ok(())
    }

    /// The counter hashes of `user` in `periods`, in one pipeline; `None` where not loaded yet.
    pub async fn read_counters(
        &self,
        keys: &UserKeys,
        periods: &[Period],
    ) -> Result<Vec<Option<CounterHash>>, StoreError> {
        let mut pipe = redis::pipe();
        for p in periods {
            pipe.hgetall(keys.counter(*p));
        }
        let maps: Vec<HashMap<String, String>> = self.run_pipe(&pipe).await?;
        Ok(maps
            .iter()
            .map(CounterHash::parse)
            .map(|h| h.is_loaded().then_some(h))
            .collect())
    }

    /// Redis' clock minus the daemon's wall clock, in ms, as last measured (`None` until then).
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.clock
            .measured
            .load(Ordering::Relaxed)
            .then(|| self.clock.offset_ms.load(Ordering::Relaxed))
    }

    /// PING, for readiness; with it, in the same round trip, `CLIENT SETNAME` (naming the
    /// connection) and `TIME`, to measure the offset
    /// between the daemon's wall clock and Redis' (script deadlines are in Redis' clock). The
    /// offset is taken as Redis' time minus the middle of the round trip, so its error is at most
    /// half the round trip; a measurement whose round trip exceeds the grace is not used.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.set_name(&mut pipe);
        pipe.cmd("PING").ignore().cmd("TIME");
        let pipe = &pipe;
        let sent = SystemTime::now();
        let started = std::time::Instant::now();
        let ((secs, micros),): ((i64, i64),) = self
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let rtt = started.elapsed();
        if rtt <= self.grace() {
            self.clock
                .offset_ms
                .store(clock_offset(sent, rtt, secs, micros), Ordering::Relaxed);
            self.clock.measured.store(true, Ordering::Relaxed);
            self.clock.next_sync_ms.store(
                wall_ms(SystemTime::now()) + CLOCK_RESYNC_MS,
                Ordering::Relaxed,
            );
        }
        Ok(())
    }
}

fn to_reply(status: &str, used: i64, plan: String, limit: i64, period: Option<Period>) -> Reply {
    let status = match status {
        "ok" => Status::Ok,
        "denied" => Status::Denied,
        "replay" => Status::Replay,
        "conflict" => Status::Conflict,
        "refunded" => Status::Refunded,
        "meta_limit" => Status::MetaLimit,
        "meta_sum" => Status::MetaSum,
        _ => Status::Hydrate,
    };
    Reply {
        status,
        used: used.max(0) as u64,
        plan,
        limit: u64::try_from(limit).ok(),
        period,
        detail: String::new(),
    }
}

/// Sends `work`, waiting until `deadline`; `None` = no answer by then.
async fn attempt<T>(
    deadline: tokio::time::Instant,
    work: impl Future<Output = Result<T, RedisError>>,
) -> Option<Result<T, RedisError>> {
    tokio::time::timeout_at(deadline, work).await.ok()
}

/// Redis' clock minus the daemon's, in ms, from a `TIME` answer (`secs`, `micros`) to a request
/// sent at `sent` that took `rtt` there and back: Redis read its clock about half-way.
fn clock_offset(sent: SystemTime, rtt: Duration, secs: i64, micros: i64) -> i64 {
    let redis_ms = secs * 1000 + micros / 1000;
    redis_ms - (wall_ms(sent) + (rtt.as_millis() / 2) as i64)
}

/// Milliseconds since the Unix epoch.
fn wall_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The failure happened at the connection (refused, reset, closed): the call may not have
/// reached Redis, and a reconnected connection may do better.
fn is_connection_fault(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// The error code a script's deadline check answers with (see `lua/common.lua`).
const EXPIRED: &str = "EXPIRED";

/// Redis' replies that mean "I cannot take this call now" and that nothing ran, with the reason
/// told to a person. A refused script did nothing: Redis refuses the first write of a script
/// (OOM, READONLY, NOREPLICAS, MISCONF) before any write, and the others before the script starts.
fn refusal(code: &str) -> Option<&'static str> {
    Some(match code {
        "OOM" => "it is out of memory (maxmemory reached)",
        "LOADING" => "it is still loading its data set",
        "READONLY" => "it is a read-only replica (a failover may have moved the primary)",
        "BUSY" => "it is busy running a long script",
        "MASTERDOWN" => "it is a replica that lost its link to the primary",
        "CLUSTERDOWN" => "the cluster is down",
        "TRYAGAIN" => "the keys are being moved between cluster nodes",
        "NOREPLICAS" => "too few replicas are connected for it to take writes",
        "MISCONF" => "it cannot save to disk and refuses writes",
        _ => return None,
    })
}

/// Connection faults, late scripts and refusals are outages (the fail policy applies); other
/// server replies are bugs.
fn classify(e: RedisError) -> StoreError {
    if is_connection_fault(&e) {
        return StoreError::Unavailable(e.to_string());
    }
    // A pipeline's error carries each failed command's reply; its first refusal decides.
    let codes: Vec<(String, String)> = match e.clone().into_server_errors() {
        Some(errors) => errors
            .iter()
            .map(|(_, s)| (s.code().to_owned(), s.details().unwrap_or("").to_owned()))
            .collect(),
        None => Vec::new(),
    };
    for (code, detail) in codes {
        if code == EXPIRED {
            return StoreError::Unavailable(format!(
                "redis ran the call after its deadline, so it did nothing: {detail}"
            ));
        }
        if let Some(reason) = refusal(&code) {
            return StoreError::Refused {
                reason,
                detail: format!("{code} {detail}"),
            };
        }
    }
    StoreError::Redis(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_offset_is_redis_time_minus_the_middle_of_the_round_trip() {
        let sent = UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        // Redis an hour ahead, read 4 ms after the send of an 8 ms round trip.
        let (secs, micros) = (1_800_003_600, 4_000);
        let offset = clock_offset(sent, Duration::from_millis(8), secs, micros);
        assert_eq!(offset, 3_600_000);
        // Redis 250 ms behind.
        let offset = clock_offset(sent, Duration::from_millis(2), 1_799_999_999, 751_000);
        assert_eq!(offset, -250);
    }

    #[test]
    fn refusals_are_outages_late_scripts_are_unavailable_other_replies_are_bugs() {
        for (code, reason) in [
            ("OOM", "out of memory"),
            ("BUSY", "busy running a long script"),
            ("NOREPLICAS", "too few replicas"),
            ("MISCONF", "cannot save to disk"),
        ] {
            let e = classify(redis::make_extension_error(code.into(), Some("x".into())));
            match &e {
                StoreError::Refused { reason: r, .. } => assert!(r.contains(reason), "{code}: {r}"),
                other => panic!("{code}: {other:?}"),
            }
            assert!(e.is_outage());
        }
        let late = classify(redis::make_extension_error(
            EXPIRED.into(),
            Some("ran 3 ms after the call's deadline".into()),
        ));
        assert!(matches!(late, StoreError::Unavailable(_)), "{late:?}");
        let bug = classify(redis::make_extension_error(
            "WRONGTYPE".into(),
            Some("Operation against a key holding the wrong kind of value".into()),
        ));
        assert!(matches!(bug, StoreError::Redis(_)), "{bug:?}");
        assert!(!bug.is_outage());
    }
}
