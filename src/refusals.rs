//! The near-cache of refusals: a user over a limit is refused from memory, without a Redis call,
//! until something could change the answer.
//!
//! Counts only rise between the events that can lower them or raise a limit, so a refusal stays
//! true until one of them:
//!
//! - a new period: the period is part of the entry, so the first request of a new month misses;
//! - a changed limit: a plans reload forgets everything, and a customer's override change is
//!   announced like a plan change;
//! - a plan change, a refund, a release, a reconcile repair, or a counter loaded again from
//!   Postgres: the Redis scripts that do these publish the user's id on `<prefix>:1:changes` in
//!   the same atomic step, and every replica forgets that user's entries when it hears it.
//!
//! A member of an account is refused by their own level or by the pool, which every member's
//! calls change: their refusals carry the account and the account's generation when remembered.
//! The scripts that lower a pool or change its limits (a member's refund or release, the
//! account's plan or overrides, a load of the pool) announce the account's id, and every replica
//! then moves that account's generation on, which forgets every refusal remembered under it at
//! once, whichever member it was for.
//!
//! Pub/sub delivers at most once, so the cache is only used while this replica's subscription is
//! up: when it drops, everything is forgotten and nothing is cached until it is back. A ticket
//! taken before each Redis call makes sure an answer that raced with an invalidation is not
//! remembered. Entries also expire after a TTL, a bound on any staleness nothing else catches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use deadpool_redis::redis;
use futures_util::StreamExt;
use uuid::Uuid;

use crate::clock::Clock;
use crate::metrics as m;
use crate::period::Period;
use crate::plans::Overage;
use crate::store::{Level, LimitSource};

/// Independent locks, so concurrent lookups rarely wait for each other.
const SHARDS: usize = 64;

/// How often the subscription connection is pinged; a missed pong means it is dead.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The refusals this replica remembers. Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct Refusals {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<HashMap<Uuid, Vec<Refusal>>>>,
    /// The generation of each account some refusal was remembered under: an announcement of the
    /// account moves it on, and a refusal remembered under an older one is forgotten.
    accounts: Mutex<HashMap<Uuid, u64>>,
    /// Whether the invalidation subscription is up (the cache is used only then).
    live: AtomicBool,
    /// Bumped by every invalidation; an answer is remembered only if it did not move meanwhile.
    generation: AtomicU64,
    ttl: chrono::Duration,
    per_shard: usize,
    ping_every: Duration,
    /// What "now" is, for entries' expiry.
    clock: Arc<dyn Clock>,
}

struct Refusal {
    usage_type: Box<str>,
    period: Period,
    plan_override: Option<Box<str>>,
    /// What Redis answered.
    seen: Remembered,
    /// For a member: the account's generation when it was remembered.
    account_generation: u64,
    until: DateTime<Utc>,
}

/// One level of a remembered refusal, as Redis answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelSeen {
    /// The plan in force at the level.
    pub plan: String,
    /// The count Redis refused at (the true count is at least this until an invalidation).
    pub used: u64,
    /// What open reservations held then (a hold freed is announced like a refund).
    pub held: u64,
    /// The limit (`None`: none at this level). A change of it (a plan or override change) is
    /// announced, and a plans reload forgets everything.
    pub limit: Option<u64>,
    /// Where the limit comes from.
    pub source: LimitSource,
    /// How far past the limit the level may go (it changes only with the plan or a reload).
    pub overage_cap: Overage,
    /// The level's overage when refused (a refusal counts nothing, so it stays until an
    /// invalidation).
    pub overage: u64,
}

impl LevelSeen {
    /// Whether `amount` more still does not fit at this level: past the limit plus the overage
    /// cap (a soft limit never refuses).
    pub fn refuses(&self, amount: u64) -> bool {
        match (self.limit, self.overage_cap.cap()) {
            (Some(l), Some(cap)) => self.used + self.held + amount > l.saturating_add(cap),
            _ => false,
        }
    }
}

/// A remembered refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The user's level.
    pub user: LevelSeen,
    /// For a member of an account: the account and its pool.
    pub account: Option<(Uuid, LevelSeen)>,
    /// The level that refused.
    pub limited_by: Level,
}

impl Remembered {
    /// The level that refused.
    pub fn refusing(&self) -> &LevelSeen {
        match (&self.limited_by, &self.account) {
            (Level::Account, Some((_, pool))) => pool,
            _ => &self.user,
        }
    }
}

/// What identifies a decision's counter and its plan.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The user.
    pub user: Uuid,
    /// The usage type.
    pub usage_type: &'a str,
    /// The period counted in.
    pub period: Period,
    /// The plan the caller vouched for, if any.
    pub plan_override: Option<&'a str>,
    /// The account the call was sent under (the replica's belief), if any.
    pub account: Option<Uuid>,
}

impl Refusals {
    /// A cache keeping refusals for `ttl` by `clock`, at most `capacity` of them; a zero for
    /// either turns it off.
    pub fn new(ttl: Duration, capacity: usize, clock: Arc<dyn Clock>) -> Refusals {
        Self::pinging_every(ttl, capacity, clock, PING_EVERY)
    }

    fn pinging_every(
        ttl: Duration,
        capacity: usize,
        clock: Arc<dyn Clock>,
        ping_every: Duration,
    ) -> Refusals {
        Refusals {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                accounts: Mutex::new(HashMap::new()),
                live: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
                per_shard: capacity.div_ceil(SHARDS),
                ping_every,
                clock,
            }),
        }
    }

    /// Whether the cache is configured on.
    pub fn enabled(&self) -> bool {
        self.inner.ttl > chrono::Duration::zero() && self.inner.per_shard > 0
    }

    /// Whether refusals are being served from memory now (configured on, and subscribed to
    /// invalidations).
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Taken before asking Redis; [`Refusals::remember`] keeps the answer only if no
    /// invalidation arrived in between. `None` when the cache is not in use.
    pub fn ticket(&self) -> Option<u64> {
        self.is_live()
            .then(|| self.inner.generation.load(Ordering::Acquire))
    }

    /// The refusal remembered for `subject`, if any and not expired.
    pub fn lookup(&self, subject: &Subject<'_>) -> Option<Remembered> {
        if !self.is_live() {
            return None;
        }
        let now = self.inner.clock.now();
        let current = subject.account.map(|a| self.account_generation(a));
        let shard = self.shard(&subject.user);
        let entries = shard.get(&subject.user)?;
        entries
            .iter()
            .find(|r| {
                r.matches(subject)
                    && r.until > now
                    && current.is_none_or(|g| g == r.account_generation)
            })
            .map(|r| r.seen.clone())
    }

    /// The current generation of `account` (0 until it is first announced).
    fn account_generation(&self, account: Uuid) -> u64 {
        let accounts = self
            .inner
            .accounts
            .lock()
            .expect("refusal cache lock poisoned");
        accounts.get(&account).copied().unwrap_or(0)
    }

    /// Remembers that Redis refused `subject` as `seen` says, unless an invalidation arrived
    /// since `ticket` was taken.
    pub fn remember(&self, ticket: u64, subject: &Subject<'_>, seen: Remembered) {
        // Registered before the check below: an announcement of the account from now on moves
        // its generation on; one before it was counted in the ticket.
        let account_generation = match subject.account {
            Some(a) => {
                let mut accounts = self
                    .inner
                    .accounts
                    .lock()
                    .expect("refusal cache lock poisoned");
                if accounts.len() >= self.inner.per_shard * SHARDS && !accounts.contains_key(&a) {
                    return;
                }
                *accounts.entry(a).or_insert(0)
            }
            None => 0,
        };
        let mut shard = self.shard(&subject.user);
        // Checked under the shard lock: an invalidation bumps the generation before it takes
        // this lock to remove entries, so either this sees the bump or the removal sees this.
        if !self.is_live() || self.inner.generation.load(Ordering::Acquire) != ticket {
            return;
        }
        let now = self.inner.clock.now();
        if !shard.contains_key(&subject.user) && shard.len() >= self.inner.per_shard {
            shard.retain(|_, rs| {
                rs.retain(|r| r.until > now);
                !rs.is_empty()
            });
            if shard.len() >= self.inner.per_shard {
                return;
            }
        }
        let entries = shard.entry(subject.user).or_default();
        entries.retain(|r| !r.matches(subject) && r.until > now);
        entries.push(Refusal {
            usage_type: subject.usage_type.into(),
            period: subject.period,
            plan_override: subject.plan_override.map(Into::into),
            seen,
            account_generation,
            until: now
                .checked_add_signed(self.inner.ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        });
    }

    /// Forgets every refusal of `id`: a user's own, or (an account's id) every refusal
    /// remembered under that account.
    pub fn forget(&self, id: &Uuid) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(g) = self
            .inner
            .accounts
            .lock()
            .expect("refusal cache lock poisoned")
            .get_mut(id)
        {
            *g += 1;
        }
        self.shard(id).remove(id);
    }

    /// Forgets every refusal.
    pub fn forget_all(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        for shard in &self.inner.shards {
            shard.lock().expect("refusal cache lock poisoned").clear();
        }
        // Every refusal went: the accounts' generations may start again.
        self.inner
            .accounts
            .lock()
            .expect("refusal cache lock poisoned")
            .clear();
    }

    /// How many users have a refusal remembered.
    pub fn users(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().expect("refusal cache lock poisoned").len())
            .sum()
    }

    fn shard(&self, user: &Uuid) -> MutexGuard<'_, HashMap<Uuid, Vec<Refusal>>> {
        let b = user.as_u128() as usize % SHARDS;
        self.inner.shards[b]
            .lock()
            .expect("refusal cache lock poisoned")
    }

    fn set_live(&self, live: bool) {
        // Off first, then forget: nothing is served or remembered from before the gap.
        if !live {
            self.inner.live.store(false, Ordering::Release);
        }
        self.forget_all();
        if live {
            self.inner.live.store(true, Ordering::Release);
        }
        metrics::gauge!(m::REFUSAL_CACHE_LIVE).set(if live { 1.0 } else { 0.0 });
    }

    /// Subscribes to `channel` and forgets the users named there, reconnecting with backoff
    /// for as long as it runs. The cache is used only while subscribed. `clients` are tried in
    /// turn, the next after each failure: on a Redis Cluster a plain `PUBLISH` reaches the
    /// subscribers of every node, so any seed node that is up will do.
    pub async fn listen(self, clients: Vec<redis::Client>, channel: String) {
        if !self.enabled() {
            return;
        }
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        let mut delay = FIRST_RETRY;
        if clients.is_empty() {
            return;
        }
        for client in clients.iter().cycle() {
            let Err(ended) = self.subscription(client, &channel).await;
            // A subscription that was up starts the backoff afresh; failed attempts lengthen it.
            if self.is_live() {
                delay = FIRST_RETRY;
            }
            self.set_live(false);
            tracing::warn!(error.message = %ended, retry_in_ms = delay.as_millis() as u64, "refusal cache: invalidation subscription down; refusals go to Redis");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One subscription, until it fails (it never ends otherwise); the error says why.
    async fn subscription(
        &self,
        client: &redis::Client,
        channel: &str,
    ) -> Result<std::convert::Infallible, String> {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, mut messages) = pubsub.split();
        self.set_live(true);
        tracing::info!(channel, "refusal cache: subscribed to invalidations");
        let every = self.inner.ping_every;
        let mut ping = tokio::time::interval(every);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else {
                        return Err("the subscription connection closed".into());
                    };
                    match std::str::from_utf8(msg.get_payload_bytes()).ok().and_then(|s| Uuid::parse_str(s).ok()) {
                        Some(user) => self.forget(&user),
                        // Not a user id: forget everything rather than guess.
                        None => self.forget_all(),
                    }
                }
                _ = ping.tick() => {
                    // A subscribed connection answers PING with ["pong", ""], not +PONG.
                    match tokio::time::timeout(every, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(format!("ping: {e}")),
                        Err(_) => return Err("the subscription connection stopped answering".into()),
                    }
                }
            }
        }
    }
}

impl Refusal {
    fn matches(&self, s: &Subject<'_>) -> bool {
        &*self.usage_type == s.usage_type
            && self.period == s.period
            && self.plan_override.as_deref() == s.plan_override
            && self.seen.account.as_ref().map(|(a, _)| *a) == s.account
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn clock() -> ManualClock {
        ManualClock::new("2026-11-15T12:00:00Z".parse().unwrap())
    }

    fn subject(user: Uuid) -> Subject<'static> {
        Subject {
            user,
            usage_type: "ai_generation",
            period: Period::Month {
                year: 2026,
                month: 11,
            },
            plan_override: None,
            account: None,
        }
    }

    fn free_at_limit() -> Remembered {
        Remembered {
            user: LevelSeen {
                plan: "FREE".into(),
                used: 50,
                held: 0,
                limit: Some(50),
                source: LimitSource::Plan,
                overage_cap: Overage::None,
                overage: 0,
            },
            account: None,
            limited_by: Level::User,
        }
    }

    #[test]
    fn a_remembered_refusal_refuses_only_what_does_not_fit_within_limit_and_overage_cap() {
        let at = |used, overage_cap| LevelSeen {
            used,
            overage_cap,
            ..free_at_limit().user
        };
        assert!(at(50, Overage::None).refuses(1));
        assert!(
            !at(148, Overage::Cap(100)).refuses(2),
            "150 fits in 50 + 100"
        );
        assert!(at(148, Overage::Cap(100)).refuses(3));
        assert!(
            !at(1_000_000, Overage::Soft).refuses(1_000_000),
            "a soft limit refuses nothing"
        );
        let unlimited = LevelSeen {
            limit: None,
            ..at(50, Overage::None)
        };
        assert!(!unlimited.refuses(1));
    }

    #[test]
    fn an_announcement_of_an_account_forgets_every_refusal_remembered_under_it() {
        let c = live_cache();
        let (account, other) = (Uuid::new_v4(), Uuid::new_v4());
        let pool = LevelSeen {
            plan: "FREE".into(),
            used: 50,
            held: 0,
            limit: Some(50),
            source: LimitSource::Plan,
            overage_cap: Overage::None,
            overage: 0,
        };
        let member_refusal = |account: Uuid| Remembered {
            user: LevelSeen {
                limit: None,
                source: LimitSource::Account,
                ..pool.clone()
            },
            account: Some((account, pool.clone())),
            limited_by: Level::Account,
        };
        let members: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let under = |user: Uuid, account: Uuid| Subject {
            account: Some(account),
            ..subject(user)
        };
        for m in &members {
            c.remember(
                c.ticket().unwrap(),
                &under(*m, account),
                member_refusal(account),
            );
        }
        let elsewhere = Uuid::new_v4();
        c.remember(
            c.ticket().unwrap(),
            &under(elsewhere, other),
            member_refusal(other),
        );
        assert!(members
            .iter()
            .all(|m| c.lookup(&under(*m, account)).is_some()));
        assert_eq!(
            c.lookup(&subject(members[0])),
            None,
            "another belief: no account"
        );

        c.forget(&account);

        assert!(members
            .iter()
            .all(|m| c.lookup(&under(*m, account)).is_none()));
        assert!(
            c.lookup(&under(elsewhere, other)).is_some(),
            "another account's stays"
        );
        // Remembered again after the announcement: served again.
        c.remember(
            c.ticket().unwrap(),
            &under(members[0], account),
            member_refusal(account),
        );
        assert!(c.lookup(&under(members[0], account)).is_some());
    }

    fn live_cache() -> Refusals {
        let c = Refusals::new(Duration::from_secs(60), 1000, Arc::new(clock()));
        c.set_live(true);
        c
    }

    #[test]
    fn a_refusal_is_kept_for_the_ttl_and_no_longer() {
        let clock = clock();
        let c = Refusals::new(Duration::from_secs(60), 1000, Arc::new(clock.clone()));
        c.set_live(true);
        let u = Uuid::new_v4();
        c.remember(c.ticket().unwrap(), &subject(u), free_at_limit());
        clock.set("2026-11-15T12:00:59Z".parse().unwrap());
        assert!(c.lookup(&subject(u)).is_some(), "within the TTL");
        clock.set("2026-11-15T12:01:00Z".parse().unwrap());
        assert_eq!(c.lookup(&subject(u)), None, "expired");
    }

    #[test]
    fn remembers_and_forgets_a_user() {
        let c = live_cache();
        let u = Uuid::new_v4();
        let t = c.ticket().unwrap();
        c.remember(t, &subject(u), free_at_limit());
        assert_eq!(c.lookup(&subject(u)), Some(free_at_limit()));
        let other_type = Subject {
            usage_type: "kb_file",
            ..subject(u)
        };
        assert_eq!(c.lookup(&other_type), None);
        let other_month = Subject {
            period: Period::Month {
                year: 2026,
                month: 12,
            },
            ..subject(u)
        };
        assert_eq!(c.lookup(&other_month), None);
        c.forget(&u);
        assert_eq!(c.lookup(&subject(u)), None);
    }

    #[test]
    fn an_answer_older_than_an_invalidation_is_not_remembered() {
        let c = live_cache();
        let u = Uuid::new_v4();
        let t = c.ticket().unwrap();
        c.forget(&Uuid::new_v4());
        c.remember(t, &subject(u), free_at_limit());
        assert_eq!(c.lookup(&subject(u)), None);
    }

    #[test]
    fn nothing_is_used_or_remembered_while_unsubscribed() {
        let c = Refusals::new(Duration::from_secs(60), 1000, Arc::new(clock()));
        assert_eq!(c.ticket(), None);
        let u = Uuid::new_v4();
        c.remember(0, &subject(u), free_at_limit());
        assert_eq!(c.users(), 0);
        c.set_live(true);
        c.remember(c.ticket().unwrap(), &subject(u), free_at_limit());
        assert_eq!(c.users(), 1);
        c.set_live(false);
        assert_eq!(c.users(), 0);
        assert_eq!(c.lookup(&subject(u)), None);
    }

    /// Against the Redis of the test environment (`QUOTAD_TEST_REDIS_URL`).
    #[tokio::test]
    async fn the_subscription_stays_up_across_pings_and_hears_changes() {
        let url = std::env::var("QUOTAD_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url.as_str()).unwrap();
        let channel = format!("t{}:1:changes", Uuid::new_v4().simple());
        let c = Refusals::pinging_every(
            Duration::from_secs(60),
            1000,
            Arc::new(clock()),
            Duration::from_millis(20),
        );
        let listening = tokio::spawn(c.clone().listen(vec![client.clone()], channel.clone()));
        let started = std::time::Instant::now();
        while !c.is_live() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no subscription to {url}: is Redis running? (deploy/ensure-services.sh)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
        c.remember(c.ticket().unwrap(), &subject(u), free_at_limit());
        c.remember(c.ticket().unwrap(), &subject(v), free_at_limit());
        // Ten pings go by: the subscription stays up and keeps what it remembered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(c.is_live());
        assert_eq!(c.users(), 2);

        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(u.to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        while c.lookup(&subject(u)).is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "not heard");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            c.lookup(&subject(v)).is_some(),
            "only the named user is forgotten"
        );
        listening.abort();
    }

    #[test]
    fn capacity_is_a_bound() {
        let c = Refusals::new(Duration::from_secs(60), SHARDS, Arc::new(clock()));
        c.set_live(true);
        for _ in 0..SHARDS * 10 {
            c.remember(
                c.ticket().unwrap(),
                &subject(Uuid::new_v4()),
                free_at_limit(),
            );
        }
        assert!(c.users() <= SHARDS, "{} users kept", c.users());
    }
}
