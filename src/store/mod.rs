//! Redis: the hot counters. [`RedisStore`] speaks the domain to its callers (consume, check,
//! refund, release, hydrate, plan changes) as one Lua script each. Beside it: `keys` builds every
//! key, `counter` reads and builds the counter hash, `conn` owns the connection, the deadlines
//! and error classification, `dirty` and `scan` are the flusher's and reconcile's side.
//!
//! # Key format (schema version 1)
//!
//! ```text
//! <prefix>:1:{<b>}:c:<user>:<period>   hash: counts by type, v, p, pv, m:<type>:<name>,
//!                                      s:<type>:<name>, n:<type>, o:<type> and x:ov (limit
//!                                      overrides and their version), ov:<type> (the period's
//!                                      overage: units past the limit), h:<type> (held by open
//!                                      reservations), x:next (set once the next
//!                                      month's counter was created: it never starts fresh
//!                                      again), x:dirty (set while on the dirty set). Months
//!                                      expire 35 days after their end; a
//!                                      lifetime hash loaded with nothing expires after 24 h
//!                                      until something is counted in it
//! <prefix>:1:{<b>}:a:<account>:<period>  hash: an account's pool, the same fields (no metadata)
//! <prefix>:1:{<b>}:dirty               sorted set of "<user>:<period>" and "a:<account>:<period>"
//!                                      changed since their last flush, scored by the time (ms)
//!                                      of the first such change
//! <prefix>:1:{<b>}:u:<user>            string: the user's route in this bucket (missing: here,
//!                                      no account; "<account>": here, a member; ">moving";
//!                                      "><account>" or ">home": moved away)
//! <prefix>:1:{<b>}:i:<user>:<key>      hash: an idempotent call's answer, 24 h
//! <prefix>:1:{<b>}:ix:<user>           sorted set: the user's idempotency records here, scored by
//!                                      their expiry (ms), for a membership change to carry
//! <prefix>:1:{<b>}:r:<user>:<rid>      hash: a reservation (type, amount, period, account,
//!                                      state, expiry; see lua/holds.lua), kept 24 h after it
//!                                      closes; its hold is `h:<type>` in the counters it holds in
//! <prefix>:1:{<b>}:rz                  sorted set of "<user>:<rid>": the bucket's open
//!                                      reservations, scored by expiry (ms, Redis' clock)
//! <prefix>:1:{<b>}:since              string: the time (ms) since which the bucket has
//!                                      held its data without a gap (set by the first load from
//!                                      Postgres; lets a new month's counter start without one)
//! <prefix>:1:changes                   pub/sub channel: users whose counts went down or whose
//!                                      plan changed (refusal-cache invalidation)
//! ```
//!
//! `<b>` is `crc16(id) % 1024` of the account's id for an account and its members, of the user's
//! id for a user without one, written in braces as a Redis Cluster hash tag: all of one user's
//! keys, their account's pool and the dirty set that lists them live in one slot, so each script
//! touches one slot.
//! `<period>` is `2026-11` or `life`. The `1` is the schema version: a later layout takes a new
//! number and migrates, instead of silently reading empty counters.

mod conn;
use conn::ServerClock;
pub use conn::Topology;
pub mod counter;
mod direct;
mod dirty;
mod items;
pub mod keys;
mod reservations;
mod scan;
pub mod scripts;

pub use counter::CounterHash;
pub use dirty::{DirtyMember, DirtyScan};
pub use items::{periods_of, Item, ItemsCall, ItemsMode, ItemsReply};
pub use keys::{Owner, OwnerKeys, UserKeys};
pub use reservations::{Due, DueScan, Placed, ReserveCall, Settle, SettleReply, Settled};
pub use scan::LiveCounter;

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_redis::redis::{self, AsyncCommands, RedisError, ScriptInvocation};
use uuid::Uuid;

use crate::period::Period;
use crate::plans::{Overage, UsageType};

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
/// Times a membership change reads the user's idempotency index and tries to move, before it
/// gives up (each try fails only when a keyed call of the user counted in between).
const MOVE_OUT_ATTEMPTS: usize = 5;
/// Counter hashes read per pipeline by [`RedisStore::read_many`] (about 7 ms of Redis' time at
/// 1,000, measured with `examples/account_scale.rs`).
pub const READ_MANY_CHUNK: usize = 1000;
/// Clock skew allowed between replicas, in ms: a month counter starts fresh without a Postgres
/// read only if its bucket's marker is older than the month's start by more than this.
pub const SKEW_MARGIN_MS: i64 = 60_000;

/// Why a Redis call failed.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// A counter must be loaded from Postgres first ([`Reply::detail`]: "user", "account" or
    /// both).
    Hydrate,
    /// The user's counters are not where the call was sent ([`Reply::detail`]: what the route
    /// key holds there); nothing done.
    Moved,
}

impl Status {
    /// A script's status word; anything it does not name is [`Status::Hydrate`] (the caller
    /// loads and asks again).
    fn parse(word: &str) -> Status {
        match word {
            "ok" => Status::Ok,
            "denied" => Status::Denied,
            "replay" => Status::Replay,
            "conflict" => Status::Conflict,
            "refunded" => Status::Refunded,
            "meta_limit" => Status::MetaLimit,
            "meta_sum" => Status::MetaSum,
            "moved" => Status::Moved,
            _ => Status::Hydrate,
        }
    }
}

/// A level a decision checks: the user's own limit, or their account's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The user's own limit (their plan, or their override).
    User,
    /// The account's pool.
    Account,
}

/// Where a level's limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    /// The plan's limit for the type.
    Plan,
    /// A limit override set for this customer.
    Override,
    /// The user's level of a member with neither a plan of their own nor an override: only the
    /// account's pool limits them.
    Account,
}

impl LimitSource {
    fn parse(s: &str) -> LimitSource {
        match s {
            "override" => LimitSource::Override,
            "account" => LimitSource::Account,
            _ => LimitSource::Plan,
        }
    }
}

/// One level of a decision, as a script answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelReply {
    /// The count (after the call, when counted).
    pub used: u64,
    /// The plan in force at this level.
    pub plan: String,
    /// The limit; `None` = unlimited.
    pub limit: Option<u64>,
    /// Where the limit comes from.
    pub source: LimitSource,
    /// How far past the limit the level may go.
    pub overage_cap: Overage,
    /// The period's overage at this level (after the call, when counted).
    pub overage: u64,
    /// The overage this call counted at this level (for check: would count).
    pub overage_added: u64,
    /// What open reservations hold at this level (after the call, for a reserve).
    pub held: u64,
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
    /// For [`Status::MetaSum`], the metadata name at fault; for [`Status::Hydrate`], which
    /// counters; for [`Status::Moved`], the route; else empty.
    pub detail: String,
    /// For [`Status::Denied`], the level that ran out.
    pub limited_by: Option<Level>,
    /// Where the user's limit comes from.
    pub source: LimitSource,
    /// How far past the user's limit the call may go.
    pub overage_cap: Overage,
    /// The user's overage in the period (after the call, when counted).
    pub overage: u64,
    /// The overage this call counted at the user's level (for check: would count).
    pub overage_added: u64,
    /// The account's level, for a member.
    /// What open reservations hold at the user's level (after the call, for a reserve).
    pub held: u64,
    pub account: Option<LevelReply>,
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

/// A change written into an owner's live counters by [`RedisStore::put_in_force`].
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A plan and its version.
    Plan(&'a str, i64),
    /// Every limit override in force, and their version.
    Limits(&'a [(String, i64)], i64),
}

/// A refund's outcome.
#[derive(Debug, Clone)]
pub enum RefundReply {
    /// Given back (one type).
    Refunded(RefundedItem),
    /// Given back, every item of a call with items, in the order the call sent them to Redis.
    RefundedItems(Vec<RefundedItem>),
    /// No record under that key.
    Missing,
    /// Refunded before.
    AlreadyRefunded,
    /// A counter must be loaded from Postgres first: the user's own, or the account's.
    Hydrate(Period, Level),
    /// The user's counters are not where the call was sent: what the route key holds there.
    Moved(String),
}

/// One type given back by a refund: the counter's new total, the stored plan, the type, and the
/// amount actually given back (less than the call's when the counter held less; 0 changed
/// nothing), the overage after (what is given back comes off the overage first); for a call that
/// counted in the user's account's pool, the pool's new total, what it got back and its overage
/// after.
#[derive(Debug, Clone)]
pub struct RefundedItem {
    pub used: u64,
    pub overage: u64,
    pub stored_plan: Option<String>,
    pub usage_type: String,
    pub amount: u64,
    pub period: Period,
    pub account: Option<(u64, u64, u64)>,
}

impl RefundedItem {
    /// From a refund script's figures: the user's (used after, given back, overage after) and,
    /// when the pool got its part back, the pool's; `plan` as stored ("" for none).
    fn from_script(
        usage_type: String,
        period: Period,
        plan: String,
        (used, given, overage): (i64, i64, i64),
        pool: Option<(i64, i64, i64)>,
    ) -> RefundedItem {
        let whole = |n: i64| n.max(0) as u64;
        RefundedItem {
            used: whole(used),
            overage: whole(overage),
            stored_plan: (!plan.is_empty()).then_some(plan),
            usage_type,
            amount: whole(given),
            period,
            account: pool.map(|(u, g, o)| (whole(u), whole(g), whole(o))),
        }
    }
}

/// A release's outcome.
#[derive(Debug, Clone)]
pub enum ReleaseReply {
    /// Lowered: the user's new total, the stored plan, how much was lowered (0 when the counter
    /// was at 0: then nothing changed), the overage after (lowered first); for a member, the
    /// pool's new total, what it lowered and its overage after.
    Released {
        used: u64,
        overage: u64,
        stored_plan: Option<String>,
        released: u64,
        account: Option<(u64, u64, u64)>,
    },
    /// A counter must be loaded from Postgres first.
    Hydrate(Level),
    /// The user's counters are not where the call was sent: what the route key holds there.
    Moved(String),
}

/// What Postgres holds for one (owner, period): the input of a hydration.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Highest version among the rows (0 when none).
    pub version: i64,
    /// Field, value pairs to load: counts by type, metadata fields, `o:<type>` overrides.
    pub fields: Vec<(String, String)>,
    /// The owner's stored plan and its version, if any.
    pub plan: Option<(String, i64)>,
    /// The version of the owner's limit overrides (0 when none are stored).
    pub overrides_version: i64,
    /// For a user, the account Postgres says they are a member of.
    pub account: Option<uuid::Uuid>,
}

/// The Redis side of quotad.
#[derive(Clone)]
pub struct RedisStore {
    /// One Redis or a cluster, found out at the first connection.
    server: Arc<conn::Server>,
    /// One multiplexed connection (on a cluster: one per node): it pipelines every concurrent
    /// request over one socket (more sockets measured no faster, and each one more is one more
    /// client for Redis to serve). Made at the first call.
    conn: Arc<conn::Link>,
    prefix: Arc<str>,
    timeout: Duration,
    /// Replicas that must confirm a counting call's write (`WAIT`); 0: none.
    wait_replicas: u64,
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
    ///
    /// `url` is one Redis URL, or several separated by commas: the seed nodes of a Redis
    /// Cluster. Whether it is a cluster is found out at the first connection (`INFO cluster`).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, String> {
        Ok(RedisStore {
            server: Arc::new(conn::Server::parse(url)?),
            conn: Arc::default(),
            prefix: prefix.into(),
            timeout,
            name: REQUESTS_CONNECTION,
            wait_replicas: 0,
            clock: Arc::default(),
        })
    }

    /// The same Redis and keys on connections of its own, named `name`, with deadline
    /// `timeout`: for the flusher and reconcile, whose large pipelines would otherwise queue on
    /// the request path's connection ahead of consumes.
    pub fn dedicated(&self, name: &'static str, timeout: Duration) -> RedisStore {
        RedisStore {
            conn: Arc::default(),
            timeout,
            name,
            ..self.clone()
        }
    }

    /// A client per URL given, for connections of their own (the invalidation subscription:
    /// on a cluster, any node delivers what any node publishes).
    pub fn seed_clients(&self) -> Vec<redis::Client> {
        self.server.seed_clients()
    }

    /// One Redis or a cluster, and how many masters (`None` until the first connection).
    pub fn topology(&self) -> Option<Topology> {
        self.server.topology()
    }

    /// The keys of `user` as a user without an account: build them once per request and pass
    /// them down.
    pub fn keys(&self, user: Uuid) -> UserKeys {
        UserKeys::new(&self.prefix, user)
    }

    /// The keys of `user` as a member of `account` (or of none).
    pub fn keys_in(&self, user: Uuid, account: Option<Uuid>) -> UserKeys {
        UserKeys::placed(&self.prefix, user, account)
    }

    /// The keys of `owner`'s counters in `bucket` (the flusher reads the bucket off the dirty
    /// set it found the counter in).
    pub fn keys_of(&self, owner: Owner, bucket: u16) -> OwnerKeys {
        OwnerKeys::new(&self.prefix, owner, bucket)
    }

    /// The keys of an account's pool (in the account's own bucket).
    pub fn account_keys(&self, account: Uuid) -> OwnerKeys {
        OwnerKeys::new(
            &self.prefix,
            Owner::Account(account),
            keys::bucket(&account),
        )
    }

    /// The keys that let a missing month counter start fresh: previous month's hash and the
    /// bucket's marker; and the arguments: month start (ms), skew margin, EXPIREAT.
    fn fresh_start(keys: &OwnerKeys, period: Period) -> ([String; 2], [i64; 3]) {
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

    /// The pub/sub channel on which scripts announce owners whose counts went down or whose plan
    /// changed (see [`crate::refusals`]).
    pub fn changes_channel(&self) -> String {
        keys::changes_channel(&self.prefix)
    }

    /// The consume script's invocation for `call`: what [`RedisStore::run`] sends for a consume
    /// (the bench's raw-Redis ceiling sends the same). With keys placed in an account, the
    /// account's pool is checked and counted in the same step.
    pub fn count_invocation(&self, call: &CountCall<'_>) -> ScriptInvocation<'static> {
        let keys = call.keys;
        let (fresh_keys, fresh_args) = Self::fresh_start(keys.own(), call.period);
        let mut inv = scripts::CONSUME.prepare_invoke();
        inv.key(keys.counter(call.period))
            .key(keys.dirty())
            .key(&fresh_keys)
            .key(keys.route());
        if let Some(pool) = keys.pool() {
            inv.key(pool.counter(call.period))
                .key(pool.counter(call.period.previous().unwrap_or(call.period)));
        }
        if let Some(k) = call.idempotency_key {
            inv.key(keys.idempotency(k)).key(keys.idempotency_index());
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
        .arg(keys.route_value())
        .arg(
            keys.pool()
                .map(|p| p.member(call.period))
                .unwrap_or_default(),
        )
        .arg(&call.usage_type.script_notify)
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

    /// The same store, with counting calls answered only once `replicas` replicas confirmed
    /// their write (see [`Self::run`]).
    pub fn with_wait_replicas(mut self, replicas: u64) -> RedisStore {
        self.wait_replicas = replicas;
        self
    }

    /// Runs a call's script (from [`Self::count_invocation`] or [`Self::check_invocation`]),
    /// armed with its deadline: one EVALSHA; its raw reply, for [`decision_reply`].
    ///
    /// A call that `counts`, with replicas to wait for, is sent as EVALSHA and `WAIT` in one
    /// pipeline (one round trip, on the master owning the user): Redis answers once the
    /// replicas acknowledged everything written so far, or after the grace (a quarter of the
    /// deadline). A count no replica confirmed by then is answered as an outage (the type's fail
    /// policy), like a call Redis did not answer in time, and counted in
    /// [`crate::metrics::REDIS_UNREPLICATED`]: an allowed answer then always means a replica
    /// holds the count, so a failover cannot lose it. The master keeps the count; if it survives,
    /// the count stands although the answer was the fail policy's.
    pub async fn run(
        &self,
        inv: &mut ScriptInvocation<'_>,
        counts: bool,
    ) -> Result<redis::Value, StoreError> {
        if !counts || self.wait_replicas == 0 {
            return self.run_script(inv).await;
        }
        let grace = self.grace();
        let until = self.arm(inv) + grace;
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv)
            .cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(grace.as_millis().max(1) as u64);
        pipe.ignore_errors();
        let pipe = &pipe;
        let inv = &*inv;
        let (reply, acked) = self
            .with_retry(until, |mut c| async move {
                let mut replies: Vec<redis::RedisResult<redis::Value>> =
                    pipe.query_async(&mut c).await?;
                let mut first = replies.remove(0);
                if is_noscript(&first) {
                    // A Redis that lost its scripts (restarted, failed over): load and resend.
                    inv.load_async(&mut c).await?;
                    replies = pipe.query_async(&mut c).await?;
                    first = replies.remove(0);
                }
                let acked: i64 = match replies.pop() {
                    Some(Ok(v)) => redis::from_redis_value(v).unwrap_or(0),
                    _ => 0,
                };
                Ok((first?, acked))
            })
            .await?;
        if acked < self.wait_replicas as i64 {
            metrics::counter!(crate::metrics::REDIS_UNREPLICATED).increment(1);
            return Err(StoreError::Unavailable(format!(
                "{acked} of {} replicas confirmed the count within {} ms",
                self.wait_replicas,
                grace.as_millis()
            )));
        }
        Ok(reply)
    }

    /// The check script's invocation: the decision without counting, at every level. With an
    /// `idempotency_key` that names an earlier consume or track, it answers
    /// [`Status::Conflict`] (the key belongs to another call).
    #[allow(clippy::too_many_arguments)]
    pub fn check_invocation(
        &self,
        keys: &UserKeys,
        usage_type: &UsageType,
        amount: u64,
        period: Period,
        plan_override: Option<&str>,
        default_plan: &str,
        idempotency_key: Option<&str>,
    ) -> ScriptInvocation<'static> {
        let (fresh_keys, fresh_args) = Self::fresh_start(keys.own(), period);
        let mut inv = scripts::CHECK.prepare_invoke();
        inv.key(keys.counter(period))
            .key(&fresh_keys)
            .key(keys.route());
        if let Some(pool) = keys.pool() {
            inv.key(pool.counter(period))
                .key(pool.counter(period.previous().unwrap_or(period)));
        }
        if let Some(k) = idempotency_key {
            inv.key(keys.idempotency(k));
        }
        inv.arg(&usage_type.name)
            .arg(amount)
            .arg(plan_override.unwrap_or(""))
            .arg(default_plan)
            .arg(&fresh_args)
            .arg(keys.route_value())
            .arg(&usage_type.script_limits);
        inv
    }

    /// Refund the call recorded under `key`: reads the record's period, then refunds atomically
    /// at every level the call counted at (see `lua/refund.lua`).
    pub async fn refund(&self, keys: &UserKeys, key: &str) -> Result<RefundReply, StoreError> {
        let idem = keys.idempotency(key);
        let idem_read = idem.clone();
        let (period, kind, periods): (Option<String>, Option<String>, Option<String>) = self
            .with_conn(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(idem_read)
                    .arg("pe")
                    .arg("k")
                    .arg("pes")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if kind.as_deref().is_some_and(|k| k.starts_with("multi:")) {
            return self
                .refund_items(keys, idem, periods.as_deref().unwrap_or(""))
                .await;
        }
        let Some(period) = period.as_deref().and_then(Period::parse_id) else {
            return Ok(RefundReply::Missing);
        };
        let mut inv = scripts::REFUND.prepare_invoke();
        inv.key(idem)
            .key(keys.counter(period))
            .key(keys.dirty())
            .key(keys.route());
        if let Some(pool) = keys.pool() {
            inv.key(pool.counter(period));
        }
        inv.arg(period.id())
            .arg(keys.member(period))
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(keys.route_value())
            .arg(keys.pool().map(|p| p.member(period)).unwrap_or_default());
        #[allow(clippy::type_complexity)]
        let (
            (status, used, plan, usage_type, amount, account_used, account_given, detail),
            (overage, account_overage),
        ): (
            (String, i64, String, String, i64, i64, i64, String),
            (i64, i64),
        ) = split_reply(self.run_script(&mut inv).await?, 8)?;
        let level = if detail == "account" {
            Level::Account
        } else {
            Level::User
        };
        Ok(match status.as_str() {
            "ok" => RefundReply::Refunded(RefundedItem::from_script(
                usage_type,
                period,
                plan,
                (used, amount, overage),
                (detail == "pool").then_some((account_used, account_given, account_overage)),
            )),
            "refunded" => RefundReply::AlreadyRefunded,
            "hydrate" => RefundReply::Hydrate(period, level),
            "moved" => RefundReply::Moved(detail),
            _ => RefundReply::Missing,
        })
    }

    /// Lower a lifetime counter by `amount`, never below 0, and a member's account pool with it.
    pub async fn release(
        &self,
        keys: &UserKeys,
        usage_type: &str,
        amount: u64,
    ) -> Result<ReleaseReply, StoreError> {
        let period = Period::Lifetime;
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(keys.counter(period))
            .key(keys.dirty())
            .key(keys.route());
        if let Some(pool) = keys.pool() {
            inv.key(pool.counter(period));
        }
        inv.arg(usage_type)
            .arg(amount)
            .arg(keys.member(period))
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(keys.route_value())
            .arg(keys.pool().map(|p| p.member(period)).unwrap_or_default());
        #[allow(clippy::type_complexity)]
        let (
            (status, used, plan, released, account_used, account_released, detail),
            (overage, account_overage),
        ): ((String, i64, String, i64, i64, i64, String), (i64, i64)) =
            split_reply(self.run_script(&mut inv).await?, 7)?;
        Ok(match status.as_str() {
            "ok" => ReleaseReply::Released {
                used: used.max(0) as u64,
                overage: overage.max(0) as u64,
                stored_plan: (!plan.is_empty()).then_some(plan),
                released: released.max(0) as u64,
                account: keys.pool().map(|_| {
                    (
                        account_used.max(0) as u64,
                        account_released.max(0) as u64,
                        account_overage.max(0) as u64,
                    )
                }),
            },
            "moved" => ReleaseReply::Moved(detail),
            _ if detail == "account" => ReleaseReply::Hydrate(Level::Account),
            _ => ReleaseReply::Hydrate(Level::User),
        })
    }

    /// The hydrate script's invocation: fill (owner, period) from `snap` unless it is loaded
    /// already, and set the bucket's marker to `now` unless it is set. `believed` is the route
    /// the caller sent its call under (the account id, or ""); the script fills only where the
    /// owner's counters live (see `lua/hydrate.lua`). A month's load also marks the previous
    /// month's hash (so this month never starts fresh again); a lifetime counter loaded with
    /// nothing expires after [`EMPTY_LIFETIME_TTL_SECS`].
    pub fn hydrate_invocation(
        &self,
        keys: &OwnerKeys,
        period: Period,
        snap: &Snapshot,
        now: DateTime<Utc>,
        believed: &str,
    ) -> ScriptInvocation<'static> {
        let expire_at = period
            .expire_at(chrono::Duration::days(GRACE_DAYS))
            .unwrap_or(0);
        let mut inv = scripts::HYDRATE.prepare_invoke();
        let (plan, plan_version) = snap.plan.clone().unwrap_or_default();
        inv.key(keys.counter(period))
            .key(keys.since())
            .key(keys.route());
        if let Some(prev) = period.previous() {
            inv.key(keys.counter(prev));
        }
        // Where Postgres places the owner's counters, relative to this bucket.
        let placed = match keys.owner() {
            Owner::Account(_) => "=".to_owned(),
            Owner::User(user) => {
                let home = self.keys_in(user, snap.account);
                if home.own() == keys {
                    format!("={}", home.route_value())
                } else {
                    match snap.account {
                        Some(a) => format!(">{a}"),
                        None => ">home".to_owned(),
                    }
                }
            }
        };
        inv.arg(expire_at)
            .arg(snap.version)
            .arg(plan)
            .arg(plan_version)
            .arg(self.changes_channel())
            .arg(keys.owner().id().to_string())
            .arg(now.timestamp_millis())
            .arg(EMPTY_LIFETIME_TTL_SECS)
            .arg(
                period
                    .end()
                    .map_or(0, |end| end.timestamp_millis() - SKEW_MARGIN_MS),
            )
            .arg(believed)
            .arg(placed)
            .arg(snap.overrides_version);
        for (field, value) in &snap.fields {
            inv.arg(field).arg(value);
        }
        inv
    }

    /// Fill the counter hash of (owner, period) from `snap` unless it is loaded already; `now`
    /// is the daemon's clock.
    pub async fn hydrate(
        &self,
        keys: &OwnerKeys,
        period: Period,
        snap: &Snapshot,
        now: DateTime<Utc>,
        believed: &str,
    ) -> Result<Hydrated, StoreError> {
        let mut inv = self.hydrate_invocation(keys, period, snap, now, believed);
        let reply: redis::Value = self.run_script(&mut inv).await?;
        hydrated(reply)
    }

    /// [`Self::hydrate`] for many counters in one round trip: one pipeline of hydrate scripts,
    /// each armed with its deadline, so one that Redis runs late does nothing, as alone. Each
    /// load carries one slot per caller for a follow-up script (the call that found the counter
    /// missing: a consume's count, a check), sent right after its fill in the same pipeline and
    /// armed the same way, so a first request needs no round trip of its own after its load. The
    /// outer error is the pipeline's (no answer, a lost connection: every counter failed alike);
    /// inside, each counter's own outcome and, slot by slot, its follow-ups' replies, so a script
    /// that fails fails only its own call. An empty slot, or a follow-up Redis did not run (it
    /// had not loaded that script: a restarted Redis), answers `None`: its caller sends the call
    /// again alone.
    pub async fn hydrate_many(
        &self,
        loads: &mut [Load<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Filled>, StoreError> {
        let mut batch = self.batch(redis::pipe());
        let mut until = tokio::time::Instant::now();
        for load in loads.iter_mut() {
            let bucket = load.keys.bucket();
            let mut fill =
                self.hydrate_invocation(load.keys, load.period, load.snapshot, now, load.believed);
            until = self.arm(&mut fill);
            batch.to(bucket).invoke_script(&fill);
            for follow_up in load.follow_ups.iter_mut().flatten() {
                until = self.arm(follow_up);
                batch.to(bucket).invoke_script(follow_up);
            }
        }
        // Each script's reply stands alone: a failed one does not fail the others. Follow-ups
        // count: with replicas to wait for, each pipeline ends with the wait.
        batch
            .ignore_errors()
            .wait_for(self.wait_replicas, self.grace().as_millis().max(1) as u64);
        let waited = if self.wait_replicas > 0 {
            until + self.grace()
        } else {
            until
        };
        let replies = self.run_batch(batch, waited).await?;
        let mut replies = replies.into_iter();
        let mut out: Vec<(ScriptReply, Vec<Option<ScriptReply>>)> = loads
            .iter()
            .map(|load| {
                let fill = replies.next().unwrap_or_else(|| Err(short_reply()));
                let follow = load
                    .follow_ups
                    .iter()
                    .map(|slot| {
                        slot.as_ref()
                            .map(|_| replies.next().unwrap_or_else(|| Err(short_reply())))
                    })
                    .collect();
                (fill, follow)
            })
            .collect();

        // A pipeline cannot load a script Redis lacks and resend it, as one EVALSHA does: fills
        // Redis did not know (a restarted Redis) are sent again after the script is loaded, once;
        // follow-ups are left to their callers.
        let missing: Vec<usize> = (0..out.len()).filter(|i| is_noscript(&out[*i].0)).collect();
        if !missing.is_empty() {
            let mut prelude = redis::pipe();
            prelude.load_script(&scripts::HYDRATE).ignore();
            let mut batch = self.batch(prelude);
            for i in &missing {
                let load = &loads[*i];
                let mut fill = self.hydrate_invocation(
                    load.keys,
                    load.period,
                    load.snapshot,
                    now,
                    load.believed,
                );
                until = self.arm(&mut fill);
                batch.to(load.keys.bucket()).invoke_script(&fill);
            }
            batch.ignore_errors();
            let again = self.run_batch(batch, until).await?;
            for (i, r) in missing.into_iter().zip(again) {
                out[i].0 = r;
            }
        }
        Ok(out
            .into_iter()
            .map(|(fill, follow)| Filled {
                filled: self.settle(Some(fill)).and_then(hydrated),
                follow_ups: follow
                    .into_iter()
                    .map(|slot| {
                        slot.filter(|r| !is_noscript(r))
                            .map(|r| self.settle(Some(r)))
                    })
                    .collect(),
            })
            .collect())
    }

    /// Write a plan or override change (with its Postgres version) into an owner's counter
    /// hashes of `periods` (those in force now: created if missing), and of `adjacent` (the
    /// months next to the current one: written only if they exist, so a change just before
    /// midnight reaches a next month another replica already counts in). `believed` is the
    /// route the keys are placed under; `Err(route)` inside when the owner's counters are
    /// elsewhere (nothing written). `lua/set_plan.lua` and `lua/set_limits.lua` take the same
    /// arguments, the change's own last.
    pub async fn put_in_force(
        &self,
        keys: &OwnerKeys,
        believed: &str,
        change: Change<'_>,
        periods: &[Period],
        adjacent: &[Period],
    ) -> Result<Result<(), String>, StoreError> {
        let (script, version) = match change {
            Change::Plan(_, v) => (&*scripts::SET_PLAN, v),
            Change::Limits(_, v) => (&*scripts::SET_LIMITS, v),
        };
        let mut inv = script.prepare_invoke();
        inv.key(keys.route());
        for p in periods.iter().chain(adjacent) {
            inv.key(keys.counter(*p));
        }
        inv.arg(version)
            .arg(self.changes_channel())
            .arg(keys.owner().id().to_string())
            .arg(periods.len())
            .arg(believed);
        for p in periods {
            inv.arg(p.expire_at(chrono::Duration::days(GRACE_DAYS)).unwrap_or(0));
        }
        match change {
            Change::Plan(plan, _) => {
                inv.arg(plan);
            }
            Change::Limits(limits, _) => {
                for (ty, limit) in limits {
                    inv.arg(ty).arg(limit);
                }
            }
        }
        let reply: redis::Value = self.run_script(&mut inv).await?;
        Ok(moved_or_done(reply))
    }

    /// The counter hashes of an owner in `periods`, in one pipeline; `None` where not loaded
    /// yet. With `route`, also what the owner's route key holds (`Some("")` when missing), so a
    /// caller can tell whether the counters live here.
    pub async fn read_counters(
        &self,
        keys: &OwnerKeys,
        periods: &[Period],
    ) -> Result<(Vec<Option<CounterHash>>, String), StoreError> {
        let mut pipe = redis::pipe();
        pipe.get(keys.route());
        for p in periods {
            pipe.hgetall(keys.counter(*p));
        }
        let (route, maps): (Option<String>, Vec<HashMap<String, String>>) = {
            let mut replies: Vec<redis::Value> = self.run_pipe(&pipe).await?;
            let route = redis::from_redis_value(replies.remove(0))
                .map_err(|e| StoreError::Redis(e.into()))?;
            let maps = replies
                .into_iter()
                .map(redis::from_redis_value)
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Redis(e.into()))?;
            (route, maps)
        };
        Ok((
            maps.iter()
                .map(CounterHash::parse)
                .map(|h| h.is_loaded().then_some(h))
                .collect(),
            route.unwrap_or_default(),
        ))
    }

    /// What `keys`' user's route key holds ("" when missing).
    pub async fn route_of(&self, keys: &UserKeys) -> Result<String, StoreError> {
        let route = keys.route();
        let held: Option<String> = self
            .with_conn(|mut c| async move { c.get(route).await })
            .await?;
        Ok(held.unwrap_or_default())
    }

    /// Many owners' counter hashes of one period (`None` where not loaded): an account's
    /// members, for its usage read. One pipeline per [`READ_MANY_CHUNK`] keys, so each stays
    /// well within the call's deadline however large the account.
    pub async fn read_many(
        &self,
        keys: &[OwnerKeys],
        period: Period,
    ) -> Result<Vec<Option<CounterHash>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(READ_MANY_CHUNK) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.hgetall(k.counter(period));
            }
            let maps: Vec<HashMap<String, String>> = self.run_pipe(&pipe).await?;
            out.extend(
                maps.iter()
                    .map(CounterHash::parse)
                    .map(|h| h.is_loaded().then_some(h)),
            );
        }
        Ok(out)
    }

    /// Moves a user's counters of `periods` from `from` to `to` (see `lua/move_out.lua`,
    /// `move_in.lua`, `move_done.lua`, or `reroute.lua` when both share a bucket). Returns
    /// `Err(route)` inside when the counters were not at `from` (the route there says where).
    pub async fn move_user(
        &self,
        from: &UserKeys,
        to: &UserKeys,
        periods: &[Period],
    ) -> Result<Result<(), String>, StoreError> {
        let user = from.user().to_string();
        if from.own().dirty() == to.own().dirty() {
            let mut inv = scripts::REROUTE.prepare_invoke();
            inv.key(from.route())
                .arg(from.route_value())
                .arg(to.route_value())
                .arg(self.changes_channel())
                .arg(&user);
            let reply: redis::Value = self.run_script(&mut inv).await?;
            return Ok(moved_or_done(reply));
        }
        // The user's live idempotency records go along: read from the index, named to the
        // script, which refuses (and is sent again) if one was added meanwhile.
        let mut reply = Vec::new();
        let mut records: Vec<String> = Vec::new();
        for _ in 0..MOVE_OUT_ATTEMPTS {
            let index = from.idempotency_index();
            let now_ms = Utc::now().timestamp_millis();
            records = self
                .with_conn(|mut c| async move { c.zrangebyscore(index, now_ms, "+inf").await })
                .await?;
            let mut out = scripts::MOVE_OUT.prepare_invoke();
            out.key(from.route());
            for p in periods {
                out.key(from.counter(*p));
            }
            out.key(from.idempotency_index());
            for r in &records {
                out.key(r);
            }
            out.arg(from.route_value()).arg(periods.len()).arg(now_ms);
            reply = self.run_script(&mut out).await?;
            let status: String = reply
                .first()
                .map(redis::from_redis_value_ref)
                .transpose()
                .map_err(|e| StoreError::Redis(e.into()))?
                .unwrap_or_default();
            match status.as_str() {
                "ok" => break,
                "retry" => reply.clear(),
                _ => {
                    let route: String = reply
                        .get(1)
                        .map(redis::from_redis_value_ref)
                        .transpose()
                        .map_err(|e| StoreError::Redis(e.into()))?
                        .unwrap_or_default();
                    return Ok(Err(route));
                }
            }
        }
        if reply.is_empty() {
            return Err(StoreError::Unavailable(
                "the user's idempotent calls kept coming while their counters were being moved; repeat the change".into(),
            ));
        }
        let mut reply = reply.into_iter().skip(1);
        let mut next = |fallback: redis::Value| reply.next().unwrap_or(fallback);
        let to_records: Vec<String> = records
            .iter()
            .filter_map(|r| from.idempotency_key_of(r))
            .map(|k| to.idempotency(k))
            .collect();
        let mut inn = scripts::MOVE_IN.prepare_invoke();
        inn.key(to.route()).key(to.dirty());
        for p in periods {
            inn.key(to.counter(*p));
        }
        inn.key(to.idempotency_index());
        for r in &to_records {
            inn.key(r);
        }
        inn.arg(to.route_value())
            .arg(self.changes_channel())
            .arg(&user)
            .arg(Utc::now().timestamp_millis())
            .arg(periods.len());
        let parse = |v: redis::Value| -> Result<Vec<(String, String)>, StoreError> {
            redis::from_redis_value(v).map_err(|e| StoreError::Redis(e.into()))
        };
        let ttl = |v: redis::Value| -> Result<i64, StoreError> {
            redis::from_redis_value(v).map_err(|e| StoreError::Redis(e.into()))
        };
        for p in periods {
            let fields = parse(next(redis::Value::Array(Vec::new())))?;
            let left = ttl(next(redis::Value::Int(-2)))?;
            inn.arg(to.member(*p)).arg(left).arg(fields.len());
            for (f, v) in fields {
                inn.arg(f).arg(v);
            }
        }
        for r in &records {
            let fields = parse(next(redis::Value::Array(Vec::new())))?;
            let left = ttl(next(redis::Value::Int(-2)))?;
            // A record of another user's key cannot be in this user's index; skipped alike.
            if from.idempotency_key_of(r).is_none() {
                continue;
            }
            inn.arg(left).arg(fields.len());
            for (f, v) in fields {
                inn.arg(f).arg(v);
            }
        }
        let _: i64 = self.run_script(&mut inn).await?;
        let mut done = scripts::MOVE_DONE.prepare_invoke();
        done.key(from.route()).key(from.dirty());
        for p in periods {
            done.key(from.counter(*p));
        }
        done.key(from.idempotency_index());
        for r in &records {
            done.key(r);
        }
        done.arg(match to.account() {
            Some(a) => format!(">{a}"),
            None => ">home".to_owned(),
        });
        for p in periods {
            done.arg(from.member(*p));
        }
        let _: i64 = self.run_script(&mut done).await?;
        Ok(Ok(()))
    }
}

/// What a hydrate script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hydrated {
    /// This load filled the counter.
    Filled,
    /// It was loaded already.
    Loaded,
    /// The owner's counters live elsewhere: what the route key holds (nothing filled).
    Moved(String),
}

fn hydrated(reply: redis::Value) -> Result<Hydrated, StoreError> {
    match reply {
        redis::Value::Int(1) => Ok(Hydrated::Filled),
        redis::Value::Int(_) => Ok(Hydrated::Loaded),
        other => match moved_or_done(other) {
            Err(route) => Ok(Hydrated::Moved(route)),
            Ok(()) => Ok(Hydrated::Loaded),
        },
    }
}

/// A script's `{"moved", route}` (or `{"elsewhere", route}`) reply as `Err(route)`; anything else
/// is done.
fn moved_or_done(reply: redis::Value) -> Result<(), String> {
    match redis::from_redis_value::<(String, String)>(reply) {
        Ok((status, route)) if status == "moved" || status == "elsewhere" => Err(route),
        _ => Ok(()),
    }
}

/// One counter to load in [`RedisStore::hydrate_many`], with the scripts to run right after it.
pub struct Load<'a> {
    /// Whose counter, in which bucket.
    pub keys: &'a OwnerKeys,
    /// The route the caller sent its call under (see [`RedisStore::hydrate_invocation`]).
    pub believed: &'a str,
    /// Which period.
    pub period: Period,
    /// What Postgres holds for it.
    pub snapshot: &'a Snapshot,
    /// One slot per caller: the script sent after the fill for it, if any (unarmed: the
    /// pipeline arms it).
    pub follow_ups: Vec<Option<ScriptInvocation<'static>>>,
}

/// What [`RedisStore::hydrate_many`] did for one [`Load`].
#[derive(Debug)]
pub struct Filled {
    /// What this load's fill did.
    pub filled: Result<Hydrated, StoreError>,
    /// Slot by slot as in [`Load::follow_ups`], each follow-up's reply; `None` for an empty
    /// slot or a follow-up Redis did not run (NOSCRIPT).
    pub follow_ups: Vec<Option<Result<redis::Value, StoreError>>>,
}

/// One script's reply in a pipeline that ignores errors: each stands alone.
type ScriptReply = redis::RedisResult<redis::Value>;

/// Redis answered "unknown script": the script did not run.
pub(crate) fn is_noscript<T>(r: &redis::RedisResult<T>) -> bool {
    matches!(r, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

/// A pipeline that answered fewer replies than it sent commands (it cannot happen with a
/// well-behaved server).
fn short_reply() -> RedisError {
    RedisError::from(std::io::Error::other(
        "redis answered fewer replies than commands sent",
    ))
}

/// A script's reply array as two tuples: its first `head` fields, then the rest (Redis' tuple
/// conversion takes at most 12 fields at once).
fn split_reply<A, B>(raw: redis::Value, head: usize) -> Result<(A, B), StoreError>
where
    A: redis::FromRedisValue,
    B: redis::FromRedisValue,
{
    let bad = |e: redis::ParsingError| StoreError::Redis(e.into());
    let mut fields: Vec<redis::Value> = redis::from_redis_value(raw).map_err(bad)?;
    let tail = fields.split_off(head.min(fields.len()));
    Ok((
        redis::from_redis_value(redis::Value::Array(fields)).map_err(bad)?,
        redis::from_redis_value(redis::Value::Array(tail)).map_err(bad)?,
    ))
}

/// The reply of the consume, check or reserve script (see `lua/consume.lua`: they answer the
/// same twenty fields; eighteen, without the holds, from a script of a build before
/// reservations) as a [`Reply`]; `period` stands in where the script names none (check).
pub fn decision_reply(raw: redis::Value, period: Period) -> Result<Reply, StoreError> {
    let bad = |e: redis::ParsingError| StoreError::Redis(e.into());
    let fields: Vec<redis::Value> = redis::from_redis_value(raw).map_err(bad)?;
    if fields.len() != 18 && fields.len() != 20 {
        return Err(StoreError::Redis(RedisError::from(std::io::Error::other(
            format!("a decision script answered {} fields, not 20", fields.len()),
        ))));
    }
    let mut it = fields.into_iter();
    let mut text = || -> Result<String, StoreError> {
        redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil)).map_err(bad)
    };
    let status = text()?;
    let used: i64 = text()?.parse().unwrap_or(0);
    let plan = text()?;
    let limit: i64 = text()?.parse().unwrap_or(-1);
    let period_id = text()?;
    let detail = text()?;
    let limited_by = match text()?.as_str() {
        "user" => Some(Level::User),
        "account" => Some(Level::Account),
        _ => None,
    };
    let source = LimitSource::parse(&text()?);
    let account_used: i64 = text()?.parse().unwrap_or(0);
    let account_plan = text()?;
    let account_limit: i64 = text()?.parse().unwrap_or(-1);
    let account_source = text()?;
    let mut number = || -> Result<i64, StoreError> { Ok(text()?.parse().unwrap_or(0)) };
    let (cap, overage, added) = (number()?, number()?, number()?);
    let (account_cap, account_overage, account_added) = (number()?, number()?, number()?);
    // What open reservations hold at each level (absent from a script before reservations).
    let (held, account_held) = (number().unwrap_or(0), number().unwrap_or(0));
    let status = Status::parse(&status);
    Ok(Reply {
        status,
        used: used.max(0) as u64,
        plan,
        limit: u64::try_from(limit).ok(),
        period: Some(Period::parse_id(&period_id).unwrap_or(period)),
        detail,
        limited_by,
        source,
        overage_cap: Overage::from_script(cap),
        overage: overage.max(0) as u64,
        overage_added: added.max(0) as u64,
        held: held.max(0) as u64,
        account: (!account_source.is_empty()).then(|| LevelReply {
            used: account_used.max(0) as u64,
            plan: account_plan,
            limit: u64::try_from(account_limit).ok(),
            source: LimitSource::parse(&account_source),
            overage_cap: Overage::from_script(account_cap),
            overage: account_overage.max(0) as u64,
            overage_added: account_added.max(0) as u64,
            held: account_held.max(0) as u64,
        }),
    })
}
