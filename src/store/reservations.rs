//! Reservations in Redis: the reserve script's invocation, commit and cancel of one reservation,
//! and the sweeper's side (the due members of every bucket's open set, expired in batches). The
//! scripts are `lua/reserve.lua`, `commit.lua`, `cancel.lua` and `expire.lua`, with the helpers
//! and the reservation's fields in `lua/holds.lua`.

use deadpool_redis::redis::{self, ScriptInvocation};
use uuid::Uuid;

use super::{keys, scripts, Owner, OwnerKeys, RedisStore, StoreError, UserKeys};
use crate::period::Period;
use crate::plans::UsageType;

/// How long a closed reservation is kept, so a repeated commit or cancel answers as the first
/// did (and an expired one can still be committed late), in ms: a day, as idempotency records.
pub const CLOSED_KEEP_MS: u64 = super::IDEMPOTENCY_TTL_SECS * 1000;

/// A reserve call.
#[derive(Debug)]
pub struct ReserveCall<'a> {
    /// The user's keys, placed where this replica believes they live.
    pub keys: &'a UserKeys,
    /// The reservation's random part (32 hex digits).
    pub rid: &'a str,
    /// The usage type and its plan limits.
    pub usage_type: &'a UsageType,
    /// How much to hold.
    pub amount: u64,
    /// How long, in ms of Redis' clock.
    pub ttl_ms: u64,
    /// The period it holds in.
    pub period: Period,
    /// The default plan.
    pub default_plan: &'a str,
}

/// Where a reservation holds: what commit and cancel read first, to name their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Its usage type.
    pub usage_type: String,
    /// The period of the counters it holds in.
    pub period: Period,
    /// The account whose pool it holds in, if any (its pool is in the reservation's bucket).
    pub account: Option<Uuid>,
}

/// Which way a reservation is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Count this amount (at most what it holds) and free the rest.
    Commit(u64),
    /// Free all of it, counting nothing.
    Cancel,
}

/// What a commit, cancel or expiry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Closed now (commit, cancel).
    Ok,
    /// Closed before the same way: the first answer again.
    Replay,
    /// Committed before (with [`SettleReply::committed`]).
    Committed,
    /// Cancelled before.
    Cancelled,
    /// A commit of more than the reservation holds.
    Over,
    /// No such reservation here.
    Missing,
    /// A counter must be loaded from Postgres first ([`SettleReply::detail`]: "user" or
    /// "account").
    Hydrate,
    /// The user's counters are not where the call was sent ([`SettleReply::detail`]: the route).
    Moved,
    /// Expired now (the sweeper).
    Expired,
    /// Not due yet (the sweeper).
    NotDue,
    /// Not open any more, or gone (the sweeper).
    Gone,
}

/// A commit, cancel or expire script's answer (see `settled` in `lua/holds.lua`).
#[derive(Debug, Clone)]
pub struct SettleReply {
    /// What happened.
    pub status: Settled,
    /// The reservation's usage type ("" when it was not found).
    pub usage_type: String,
    /// What it held.
    pub amount: u64,
    /// What its commit counted.
    pub committed: u64,
    /// What its close freed (0 for a late commit or a cancel after its expiry: the expiry freed
    /// it).
    pub freed: u64,
    /// A commit after its expiry.
    pub late: bool,
    /// The user's count and hold after the close.
    pub used: u64,
    /// See `used`.
    pub held: u64,
    /// The pool's count and hold after the close (0 without one).
    pub account_used: u64,
    /// See `account_used`.
    pub account_held: u64,
    /// Its expiry, ms of Redis' clock.
    pub expires_ms: i64,
    /// The period it held in.
    pub period: Option<Period>,
    /// The account whose pool it held in.
    pub account: Option<Uuid>,
    /// For `Hydrate`, which counter; for `Moved`, the route; "expired" when a commit found it
    /// due and expired it in the same step.
    pub detail: String,
}

/// A due member of a bucket's open set, placed: what the sweeper expires.
#[derive(Debug, Clone)]
pub struct Due {
    /// The bucket.
    pub bucket: u16,
    /// The user.
    pub user: Uuid,
    /// The reservation's random part.
    pub rid: String,
    /// Where it holds; `None` when the reservation is gone (its member is only removed).
    pub placed: Option<Placed>,
}

/// What [`RedisStore::due_reservations`] found.
#[derive(Debug, Default)]
pub struct DueScan {
    /// The due reservations, placed.
    pub due: Vec<Due>,
    /// Some bucket had more due than was taken.
    pub more: bool,
    /// Buckets with an open reservation not due yet, and the earliest such expiry (ms, Redis'
    /// clock).
    pub next: Vec<(u16, i64)>,
}

impl RedisStore {
    /// The reserve script's invocation (see `lua/reserve.lua`).
    pub fn reserve_invocation(&self, call: &ReserveCall<'_>) -> ScriptInvocation<'static> {
        let keys = call.keys;
        let (fresh_keys, fresh_args) = Self::fresh_start(keys.own(), call.period);
        let mut inv = scripts::RESERVE.prepare_invoke();
        inv.key(keys.counter(call.period))
            .key(&fresh_keys)
            .key(keys.route())
            .key(keys.reservation(call.rid))
            .key(keys.open_reservations());
        if let Some(pool) = keys.pool() {
            inv.key(pool.counter(call.period))
                .key(pool.counter(call.period.previous().unwrap_or(call.period)));
        }
        inv.arg(&call.usage_type.name)
            .arg(call.amount)
            .arg(call.ttl_ms)
            .arg(call.period.id())
            .arg(call.default_plan)
            .arg(&fresh_args)
            .arg(keys.route_value())
            .arg(keys.reservation_member(call.rid))
            .arg(CLOSED_KEEP_MS)
            .arg(&call.usage_type.script_limits);
        inv
    }

    /// Where the user's reservation `rid` holds, if `keys`' bucket has it, and what the user's
    /// route key there holds ("" when missing), in one round trip: a reservation is looked for
    /// only where the user's counters live.
    pub async fn reservation_placed(
        &self,
        keys: &UserKeys,
        rid: &str,
    ) -> Result<(Option<Placed>, String), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(keys.reservation(rid))
            .arg("t")
            .arg("pe")
            .arg("ac")
            .get(keys.route());
        let (fields, route): (Fields, Option<String>) = self.run_pipe(&pipe).await?;
        Ok((placed(fields), route.unwrap_or_default()))
    }

    /// Commits or cancels the user's reservation `rid`, which holds where `placed` says (read
    /// just before), in `keys`' bucket: one script, one atomic step (see `lua/commit.lua`,
    /// `lua/cancel.lua`), armed with its deadline. `usage_type` is the reservation's type as
    /// configured (`None` when it no longer is): a commit records the threshold events its
    /// count causes under its limits, as a track would.
    pub async fn close_reservation(
        &self,
        keys: &UserKeys,
        rid: &str,
        placed: &Placed,
        how: Settle,
        usage_type: Option<&UsageType>,
        default_plan: &str,
    ) -> Result<SettleReply, StoreError> {
        let period = placed.period;
        let pool = placed
            .account
            .map(|a| self.keys_of(Owner::Account(a), keys.own().bucket()));
        let (script, amount) = match how {
            Settle::Commit(n) => (&*scripts::COMMIT, n),
            Settle::Cancel => (&*scripts::CANCEL, 0),
        };
        let mut inv = script.prepare_invoke();
        inv.key(keys.reservation(rid))
            .key(keys.counter(period))
            .key(keys.dirty())
            .key(keys.route())
            .key(keys.open_reservations());
        if let Some(pool) = &pool {
            inv.key(pool.counter(period));
        }
        inv.arg(amount)
            .arg(period.id())
            .arg(placed.account.map(|a| a.to_string()).unwrap_or_default())
            .arg(keys.route_value())
            .arg(keys.member(period))
            .arg(pool.as_ref().map(|p| p.member(period)).unwrap_or_default())
            .arg(keys.reservation_member(rid))
            .arg(CLOSED_KEEP_MS)
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(default_plan)
            .arg(usage_type.map_or("", |t| t.script_notify.as_str()));
        if let Some(ty) = usage_type {
            inv.arg(&ty.script_limits);
        }
        // A commit counts: with replicas to wait for, it is answered once one holds it, as a
        // consume is (a repeat of an answer lost to the wait replays it).
        let raw = self.run(&mut inv, true).await?;
        settle_reply(raw)
    }

    /// The due members of the open sets of `buckets`: expiry at or before `now_ms` (Redis'
    /// clock, as this daemon estimates it; the expire script checks with Redis' own), at most
    /// `per_bucket` of each, placed (each reservation read in a second pipeline). Members quotad
    /// did not write are removed. Also whether some bucket had more due than was taken, and for
    /// each bucket whose listing showed it, the earliest expiry not yet due (what the sweeper
    /// looks at next).
    pub async fn due_reservations(
        &self,
        now_ms: i64,
        per_bucket: usize,
        buckets: &[u16],
    ) -> Result<DueScan, StoreError> {
        let mut prelude = redis::pipe();
        // Every batch names the connection again: a reconnected one has lost its name.
        self.set_name(&mut prelude);
        let mut batch = self.batch(prelude);
        for b in buckets {
            // One past the due ones: the earliest that is not due yet, when there is one.
            batch
                .to(*b)
                .cmd("ZRANGEBYSCORE")
                .arg(keys::open_reservations_of(&self.prefix, *b))
                .arg("-inf")
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(per_bucket + 1);
        }
        let listed: Vec<Vec<(String, f64)>> = self.run_batch_as(batch).await?;
        let mut scan = DueScan::default();
        let mut garbage = Vec::new();
        for (b, members) in buckets.iter().copied().zip(listed) {
            for (taken, (member, score)) in members.into_iter().enumerate() {
                let score = score as i64;
                if score > now_ms {
                    scan.next.push((b, score));
                    break;
                }
                if taken == per_bucket {
                    scan.more = true;
                    break;
                }
                match keys::parse_reservation_member(&member) {
                    Some((user, rid)) => scan.due.push(Due {
                        bucket: b,
                        user,
                        rid,
                        placed: None,
                    }),
                    None => garbage.push((b, member)),
                }
            }
        }
        if !garbage.is_empty() {
            let mut batch = self.batch(redis::pipe());
            for (b, member) in &garbage {
                batch
                    .to(*b)
                    .zrem(keys::open_reservations_of(&self.prefix, *b), member);
            }
            self.run_batch_as::<redis::Value>(batch).await?;
        }
        if scan.due.is_empty() {
            return Ok(scan);
        }
        let mut batch = self.batch(redis::pipe());
        for d in &scan.due {
            batch
                .to(d.bucket)
                .cmd("HMGET")
                .arg(self.user_in(d).reservation(&d.rid))
                .arg("t")
                .arg("pe")
                .arg("ac");
        }
        let read: Vec<Fields> = self.run_batch_as(batch).await?;
        for (d, fields) in scan.due.iter_mut().zip(read) {
            d.placed = placed(fields);
        }
        Ok(scan)
    }

    /// Expires `due` reservations (see `lua/expire.lua`): one script each, all in one batch of
    /// pipelines, each script armed with its deadline. Each answer stands alone; a script Redis
    /// did not know (a restarted Redis) is loaded and its calls sent again, once.
    pub async fn expire(
        &self,
        due: &[Due],
    ) -> Result<Vec<Result<SettleReply, StoreError>>, StoreError> {
        let mut replies = self.expire_batch(due).await?;
        let missing: Vec<usize> = (0..replies.len())
            .filter(|i| super::is_noscript(&replies[*i]))
            .collect();
        if !missing.is_empty() {
            let load = scripts::EXPIRE.prepare_invoke();
            self.with_conn(|mut c| async move { load.load_async(&mut c).await })
                .await?;
            let again: Vec<Due> = missing.iter().map(|i| due[*i].clone()).collect();
            for (i, r) in missing.into_iter().zip(self.expire_batch(&again).await?) {
                replies[i] = r;
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| self.reply_as::<redis::Value>(r).and_then(settle_reply))
            .collect())
    }

    async fn expire_batch(
        &self,
        due: &[Due],
    ) -> Result<Vec<redis::RedisResult<redis::Value>>, StoreError> {
        let mut batch = self.batch(redis::pipe());
        let mut until = tokio::time::Instant::now();
        for d in due {
            let keys = self.user_in(d);
            let placed = d.placed.clone().unwrap_or(Placed {
                usage_type: String::new(),
                period: Period::Lifetime,
                account: None,
            });
            let pool = placed
                .account
                .map(|a| self.keys_of(Owner::Account(a), d.bucket));
            let mut inv = scripts::EXPIRE.prepare_invoke();
            inv.key(keys.reservation(&d.rid))
                .key(keys.counter(placed.period))
                .key(keys.route())
                .key(keys.open_reservations());
            if let Some(pool) = &pool {
                inv.key(pool.counter(placed.period));
            }
            inv.arg(keys.reservation_member(&d.rid))
                .arg(if d.placed.is_some() {
                    placed.period.id()
                } else {
                    String::new()
                })
                .arg(placed.account.map(|a| a.to_string()).unwrap_or_default())
                .arg(CLOSED_KEEP_MS)
                .arg(self.changes_channel())
                .arg(d.user.to_string());
            until = self.arm(&mut inv);
            batch.to(d.bucket).invoke_script(&inv);
        }
        batch.ignore_errors();
        self.run_batch(batch, until).await
    }

    /// The keys of a due reservation's user in the bucket it was found in.
    fn user_in(&self, d: &Due) -> OwnerKeys {
        self.keys_of(Owner::User(d.user), d.bucket)
    }
}

/// A reservation's `t`, `pe` and `ac` as `HMGET` reads them.
type Fields = (Option<String>, Option<String>, Option<String>);

/// A reservation's type, period and account as stored; `None` when it is missing (or not
/// quotad's).
fn placed((usage_type, period, account): Fields) -> Option<Placed> {
    let period = Period::parse_id(period.as_deref()?)?;
    let account = match account.as_deref().unwrap_or("") {
        "" => None,
        a => Some(Uuid::parse_str(a).ok()?),
    };
    Some(Placed {
        usage_type: usage_type?,
        period,
        account,
    })
}

/// `settled` of `lua/holds.lua` as a [`SettleReply`].
fn settle_reply(raw: redis::Value) -> Result<SettleReply, StoreError> {
    let bad = |e: redis::ParsingError| StoreError::Redis(e.into());
    let fields: Vec<redis::Value> = redis::from_redis_value(raw).map_err(bad)?;
    if fields.len() != 14 {
        return Err(StoreError::Redis(redis::RedisError::from(
            std::io::Error::other(format!(
                "a reservation script answered {} fields, not 14",
                fields.len()
            )),
        )));
    }
    let mut it = fields.into_iter();
    let mut text = || -> Result<String, StoreError> {
        redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil)).map_err(bad)
    };
    let status = match text()?.as_str() {
        "ok" => Settled::Ok,
        "replay" => Settled::Replay,
        "committed" => Settled::Committed,
        "cancelled" => Settled::Cancelled,
        "over" => Settled::Over,
        "hydrate" => Settled::Hydrate,
        "moved" => Settled::Moved,
        "expired" => Settled::Expired,
        "not_due" => Settled::NotDue,
        "gone" => Settled::Gone,
        _ => Settled::Missing,
    };
    let usage_type = text()?;
    let mut number = || -> Result<i64, StoreError> { Ok(text()?.parse().unwrap_or(0)) };
    let amount = number()?;
    let committed = number()?;
    let freed = number()?;
    let late = number()? == 1;
    let used = number()?;
    let held = number()?;
    let account_used = number()?;
    let account_held = number()?;
    let expires_ms = number()?;
    let period = text()?;
    let account = text()?;
    let detail = text()?;
    let whole = |n: i64| n.max(0) as u64;
    Ok(SettleReply {
        status,
        usage_type,
        amount: whole(amount),
        committed: whole(committed),
        freed: whole(freed),
        late,
        used: whole(used),
        held: whole(held),
        account_used: whole(account_used),
        account_held: whole(account_held),
        expires_ms,
        period: Period::parse_id(&period),
        account: Uuid::parse_str(&account).ok(),
        detail,
    })
}
