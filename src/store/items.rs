//! Several usage types in one call, all or nothing (`lua/consume_many.lua`), and the refund that
//! gives every item of such a call back (`lua/refund_many.lua`).

use deadpool_redis::redis::{self, RedisError, ScriptInvocation};

use super::{
    decision_reply, scripts, Level, RedisStore, RefundReply, RefundedItem, Reply, Status,
    StoreError, UserKeys, IDEMPOTENCY_TTL_SECS, SKEW_MARGIN_MS,
};
use crate::period::Period;
use crate::plans::UsageType;

/// What a call with items asks: the same three decisions as one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemsMode {
    /// Every item counted if every item fits, else none.
    Consume,
    /// Consume's decision, nothing written.
    Check,
    /// Every item counted regardless of limits.
    Track,
}

impl ItemsMode {
    /// The mode as the script (and the idempotency record, `multi:<mode>`) names it.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemsMode::Consume => "consume",
            ItemsMode::Check => "check",
            ItemsMode::Track => "track",
        }
    }
}

/// One item of a call: a type, its amount and the period it counts in.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// The usage type and its plan limits.
    pub usage_type: &'a UsageType,
    /// How much, a whole number > 0.
    pub amount: u64,
    /// The period the type counts in now.
    pub period: Period,
}

/// A call with items, as sent: each type at most once (the caller's check), in the order the
/// idempotency record keeps them.
#[derive(Debug)]
pub struct ItemsCall<'a> {
    /// Consume, check or track.
    pub mode: ItemsMode,
    /// The user's keys.
    pub keys: &'a UserKeys,
    /// The items.
    pub items: &'a [Item<'a>],
    /// A caller-supplied plan, overriding the stored one.
    pub plan_override: Option<&'a str>,
    /// The default plan.
    pub default_plan: &'a str,
    /// The idempotency key, if any.
    pub idempotency_key: Option<&'a str>,
}

/// The answer of a call with items.
#[derive(Debug, Clone)]
pub struct ItemsReply {
    /// Ok (every item counted, or for check would be), Denied (some item does not fit; nothing
    /// counted), Replay, Conflict, Refunded, Hydrate or Moved.
    pub status: Status,
    /// For Hydrate, the counters to load ("<period index>:user", "<period index>:account",
    /// space-separated, 1-based into [`periods_of`]); for Moved, the route.
    pub detail: String,
    /// Per item, in the order sent: its decision ([`Status::Ok`]: fits, [`Status::Denied`]: does
    /// not, with the level that ran out). Empty unless the status is Ok, Denied or Replay.
    pub items: Vec<Reply>,
}

/// The distinct periods of `items`, in the order they first appear: the periods the script reads.
pub fn periods_of(items: &[Item<'_>]) -> Vec<Period> {
    let mut periods: Vec<Period> = Vec::with_capacity(2);
    for item in items {
        if !periods.contains(&item.period) {
            periods.push(item.period);
        }
    }
    periods
}

/// The items as the idempotency record keeps them: `<type>:<amount>,…`.
fn signature(items: &[Item<'_>]) -> String {
    items
        .iter()
        .map(|i| format!("{}:{}", i.usage_type.name, i.amount))
        .collect::<Vec<_>>()
        .join(",")
}

impl RedisStore {
    /// The invocation of `lua/consume_many.lua` for `call`.
    pub fn items_invocation(&self, call: &ItemsCall<'_>) -> ScriptInvocation<'static> {
        let keys = call.keys;
        let periods = periods_of(call.items);
        let mut inv = scripts::CONSUME_MANY.prepare_invoke();
        inv.key(keys.dirty()).key(keys.since()).key(keys.route());
        for period in &periods {
            let prev = period.previous().unwrap_or(*period);
            inv.key(keys.counter(*period)).key(keys.counter(prev));
            if let Some(pool) = keys.pool() {
                inv.key(pool.counter(*period)).key(pool.counter(prev));
            }
        }
        if let Some(k) = call.idempotency_key {
            inv.key(keys.idempotency(k)).key(keys.idempotency_index());
        }
        inv.arg(call.mode.as_str())
            .arg(call.default_plan)
            .arg(call.plan_override.unwrap_or(""))
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(keys.route_value())
            .arg(SKEW_MARGIN_MS)
            .arg(periods.len())
            .arg(call.items.len())
            .arg(signature(call.items))
            .arg(if call.idempotency_key.is_some() {
                "1"
            } else {
                "0"
            });
        for period in &periods {
            let (_, [month_start, _, expire_at]) = Self::fresh_start(keys.own(), *period);
            inv.arg(period.id())
                .arg(keys.member(*period))
                .arg(keys.pool().map(|p| p.member(*period)).unwrap_or_default())
                .arg(month_start)
                .arg(expire_at);
        }
        for item in call.items {
            let index = periods.iter().position(|p| *p == item.period).unwrap_or(0) + 1;
            let ty = item.usage_type;
            inv.arg(&ty.name)
                .arg(item.amount)
                .arg(index)
                .arg(&ty.script_notify)
                .arg(ty.script_limits.len())
                .arg(&ty.script_limits);
        }
        inv
    }

    /// Gives back every item of the call with items recorded at `idem`, whose periods the record
    /// lists as `periods` (read just before): see `lua/refund_many.lua`.
    pub(super) async fn refund_items(
        &self,
        keys: &UserKeys,
        idem: String,
        periods: &str,
    ) -> Result<RefundReply, StoreError> {
        let parsed: Option<Vec<Period>> = periods.split(',').map(Period::parse_id).collect();
        let Some(parsed) = parsed.filter(|p| !p.is_empty()) else {
            return Ok(RefundReply::Missing);
        };
        let mut inv = scripts::REFUND_MANY.prepare_invoke();
        inv.key(idem).key(keys.dirty()).key(keys.route());
        for period in &parsed {
            inv.key(keys.counter(*period));
            if let Some(pool) = keys.pool() {
                inv.key(pool.counter(*period));
            }
        }
        inv.arg(periods)
            .arg(self.changes_channel())
            .arg(keys.user().to_string())
            .arg(keys.route_value());
        for period in &parsed {
            inv.arg(keys.member(*period))
                .arg(keys.pool().map(|p| p.member(*period)).unwrap_or_default());
        }
        let bad = |e: redis::ParsingError| StoreError::Redis(e.into());
        let mut fields: Vec<redis::Value> =
            redis::from_redis_value(self.run_script(&mut inv).await?).map_err(bad)?;
        if fields.len() < 2 || !(fields.len() - 2).is_multiple_of(9) {
            return Err(malformed(fields.len()));
        }
        let rest = fields.split_off(2);
        let (status, detail): (String, String) =
            redis::from_redis_value(redis::Value::Array(fields)).map_err(bad)?;
        let at = |detail: &str| {
            let (index, level) = detail.split_once(':').unwrap_or(("1", "user"));
            let index: usize = index.parse().unwrap_or(1);
            let period = parsed[index.clamp(1, parsed.len()) - 1];
            let level = if level == "account" {
                Level::Account
            } else {
                Level::User
            };
            (period, level)
        };
        Ok(match status.as_str() {
            "ok" => {
                let mut items = Vec::with_capacity(rest.len() / 9);
                for chunk in rest.chunks(9) {
                    #[allow(clippy::type_complexity)]
                    let (
                        (usage_type, given, used, overage, period),
                        (pool_given, pool_used, pool_overage, plan),
                    ): (
                        (String, i64, i64, i64, String),
                        (i64, i64, i64, String),
                    ) = super::split_reply(redis::Value::Array(chunk.to_vec()), 5)?;
                    let Some(period) = Period::parse_id(&period) else {
                        return Err(malformed(chunk.len()));
                    };
                    items.push(RefundedItem::from_script(
                        usage_type,
                        period,
                        plan,
                        (used, given, overage),
                        (detail == "pool").then_some((pool_used, pool_given, pool_overage)),
                    ));
                }
                RefundReply::RefundedItems(items)
            }
            "refunded" => RefundReply::AlreadyRefunded,
            "hydrate" => {
                let (period, level) = at(&detail);
                RefundReply::Hydrate(period, level)
            }
            "moved" => RefundReply::Moved(detail),
            _ => RefundReply::Missing,
        })
    }

    /// Runs a call with items: one EVALSHA (with replicas to wait for, answered once they hold
    /// what it counted, as a consume is; see [`Self::run`]).
    pub async fn run_items(&self, call: &ItemsCall<'_>) -> Result<ItemsReply, StoreError> {
        let mut inv = self.items_invocation(call);
        let raw = self.run(&mut inv, call.mode != ItemsMode::Check).await?;
        items_reply(raw, call.items)
    }
}

/// The script's reply as an [`ItemsReply`]: status, detail, then twenty fields per item.
fn items_reply(raw: redis::Value, items: &[Item<'_>]) -> Result<ItemsReply, StoreError> {
    let bad = |e: redis::ParsingError| StoreError::Redis(e.into());
    let mut fields: Vec<redis::Value> = redis::from_redis_value(raw).map_err(bad)?;
    if fields.len() < 2 {
        return Err(malformed(fields.len()));
    }
    let rest = fields.split_off(2);
    let (status, detail): (String, String) =
        redis::from_redis_value(redis::Value::Array(fields)).map_err(bad)?;
    let status = Status::parse(&status);
    let mut replies = Vec::with_capacity(items.len());
    if matches!(status, Status::Ok | Status::Denied | Status::Replay) {
        if rest.len() != items.len() * 20 {
            return Err(malformed(rest.len() + 2));
        }
        for (chunk, item) in rest.chunks(20).zip(items) {
            replies.push(decision_reply(
                redis::Value::Array(chunk.to_vec()),
                item.period,
            )?);
        }
    }
    Ok(ItemsReply {
        status,
        detail,
        items: replies,
    })
}

fn malformed(n: usize) -> StoreError {
    StoreError::Redis(RedisError::from(std::io::Error::other(format!(
        "the items script answered {n} fields"
    ))))
}
