//! The counting contract, model-checked. Random sequences of consume, check, track (of one type,
//! or of several in one call with `items`), refund, release, plan changes, idempotent retries, usage reads, flushes, a Redis that loses its data
//! and clock moves across month ends run against quotad (real Redis, real Postgres, over HTTP) and
//! against a small in-memory model of what the README promises. Every answer is compared with the
//! model's after every step, and Postgres with the model after every flush.
//!
//! The seed is printed; `QUOTAD_MODEL_SEED=<n>` replays a run, `QUOTAD_MODEL_STEPS` sets its length.

use std::collections::{BTreeSet, HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use deadpool_redis::redis;
use quotad::period::{Period, PeriodKind, LIFETIME_START};
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{mid_month, tempfile_path, Answer, Options, TestApp};

/// Small limits, so that a few hundred steps reach every limit, cross it with tracks and come back
/// under it with refunds and releases.
const PLANS: &str = r#"upgrade_url = "/billing"
default_plan = "FREE"

[types]
ai_generation = { period = "month" }
export        = { period = "month" }
kb_file       = { period = "lifetime", fail = "closed" }

[plans.FREE]
ai_generation = 6
export = 3
kb_file = 4

[plans.PRO]
ai_generation = 15
export = -1
kb_file = 10

[plans.ENTERPRISE]
ai_generation = -1
export = -1
kb_file = -1
"#;

const TYPES: [&str; 3] = ["ai_generation", "export", "kb_file"];
const PLAN_NAMES: [&str; 3] = ["FREE", "PRO", "ENTERPRISE"];
const USERS: usize = 3;
/// Idempotency keys are drawn from this many per user, so retries, reuse and refunds are common.
const KEYS: u64 = 6;

/// The limits of [`PLANS`], written out by hand (the model does not read them through quotad).
fn limit_of(plan: &str, ty: usize) -> Option<u64> {
    match (plan, ty) {
        ("FREE", 0) => Some(6),
        ("FREE", 1) => Some(3),
        ("FREE", 2) => Some(4),
        ("PRO", 0) => Some(15),
        ("PRO", 2) => Some(10),
        ("PRO" | "ENTERPRISE", _) => None,
        _ => unreachable!("no plan {plan}"),
    }
}

fn kind_of(ty: usize) -> PeriodKind {
    if ty == 2 {
        PeriodKind::Lifetime
    } else {
        PeriodKind::Month
    }
}

/// splitmix64: a tiny, seedable generator, so a failing sequence replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

#[derive(Debug, Clone)]
enum Op {
    Consume {
        user: usize,
        ty: usize,
        amount: u64,
        key: Option<String>,
        plan: Option<&'static str>,
    },
    Check {
        user: usize,
        ty: usize,
        amount: u64,
        key: Option<String>,
        plan: Option<&'static str>,
    },
    Track {
        user: usize,
        ty: usize,
        amount: u64,
        key: Option<String>,
    },
    /// consume, check or track with `items`: distinct types, all or nothing.
    Items {
        action: &'static str,
        user: usize,
        items: Vec<(usize, u64)>,
        key: Option<String>,
        plan: Option<&'static str>,
    },
    Refund {
        user: usize,
        key: String,
    },
    Release {
        user: usize,
        ty: usize,
        amount: u64,
    },
    SetPlan {
        user: usize,
        plan: &'static str,
    },
    Usage {
        user: usize,
    },
    Flush,
    /// Flush, then delete every key of this daemon from Redis (a restart without persistence).
    LoseRedis,
    SetClock(DateTime<Utc>),
}

/// One random step. `keyed` holds the keyed consumes and tracks made so far: a retry repeats one
/// of them exactly, as a client that lost the answer would.
fn generate(rng: &mut Rng, now: DateTime<Utc>, keyed: &[Op]) -> Op {
    if !keyed.is_empty() && rng.chance(8) {
        return keyed[rng.index(keyed.len())].clone();
    }
    let user = rng.index(USERS);
    let ty = rng.index(TYPES.len());
    let amount = match rng.below(20) {
        0..=9 => 1,
        10..=16 => 2 + rng.below(2),
        _ => 4 + rng.below(4),
    };
    let key = rng.chance(45).then(|| format!("k{}", rng.below(KEYS)));
    let plan = match rng.below(100) {
        0..=7 => Some(PLAN_NAMES[rng.index(PLAN_NAMES.len())]),
        8 => Some("GOLD"),
        _ => None,
    };
    if rng.chance(10) {
        // Two or three distinct types, in a random order.
        let mut types = vec![0, 1, 2];
        let first = types.remove(rng.index(3));
        let second = types.remove(rng.index(2));
        let mut chosen = vec![first, second];
        if rng.chance(40) {
            chosen.push(types[0]);
        }
        let action = match rng.below(10) {
            0..=5 => "consume",
            6..=7 => "check",
            _ => "track",
        };
        let items = chosen
            .into_iter()
            .map(|t| {
                (
                    t,
                    if action == "track" {
                        amount.min(3)
                    } else {
                        amount
                    },
                )
            })
            .collect();
        return Op::Items {
            action,
            user,
            items,
            key,
            plan: if action == "track" { None } else { plan },
        };
    }
    match rng.below(100) {
        0..=33 => Op::Consume {
            user,
            ty,
            amount,
            key,
            plan,
        },
        34..=43 => Op::Check {
            user,
            ty,
            amount,
            key,
            plan,
        },
        44..=53 => Op::Track {
            user,
            ty,
            amount: amount.min(3),
            key,
        },
        54..=65 => Op::Refund {
            user,
            key: format!("k{}", rng.below(KEYS)),
        },
        66..=72 => Op::Release {
            user,
            // Mostly the lifetime type; sometimes a monthly one, which is refused.
            ty: if rng.chance(85) { 2 } else { rng.index(2) },
            amount: 1 + rng.below(3),
        },
        73..=79 => Op::SetPlan {
            user,
            plan: PLAN_NAMES[rng.index(PLAN_NAMES.len())],
        },
        80..=86 => Op::Usage { user },
        87..=90 => Op::Flush,
        91 => Op::LoseRedis,
        _ => {
            let month = Period::current(PeriodKind::Month, now);
            let end = month.end().expect("a month ends");
            Op::SetClock(match rng.below(20) {
                // A little later in the same day.
                0..=9 => now + Duration::minutes(1 + rng.below(600) as i64),
                // The last three seconds of the month, to the millisecond.
                10..=13 => (end - Duration::milliseconds(1 + rng.below(3000) as i64)).max(now),
                // Exactly the first instant of the next month.
                14..=16 => end,
                // Some days on (sometimes into the next month).
                _ => now + Duration::days(1 + rng.below(10) as i64),
            })
        }
    }
}

/// An idempotency record, as the model keeps it: what the counted call was and what it answered.
#[derive(Debug, Clone)]
struct Record {
    mode: &'static str,
    ty: usize,
    amount: u64,
    used: u64,
    plan: String,
    limit: Option<u64>,
    period: Period,
    refunded: bool,
    /// For a call with items (`mode` "multi:consume" or "multi:track"): each item as counted.
    items: Vec<Counted>,
}

/// One item of a call with items, as counted: its type and amount, the count after it, the plan
/// and limit it was decided under, its period.
#[derive(Debug, Clone)]
struct Counted {
    ty: usize,
    amount: u64,
    used: u64,
    plan: String,
    limit: Option<u64>,
    period: Period,
}

type Counter = (usize, usize, Period);
/// One item of a call with items, as the model decides it: type, amount, counter, plan, limit,
/// the count before, whether it fits.
type Decided = (usize, u64, Counter, String, Option<u64>, u64, bool);
/// What a refusal from the near-cache is keyed by: user, type, period and the call's plan override.
type Subject = (usize, usize, Period, Option<&'static str>);

/// What the README promises, for `USERS` users.
struct Model {
    now: DateTime<Utc>,
    plans: [&'static str; USERS],
    counts: HashMap<Counter, u64>,
    records: HashMap<(usize, String), Record>,
    /// The `used` values refusals were answered with since the user's last invalidation: a
    /// refusal answered from the near-cache may report one of these instead of the current count
    /// (the README: a remembered refusal reports the count it was refused at).
    remembered: HashMap<Subject, BTreeSet<u64>>,
}

impl Model {
    fn period(&self, ty: usize) -> Period {
        Period::current(kind_of(ty), self.now)
    }

    fn count(&self, c: Counter) -> u64 {
        self.counts.get(&c).copied().unwrap_or(0)
    }

    fn forget(&mut self, user: usize) {
        self.remembered.retain(|s, _| s.0 != user);
    }
}

struct Run {
    app: TestApp,
    db: sqlx::PgPool,
    users: [Uuid; USERS],
    model: Model,
    /// How often each interesting outcome was met, so a run that never met one fails.
    seen: HashMap<&'static str, u64>,
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn show(a: &Answer) -> String {
    format!("{} {}", a.status, a.body)
}

fn expect_error(a: &Answer, status: u16, code: &str) -> Result<(), String> {
    ensure!(
        a.status == status && a.body["code"] == code,
        "expected {status} {code}, got {}",
        show(a)
    );
    ensure!(
        a.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "an error without its sentence: {}",
        show(a)
    );
    Ok(())
}

/// The counter fields every decision carries.
fn expect_counter(
    a: &Answer,
    used: u64,
    plan: &str,
    limit: Option<u64>,
    period: Period,
) -> Result<(), String> {
    let b = &a.body;
    ensure!(b["used"] == used, "used: expected {used}, got {}", show(a));
    ensure!(b["plan"] == plan, "plan: expected {plan}, got {}", show(a));
    match limit {
        Some(l) => {
            ensure!(
                b["limit"] == l && b["unlimited"] == false,
                "limit: expected {l}, got {}",
                show(a)
            );
            ensure!(
                b["remaining"] == l.saturating_sub(used),
                "remaining: expected {}, got {}",
                l.saturating_sub(used),
                show(a)
            );
        }
        None => ensure!(
            b["limit"].is_null() && b["unlimited"] == true && b["remaining"].is_null(),
            "expected unlimited, got {}",
            show(a)
        ),
    }
    let start = b["period_start"]
        .as_str()
        .map(|s| s.parse::<DateTime<Utc>>());
    match period {
        Period::Lifetime => ensure!(start.is_none(), "a lifetime period_start: {}", show(a)),
        month => ensure!(
            start == Some(Ok(month.start())),
            "period_start: expected {}, got {}",
            month.start(),
            show(a)
        ),
    }
    Ok(())
}

fn replayed(a: &Answer) -> bool {
    a.header("idempotent-replayed") == Some("true")
}

impl Run {
    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match op.clone() {
            Op::Consume {
                user,
                ty,
                amount,
                key,
                plan,
            } => self.decide("consume", user, ty, amount, key, plan).await,
            Op::Check {
                user,
                ty,
                amount,
                key,
                plan,
            } => self.decide("check", user, ty, amount, key, plan).await,
            Op::Track {
                user,
                ty,
                amount,
                key,
            } => self.decide("track", user, ty, amount, key, None).await,
            Op::Items {
                action,
                user,
                items,
                key,
                plan,
            } => self.decide_items(action, user, items, key, plan).await,
            Op::Refund { user, key } => self.refund(user, key).await,
            Op::Release { user, ty, amount } => self.release(user, ty, amount).await,
            Op::SetPlan { user, plan } => {
                let a = self
                    .app
                    .send(
                        Method::PUT,
                        &format!("/v1/users/{}/plan", self.users[user]),
                        Some(json!({"plan": plan})),
                        None,
                    )
                    .await;
                ensure!(
                    a.status == 200 && a.body["plan"] == plan,
                    "PUT plan {plan}: {}",
                    show(&a)
                );
                self.model.plans[user] = plan;
                self.model.forget(user);
                Ok(())
            }
            Op::Usage { user } => self.usage(user).await,
            Op::Flush => self.flush_and_compare().await,
            Op::LoseRedis => {
                self.flush_and_compare().await?;
                let mut r = self.app.redis().await;
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.app.prefix))
                    .query_async(&mut r)
                    .await
                    .map_err(|e| e.to_string())?;
                if !keys.is_empty() {
                    redis::cmd("DEL")
                        .arg(&keys)
                        .query_async::<()>(&mut r)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                // Counts come back from Postgres; idempotency records live in Redis only.
                self.model.records.clear();
                Ok(())
            }
            Op::SetClock(at) => {
                self.app.set_at(at);
                self.model.now = at;
                Ok(())
            }
        }
    }

    /// consume, check or track.
    async fn decide(
        &mut self,
        action: &'static str,
        user: usize,
        ty: usize,
        amount: u64,
        key: Option<String>,
        plan_override: Option<&'static str>,
    ) -> Result<(), String> {
        let mut body = json!({"user_id": self.users[user], "type": TYPES[ty], "amount": amount});
        if let Some(k) = &key {
            body["idempotency_key"] = json!(k);
        }
        if let Some(p) = plan_override {
            body["plan"] = json!(p);
        }
        let a = self.app.post(&format!("/v1/{action}"), body).await;
        let m = &mut self.model;

        if plan_override == Some("GOLD") {
            return expect_error(&a, 400, "UNKNOWN_PLAN");
        }
        if let Some(rec) = key.as_ref().and_then(|k| m.records.get(&(user, k.clone()))) {
            if action == "check" {
                return expect_error(&a, 409, "IDEMPOTENCY_KEY_REUSED");
            }
            if rec.mode != action || rec.ty != ty || rec.amount != amount {
                return expect_error(&a, 409, "IDEMPOTENCY_KEY_REUSED");
            }
            if rec.refunded {
                return expect_error(&a, 409, "IDEMPOTENCY_KEY_REFUNDED");
            }
            ensure!(
                a.status == 200 && a.body["allowed"] == true && replayed(&a),
                "expected the first answer replayed, got {}",
                show(&a)
            );
            *self.seen.entry("replayed").or_default() += 1;
            return expect_counter(&a, rec.used, &rec.plan, rec.limit, rec.period);
        }
        ensure!(
            !replayed(&a),
            "a replay of a call never answered: {}",
            show(&a)
        );

        let period = m.period(ty);
        let counter = (user, ty, period);
        let plan = plan_override.unwrap_or(m.plans[user]);
        let limit = limit_of(plan, ty);
        let used = m.count(counter);
        let fits = limit.is_none_or(|l| used + amount <= l);

        if action == "track" || (fits && action == "consume") {
            let now_used = used + amount;
            ensure!(
                a.status == 200 && a.body["allowed"] == true,
                "expected counted, got {}",
                show(&a)
            );
            expect_counter(&a, now_used, plan, limit, period)?;
            m.counts.insert(counter, now_used);
            if let Some(k) = key {
                let record = Record {
                    mode: action,
                    ty,
                    amount,
                    used: now_used,
                    plan: plan.to_owned(),
                    limit,
                    period,
                    refunded: false,
                    items: Vec::new(),
                };
                m.records.insert((user, k), record);
            }
            return Ok(());
        }
        // A check (either way) or a refused consume: nothing counted.
        let status = if action == "consume" { 402 } else { 200 };
        ensure!(
            a.status == status && a.body["allowed"] == fits,
            "expected {status} allowed={fits}, got {}",
            show(&a)
        );
        if action == "consume" {
            *self.seen.entry("refused").or_default() += 1;
            ensure!(
                a.body["code"] == "USAGE_LIMIT_EXCEEDED" && a.body["upgrade_url"] == "/billing",
                "a refusal without its code and upgrade link: {}",
                show(&a)
            );
        }
        if fits {
            return expect_counter(&a, used, plan, limit, period);
        }
        // A refusal may come from the near-cache (calls without a key only), with the count it
        // was first refused at.
        let subject = (user, ty, period, plan_override);
        let reported = a.body["used"].as_u64().unwrap_or(u64::MAX);
        let remembered = m.remembered.entry(subject).or_default();
        let may_report = if key.is_none() && reported != used && remembered.contains(&reported) {
            *self.seen.entry("remembered_stale").or_default() += 1;
            reported
        } else {
            used
        };
        expect_counter(&a, may_report, plan, limit, period)?;
        if key.is_none() {
            remembered.insert(reported);
        }
        Ok(())
    }

    /// consume, check or track with `items`.
    async fn decide_items(
        &mut self,
        action: &'static str,
        user: usize,
        items: Vec<(usize, u64)>,
        key: Option<String>,
        plan_override: Option<&'static str>,
    ) -> Result<(), String> {
        let list: Vec<serde_json::Value> = items
            .iter()
            .map(|(t, n)| json!({"type": TYPES[*t], "amount": n}))
            .collect();
        let mut body = json!({"user_id": self.users[user], "items": list});
        if let Some(k) = &key {
            body["idempotency_key"] = json!(k);
        }
        if let Some(p) = plan_override {
            body["plan"] = json!(p);
        }
        let a = self.app.post(&format!("/v1/{action}"), body).await;
        let m = &mut self.model;
        if plan_override == Some("GOLD") {
            return expect_error(&a, 400, "UNKNOWN_PLAN");
        }
        let mode = if action == "consume" {
            "multi:consume"
        } else {
            "multi:track"
        };
        let item_of = |n: usize| Answer {
            status: a.status,
            headers: Default::default(),
            body: a.body["items"][n].clone(),
        };
        if let Some(rec) = key.as_ref().and_then(|k| m.records.get(&(user, k.clone()))) {
            let mut sent = items.clone();
            sent.sort();
            let mut had: Vec<(usize, u64)> = rec.items.iter().map(|i| (i.ty, i.amount)).collect();
            had.sort();
            if action == "check" || rec.mode != mode || sent != had {
                return expect_error(&a, 409, "IDEMPOTENCY_KEY_REUSED");
            }
            if rec.refunded {
                return expect_error(&a, 409, "IDEMPOTENCY_KEY_REFUNDED");
            }
            ensure!(
                a.status == 200 && a.body["allowed"] == true && replayed(&a),
                "expected the first answer replayed, got {}",
                show(&a)
            );
            *self.seen.entry("items_replayed").or_default() += 1;
            for (n, (ty, _)) in items.iter().enumerate() {
                let c = rec
                    .items
                    .iter()
                    .find(|i| i.ty == *ty)
                    .expect("the same types");
                expect_counter(&item_of(n), c.used, &c.plan, c.limit, c.period)
                    .map_err(|e| format!("replayed item {n}: {e}"))?;
            }
            return Ok(());
        }
        ensure!(
            !replayed(&a),
            "a replay of a call never answered: {}",
            show(&a)
        );
        let decided: Vec<Decided> = items
            .iter()
            .map(|(ty, amount)| {
                let counter = (user, *ty, m.period(*ty));
                let plan = plan_override.unwrap_or(m.plans[user]).to_owned();
                let limit = limit_of(&plan, *ty);
                let used = m.count(counter);
                let fits = limit.is_none_or(|l| used + amount <= l);
                (*ty, *amount, counter, plan, limit, used, fits)
            })
            .collect();
        let all_fit = decided.iter().all(|d| d.6);
        let counts = action == "track" || (action == "consume" && all_fit);
        let status = if action == "consume" && !all_fit {
            402
        } else {
            200
        };
        ensure!(
            a.status == status && a.body["allowed"] == (all_fit || action == "track"),
            "expected {status}, allowed {}, got {}",
            all_fit || action == "track",
            show(&a)
        );
        if action != "track" {
            let refused: Vec<&str> = decided
                .iter()
                .filter(|d| !d.6)
                .map(|d| TYPES[d.0])
                .collect();
            let shown: Vec<&str> = a.body["refused"]
                .as_array()
                .map(|r| r.iter().filter_map(|t| t.as_str()).collect())
                .unwrap_or_default();
            ensure!(
                shown == refused,
                "expected {refused:?} refused, got {}",
                show(&a)
            );
        }
        let mut counted = Vec::new();
        for (n, (ty, amount, counter, plan, limit, used, fits)) in decided.into_iter().enumerate() {
            let after = if counts { used + amount } else { used };
            let item = item_of(n);
            ensure!(
                item.body["allowed"] == (fits || action == "track"),
                "item {n}: expected allowed {fits}, got {}",
                show(&a)
            );
            expect_counter(&item, after, &plan, limit, counter.2)
                .map_err(|e| format!("item {n}: {e}"))?;
            if counts {
                m.counts.insert(counter, after);
                counted.push(Counted {
                    ty,
                    amount,
                    used: after,
                    plan,
                    limit,
                    period: counter.2,
                });
            }
        }
        *self
            .seen
            .entry(if counts {
                "items_counted"
            } else {
                "items_not_counted"
            })
            .or_default() += 1;
        if let (true, Some(k)) = (counts, key) {
            let first = counted[0].clone();
            m.records.insert(
                (user, k),
                Record {
                    mode,
                    ty: first.ty,
                    amount: first.amount,
                    used: first.used,
                    plan: first.plan,
                    limit: first.limit,
                    period: first.period,
                    refunded: false,
                    items: counted,
                },
            );
        }
        Ok(())
    }

    async fn refund(&mut self, user: usize, key: String) -> Result<(), String> {
        let a = self
            .app
            .post(
                "/v1/refund",
                json!({"user_id": self.users[user], "idempotency_key": key}),
            )
            .await;
        let m = &mut self.model;
        let Some(rec) = m.records.get_mut(&(user, key)) else {
            return expect_error(&a, 404, "UNKNOWN_IDEMPOTENCY_KEY");
        };
        if rec.refunded {
            return expect_error(&a, 409, "ALREADY_REFUNDED");
        }
        rec.refunded = true;
        if !rec.items.is_empty() {
            // Every item given back, listed by type.
            let mut items = rec.items.clone();
            items.sort_by_key(|i| TYPES[i.ty]);
            ensure!(
                a.status == 200 && a.body["items"].as_array().map(Vec::len) == Some(items.len()),
                "expected {} items refunded, got {}",
                items.len(),
                show(&a)
            );
            let mut any = false;
            for (n, item) in items.iter().enumerate() {
                let counter = (user, item.ty, item.period);
                let before = m.count(counter);
                let given = item.amount.min(before);
                m.counts.insert(counter, before - given);
                let got = &a.body["items"][n];
                ensure!(
                    got["type"] == TYPES[item.ty]
                        && got["refunded"] == given
                        && got["used"] == before - given,
                    "item {n}: expected {given} of {} refunded to {}, got {}",
                    TYPES[item.ty],
                    before - given,
                    show(&a)
                );
                any |= given > 0;
            }
            *self.seen.entry("items_refunded").or_default() += 1;
            if any {
                m.forget(user);
            }
            return Ok(());
        }
        let (ty, period, amount) = (rec.ty, rec.period, rec.amount);
        let counter = (user, ty, period);
        let before = m.count(counter);
        let given = amount.min(before);
        m.counts.insert(counter, before - given);
        ensure!(
            a.status == 200 && a.body["refunded"] == given && a.body["type"] == TYPES[ty],
            "expected {given} of {} refunded, got {}",
            TYPES[ty],
            show(&a)
        );
        // Answered with the counter the call was counted in, under the plan that counter holds:
        // the user's plan for this month's and the lifetime counter. (A counter of a month long
        // past keeps the plan it had; a plan change writes only the months around now.)
        let plan = if period == m.period(ty) {
            m.plans[user]
        } else {
            PLAN_NAMES
                .into_iter()
                .find(|p| a.body["plan"] == *p)
                .ok_or_else(|| format!("a refund under no known plan: {}", show(&a)))?
        };
        expect_counter(&a, before - given, plan, limit_of(plan, ty), period)?;
        *self
            .seen
            .entry(if given > 0 {
                "refunded"
            } else {
                "refunded_nothing"
            })
            .or_default() += 1;
        if given > 0 {
            m.forget(user);
        }
        Ok(())
    }

    async fn release(&mut self, user: usize, ty: usize, amount: u64) -> Result<(), String> {
        let a = self
            .app
            .post(
                "/v1/release",
                json!({"user_id": self.users[user], "type": TYPES[ty], "amount": amount}),
            )
            .await;
        if kind_of(ty) != PeriodKind::Lifetime {
            return expect_error(&a, 400, "NOT_A_LIFETIME_TYPE");
        }
        let m = &mut self.model;
        let counter = (user, ty, Period::Lifetime);
        let before = m.count(counter);
        let given = amount.min(before);
        m.counts.insert(counter, before - given);
        ensure!(
            a.status == 200 && a.body["released"] == given,
            "expected {given} released, got {}",
            show(&a)
        );
        let plan = m.plans[user];
        expect_counter(
            &a,
            before - given,
            plan,
            limit_of(plan, ty),
            Period::Lifetime,
        )?;
        if given > 0 {
            m.forget(user);
        }
        Ok(())
    }

    async fn usage(&mut self, user: usize) -> Result<(), String> {
        let a = self
            .app
            .get(&format!("/v1/users/{}/usage", self.users[user]))
            .await;
        let m = &self.model;
        let plan = m.plans[user];
        ensure!(
            a.status == 200 && a.body["plan"] == plan,
            "usage: expected plan {plan}, got {}",
            show(&a)
        );
        for (ty, name) in TYPES.iter().enumerate() {
            let period = m.period(ty);
            let one = Answer {
                status: 200,
                headers: Default::default(),
                body: {
                    let mut b = a.body["usage"][name].clone();
                    b["plan"] = json!(plan);
                    b
                },
            };
            expect_counter(
                &one,
                m.count((user, ty, period)),
                plan,
                limit_of(plan, ty),
                period,
            )
            .map_err(|e| format!("usage of {name}: {e}"))?;
        }
        Ok(())
    }

    /// Flushes everything, then compares every row of `usage_tracking` with the model.
    async fn flush_and_compare(&mut self) -> Result<(), String> {
        self.app.flush().await;
        let rows: Vec<(Uuid, String, DateTime<Utc>, i64)> =
            sqlx::query_as("SELECT user_id, type, period_start, count FROM usage_tracking")
                .fetch_all(&self.db)
                .await
                .map_err(|e| e.to_string())?;
        let start = |p: Period| match p {
            Period::Lifetime => LIFETIME_START,
            month => month.start(),
        };
        let mut expected: HashMap<(Uuid, String, DateTime<Utc>), u64> = self
            .model
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|((u, t, p), n)| ((self.users[*u], TYPES[*t].to_owned(), start(*p)), *n))
            .collect();
        for (user, ty, period_start, count) in rows {
            let want = expected
                .remove(&(user, ty.clone(), period_start))
                .unwrap_or(0);
            ensure!(
                count == want as i64,
                "Postgres holds {count} for {user} {ty} {period_start}, the model {want}"
            );
        }
        ensure!(
            expected.is_empty(),
            "counted but not in Postgres after a flush: {expected:?}"
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_calls_agree_with_the_model_of_the_contract() {
    let seed = std::env::var("QUOTAD_MODEL_SEED")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("QUOTAD_MODEL_SEED is a whole number")
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let steps: usize = std::env::var("QUOTAD_MODEL_STEPS")
        .ok()
        .map(|s| s.parse().expect("QUOTAD_MODEL_STEPS is a whole number"))
        .unwrap_or(1500);
    println!("model: seed {seed} (replay with QUOTAD_MODEL_SEED={seed}), {steps} steps");

    let plans = tempfile_path::write(PLANS);
    let now = mid_month();
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.0.clone()),
        now,
        ..Options::default()
    })
    .await;
    app.wait_refusal_cache_live().await;
    let db = app.db().await;
    let mut run = Run {
        app,
        db,
        seen: HashMap::new(),
        users: [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()],
        model: Model {
            now,
            plans: ["FREE"; USERS],
            counts: HashMap::new(),
            records: HashMap::new(),
            remembered: HashMap::new(),
        },
    };

    let mut rng = Rng(seed);
    let mut recent: VecDeque<String> = VecDeque::new();
    let mut keyed: Vec<Op> = Vec::new();
    let mut tally: HashMap<&'static str, u64> = HashMap::new();
    for i in 0..steps {
        let op = generate(&mut rng, run.model.now, &keyed);
        if matches!(
            &op,
            Op::Consume { key: Some(_), .. }
                | Op::Track { key: Some(_), .. }
                | Op::Items {
                    action: "consume" | "track",
                    key: Some(_),
                    ..
                }
        ) {
            keyed.push(op.clone());
        }
        recent.push_back(format!("{i}: {op:?}"));
        if recent.len() > 25 {
            recent.pop_front();
        }
        *tally.entry(op_name(&op)).or_default() += 1;
        if let Err(e) = run.step(&op).await {
            panic!(
                "step {i} of seed {seed} disagrees with the model: {e}\nlast steps:\n{}\n\
                 replay with QUOTAD_MODEL_SEED={seed}",
                Vec::from(recent).join("\n")
            );
        }
    }
    run.flush_and_compare()
        .await
        .unwrap_or_else(|e| panic!("seed {seed}, at the end: {e}"));
    let months: BTreeSet<String> = run
        .model
        .counts
        .keys()
        .filter(|c| c.2 != Period::Lifetime)
        .map(|c| c.2.id())
        .collect();
    println!(
        "model: {steps} steps agreed; calls {tally:?}; outcomes {:?}; months {months:?}",
        run.seen
    );
    // A long enough run must have reached the states that matter, or it proved little.
    if steps >= 1000 {
        assert!(
            months.len() >= 2,
            "the clock never crossed a month end: {months:?}"
        );
        for outcome in [
            "refused",
            "replayed",
            "refunded",
            "items_counted",
            "items_not_counted",
        ] {
            assert!(
                run.seen.contains_key(outcome),
                "no {outcome} in {steps} steps: {:?}",
                run.seen
            );
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Consume { .. } => "consume",
        Op::Check { .. } => "check",
        Op::Track { .. } => "track",
        Op::Items { .. } => "items",
        Op::Refund { .. } => "refund",
        Op::Release { .. } => "release",
        Op::SetPlan { .. } => "plan",
        Op::Usage { .. } => "usage",
        Op::Flush => "flush",
        Op::LoseRedis => "lose_redis",
        Op::SetClock(_) => "clock",
    }
}
