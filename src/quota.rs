//! The quota decisions: what the HTTP handlers ask, in domain terms. Each call is one Redis script
//! run; a counter that Redis does not hold yet is first loaded from Postgres (hydration) and the
//! call is run again. When Redis cannot answer in time, the type's fail policy decides.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_redis::redis::{self, ScriptInvocation};
use sqlx::PgPool;
use uuid::Uuid;

use crate::clock::Clock;
use crate::db;
use crate::hydrate::{Hydrator, LoadError};
use crate::metrics as m;
use crate::period::{Period, PeriodKind};
use crate::plans::{FailPolicy, Overage, PlanBook, Plans, PlansError, UsageType};
use crate::refusals::{LevelSeen, Refusals, Remembered, Subject};
use crate::routes::{Hops, Routes};
use crate::store::{
    self, Change, CountCall, CounterHash, Hydrated, Level, LimitSource, MetaValue, Mode, Owner,
    OwnerKeys, RedisStore, RefundReply, ReleaseReply, Reply, Status, StoreError, UserKeys,
};

/// How often a call is re-run after loading its counters, or after following the user's route to
/// where their counters live, before it gives up. A member's first call may load two counters
/// (their own and the pool) and follow one route; the rest is margin for a counter deleted again
/// between its load and the re-run.
pub(crate) const ATTEMPTS: usize = 8;

/// Which decision a caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Check the limit and count if allowed.
    Consume,
    /// Decide without counting.
    Check,
    /// Count without enforcing.
    Track,
}

impl Action {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Action::Consume => "consume",
            Action::Check => "check",
            Action::Track => "track",
        }
    }
}

/// A validated consume, check or track request, under the plans it was validated against.
#[derive(Debug, Clone)]
pub struct DecisionInput<'p> {
    /// The user.
    pub user: Uuid,
    /// The usage type, resolved once (by [`known_type`]) from the same plans.
    pub usage_type: &'p UsageType,
    /// How much, 1..=1,000,000.
    pub amount: u64,
    /// Makes a retried consume or track count once.
    pub idempotency_key: Option<String>,
    /// A plan the caller vouches for, overriding the stored one.
    pub plan: Option<String>,
    /// Numeric values are summed per counter; others kept as the latest.
    pub metadata: Vec<(String, MetaValue)>,
}

/// A counter as the API shows it.
#[derive(Debug, Clone)]
pub struct CounterView {
    /// Units used in the period; `None` when Redis could not be asked (degraded).
    pub used: Option<u64>,
    /// The limit; `None` = unlimited (or unknown, when degraded).
    pub limit: Option<u64>,
    /// Whether the plan sets no limit.
    pub unlimited: bool,
    /// The period counted in.
    pub period: Period,
    /// How far past the limit use may go before a consume is refused.
    pub overage_cap: Overage,
    /// The period's overage: units counted past the limit where the plan allows it; `None` when
    /// Redis could not be asked (degraded).
    pub overage: Option<u64>,
    /// Units held by open reservations (see [`crate::reservations`]): taken, not yet used;
    /// `None` where the answer does not read them (a refund, a release, a degraded decision).
    pub held: Option<u64>,
}

impl CounterView {
    /// A counter of `used` against `limit` (`None` = unlimited) in `period`, with its overage.
    pub fn of(
        used: u64,
        limit: Option<u64>,
        period: Period,
        overage_cap: Overage,
        overage: u64,
    ) -> CounterView {
        CounterView {
            used: Some(used),
            limit,
            unlimited: limit.is_none(),
            period,
            // Without a limit there is nothing to go past.
            overage_cap: if limit.is_some() {
                overage_cap
            } else {
                Overage::None
            },
            overage: Some(overage),
            held: None,
        }
    }

    /// The same counter, with what open reservations hold at it.
    pub fn with_held(mut self, held: u64) -> CounterView {
        self.held = Some(held);
        self
    }

    /// What is used and what open reservations hold: what a consume sees taken.
    fn taken(&self) -> Option<u64> {
        Some(self.used?.saturating_add(self.held.unwrap_or(0)))
    }

    /// What is left before the limit, beside what open reservations hold: `None` when unlimited
    /// or unknown. Past the limit (in overage) it is 0.
    pub fn remaining(&self) -> Option<u64> {
        Some(self.limit?.saturating_sub(self.taken()?))
    }

    /// The count past which a consume is refused: the limit plus the overage cap. `None` when
    /// nothing refuses (unlimited, or a soft limit) or it is unknown (degraded).
    pub fn hard_limit(&self) -> Option<u64> {
        Some(self.limit?.saturating_add(self.overage_cap.cap()?))
    }

    /// What is left before a consume is refused, beside what open reservations hold: `None`
    /// when nothing refuses or it is unknown.
    pub fn headroom(&self) -> Option<u64> {
        Some(self.hard_limit()?.saturating_sub(self.taken()?))
    }

    /// Whether the count is past the limit.
    pub fn is_over_limit(&self) -> bool {
        matches!((self.used, self.limit), (Some(u), Some(l)) if u > l)
    }
}

/// A consume, check or track decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Allowed (and for consume and track, counted).
    pub allowed: bool,
    /// The answer of an earlier call with the same idempotency key; nothing counted now.
    pub replayed: bool,
    /// Redis could not answer: allowed by the fail-open policy, not counted.
    pub degraded: bool,
    /// The user.
    pub user: Uuid,
    /// The usage type.
    pub usage_type: String,
    /// The plan the decision was made under (`None` when degraded and unknown).
    pub plan: Option<String>,
    /// The counter after the call.
    pub counter: CounterView,
    /// When it was decided.
    pub now: DateTime<Utc>,
    /// For a refused consume, the level that ran out.
    pub limited_by: Option<Level>,
    /// Where the user's limit comes from.
    pub source: LimitSource,
    /// The overage this call counted at the user's level (for check: would count if consumed).
    pub overage_added: u64,
    /// The account's level, for a member of an account.
    pub account: Option<AccountLevel>,
}

impl Decision {
    /// Records the decision in the metrics: its `outcome`, the overage it counted (a replay
    /// counted it the first time; a check counts nothing), and whether it left the counter at 80 %
    /// or more of its limit (a signal to nudge an upgrade).
    pub(crate) fn record(&self, action: Action, outcome: &'static str) {
        let plan = self.plan.as_deref().unwrap_or("");
        m::decision(&self.usage_type, plan, outcome);
        if action != Action::Check && !self.replayed {
            let pool = self
                .account
                .as_ref()
                .map(|a| (a.plan.as_str(), a.overage_added));
            m::overage(&self.usage_type, plan, self.overage_added, pool);
        }
        if let (Some(used), Some(limit)) = (self.counter.used, self.counter.limit) {
            if limit > 0 && used * 5 >= limit * 4 {
                m::near_limit(&self.usage_type, plan);
            }
        }
    }

    /// The answer when Redis (or Postgres, for a load) could not be asked and `ty` fails open:
    /// allowed, nothing counted, the counter unknown. `plan` is the one the caller sent, if any.
    pub(crate) fn degraded(
        user: Uuid,
        ty: &UsageType,
        plan: Option<String>,
        period: Period,
        now: DateTime<Utc>,
    ) -> Decision {
        Decision {
            allowed: true,
            replayed: false,
            degraded: true,
            user,
            usage_type: ty.name.clone(),
            plan,
            counter: CounterView {
                used: None,
                limit: None,
                unlimited: false,
                period,
                overage_cap: Overage::None,
                overage: None,
                held: None,
            },
            now,
            limited_by: None,
            source: LimitSource::Plan,
            overage_added: 0,
            account: None,
        }
    }

    /// A counting, check or reserve script's reply as a decision in `period`: the user's level,
    /// and the account's for a member (`account`, when the reply carries its level).
    pub(crate) fn from_reply(
        reply: Reply,
        account: Option<Uuid>,
        user: Uuid,
        ty: &UsageType,
        period: Period,
        now: DateTime<Utc>,
    ) -> Decision {
        let account = account
            .zip(reply.account)
            .map(|(account, level)| AccountLevel {
                account,
                plan: level.plan,
                counter: CounterView::of(
                    level.used,
                    level.limit,
                    period,
                    level.overage_cap,
                    level.overage,
                )
                .with_held(level.held),
                source: level.source,
                overage_added: level.overage_added,
            });
        Decision {
            allowed: reply.status != Status::Denied,
            replayed: reply.status == Status::Replay,
            degraded: false,
            user,
            usage_type: ty.name.clone(),
            plan: Some(reply.plan),
            counter: CounterView::of(
                reply.used,
                reply.limit,
                period,
                reply.overage_cap,
                reply.overage,
            )
            .with_held(reply.held),
            now,
            limited_by: reply.limited_by,
            source: reply.source,
            overage_added: reply.overage_added,
            account,
        }
    }
}

/// The account's level of a decision, refund or usage read.
#[derive(Debug, Clone)]
pub struct AccountLevel {
    /// The account.
    pub account: Uuid,
    /// The account's plan in force.
    pub plan: String,
    /// The pool after the call.
    pub counter: CounterView,
    /// Where the pool's limit comes from.
    pub source: LimitSource,
    /// The overage this call counted in the pool (for check: would count if consumed).
    pub overage_added: u64,
}

/// A successful refund.
#[derive(Debug, Clone)]
pub struct Refund {
    /// The user.
    pub user: Uuid,
    /// The type given back.
    pub usage_type: String,
    /// How much was given back: the call's amount, or less when the counter held less (never
    /// below 0).
    pub amount: u64,
    /// The plan in force.
    pub plan: String,
    /// The counter after the refund.
    pub counter: CounterView,
    /// For a call that counted in the user's account's pool: the account, the pool after the
    /// refund, and how much it got back.
    pub account: Option<(Uuid, CounterView, u64)>,
}

/// What a refund gave back.
#[derive(Debug, Clone)]
pub enum Refunded {
    /// A call for one type.
    One(Box<Refund>),
    /// A call with items: every item, in the order of the call's items sorted by type.
    Items(Vec<Refund>),
}

/// One type's counter on a usage read.
#[derive(Debug, Clone)]
pub struct TypeUsage {
    /// Month or lifetime.
    pub period: PeriodKind,
    /// The counter.
    pub counter: CounterView,
    /// Where its limit comes from.
    pub source: LimitSource,
}

/// Every configured type's counter for one user.
#[derive(Debug, Clone)]
pub struct Usage {
    /// The user.
    pub user: Uuid,
    /// The plan in force.
    pub plan: String,
    /// Counters by type name.
    pub counters: BTreeMap<String, TypeUsage>,
    /// The user's account and its pool, for a member.
    pub account: Option<PoolUsage>,
}

/// An account's pool: every configured type's counter.
#[derive(Debug, Clone)]
pub struct PoolUsage {
    /// The account.
    pub account: Uuid,
    /// The account's plan in force.
    pub plan: String,
    /// Counters by type name.
    pub counters: BTreeMap<String, TypeUsage>,
}

/// A user's plan as stored.
#[derive(Debug, Clone)]
pub struct UserPlan {
    /// The user.
    pub user: Uuid,
    /// The plan in force.
    pub plan: String,
    /// True when no plan is stored and the default applies.
    pub is_default: bool,
    /// When it was last set.
    pub updated_at: Option<DateTime<Utc>>,
}

/// Why a quota call gave no answer, in domain terms. `src/http/error.rs` turns each into its
/// status, code and sentence.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The usage type is not configured; `known` lists the configured ones.
    #[error("{name:?} is not a configured usage type")]
    UnknownType { name: String, known: Vec<String> },
    /// The plan is not configured; `known` lists the configured ones.
    #[error("{name:?} is not a configured plan")]
    UnknownPlan { name: String, known: Vec<String> },
    /// A release on a type counted per month.
    #[error("{0} is not a lifetime type")]
    NotALifetimeType(String),
    /// The counter already holds the most metadata names it may.
    #[error("the counter holds the most metadata names it may")]
    TooManyMetadataNames,
    /// The sum of the named numeric metadata would not be a finite number.
    #[error("the sum of metadata {0} would not be finite")]
    MetadataSumTooLarge(String),
    /// The idempotency key names a call that was refunded.
    #[error("the idempotency key names a refunded call")]
    KeyRefunded,
    /// The idempotency key was used for another call.
    #[error("the idempotency key was used for another call")]
    KeyReused,
    /// No counted call of the user has this idempotency key.
    #[error("no counted call has idempotency key {0:?}")]
    UnknownKey(String),
    /// The call with this idempotency key was refunded already.
    #[error("the call with idempotency key {0:?} was refunded already")]
    AlreadyRefunded(String),
    /// The counter vanished again each time it was loaded.
    #[error("the counter could not be loaded")]
    NotLoaded,
    /// The plan is stored in Postgres, but Redis did not take it.
    #[error("the plan is stored but not in force: {0}")]
    PlanNotInForce(StoreError),
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] StoreError),
    /// Postgres failed while a counter was loaded from it (always an outage).
    #[error("loading a counter: {0}")]
    Load(sqlx::Error),
    /// Postgres failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A fault on the way to a decision: an outage (the fail policy may apply) or an answer.
pub(crate) enum Fault {
    Redis(StoreError),
    Db(sqlx::Error),
    /// An answer for the client that is not an outage (e.g. a reused idempotency key).
    Answer(QuotaError),
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Self {
        Fault::Redis(e)
    }
}

impl From<sqlx::Error> for Fault {
    fn from(e: sqlx::Error) -> Self {
        Fault::Db(e)
    }
}

impl From<LoadError> for Fault {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Db(e) => Fault::Db(e),
            LoadError::Redis(e) => Fault::Redis(e),
        }
    }
}

impl From<LoadError> for QuotaError {
    fn from(e: LoadError) -> Self {
        Fault::from(e).into()
    }
}

impl From<Fault> for QuotaError {
    fn from(f: Fault) -> Self {
        match f {
            Fault::Redis(e) => QuotaError::Redis(e),
            Fault::Db(e) => QuotaError::Load(e),
            Fault::Answer(e) => e,
        }
    }
}

impl Fault {
    /// Whether the fail policy applies (an outage), rather than a bug.
    pub(crate) fn is_outage(&self) -> bool {
        match self {
            Fault::Redis(e) => e.is_outage(),
            Fault::Db(_) => true,
            Fault::Answer(_) => false,
        }
    }
}

/// The quota service: Redis for counting, Postgres for what lasts, a clock and the plans.
#[derive(Clone)]
pub struct Quota {
    /// The hot counters.
    pub store: RedisStore,
    /// The durable record.
    pub db: PgPool,
    /// Deadline of one Postgres call on the request path (`QUOTAD_DATABASE_TIMEOUT_MS`).
    pub db_timeout: Duration,
    /// The plans in force.
    pub plans: PlanBook,
    /// What "now" is.
    pub clock: Arc<dyn Clock>,
    /// Refusals answered from memory until something could change them.
    pub refusals: Refusals,
    /// Loads counters Redis does not hold from Postgres, many at once.
    pub hydrator: Hydrator,
    /// Where this replica believes each member of an account counts.
    pub routes: Routes,
    /// The buckets with open reservations, for the reservation sweeper (see
    /// [`crate::reservations::Sweeper`]).
    pub holds: crate::reservations::OpenHolds,
}

impl Quota {
    /// Consume, check or track, as `action` says, under `plans`: the snapshot the caller
    /// validated the input against, so one request sees one version of the plans file.
    #[tracing::instrument(skip_all, fields(user = %input.user, r#type = %input.usage_type.name, action = action.label()))]
    pub async fn decide(
        &self,
        action: Action,
        input: &DecisionInput<'_>,
        plans: &Plans,
    ) -> Result<Decision, QuotaError> {
        let ty = input.usage_type;
        let now = self.clock.now();
        let period = Period::current(ty.period, now);
        // Where this replica believes the user counts, looked up once for the decision.
        let account = self.routes.get(&input.user);
        let remembered = self.remembered_refusal(action, input, ty, period, now, account);
        let decision = if let Some(refused) = remembered {
            metrics::counter!(m::REFUSAL_CACHE_HITS, "type" => ty.name.clone()).increment(1);
            refused
        } else {
            let started = std::time::Instant::now();
            let keys = self.store.keys_in(input.user, account);
            let result = self
                .decide_in(action, input, plans, period, now, keys)
                .await;
            metrics::histogram!(m::REDIS_SCRIPT_SECONDS, "script" => action.label())
                .record(started.elapsed());
            Self::or_fail_policy(result, input, ty, period, now)?
        };
        let outcome = match (decision.degraded, decision.allowed) {
            (true, _) => "degraded",
            (false, true) => "allowed",
            (false, false) => "denied",
        };
        decision.record(action, outcome);
        Ok(decision)
    }

    /// The decision, or for an outage of a fail-open type the degraded answer; other faults are
    /// counted and returned.
    fn or_fail_policy(
        result: Result<Decision, Fault>,
        input: &DecisionInput<'_>,
        ty: &UsageType,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<Decision, QuotaError> {
        Ok(match result {
            Ok(d) => d,
            Err(fault) if fault.is_outage() && ty.fail == FailPolicy::Open => {
                match &fault {
                    Fault::Db(e) => {
                        tracing::warn!(error.message = %e, "postgres unavailable while loading a counter; failing open")
                    }
                    Fault::Redis(e) => {
                        tracing::warn!(error.message = %e, "redis unavailable; failing open")
                    }
                    Fault::Answer(_) => {}
                }
                Decision::degraded(input.user, ty, input.plan.clone(), period, now)
            }
            Err(fault) => {
                m::decision(&ty.name, "", "error");
                return Err(fault.into());
            }
        })
    }

    /// A refusal answered from the near-cache: only for consume and check without an
    /// idempotency key (a retried key must replay its first answer, which only Redis holds).
    fn remembered_refusal(
        &self,
        action: Action,
        input: &DecisionInput<'_>,
        ty: &UsageType,
        period: Period,
        now: DateTime<Utc>,
        account: Option<Uuid>,
    ) -> Option<Decision> {
        if !cacheable(action, input) {
            return None;
        }
        let seen = self.refusals.lookup(&subject(input, ty, period, account))?;
        if !seen.refusing().refuses(input.amount) {
            return None;
        }
        let view = |level: &LevelSeen| {
            CounterView::of(
                level.used,
                level.limit,
                period,
                level.overage_cap,
                level.overage,
            )
            .with_held(level.held)
        };
        Some(Decision {
            allowed: false,
            replayed: false,
            degraded: false,
            user: input.user,
            usage_type: ty.name.clone(),
            plan: Some(seen.user.plan.clone()),
            counter: view(&seen.user),
            now,
            limited_by: Some(seen.limited_by),
            source: seen.user.source,
            overage_added: 0,
            account: seen.account.as_ref().map(|(account, pool)| AccountLevel {
                account: *account,
                plan: pool.plan.clone(),
                counter: view(pool),
                source: pool.source,
                overage_added: 0,
            }),
        })
    }

    /// Re-reads the plans file; on success every remembered refusal is forgotten (the default
    /// plan, or a plan's existence, may have changed).
    pub fn reload_plans(&self) -> Result<Arc<Plans>, PlansError> {
        let plans = self.plans.reload()?;
        self.refusals.forget_all();
        Ok(plans)
    }

    async fn decide_in(
        &self,
        action: Action,
        input: &DecisionInput<'_>,
        plans: &Plans,
        period: Period,
        now: DateTime<Utc>,
        mut keys: UserKeys,
    ) -> Result<Decision, Fault> {
        let ty = input.usage_type;
        let mut hops = Hops::default();
        // The call, as its script's invocation for keys placed as believed.
        let invocation = |keys: &UserKeys| match action {
            Action::Check => self.store.check_invocation(
                keys,
                ty,
                input.amount,
                period,
                input.plan.as_deref(),
                &plans.default_plan,
                input.idempotency_key.as_deref(),
            ),
            Action::Consume | Action::Track => self.store.count_invocation(&CountCall {
                mode: if action == Action::Consume {
                    Mode::Consume
                } else {
                    Mode::Track
                },
                keys,
                usage_type: ty,
                amount: input.amount,
                period,
                plan_override: input.plan.as_deref(),
                default_plan: &plans.default_plan,
                idempotency_key: input.idempotency_key.as_deref(),
                metadata: &input.metadata,
            }),
        };
        let read = |raw| store::decision_reply(raw, period);
        // The refusal cache's ticket, taken before each send whose answer may be remembered.
        let new_ticket = |_: &UserKeys| {
            cacheable(action, input)
                .then(|| self.refusals.ticket())
                .flatten()
        };
        // A reply that came back with a load (the call sent again right after the fill, in the
        // same pipeline), with the ticket taken before it was sent.
        let mut answered: Option<(Option<u64>, Reply)> = None;
        for _ in 0..ATTEMPTS {
            let (ticket, reply) = match answered.take() {
                Some(answered) => answered,
                None => (
                    new_ticket(&keys),
                    read(
                        self.store
                            .run(&mut invocation(&keys), action != Action::Check)
                            .await?,
                    )?,
                ),
            };
            match reply.status {
                Status::Moved => {
                    keys = self.follow(&keys, &reply.detail, &mut hops).await?;
                    continue;
                }
                Status::Hydrate => {
                    let ticket = new_ticket(&keys);
                    match self
                        .load_levels(&keys, period, &reply.detail, invocation(&keys))
                        .await?
                    {
                        Reloaded::Answer(raw) => answered = Some((ticket, read(raw?)?)),
                        Reloaded::Moved(route) => {
                            keys = self.follow(&keys, &route, &mut hops).await?
                        }
                        Reloaded::Again => {}
                    }
                    continue;
                }
                Status::MetaLimit => return Err(Fault::Answer(QuotaError::TooManyMetadataNames)),
                Status::MetaSum => {
                    return Err(Fault::Answer(QuotaError::MetadataSumTooLarge(reply.detail)))
                }
                Status::Refunded => return Err(Fault::Answer(QuotaError::KeyRefunded)),
                Status::Conflict => return Err(Fault::Answer(QuotaError::KeyReused)),
                Status::Ok | Status::Denied | Status::Replay => {}
            }
            if let (Some(ticket), Status::Denied, Some(limited_by)) =
                (ticket, reply.status, reply.limited_by)
            {
                let level =
                    |plan: &str, used, held, limit, source, overage_cap, overage| LevelSeen {
                        plan: plan.to_owned(),
                        used,
                        held,
                        limit,
                        source,
                        overage_cap,
                        overage,
                    };
                let seen = Remembered {
                    user: level(
                        &reply.plan,
                        reply.used,
                        reply.held,
                        reply.limit,
                        reply.source,
                        reply.overage_cap,
                        reply.overage,
                    ),
                    account: keys.account().zip(reply.account.as_ref()).map(|(a, l)| {
                        let (plan, cap) = (&l.plan, l.overage_cap);
                        (
                            a,
                            level(plan, l.used, l.held, l.limit, l.source, cap, l.overage),
                        )
                    }),
                    limited_by,
                };
                self.refusals
                    .remember(ticket, &subject(input, ty, period, keys.account()), seen);
            }
            let period = reply.period.unwrap_or(period);
            return Ok(Decision::from_reply(
                reply,
                keys.account(),
                input.user,
                ty,
                period,
                now,
            ));
        }
        Err(Fault::Redis(StoreError::Unavailable(
            "the counter vanished while it was being loaded".into(),
        )))
    }

    /// The keys of `user`, placed where this replica believes their counters live.
    pub fn placed(&self, user: Uuid) -> UserKeys {
        self.store.keys_in(user, self.routes.get(&user))
    }

    /// The keys of `keys`' user placed where the route a script reported (`route`) says their
    /// counters live; remembered for the next call. A move under way (">moving") is waited out
    /// (up to [`crate::routes::MOVE_WAIT`], asking Redis for the route again between pauses);
    /// after that, and after too many hops, the call fails as an outage (the fail policy
    /// decides).
    pub(crate) async fn follow(
        &self,
        keys: &UserKeys,
        route: &str,
        hops: &mut Hops,
    ) -> Result<UserKeys, Fault> {
        let user = keys.user();
        let unavailable = |e: String| Fault::Redis(StoreError::Unavailable(e));
        let mut route = route.to_owned();
        while route == ">moving" {
            hops.pause().await.map_err(unavailable)?;
            route = self.store.route_of(keys).await?;
            if route == keys.route_value() {
                return Ok(keys.clone());
            }
        }
        let next = hops.next(&route).map_err(unavailable)?;
        self.routes.set(user, next);
        Ok(self.store.keys_in(user, next))
    }

    /// Loads the counters a script named missing (`which`: "user", "account" or both) from
    /// Postgres. With one missing, `follow_up` rides in its load's pipeline and its reply comes
    /// back; with both, they load together and the call is sent again.
    pub(crate) async fn load_levels(
        &self,
        keys: &UserKeys,
        period: Period,
        which: &str,
        follow_up: ScriptInvocation<'static>,
    ) -> Result<Reloaded, Fault> {
        // The user's counters are loaded under the user's route; an account's pool has none.
        let believed = keys.route_value();
        let mut levels: Vec<(&OwnerKeys, &str)> = Vec::with_capacity(2);
        if which.contains("user") {
            levels.push((keys.own(), &believed));
        }
        if let (true, Some(pool)) = (which.contains("account"), keys.pool()) {
            levels.push((pool, ""));
        }
        if let [(level, believed)] = levels[..] {
            let loaded = self
                .hydrator
                .load_then(level, believed, period, Some(follow_up))
                .await?;
            self.after_load(level, &loaded.filled);
            return Ok(match loaded.filled {
                Hydrated::Moved(route) => Reloaded::Moved(route),
                _ => loaded.follow_up.map_or(Reloaded::Again, Reloaded::Answer),
            });
        }
        let loads = levels
            .iter()
            .map(|(k, believed)| self.hydrator.load(k, believed, period));
        let filled = futures_util::future::try_join_all(loads).await?;
        for ((k, _), f) in levels.iter().zip(&filled) {
            self.after_load(k, f);
        }
        Ok(
            match filled.into_iter().find_map(|f| match f {
                Hydrated::Moved(route) => Some(route),
                _ => None,
            }) {
                Some(route) => Reloaded::Moved(route),
                None => Reloaded::Again,
            },
        )
    }

    /// What follows a load: a counter filled again may hold less than the one Redis lost, so the
    /// owner's remembered refusals go.
    fn after_load(&self, keys: &OwnerKeys, filled: &Hydrated) {
        if *filled == Hydrated::Filled {
            self.refusals.forget(&keys.owner().id());
            metrics::counter!(m::HYDRATIONS).increment(1);
        }
    }

    /// Loads (owner, period) from Postgres into Redis unless another caller already did.
    pub(crate) async fn hydrate(
        &self,
        keys: &OwnerKeys,
        believed: &str,
        period: Period,
    ) -> Result<Hydrated, Fault> {
        let filled = self.hydrator.load(keys, believed, period).await?;
        self.after_load(keys, &filled);
        Ok(filled)
    }

    /// Gives back the consume or track recorded under `key`, once, at every level it counted at;
    /// for a call with items, every item.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn refund(&self, user: Uuid, key: &str) -> Result<Refunded, QuotaError> {
        let mut keys = self.placed(user);
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            match self.store.refund(&keys, key).await? {
                RefundReply::Refunded(item) => {
                    return Ok(Refunded::One(Box::new(self.refunded(user, &keys, item))))
                }
                RefundReply::RefundedItems(items) => {
                    let items = items
                        .into_iter()
                        .map(|item| self.refunded(user, &keys, item))
                        .collect();
                    return Ok(Refunded::Items(items));
                }
                RefundReply::Missing => return Err(QuotaError::UnknownKey(key.to_owned())),
                RefundReply::AlreadyRefunded => {
                    return Err(QuotaError::AlreadyRefunded(key.to_owned()))
                }
                RefundReply::Moved(route) => {
                    keys = self.follow(&keys, &route, &mut hops).await?;
                }
                RefundReply::Hydrate(period, level) => {
                    if let Hydrated::Moved(route) = self.hydrate_level(&keys, level, period).await?
                    {
                        keys = self.follow(&keys, &route, &mut hops).await?;
                    }
                }
            }
        }
        Err(QuotaError::NotLoaded)
    }

    /// A type given back, as the answer shows it; the user's (and the pool's) remembered
    /// refusals go.
    fn refunded(&self, user: Uuid, keys: &UserKeys, item: store::RefundedItem) -> Refund {
        // Other replicas forget on the script's pub/sub message; this one need not wait.
        self.refusals.forget(&user);
        if let Some(a) = keys.account() {
            self.refusals.forget(&a);
        }
        let plans = self.plans.current();
        let plan = plans.effective_plan(item.stored_plan.as_deref()).to_owned();
        let ty = plans.usage_type(&item.usage_type);
        let limit = ty.and_then(|t| t.limit(&plan));
        let cap = ty.map_or(Overage::None, |t| t.overage(&plan));
        let period = item.period;
        let account = match (keys.account(), item.account) {
            (Some(a), Some((pool_used, given, pool_overage))) => {
                Some((a, pool_view(pool_used, period, pool_overage), given))
            }
            _ => None,
        };
        Refund {
            user,
            counter: CounterView::of(item.used, limit, period, cap, item.overage),
            usage_type: item.usage_type,
            amount: item.amount,
            plan,
            account,
        }
    }

    /// Loads one level of `keys` (the user's own counter, or the pool's).
    async fn hydrate_level(
        &self,
        keys: &UserKeys,
        level: Level,
        period: Period,
    ) -> Result<Hydrated, Fault> {
        match (level, keys.pool()) {
            (Level::Account, Some(pool)) => self.hydrate(pool, "", period).await,
            _ => self.hydrate(keys.own(), &keys.route_value(), period).await,
        }
    }

    /// Lowers a lifetime counter by `amount`, never below 0 (a member's pool with it): the plan,
    /// the counter after it, how much was actually lowered, and for a member the pool's part.
    #[tracing::instrument(skip_all, fields(user = %user, r#type = %usage_type))]
    pub async fn release(
        &self,
        user: Uuid,
        usage_type: &str,
        amount: u64,
    ) -> Result<Release, QuotaError> {
        let plans = self.plans.current();
        let ty = known_type(&plans, usage_type)?;
        if ty.period != PeriodKind::Lifetime {
            return Err(QuotaError::NotALifetimeType(usage_type.to_owned()));
        }
        let mut keys = self.placed(user);
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            match self.store.release(&keys, usage_type, amount).await? {
                ReleaseReply::Released {
                    used,
                    overage,
                    stored_plan,
                    released,
                    account,
                } => {
                    self.refusals.forget(&user);
                    if let Some(a) = keys.account() {
                        self.refusals.forget(&a);
                    }
                    let plan = plans.effective_plan(stored_plan.as_deref()).to_owned();
                    let limit = ty.limit(&plan);
                    let view =
                        CounterView::of(used, limit, Period::Lifetime, ty.overage(&plan), overage);
                    let account = match (keys.account(), account) {
                        (Some(a), Some((pool_used, lowered, pool_overage))) => Some((
                            a,
                            pool_view(pool_used, Period::Lifetime, pool_overage),
                            lowered,
                        )),
                        _ => None,
                    };
                    return Ok(Release {
                        plan,
                        counter: view,
                        released,
                        account,
                    });
                }
                ReleaseReply::Moved(route) => {
                    keys = self.follow(&keys, &route, &mut hops).await?;
                }
                ReleaseReply::Hydrate(level) => {
                    if let Hydrated::Moved(route) =
                        self.hydrate_level(&keys, level, Period::Lifetime).await?
                    {
                        keys = self.follow(&keys, &route, &mut hops).await?;
                    }
                }
            }
        }
        Err(QuotaError::NotLoaded)
    }

    /// The counter hashes of one owner in `periods`, loading those Redis does not hold. `Err`
    /// inside with the route when the owner's counters are not in `keys`' bucket.
    async fn loaded_counters(
        &self,
        keys: &OwnerKeys,
        believed: &str,
        periods: &[Period],
    ) -> Result<Result<Vec<Option<CounterHash>>, String>, Fault> {
        let (mut maps, mut route) = self.store.read_counters(keys, periods).await?;
        for _ in 0..ATTEMPTS {
            if route != believed {
                return Ok(Err(route));
            }
            let missing: Vec<Period> = periods
                .iter()
                .zip(&maps)
                .filter(|(_, m)| m.is_none())
                .map(|(p, _)| *p)
                .collect();
            if missing.is_empty() {
                break;
            }
            // Asked for together, so the loads share one batch (one Postgres statement).
            let filled = futures_util::future::try_join_all(
                missing.iter().map(|p| self.hydrate(keys, believed, *p)),
            )
            .await?;
            if let Some(route) = filled.into_iter().find_map(|f| match f {
                Hydrated::Moved(route) => Some(route),
                _ => None,
            }) {
                return Ok(Err(route));
            }
            (maps, route) = self.store.read_counters(keys, periods).await?;
        }
        Ok(Ok(maps))
    }

    /// An account's pool's counter hashes of `periods`, loading those Redis does not hold.
    pub(crate) async fn pool_counters(
        &self,
        pool: &OwnerKeys,
        periods: &[Period],
    ) -> Result<Vec<Option<CounterHash>>, QuotaError> {
        match self.loaded_counters(pool, "", periods).await? {
            Ok(maps) => Ok(maps),
            // An account's route key is never set: only a hand-made key reads otherwise.
            Err(route) => Err(QuotaError::Redis(StoreError::Unavailable(format!(
                "the account's pool is routed elsewhere ({route:?})"
            )))),
        }
    }

    /// Every configured type's counter for `user`, and the plan in force; for a member, their
    /// account's pool too.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn usage(&self, user: Uuid) -> Result<Usage, QuotaError> {
        let plans = self.plans.current();
        let now = self.clock.now();
        let periods = current_periods(&plans, now);
        let mut keys = self.placed(user);
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            let believed = keys.route_value();
            let maps = match self
                .loaded_counters(keys.own(), &believed, &periods)
                .await?
            {
                Ok(maps) => maps,
                Err(route) => {
                    keys = self.follow(&keys, &route, &mut hops).await?;
                    continue;
                }
            };
            let account = match keys.pool() {
                Some(pool) => {
                    let pool_maps = self.pool_counters(pool, &periods).await?;
                    let (plan, counters) = level_usage(&plans, &periods, &pool_maps, now, false);
                    Some(PoolUsage {
                        account: pool.owner().id(),
                        plan,
                        counters,
                    })
                }
                None => None,
            };
            let (plan, counters) =
                level_usage(&plans, &periods, &maps, now, keys.account().is_some());
            return Ok(Usage {
                user,
                plan,
                counters,
                account,
            });
        }
        Err(QuotaError::NotLoaded)
    }

    /// Stores `plan` for `user` in Postgres, then puts it into the user's live Redis counters so
    /// that the next request on any replica counts under it.
    #[tracing::instrument(skip_all, fields(user = %user, plan = %plan))]
    pub async fn set_plan(&self, user: Uuid, plan: &str) -> Result<UserPlan, QuotaError> {
        let plans = self.plans.current();
        known_plan(&plans, plan)?;
        let owner = Owner::User(user);
        let stored = db::within(self.db_timeout, db::put_plan(&self.db, owner, plan)).await?;
        let written = self
            .put_in_force(owner, Change::Plan(&stored.plan, stored.version))
            .await;
        self.refusals.forget(&user);
        if let Err(e) = written {
            tracing::warn!(error.message = %e, "plan stored in postgres but not in redis");
            return Err(QuotaError::PlanNotInForce(e));
        }
        Ok(UserPlan {
            user,
            plan: stored.plan,
            is_default: false,
            updated_at: Some(stored.updated_at),
        })
    }

    /// Puts `change` (a plan or override change) into the live counters of `owner`: a user's
    /// wherever they live (following the user's route until it lands), an account's in its own
    /// bucket.
    pub(crate) async fn put_in_force(
        &self,
        owner: Owner,
        change: Change<'_>,
    ) -> Result<(), StoreError> {
        let plans = self.plans.current();
        let (periods, adjacent) = in_force(&plans, self.clock.now());
        let mut keys = self.placed(owner.id());
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            let (own, believed) = match owner {
                Owner::User(_) => (keys.own().clone(), keys.route_value()),
                Owner::Account(a) => (self.store.account_keys(a), String::new()),
            };
            let written = self
                .store
                .put_in_force(&own, &believed, change, &periods, &adjacent)
                .await?;
            match (written, owner) {
                (Ok(()), _) => return Ok(()),
                (Err(route), Owner::Account(_)) => {
                    return Err(StoreError::Unavailable(format!(
                        "the account's counters are routed elsewhere ({route:?})"
                    )))
                }
                (Err(route), Owner::User(_)) => {
                    keys = match self.follow(&keys, &route, &mut hops).await {
                        Ok(k) => k,
                        Err(Fault::Redis(e)) => return Err(e),
                        Err(_) => return Err(StoreError::Unavailable("routing failed".into())),
                    }
                }
            }
        }
        Err(StoreError::Unavailable(
            "the user's counters kept moving".into(),
        ))
    }

    /// The plan stored for `user`, or the default.
    pub async fn get_plan(&self, user: Uuid) -> Result<UserPlan, QuotaError> {
        let plans = self.plans.current();
        Ok(
            match db::within(self.db_timeout, db::get_plan(&self.db, Owner::User(user))).await? {
                Some(p) => UserPlan {
                    user,
                    plan: p.plan,
                    is_default: false,
                    updated_at: Some(p.updated_at),
                },
                None => UserPlan {
                    user,
                    plan: plans.default_plan.clone(),
                    is_default: true,
                    updated_at: None,
                },
            },
        )
    }
}

/// A release: the plan, the counter after it, how much was lowered, and for a member the account,
/// its pool after it and how much the pool was lowered.
#[derive(Debug, Clone)]
pub struct Release {
    /// The plan in force.
    pub plan: String,
    /// The user's counter after the release.
    pub counter: CounterView,
    /// How much was lowered.
    pub released: u64,
    /// For a member: the account, its pool after the release, and how much it was lowered.
    pub account: Option<(Uuid, CounterView, u64)>,
}

/// An account's pool after a refund or release: its count and overage (its limit is not read).
fn pool_view(used: u64, period: Period, overage: u64) -> CounterView {
    CounterView {
        used: Some(used),
        limit: None,
        unlimited: false,
        period,
        overage_cap: Overage::None,
        overage: Some(overage),
        held: None,
    }
}

/// What loading a call's missing counters gave.
pub(crate) enum Reloaded {
    /// The call's reply, sent right after the load.
    Answer(Result<redis::Value, StoreError>),
    /// The counters live elsewhere: the route.
    Moved(String),
    /// Loaded; send the call again.
    Again,
}

/// Every configured type's counter at one level, from that level's hashes of `periods`: the plan
/// in force and the counters. `member` is the user's level of a member of an account: a type
/// without an override is limited there only when the user has a plan of their own.
pub(crate) fn level_usage(
    plans: &Plans,
    periods: &[Period],
    maps: &[Option<CounterHash>],
    now: DateTime<Utc>,
    member: bool,
) -> (String, BTreeMap<String, TypeUsage>) {
    // Every hash carries the plan; the one written by the newest plan change wins.
    let stored = maps
        .iter()
        .flatten()
        .filter_map(|h| h.plan.as_ref())
        .max_by_key(|(_, pv)| *pv)
        .map(|(p, _)| p.as_str());
    let plan = plans.effective_plan(stored).to_owned();
    let counters = plans
        .types
        .values()
        .map(|ty| {
            let period = Period::current(ty.period, now);
            let hash = periods
                .iter()
                .position(|p| *p == period)
                .and_then(|i| maps[i].as_ref());
            let used = hash.map_or(0, |h| h.count(&ty.name).max(0) as u64);
            let overage = hash.map_or(0, |h| h.overage(&ty.name).max(0) as u64);
            let held = hash.map_or(0, |h| h.held(&ty.name).max(0) as u64);
            // The plan's overage applies on top of an override too (as the scripts decide).
            let (limit, source) = match hash.and_then(|h| h.limit_override(&ty.name)) {
                Some(o) => (u64::try_from(o).ok(), LimitSource::Override),
                None if member && stored.is_none() => (None, LimitSource::Account),
                None => (ty.limit(&plan), LimitSource::Plan),
            };
            (
                ty.name.clone(),
                TypeUsage {
                    period: ty.period,
                    counter: CounterView::of(used, limit, period, ty.overage(&plan), overage)
                        .with_held(held),
                    source,
                },
            )
        })
        .collect();
    (plan, counters)
}

/// The periods in force at `now` (created in Redis when missing), and the months either side of
/// the current one (written only where they exist: another replica's clock, or this one's a
/// moment later, may already be past midnight).
pub(crate) fn in_force(plans: &Plans, now: DateTime<Utc>) -> (Vec<Period>, Vec<Period>) {
    let periods = current_periods(plans, now);
    let adjacent: Vec<Period> = periods
        .iter()
        .filter_map(|p| Some([p.previous()?, Period::current(PeriodKind::Month, p.end()?)]))
        .flatten()
        .collect();
    (periods, adjacent)
}

/// Whether a decision may be answered from, and kept in, the refusal cache.
fn cacheable(action: Action, input: &DecisionInput<'_>) -> bool {
    matches!(action, Action::Consume | Action::Check) && input.idempotency_key.is_none()
}

fn subject<'a>(
    input: &'a DecisionInput<'_>,
    ty: &'a UsageType,
    period: Period,
    account: Option<Uuid>,
) -> Subject<'a> {
    Subject {
        user: input.user,
        usage_type: &ty.name,
        period,
        plan_override: input.plan.as_deref(),
        account,
    }
}

/// The configured type named `name`.
pub fn known_type<'a>(plans: &'a Plans, name: &str) -> Result<&'a UsageType, QuotaError> {
    plans
        .usage_type(name)
        .ok_or_else(|| QuotaError::UnknownType {
            name: name.to_owned(),
            known: plans.types.keys().cloned().collect(),
        })
}

/// `plan`, if it is configured.
pub fn known_plan(plans: &Plans, plan: &str) -> Result<(), QuotaError> {
    if plans.has_plan(plan) {
        return Ok(());
    }
    Err(QuotaError::UnknownPlan {
        name: plan.to_owned(),
        known: plans.plan_names.clone(),
    })
}

/// The distinct periods in force at `now` for the configured types.
pub(crate) fn current_periods(plans: &Plans, now: DateTime<Utc>) -> Vec<Period> {
    let mut periods: Vec<Period> = Vec::with_capacity(2);
    for ty in plans.types.values() {
        let p = Period::current(ty.period, now);
        if !periods.contains(&p) {
            periods.push(p);
        }
    }
    periods
}
