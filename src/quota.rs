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
use crate::plans::{FailPolicy, PlanBook, Plans, PlansError, UsageType};
use crate::refusals::{Refusals, Subject};
use crate::store::{
    self, CountCall, MetaValue, Mode, RedisStore, RefundReply, Reply, Status, StoreError, UserKeys,
};

/// How often a call is re-run after loading its counter before it gives up. Two suffice unless
/// the counter is deleted again between the load and the re-run.
const HYDRATE_ATTEMPTS: usize = 3;

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
    fn label(self) -> &'static str {
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
}

impl CounterView {
    /// What is left: `None` when unlimited or unknown.
    pub fn remaining(&self) -> Option<u64> {
        Some(self.limit?.saturating_sub(self.used?))
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
}

/// Every configured type's counter for one user.
#[derive(Debug, Clone)]
pub struct Usage {
    /// The user.
    pub user: Uuid,
    /// The plan in force.
    pub plan: String,
    /// Counters by type name.
    pub counters: BTreeMap<String, (PeriodKind, CounterView)>,
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
enum Fault {
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
    fn is_outage(&self) -> bool {
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
        let remembered = self.remembered_refusal(action, input, plans, ty, period, now);
        let decision = if let Some(refused) = remembered {
            metrics::counter!(m::REFUSAL_CACHE_HITS, "type" => ty.name.clone()).increment(1);
            refused
        } else {
            let started = std::time::Instant::now();
            let result = self.decide_in(action, input, plans, ty, period, now).await;
            metrics::histogram!(m::REDIS_SCRIPT_SECONDS, "script" => action.label())
                .record(started.elapsed());
            Self::or_fail_policy(result, input, ty, period, now)?
        };
        let outcome = match (decision.degraded, decision.allowed) {
            (true, _) => "degraded",
            (false, true) => "allowed",
            (false, false) => "denied",
        };
        let plan = decision.plan.as_deref().unwrap_or("");
        m::decision(&ty.name, plan, outcome);
        // Near the limit: 80 % or more used after this decision (a signal to nudge an upgrade).
        if let (Some(used), Some(limit)) = (decision.counter.used, decision.counter.limit) {
            if limit > 0 && used * 5 >= limit * 4 {
                m::near_limit(&ty.name, plan);
            }
        }
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
                Decision {
                    allowed: true,
                    replayed: false,
                    degraded: true,
                    user: input.user,
                    usage_type: ty.name.clone(),
                    plan: input.plan.clone(),
                    counter: CounterView {
                        used: None,
                        limit: None,
                        unlimited: false,
                        period,
                    },
                    now,
                }
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
        plans: &Plans,
        ty: &UsageType,
        period: Period,
        now: DateTime<Utc>,
    ) -> Option<Decision> {
        if !cacheable(action, input) {
            return None;
        }
        let seen = self.refusals.lookup(&subject(input, ty, period))?;
        // The limit in force now, not the one refused under: a raised limit counts at once.
        let plan = plans.effective_plan(Some(&seen.plan));
        let limit = ty.limit(plan)?;
        if seen.used + input.amount <= limit {
            return None;
        }
        Some(Decision {
            allowed: false,
            replayed: false,
            degraded: false,
            user: input.user,
            usage_type: ty.name.clone(),
            plan: Some(plan.to_owned()),
            counter: CounterView {
                used: Some(seen.used),
                limit: Some(limit),
                unlimited: false,
                period,
            },
            now,
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
        ty: &UsageType,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<Decision, Fault> {
        let cacheable = cacheable(action, input);
        let keys = self.store.keys(input.user);
        // The call, as its script's invocation and the reading of its reply.
        let invocation = || match action {
            Action::Check => self.store.check_invocation(
                &keys,
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
                keys: &keys,
                usage_type: ty,
                amount: input.amount,
                period,
                plan_override: input.plan.as_deref(),
                default_plan: &plans.default_plan,
                idempotency_key: input.idempotency_key.as_deref(),
                metadata: &input.metadata,
            }),
        };
        let read = |raw| match action {
            Action::Check => store::check_reply(raw, period),
            Action::Consume | Action::Track => store::count_reply(raw),
        };
        // The refusal cache's ticket, taken before each send whose answer may be remembered.
        let new_ticket = || cacheable.then(|| self.refusals.ticket()).flatten();
        // A reply that came back with a load (the call sent again right after the fill, in the
        // same pipeline), with the ticket taken before it was sent.
        let mut answered: Option<(Option<u64>, Reply)> = None;
        for _ in 0..HYDRATE_ATTEMPTS {
            let (ticket, reply) = match answered.take() {
                Some(answered) => answered,
                None => (
                    new_ticket(),
                    read(self.store.run(&mut invocation()).await?)?,
                ),
            };
            if reply.status == Status::Hydrate {
                let ticket = new_ticket();
                if let Some(raw) = self.hydrate_then(&keys, period, invocation()).await? {
                    answered = Some((ticket, read(raw?)?));
                }
                continue;
            }
            if reply.status == Status::MetaLimit {
                return Err(Fault::Answer(QuotaError::TooManyMetadataNames));
            }
            if reply.status == Status::MetaSum {
                return Err(Fault::Answer(QuotaError::MetadataSumTooLarge(reply.detail)));
            }
            if reply.status == Status::Refunded {
                return Err(Fault::Answer(QuotaError::KeyRefunded));
            }
            if reply.status == Status::Conflict {
                return Err(Fault::Answer(QuotaError::KeyReused));
            }
            if let (Some(ticket), Status::Denied) = (ticket, reply.status) {
                self.refusals.remember(
                    ticket,
                    &subject(input, ty, period),
                    &reply.plan,
                    reply.used,
                );
            }
            return Ok(Decision {
                allowed: reply.status != Status::Denied,
                replayed: reply.status == Status::Replay,
                degraded: false,
                user: input.user,
                usage_type: ty.name.clone(),
                plan: Some(reply.plan),
                counter: CounterView {
                    used: Some(reply.used),
                    limit: reply.limit,
                    unlimited: reply.limit.is_none(),
                    period: reply.period.unwrap_or(period),
                },
                now,
            });
        }
        Err(Fault::Redis(StoreError::Unavailable(
            "the counter vanished while it was being loaded".into(),
        )))
    }

    /// Loads (user, period) from Postgres into Redis unless another caller already did.
    async fn hydrate(&self, keys: &UserKeys, period: Period) -> Result<(), Fault> {
        self.hydrate_then(keys, period, None).await.map(|_| ())
    }

    /// [`Self::hydrate`], then `follow_up` (unarmed) right after the fill in the same Redis
    /// pipeline: its reply, or `None` when it was not run (send it again).
    async fn hydrate_then(
        &self,
        keys: &UserKeys,
        period: Period,
        follow_up: impl Into<Option<ScriptInvocation<'static>>>,
    ) -> Result<Option<Result<redis::Value, StoreError>>, Fault> {
        let loaded = self
            .hydrator
            .load_then(keys, period, follow_up.into())
            .await?;
        if loaded.filled {
            self.refusals.forget(&keys.user());
            metrics::counter!(m::HYDRATIONS).increment(1);
        }
        Ok(loaded.follow_up)
    }

    /// Gives back the consume or track recorded under `key`, once.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn refund(&self, user: Uuid, key: &str) -> Result<Refund, QuotaError> {
        let keys = self.store.keys(user);
        for _ in 0..HYDRATE_ATTEMPTS {
            match self.store.refund(&keys, key).await? {
                RefundReply::Refunded {
                    used,
                    stored_plan,
                    usage_type,
                    amount,
                    period,
                } => {
                    // Other replicas forget on the script's pub/sub message; this one need not wait.
                    self.refusals.forget(&user);
                    let plans = self.plans.current();
                    let plan = plans.effective_plan(stored_plan.as_deref()).to_owned();
                    let limit = plans.usage_type(&usage_type).and_then(|t| t.limit(&plan));
                    return Ok(Refund {
                        user,
                        counter: CounterView {
                            used: Some(used),
                            limit,
                            unlimited: limit.is_none(),
                            period,
                        },
                        usage_type,
                        amount,
                        plan,
                    });
                }
                RefundReply::Missing => return Err(QuotaError::UnknownKey(key.to_owned())),
                RefundReply::AlreadyRefunded => {
                    return Err(QuotaError::AlreadyRefunded(key.to_owned()))
                }
                RefundReply::Hydrate(period) => self.hydrate(&keys, period).await?,
            }
        }
        Err(QuotaError::NotLoaded)
    }

    /// Lowers a lifetime counter by `amount`, never below 0: the plan, the counter after it, and
    /// how much was actually lowered.
    #[tracing::instrument(skip_all, fields(user = %user, r#type = %usage_type))]
    pub async fn release(
        &self,
        user: Uuid,
        usage_type: &str,
        amount: u64,
    ) -> Result<(String, CounterView, u64), QuotaError> {
        let plans = self.plans.current();
        let ty = known_type(&plans, usage_type)?;
        if ty.period != PeriodKind::Lifetime {
            return Err(QuotaError::NotALifetimeType(usage_type.to_owned()));
        }
        let keys = self.store.keys(user);
        for _ in 0..HYDRATE_ATTEMPTS {
            match self.store.release(&keys, usage_type, amount).await? {
                Some((used, stored, released)) => {
                    self.refusals.forget(&user);
                    let plan = plans.effective_plan(stored.as_deref()).to_owned();
                    let limit = ty.limit(&plan);
                    let view = CounterView {
                        used: Some(used),
                        limit,
                        unlimited: limit.is_none(),
                        period: Period::Lifetime,
                    };
                    return Ok((plan, view, released));
                }
                None => self.hydrate(&keys, Period::Lifetime).await?,
            }
        }
        Err(QuotaError::NotLoaded)
    }

    /// Every configured type's counter for `user`, and the plan in force.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn usage(&self, user: Uuid) -> Result<Usage, QuotaError> {
        let plans = self.plans.current();
        let now = self.clock.now();
        let periods = current_periods(&plans, now);
        let keys = self.store.keys(user);
        let mut maps = self.store.read_counters(&keys, &periods).await?;
        for _ in 0..HYDRATE_ATTEMPTS {
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
            futures_util::future::try_join_all(missing.iter().map(|p| self.hydrate(&keys, *p)))
                .await?;
            maps = self.store.read_counters(&keys, &periods).await?;
        }
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
                let idx = periods
                    .iter()
                    .position(|p| *p == period)
                    .expect("period listed");
                let used = maps[idx]
                    .as_ref()
                    .map_or(0, |h| h.count(&ty.name).max(0) as u64);
                let limit = ty.limit(&plan);
                (
                    ty.name.clone(),
                    (
                        ty.period,
                        CounterView {
                            used: Some(used),
                            limit,
                            unlimited: limit.is_none(),
                            period,
                        },
                    ),
                )
            })
            .collect();
        Ok(Usage {
            user,
            plan,
            counters,
        })
    }

    /// Stores `plan` for `user` in Postgres, then puts it into the user's live Redis counters so
    /// that the next request on any replica counts under it.
    #[tracing::instrument(skip_all, fields(user = %user, plan = %plan))]
    pub async fn set_plan(&self, user: Uuid, plan: &str) -> Result<UserPlan, QuotaError> {
        let plans = self.plans.current();
        known_plan(&plans, plan)?;
        let stored = db::within(self.db_timeout, db::put_plan(&self.db, user, plan)).await?;
        let periods = current_periods(&plans, self.clock.now());
        // The months either side of the current one, where they exist: another replica's clock
        // (or this one's a moment later) may already be past midnight.
        let adjacent: Vec<Period> = periods
            .iter()
            .filter_map(|p| Some([p.previous()?, Period::current(PeriodKind::Month, p.end()?)]))
            .flatten()
            .collect();
        let written = self
            .store
            .set_plan(
                &self.store.keys(user),
                &stored.plan,
                stored.version,
                &periods,
                &adjacent,
            )
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

    /// The plan stored for `user`, or the default.
    pub async fn get_plan(&self, user: Uuid) -> Result<UserPlan, QuotaError> {
        let plans = self.plans.current();
        Ok(
            match db::within(self.db_timeout, db::get_plan(&self.db, user)).await? {
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

/// Whether a decision may be answered from, and kept in, the refusal cache.
fn cacheable(action: Action, input: &DecisionInput<'_>) -> bool {
    matches!(action, Action::Consume | Action::Check) && input.idempotency_key.is_none()
}

fn subject<'a>(input: &'a DecisionInput<'_>, ty: &'a UsageType, period: Period) -> Subject<'a> {
    Subject {
        user: input.user,
        usage_type: &ty.name,
        period,
        plan_override: input.plan.as_deref(),
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
fn current_periods(plans: &Plans, now: DateTime<Utc>) -> Vec<Period> {
    let mut periods: Vec<Period> = Vec::with_capacity(2);
    for ty in plans.types.values() {
        let p = Period::current(ty.period, now);
        if !periods.contains(&p) {
            periods.push(p);
        }
    }
    periods
}
