//! Reservations: an amount held against the limit while the work it pays for runs, when its cost
//! is known only at the end (an AI generation's tokens).
//!
//! `reserve` holds the amount at every level a consume of it would be checked at (the user, and
//! a member's account pool), in one atomic step with the same check: it fits only where used +
//! held + amount stays within the limit, and consumes and checks count what is held as taken. A
//! commit counts the actual amount (at most what is held) exactly as a track of it would (version
//! bump, dirty mark: the flusher writes it to Postgres) and frees the hold; a cancel frees it all;
//! a reservation not closed by its expiry is freed by the [`Sweeper`], whether or not the user
//! calls again. Commit and cancel are idempotent: the closed reservation is kept a day, and the
//! same call answers the same again.
//!
//! Holds live in Redis only (see the README's Guarantees): a Redis that loses its data loses the
//! open reservations with it, and their holds are freed by the loss; a commit of one then answers
//! `UNKNOWN_RESERVATION`. What commits counted is durable like every count.
//!
//! A reservation is made in the bucket where the user's counters live, and ends there: a
//! membership change that moves the counters elsewhere does not carry it (the moved counters carry
//! no holds; the old pool's hold is freed at its expiry), and a commit or cancel of it then
//! answers `UNKNOWN_RESERVATION`.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

use crate::metrics as m;
use crate::period::Period;
use crate::plans::{Plans, UsageType};
use crate::quota::{Decision, Fault, Quota, QuotaError, Reloaded, ATTEMPTS};
use crate::routes::Hops;
use crate::store::{
    self, Hydrated, Owner, RedisStore, ReserveCall, Settle, SettleReply, Settled, Status,
    StoreError, UserKeys,
};

/// Longest hold, in seconds: a day.
pub const MAX_TTL_SECS: u64 = 86_400;
/// What the sweeper takes from each bucket's open set per round.
const SWEEP_PER_BUCKET: usize = 128;
/// Rounds of one sweeper pass at most (each takes [`SWEEP_PER_BUCKET`] from every bucket).
const SWEEP_ROUNDS: usize = 16;
/// Deadline of one sweeper call to Redis: a round's pipelines are larger than one request's.
const SWEEP_REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// The name of the sweeper's Redis connection (`CLIENT LIST`).
pub const SWEEPER_CONNECTION: &str = "quotad-sweeper";

/// A reservation's id: `rsv_<user>_<random>`, the user's UUID and 128 random bits, each as 32
/// lowercase hex digits. The user part lets commit and cancel, which get only the id, find the
/// user's keys; the random part makes an id nobody can guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationId {
    /// The user who holds it.
    pub user: Uuid,
    /// The random part, 32 lowercase hex digits.
    pub rid: String,
}

impl ReservationId {
    /// A new id for `user`.
    pub fn new(user: Uuid) -> ReservationId {
        ReservationId {
            user,
            rid: Uuid::new_v4().simple().to_string(),
        }
    }

    /// The id of `user`'s reservation made with idempotency key `key`: its second part is the
    /// first 128 bits of SHA-256 over the user and the key, so every replica computes the same
    /// id for a retry, and the reserve script finds the reservation the first call made (and
    /// answers it again) instead of holding twice. Such an id is as hard to guess as its key.
    pub fn keyed(user: Uuid, key: &str) -> ReservationId {
        let digest = Sha256::digest(format!("quotad reservation\0{user}\0{key}"));
        let rid = digest[..16]
            .iter()
            .fold(String::with_capacity(32), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
        ReservationId { user, rid }
    }

    /// Reads an id exactly as [`fmt::Display`] writes it; `None` for anything else.
    pub fn parse(text: &str) -> Option<ReservationId> {
        let rest = text.strip_prefix("rsv_")?;
        let (user, rid) = rest.split_once('_')?;
        let hex32 =
            |s: &str| s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex32(user) || !hex32(rid) {
            return None;
        }
        Some(ReservationId {
            user: Uuid::parse_str(user).ok()?,
            rid: rid.to_owned(),
        })
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rsv_{}_{}", self.user.simple(), self.rid)
    }
}

/// A validated reserve request.
#[derive(Debug, Clone)]
pub struct ReserveInput<'p> {
    /// The user.
    pub user: Uuid,
    /// The usage type.
    pub usage_type: &'p UsageType,
    /// How much to hold, 1..=1,000,000.
    pub amount: u64,
    /// How long, 1..=[`MAX_TTL_SECS`] seconds.
    pub ttl_secs: u64,
    /// Makes a retried reserve find the reservation the first one made (see
    /// [`ReservationId::keyed`]).
    pub idempotency_key: Option<String>,
}

/// A reserve's answer: the decision (as consume's) and, when it fit, the reservation.
#[derive(Debug, Clone)]
pub struct Reserved {
    /// Allowed (held) or not; the counters show what is used and held after it.
    pub decision: Decision,
    /// The reservation, when held.
    pub id: Option<ReservationId>,
    /// When it frees itself if not closed (Redis' clock).
    pub expires_at: Option<DateTime<Utc>>,
}

/// How a reservation ended, as commit and cancel answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Committed: its actual amount counted.
    Committed,
    /// Cancelled: nothing counted.
    Cancelled,
}

/// A closed reservation.
#[derive(Debug, Clone)]
pub struct Closed {
    /// Its id.
    pub id: ReservationId,
    /// How it ended.
    pub state: State,
    /// Its usage type.
    pub usage_type: String,
    /// What it held.
    pub amount: u64,
    /// What was counted (0 for a cancel).
    pub committed: u64,
    /// What its close freed unused (0 when its expiry had freed it already).
    pub released: u64,
    /// Committed after its expiry (counted anyway; its hold had been freed).
    pub late: bool,
    /// The answer of an earlier commit or cancel, given again.
    pub replayed: bool,
    /// The period it held (and a commit counted) in.
    pub period: Period,
    /// The user's count and hold of the type after the close.
    pub used: u64,
    /// See `used`.
    pub held: u64,
    /// For a reservation held in an account's pool: the account, its count and hold after.
    pub account: Option<(Uuid, u64, u64)>,
    /// Its expiry (Redis' clock).
    pub expires_at: DateTime<Utc>,
}

/// Why a reservation call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    /// No such reservation: never made, closed more than a day ago, lost with Redis' data, or
    /// left behind by a membership change.
    #[error("no reservation {0}")]
    Unknown(String),
    /// A commit of a cancelled reservation.
    #[error("the reservation was cancelled")]
    Cancelled,
    /// A cancel of a committed reservation, or a commit of another amount.
    #[error("the reservation was committed with {0}")]
    Committed(u64),
    /// A commit of more than the reservation holds.
    #[error("commit of {asked}, more than the {held} held")]
    OverHold {
        /// What the reservation holds.
        held: u64,
        /// What the commit asked to count.
        asked: u64,
    },
    /// Everything a decision can fail with (bad type, Redis or Postgres down…).
    #[error(transparent)]
    Quota(#[from] QuotaError),
}

impl From<StoreError> for ReservationError {
    fn from(e: StoreError) -> Self {
        ReservationError::Quota(QuotaError::Redis(e))
    }
}

impl From<Fault> for ReservationError {
    fn from(f: Fault) -> Self {
        ReservationError::Quota(f.into())
    }
}

impl Quota {
    /// Holds `input.amount` of its type against every level's limit until committed, cancelled or
    /// expired, or refuses it (the decision says which). One Redis script, one atomic step; a
    /// counter Redis does not hold is loaded first, as for a consume. Redis down is an error
    /// whatever the type's fail policy: a hold that cannot be made is not made.
    #[tracing::instrument(skip_all, fields(user = %input.user, r#type = %input.usage_type.name))]
    pub async fn reserve(
        &self,
        input: &ReserveInput<'_>,
        plans: &Plans,
    ) -> Result<Reserved, ReservationError> {
        let ty = input.usage_type;
        let now = self.clock.now();
        let period = Period::current(ty.period, now);
        // One id for every attempt (and, with a key, for every retry): a resend finds its
        // reservation made and answers it again.
        let id = match &input.idempotency_key {
            Some(key) => ReservationId::keyed(input.user, key),
            None => ReservationId::new(input.user),
        };
        let mut keys = self.placed(input.user);
        let mut hops = Hops::default();
        let invocation = |keys: &UserKeys| {
            self.store.reserve_invocation(&ReserveCall {
                keys,
                rid: &id.rid,
                usage_type: ty,
                amount: input.amount,
                ttl_ms: input.ttl_secs * 1000,
                period,
                default_plan: &plans.default_plan,
            })
        };
        let read = |raw| store::decision_reply(raw, period);
        let mut answered = None;
        for _ in 0..ATTEMPTS {
            let reply = match answered.take() {
                Some(reply) => reply,
                None => read(self.store.run(&mut invocation(&keys), true).await?)?,
            };
            match reply.status {
                Status::Moved => {
                    keys = self.follow(&keys, &reply.detail, &mut hops).await?;
                    continue;
                }
                Status::Hydrate => {
                    match self
                        .load_levels(&keys, period, &reply.detail, invocation(&keys))
                        .await?
                    {
                        Reloaded::Answer(raw) => answered = Some(read(raw?)?),
                        Reloaded::Moved(route) => {
                            keys = self.follow(&keys, &route, &mut hops).await?
                        }
                        Reloaded::Again => {}
                    }
                    continue;
                }
                Status::Ok | Status::Replay | Status::Denied => {}
                // The key's reservation holds another type or amount.
                Status::Conflict => return Err(QuotaError::KeyReused.into()),
                other => {
                    return Err(StoreError::Unavailable(format!(
                        "the reserve script answered {other:?}"
                    ))
                    .into())
                }
            }
            let held = reply.status != Status::Denied;
            let expires_ms: i64 = reply.detail.parse().unwrap_or(0);
            let expires_at = held.then(|| at_ms(expires_ms));
            if held {
                // This daemon's sweeper frees it on time.
                self.holds.note(keys.own().bucket(), expires_ms);
            }
            if reply.status == Status::Ok {
                m::reservation(&ty.name, "opened", &[("held", input.amount)]);
            } else if reply.status == Status::Denied {
                m::reservation(&ty.name, "refused", &[]);
            }
            return Ok(Reserved {
                // What consume would answer, the counters showing what is used and held after
                // it; a hold counts nothing, so reserve.lua answers no overage added.
                decision: Decision::from_reply(reply, keys.account(), input.user, ty, period, now),
                id: held.then(|| id.clone()),
                expires_at,
            });
        }
        Err(QuotaError::NotLoaded.into())
    }

    /// Commits (counts `amount`, at most what it holds, and frees the rest) or cancels (frees it
    /// all) the reservation `id`, following the user's route to where their counters live. A
    /// repeated commit of the same amount, or a repeated cancel, answers as the first did.
    #[tracing::instrument(skip_all, fields(user = %id.user))]
    pub async fn close(&self, id: &ReservationId, how: Settle) -> Result<Closed, ReservationError> {
        let mut keys = self.placed(id.user);
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            let believed = keys.route_value();
            let (placed, route) = self.store.reservation_placed(&keys, &id.rid).await?;
            // A route that is set and says otherwise: the user's counters (and reservations made
            // since) live elsewhere. A missing one where an account is believed is a Redis that
            // lost its data: the reservation went with it.
            if route != believed && !route.is_empty() {
                keys = self.follow(&keys, &route, &mut hops).await?;
                continue;
            }
            let Some(placed) = placed else {
                return Err(ReservationError::Unknown(id.to_string()));
            };
            let plans = self.plans.current();
            let reply = self
                .store
                .close_reservation(
                    &keys,
                    &id.rid,
                    &placed,
                    how,
                    plans.usage_type(&placed.usage_type),
                    &plans.default_plan,
                )
                .await?;
            match reply.status {
                Settled::Ok | Settled::Replay => {
                    return Ok(self.closed(id, how, &reply, placed.period));
                }
                Settled::Moved => keys = self.follow(&keys, &reply.detail, &mut hops).await?,
                Settled::Hydrate => {
                    let filled = match (reply.detail.as_str(), placed.account) {
                        ("account", Some(a)) => {
                            let pool = self.store.keys_of(Owner::Account(a), keys.own().bucket());
                            self.hydrate(&pool, "", placed.period).await?
                        }
                        _ => self.hydrate(keys.own(), &believed, placed.period).await?,
                    };
                    if let Hydrated::Moved(route) = filled {
                        keys = self.follow(&keys, &route, &mut hops).await?;
                    }
                }
                Settled::Committed => return Err(ReservationError::Committed(reply.committed)),
                Settled::Cancelled => return Err(ReservationError::Cancelled),
                Settled::Over => {
                    return Err(ReservationError::OverHold {
                        held: reply.amount,
                        asked: match how {
                            Settle::Commit(n) => n,
                            Settle::Cancel => 0,
                        },
                    })
                }
                Settled::Missing | Settled::Expired | Settled::NotDue | Settled::Gone => {
                    return Err(ReservationError::Unknown(id.to_string()))
                }
            }
        }
        Err(QuotaError::NotLoaded.into())
    }

    /// A commit's or cancel's answer as a [`Closed`], counted in the metrics unless replayed; the
    /// user's (and pool's) remembered refusals are forgotten here when the close freed something
    /// (other replicas forget on the script's announcement).
    fn closed(&self, id: &ReservationId, how: Settle, r: &SettleReply, period: Period) -> Closed {
        let replayed = r.status == Settled::Replay;
        let ty = r.usage_type.as_str();
        if !replayed {
            match how {
                Settle::Commit(_) if r.detail == "expired" => {
                    m::reservation(ty, "expired", &[("expired", r.amount)]);
                    m::reservation(ty, "committed_late", &[("committed_late", r.committed)]);
                }
                Settle::Commit(_) if r.late => {
                    m::reservation(ty, "committed_late", &[("committed_late", r.committed)]);
                }
                Settle::Commit(_) => m::reservation(
                    ty,
                    "committed",
                    &[("committed", r.committed), ("released", r.freed)],
                ),
                Settle::Cancel => m::reservation(ty, "cancelled", &[("released", r.freed)]),
            }
            if r.freed > 0 || r.detail == "expired" {
                self.refusals.forget(&id.user);
                if let Some(a) = r.account {
                    self.refusals.forget(&a);
                }
            }
        }
        Closed {
            id: id.clone(),
            state: match how {
                Settle::Commit(_) => State::Committed,
                Settle::Cancel => State::Cancelled,
            },
            usage_type: r.usage_type.clone(),
            amount: r.amount,
            committed: r.committed,
            released: r.freed,
            late: r.late,
            replayed,
            period,
            used: r.used,
            held: r.held,
            account: r.account.map(|a| (a, r.account_used, r.account_held)),
            expires_at: at_ms(r.expires_ms),
        }
    }
}

/// An instant in ms since the epoch (Redis' clock) as a time.
fn at_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH)
}

/// What one sweeper pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Reservations expired (their holds freed).
    pub expired: u64,
    /// Units freed.
    pub freed: u64,
    /// Due members that were not open any more (taken off their set).
    pub gone: u64,
}

/// The buckets this daemon knows to hold open reservations, each with the earliest expiry it
/// knows of there (ms, Redis' clock): what its reserves made, and what the sweeper's last look at
/// a bucket showed. The sweeper looks only at the buckets due in it between its full passes.
#[derive(Clone, Default)]
pub struct OpenHolds(Arc<Mutex<HashMap<u16, i64>>>);

impl OpenHolds {
    /// A reservation in `bucket` expires at `expires_ms`.
    pub fn note(&self, bucket: u16, expires_ms: i64) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = known.entry(bucket).or_insert(expires_ms);
        *at = (*at).min(expires_ms);
    }

    /// Takes the buckets with a known expiry at or before `now_ms` out.
    fn take_due(&self, now_ms: i64) -> Vec<u16> {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let due: Vec<u16> = known
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(b, _)| *b)
            .collect();
        for b in &due {
            known.remove(b);
        }
        due
    }

    /// How many buckets are known to hold open reservations.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees the holds of reservations past their expiry, in every bucket, whether or not their users
/// call again. Runs every [`crate::config::Config::flush_interval`] on the flusher's thread, on a
/// Redis connection of its own; several daemons may sweep at once (only an open, due reservation
/// changes, in one atomic step).
///
/// Every [`FULL_PASS_EVERY`]th tick (and the first) is a full pass: every bucket's open set is
/// read, and each bucket's earliest expiry not yet due is remembered in [`OpenHolds`], beside
/// what this daemon's reserves note there. The ticks between look only at the buckets due in it:
/// an idle daemon sends nothing between full passes, where reading 1,024 open sets each tick
/// would cost Redis a thousand commands a second. A reservation is freed on time by the daemon
/// that made it (or any that saw it in a full pass), and at the latest at the next full pass of
/// any daemon when the one that made it stopped.
#[derive(Clone)]
pub struct Sweeper {
    store: RedisStore,
    holds: OpenHolds,
}

/// A full sweeper pass every this many ticks (30 s at the default interval).
pub const FULL_PASS_EVERY: u64 = 30;

impl Sweeper {
    /// A sweeper over the daemon's Redis, on a connection named [`SWEEPER_CONNECTION`], that
    /// looks between full passes at the buckets `holds` knows (the daemon's reserves note theirs
    /// there: give it [`crate::quota::Quota::holds`]).
    pub fn new(store: &RedisStore, holds: OpenHolds) -> Sweeper {
        Sweeper {
            store: store.dedicated(SWEEPER_CONNECTION, SWEEP_REDIS_TIMEOUT),
            holds,
        }
    }

    /// A full pass: every bucket's due reservations, [`SWEEP_PER_BUCKET`] at a time, until none
    /// is left (or [`SWEEP_ROUNDS`] rounds). "Due" by Redis' clock as this daemon knows it (its
    /// wall clock plus the measured offset); the script checks with Redis' own before it frees.
    pub async fn sweep_once(&self) -> Result<SweepOutcome, StoreError> {
        let all: Vec<u16> = (0..store::BUCKETS).collect();
        self.sweep(all).await
    }

    /// A pass over the buckets [`OpenHolds`] knows to be due.
    pub async fn sweep_known(&self) -> Result<SweepOutcome, StoreError> {
        let due = self.holds.take_due(self.redis_now_ms());
        if due.is_empty() {
            return Ok(SweepOutcome::default());
        }
        self.sweep(due).await
    }

    fn redis_now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
            + self.store.clock_offset_ms().unwrap_or(0)
    }

    async fn sweep(&self, buckets: Vec<u16>) -> Result<SweepOutcome, StoreError> {
        let mut out = SweepOutcome::default();
        let mut buckets = buckets;
        for _ in 0..SWEEP_ROUNDS {
            let scan = match self
                .store
                .due_reservations(self.redis_now_ms(), SWEEP_PER_BUCKET, &buckets)
                .await
            {
                Ok(scan) => scan,
                Err(e) => {
                    // Looked at again at the next tick.
                    for b in &buckets {
                        self.holds.note(*b, 0);
                    }
                    return Err(e);
                }
            };
            for (b, at) in &scan.next {
                self.holds.note(*b, *at);
            }
            if scan.due.is_empty() {
                break;
            }
            let swept: Vec<u16> = scan.due.iter().map(|d| d.bucket).collect();
            for reply in self.store.expire(&scan.due).await? {
                match reply {
                    Ok(r) if r.status == Settled::Expired => {
                        m::reservation(&r.usage_type, "expired", &[("expired", r.amount)]);
                        out.expired += 1;
                        out.freed += r.amount;
                    }
                    Ok(r) if r.status == Settled::Gone => out.gone += 1,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error.message = %e, "a reservation could not be expired; the next pass tries again")
                    }
                }
            }
            if !scan.more {
                break;
            }
            // Again, the buckets that had more due than one round takes.
            buckets = swept;
            buckets.sort_unstable();
            buckets.dedup();
        }
        Ok(out)
    }

    /// Sweeps every `interval` until `stop` turns true: a full pass every [`FULL_PASS_EVERY`]
    /// ticks, the known due buckets between. A failed pass is logged, counted in
    /// `quotad_reservation_sweep_errors_total` and tried again at the next tick.
    pub async fn run(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick: u64 = 0;
        loop {
            let pass = if tick.is_multiple_of(FULL_PASS_EVERY) {
                self.sweep_once().await
            } else {
                self.sweep_known().await
            };
            if let Err(e) = pass {
                metrics::counter!(m::SWEEP_ERRORS).increment(1);
                tracing::warn!(error.message = %e, "reservation sweep failed; retrying");
            }
            tick += 1;
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyed_id_is_the_same_for_the_same_user_and_key_and_reads_back() {
        let user: Uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        let other: Uuid = "0e4f5b0c-1c7a-4b52-9a6e-3d7f1a2b3c4d".parse().unwrap();
        let id = ReservationId::keyed(user, "gen-1");
        assert_eq!(id, ReservationId::keyed(user, "gen-1"));
        assert_ne!(id, ReservationId::keyed(user, "gen-2"));
        assert_ne!(id.rid, ReservationId::keyed(other, "gen-1").rid);
        assert_eq!(ReservationId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn an_id_reads_back_as_written_and_nothing_else_reads() {
        let user: Uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        let id = ReservationId::new(user);
        let text = id.to_string();
        assert!(text.starts_with("rsv_7c9e6679742540de944be07fc1f90ae7_"));
        assert_eq!(text.len(), 4 + 32 + 1 + 32);
        assert_eq!(ReservationId::parse(&text), Some(id.clone()));
        let rid = &id.rid;
        for bad in [
            String::new(),
            "rsv_".to_owned(),
            text.to_uppercase(),
            format!("RSV_7c9e6679742540de944be07fc1f90ae7_{rid}"),
            format!("rsv_7c9e6679-7425-40de-944b-e07fc1f90ae7_{rid}"),
            format!("rsv_7c9e6679742540de944be07fc1f90ae7_{rid}0"),
            format!("rsv_7c9e6679742540de944be07fc1f90ae7{rid}"),
            format!("rsv_7c9e6679742540de944be07fc1f90ae7_{}", &rid[1..]),
            format!("rsv_7c9e6679742540de944be07fc1f90ae7_{}g", &rid[1..]),
            format!(" {text}"),
            format!("{text}\n"),
        ] {
            assert_eq!(ReservationId::parse(&bad), None, "{bad:?} was read");
        }
    }
}
