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
    /// The plan Redis decided under.
    plan: Box<str>,
    /// The count Redis refused at; the true count is at least this until an invalidation.
    used: u64,
    /// The limit Redis refused under (the plan's, or the customer's override): a change of
    /// either is announced, and a plans reload forgets everything.
    limit: u64,
    until: DateTime<Utc>,
}

/// A remembered refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The plan Redis decided under.
    pub plan: String,
    /// The count it refused at (the true count is at least this).
    pub used: u64,
    /// The limit it refused under.
    pub limit: u64,
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
        let shard = self.shard(&subject.user);
        let entries = shard.get(&subject.user)?;
        entries
            .iter()
            .find(|r| r.matches(subject) && r.until > now)
            .map(|r| Remembered {
                plan: r.plan.to_string(),
                used: r.used,
                limit: r.limit,
            })
    }

    /// Remembers that Redis refused `subject` at `used` under `plan` and `limit`, unless an
    /// invalidation arrived since `ticket` was taken.
    pub fn remember(&self, ticket: u64, subject: &Subject<'_>, plan: &str, used: u64, limit: u64) {
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
            plan: plan.into(),
            used,
            limit,
            until: now
                .checked_add_signed(self.inner.ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        });
    }

    /// Forgets every refusal of `user`.
    pub fn forget(&self, user: &Uuid) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.shard(user).remove(user);
    }

    /// Forgets every refusal.
    pub fn forget_all(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        for shard in &self.inner.shards {
            shard.lock().expect("refusal cache lock poisoned").clear();
        }
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
    /// for as long as it runs. The cache is used only while subscribed.
    pub async fn listen(self, client: redis::Client, channel: String) {
        if !self.enabled() {
            return;
        }
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        let mut delay = FIRST_RETRY;
        loop {
            let Err(ended) = self.subscription(&client, &channel).await;
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
        }
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
        c.remember(c.ticket().unwrap(), &subject(u), "FREE", 50, 50);
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
        c.remember(t, &subject(u), "FREE", 50, 50);
        assert_eq!(
            c.lookup(&subject(u)),
            Some(Remembered {
                plan: "FREE".into(),
                used: 50,
                limit: 50
            })
        );
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
        c.remember(t, &subject(u), "FREE", 50, 50);
        assert_eq!(c.lookup(&subject(u)), None);
    }

    #[test]
    fn nothing_is_used_or_remembered_while_unsubscribed() {
        let c = Refusals::new(Duration::from_secs(60), 1000, Arc::new(clock()));
        assert_eq!(c.ticket(), None);
        let u = Uuid::new_v4();
        c.remember(0, &subject(u), "FREE", 50, 50);
        assert_eq!(c.users(), 0);
        c.set_live(true);
        c.remember(c.ticket().unwrap(), &subject(u), "FREE", 50, 50);
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
        let listening = tokio::spawn(c.clone().listen(client.clone(), channel.clone()));
        let started = std::time::Instant::now();
        while !c.is_live() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no subscription to {url}: is Redis running? (deploy/ensure-services.sh)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
        c.remember(c.ticket().unwrap(), &subject(u), "FREE", 50, 50);
        c.remember(c.ticket().unwrap(), &subject(v), "FREE", 50, 50);
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
                "FREE",
                50,
                50,
            );
        }
        assert!(c.users() <= SHARDS, "{} users kept", c.users());
    }
}
