//! Usage events: what quotad tells the product when a user's usage crosses a threshold.
//!
//! The consume script records a threshold event in the user's counter hash in the same atomic
//! step as the count that crossed it (see `record_thresholds` in `lua/common.lua`); the flusher
//! writes it to Postgres' outbox (`usage_events`, with one `event_deliveries` row per webhook
//! endpoint) in the same statement as the counter's totals; the dispatcher
//! ([`crate::webhooks`]) delivers it. An event's id is derived from what it is about (user, type,
//! period, threshold, limit), never from when or where it was recorded: a script that records it
//! again (a Redis that lost the hash and loaded it back from Postgres) makes the same id, and the
//! outbox keeps the first.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::period::Period;
use crate::store::counter::Fired;

/// The event type of a threshold crossing.
pub const THRESHOLD: &str = "usage.threshold";

/// One threshold event, as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThresholdEvent {
    /// Stable id: `evt_` and 32 hex digits (see [`ThresholdEvent::id_of`]).
    pub id: String,
    /// The user.
    pub user: Uuid,
    /// The usage type.
    pub usage_type: String,
    /// The threshold, in percent of the limit.
    pub threshold: i32,
    /// The count the crossing call reached.
    pub used: i64,
    /// The limit in force then.
    pub limit: i64,
    /// The plan in force then.
    pub plan: String,
    /// The period counted in.
    pub period_start: DateTime<Utc>,
    /// Its end (`None` for lifetime counters).
    pub period_end: Option<DateTime<Utc>>,
    /// When the crossing call was counted (Redis' clock).
    pub occurred_at: DateTime<Utc>,
}

impl ThresholdEvent {
    /// The event a counter hash of `user` in `period` recorded.
    pub fn from_fired(user: Uuid, period: Period, fired: &Fired) -> ThresholdEvent {
        let threshold = i32::try_from(fired.threshold).unwrap_or(i32::MAX);
        ThresholdEvent {
            id: Self::id_of(user, &fired.usage_type, period, threshold, fired.limit),
            user,
            usage_type: fired.usage_type.clone(),
            threshold,
            used: fired.used,
            limit: fired.limit,
            plan: fired.plan.clone(),
            period_start: period.start(),
            period_end: period.end(),
            occurred_at: DateTime::from_timestamp_millis(fired.at_ms).unwrap_or_else(Utc::now),
        }
    }

    /// The id of the event of `user` passing `threshold` % of `limit` of `usage_type` in
    /// `period`: the first 128 bits of SHA-256 over those, in hex. The same crossing always has
    /// the same id; a crossing under another limit (after a plan change) has another.
    pub fn id_of(
        user: Uuid,
        usage_type: &str,
        period: Period,
        threshold: i32,
        limit: i64,
    ) -> String {
        let digest = Sha256::digest(format!(
            "{THRESHOLD}|{user}|{usage_type}|{}|{threshold}|{limit}",
            period.id()
        ));
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("evt_{hex}")
    }

    /// The webhook body: `{"type", "timestamp", "data": {...}}`, instants as quotad writes them
    /// everywhere (`2026-11-01T00:00:00Z`, milliseconds when not whole); keys in name order, so
    /// every attempt sends the same bytes.
    pub fn body(&self) -> Value {
        let rfc = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        json!({
            "type": THRESHOLD,
            "timestamp": rfc(&self.occurred_at),
            "data": {
                "user_id": self.user,
                "usage_type": self.usage_type,
                "threshold": self.threshold,
                "used": self.used,
                "limit": self.limit,
                "plan": self.plan,
                "period_start": rfc(&self.period_start),
                "period_end": self.period_end.as_ref().map(rfc),
            }
        })
    }
}

/// Events deleted from the outbox per statement.
const PRUNE_BATCH: i64 = 1000;
/// Deadline of one pruning round.
const PRUNE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the outbox is pruned.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes the events recorded more than `retention` before `now` none of whose deliveries is
/// still pending (delivered, failed, or without a URL to go to), a thousand at a time; returns
/// how many it deleted. Safe with several daemons pruning at once.
pub async fn prune(
    db: &sqlx::PgPool,
    now: DateTime<Utc>,
    retention: chrono::Duration,
) -> Result<u64, sqlx::Error> {
    let before = now - retention;
    let mut total = 0;
    loop {
        let n = crate::db::prune_events(db, before, PRUNE_BATCH).await?;
        total += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Prunes the outbox every [`PRUNE_EVERY`] (and once at start) until `stop` turns true; a failed
/// round is logged and tried again at the next.
pub async fn prune_every(
    db: sqlx::PgPool,
    retention: chrono::Duration,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        // A Postgres that hangs neither holds the task past its deadline nor delays a stop.
        let round = tokio::select! {
            r = crate::db::within(PRUNE_DEADLINE, prune(&db, clock.now(), retention)) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match round {
            Ok(n) => {
                metrics::counter!(crate::metrics::EVENTS_PRUNED).increment(n);
                if n > 0 {
                    tracing::info!(pruned = n, "old usage events deleted from the outbox");
                }
            }
            Err(e) => {
                tracing::warn!(error.message = %e, "pruning the usage events failed; trying again in an hour")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(threshold: u32, limit: i64) -> Fired {
        Fired {
            usage_type: "ai_generation".into(),
            threshold,
            limit,
            used: 40,
            plan: "FREE".into(),
            at_ms: 1_764_000_000_123,
        }
    }

    #[test]
    fn the_id_names_the_crossing_not_the_moment() {
        let user = Uuid::new_v4();
        let month = Period::Month {
            year: 2026,
            month: 11,
        };
        let a = ThresholdEvent::from_fired(user, month, &fired(80, 50));
        let mut later = fired(80, 50);
        later.at_ms += 60_000;
        later.used = 44;
        assert_eq!(a.id, ThresholdEvent::from_fired(user, month, &later).id);
        assert!(a.id.starts_with("evt_") && a.id.len() == 36, "{}", a.id);
        let others = [
            ThresholdEvent::from_fired(user, month, &fired(100, 50)).id,
            ThresholdEvent::from_fired(user, month, &fired(80, 500)).id,
            ThresholdEvent::from_fired(Uuid::new_v4(), month, &fired(80, 50)).id,
            ThresholdEvent::from_fired(user, month.previous().unwrap(), &fired(80, 50)).id,
        ];
        for other in others {
            assert_ne!(a.id, other);
        }
    }

    #[test]
    fn the_body_carries_the_crossing_and_its_period() {
        let user = Uuid::new_v4();
        let month = Period::Month {
            year: 2026,
            month: 2,
        };
        let body = ThresholdEvent::from_fired(user, month, &fired(80, 50)).body();
        assert_eq!(body["type"], "usage.threshold");
        assert_eq!(body["timestamp"], "2025-11-24T16:00:00.123Z");
        assert_eq!(
            body["data"],
            json!({
                "user_id": user, "usage_type": "ai_generation", "threshold": 80, "used": 40,
                "limit": 50, "plan": "FREE", "period_start": "2026-02-01T00:00:00Z",
                "period_end": "2026-03-01T00:00:00Z",
            })
        );
        let life = ThresholdEvent::from_fired(user, Period::Lifetime, &fired(80, 50)).body();
        assert_eq!(life["data"]["period_end"], Value::Null);
    }
}
