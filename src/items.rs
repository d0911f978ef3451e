//! Calls with items: one consume (or check, or track) for several usage types, all or nothing.
//! An export that also costs 5 AI generations is allowed only if both fit, and then both are
//! counted in one atomic step: one Redis script (`lua/consume_many.lua`), one round trip, one
//! idempotency record for the whole call. A refused consume counts nothing and names every item
//! that did not fit.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::metrics as m;
use crate::period::Period;
use crate::plans::{FailPolicy, Plans, UsageType};
use crate::quota::{Action, Decision, Fault, Quota, QuotaError, ATTEMPTS};
use crate::routes::Hops;
use crate::store::{self, Item, ItemsCall, ItemsMode, ItemsReply, Status, StoreError};

/// Most items one call may carry (each type at most once).
pub const MAX_ITEMS: usize = 32;

/// One item of a call: a configured type and its amount.
#[derive(Debug, Clone)]
pub struct ItemInput<'p> {
    /// The usage type, resolved from the plans the call was validated against.
    pub usage_type: &'p UsageType,
    /// How much, 1..=1,000,000.
    pub amount: u64,
}

/// A validated call with items: each type at most once.
#[derive(Debug, Clone)]
pub struct ItemsInput<'p> {
    /// The user.
    pub user: Uuid,
    /// The items, in the order the caller sent them.
    pub items: Vec<ItemInput<'p>>,
    /// Makes a retried call count once, as a whole.
    pub idempotency_key: Option<String>,
    /// A plan the caller vouches for, overriding the stored one for every item.
    pub plan: Option<String>,
}

/// The decision on a call with items.
#[derive(Debug, Clone)]
pub struct ItemsDecision {
    /// Every item fits (consume: every item counted; track: always).
    pub allowed: bool,
    /// The answer of an earlier call with the same idempotency key; nothing counted now.
    pub replayed: bool,
    /// Redis could not answer and every item's type fails open: allowed, nothing counted.
    pub degraded: bool,
    /// The user.
    pub user: Uuid,
    /// Each item's decision, in the order sent: `allowed` says whether the item fits.
    pub items: Vec<Decision>,
}

impl ItemsDecision {
    /// The items that did not fit.
    pub fn refused(&self) -> impl Iterator<Item = &Decision> {
        self.items.iter().filter(|d| !d.allowed)
    }
}

impl Quota {
    /// Consume, check or track every item of `input` in one atomic step, under `plans` (the
    /// snapshot the input was validated against).
    #[tracing::instrument(skip_all, fields(user = %input.user, items = input.items.len(), action = action.label()))]
    pub async fn decide_items(
        &self,
        action: Action,
        input: &ItemsInput<'_>,
        plans: &Plans,
    ) -> Result<ItemsDecision, QuotaError> {
        let now = self.clock.now();
        // Sent sorted by type, so the same items in another order are the same call (one
        // idempotency record); answered in the order the caller sent them.
        let mut order: Vec<usize> = (0..input.items.len()).collect();
        order.sort_by(|a, b| {
            input.items[*a]
                .usage_type
                .name
                .cmp(&input.items[*b].usage_type.name)
        });
        let sent: Vec<Item<'_>> = order
            .iter()
            .map(|i| {
                let item = &input.items[*i];
                Item {
                    usage_type: item.usage_type,
                    amount: item.amount,
                    period: Period::current(item.usage_type.period, now),
                }
            })
            .collect();
        let mode = match action {
            Action::Consume => ItemsMode::Consume,
            Action::Check => ItemsMode::Check,
            Action::Track => ItemsMode::Track,
        };
        let started = std::time::Instant::now();
        let result = self.items_in(mode, input, &sent, plans).await;
        metrics::histogram!(m::REDIS_SCRIPT_SECONDS, "script" => "items").record(started.elapsed());
        let (reply, account) = match result {
            Ok(answered) => answered,
            Err(fault) => {
                let decision = Self::items_fail_policy(fault, input, &sent, now, action)?;
                m::items_call(action.label(), "degraded");
                return Ok(decision);
            }
        };
        let replayed = reply.status == Status::Replay;
        let allowed = reply.status != Status::Denied;
        let mut items: Vec<Option<Decision>> = vec![None; sent.len()];
        for ((i, item), r) in order.iter().zip(&sent).zip(reply.items) {
            let period = r.period.unwrap_or(item.period);
            let mut d = Decision::from_reply(r, account, input.user, item.usage_type, period, now);
            d.replayed = replayed;
            items[*i] = Some(d);
        }
        let items: Vec<Decision> = items.into_iter().flatten().collect();
        let outcome = if allowed { "allowed" } else { "denied" };
        for d in &items {
            d.record(action, outcome);
        }
        m::items_call(action.label(), outcome);
        Ok(ItemsDecision {
            allowed,
            replayed,
            degraded: false,
            user: input.user,
            items,
        })
    }

    /// Runs the call until it has an answer: following the user's route, loading the counters
    /// the script names missing. Returns the answer and the account it was made under.
    async fn items_in(
        &self,
        mode: ItemsMode,
        input: &ItemsInput<'_>,
        sent: &[Item<'_>],
        plans: &Plans,
    ) -> Result<(ItemsReply, Option<Uuid>), Fault> {
        let periods = store::periods_of(sent);
        let mut keys = self.placed(input.user);
        let mut hops = Hops::default();
        for _ in 0..ATTEMPTS {
            let reply = self
                .store
                .run_items(&ItemsCall {
                    mode,
                    keys: &keys,
                    items: sent,
                    plan_override: input.plan.as_deref(),
                    default_plan: &plans.default_plan,
                    idempotency_key: input.idempotency_key.as_deref(),
                })
                .await?;
            match reply.status {
                Status::Moved => keys = self.follow(&keys, &reply.detail, &mut hops).await?,
                Status::Hydrate => {
                    let believed = keys.route_value();
                    let loads = reply.detail.split_whitespace().map(|token| {
                        let (index, level) = token.split_once(':').unwrap_or((token, "user"));
                        let index: usize = index.parse().unwrap_or(1);
                        let period = periods[index.clamp(1, periods.len()) - 1];
                        match (level, keys.pool()) {
                            ("account", Some(pool)) => self.hydrate(pool, "", period),
                            _ => self.hydrate(keys.own(), &believed, period),
                        }
                    });
                    let filled = futures_util::future::try_join_all(loads).await?;
                    if let Some(route) = filled.into_iter().find_map(|f| match f {
                        store::Hydrated::Moved(route) => Some(route),
                        _ => None,
                    }) {
                        keys = self.follow(&keys, &route, &mut hops).await?;
                    }
                }
                Status::Conflict => return Err(Fault::Answer(QuotaError::KeyReused)),
                Status::Refunded => return Err(Fault::Answer(QuotaError::KeyRefunded)),
                Status::Ok | Status::Denied | Status::Replay => return Ok((reply, keys.account())),
                Status::MetaLimit | Status::MetaSum => {
                    return Err(Fault::Redis(StoreError::Unavailable(format!(
                        "the items script answered {:?}",
                        reply.status
                    ))))
                }
            }
        }
        Err(Fault::Redis(StoreError::Unavailable(
            "the counters vanished while they were being loaded".into(),
        )))
    }

    /// For an outage: the degraded answer when every item's type fails open (allowed, nothing
    /// counted); else the fault, as the fail-closed types among them demand.
    fn items_fail_policy(
        fault: Fault,
        input: &ItemsInput<'_>,
        sent: &[Item<'_>],
        now: DateTime<Utc>,
        action: Action,
    ) -> Result<ItemsDecision, QuotaError> {
        let open = sent.iter().all(|i| i.usage_type.fail == FailPolicy::Open);
        if !(fault.is_outage() && open) {
            for item in sent {
                m::decision(&item.usage_type.name, "", "error");
            }
            m::items_call(action.label(), "error");
            return Err(fault.into());
        }
        tracing::warn!(error.message = %QuotaError::from(fault), "redis or postgres unavailable; every item fails open");
        let items = input
            .items
            .iter()
            .map(|item| {
                let ty = item.usage_type;
                m::decision(&ty.name, input.plan.as_deref().unwrap_or(""), "degraded");
                Decision::degraded(
                    input.user,
                    ty,
                    input.plan.clone(),
                    Period::current(ty.period, now),
                    now,
                )
            })
            .collect();
        Ok(ItemsDecision {
            allowed: true,
            replayed: false,
            degraded: true,
            user: input.user,
            items,
        })
    }
}
