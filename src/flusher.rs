//! The flusher: writes Redis' counters through to Postgres' `usage_tracking`.
//!
//! One pass walks the 1024 buckets in groups: it reads the oldest members of each group's dirty
//! sets, reads those counter hashes in one pipeline, writes their absolute totals in one
//! multi-row upsert guarded by version, then takes each member off its dirty set only if its
//! version is still the one written. At-least-once and idempotent: a crash anywhere leaves the
//! member dirty and the next pass (of this or any replica) writes it again; a lower version never
//! overwrites a higher one, so replicas flushing at once cannot double count or go backwards.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Map, Number, Value};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::db::{self, Totals};
use crate::metrics as m;
use crate::store::{RedisStore, StoreError, BUCKETS};

/// Buckets scanned per batch: one pipeline, one upsert, one unmark pipeline each.
const BUCKETS_PER_BATCH: u16 = 128;
/// Oldest members taken from each bucket's dirty set per batch.
const MEMBERS_PER_BUCKET: usize = 128;
/// Batches in flight at once: one waits on Postgres while the next reads Redis. They cover
/// disjoint buckets, so they never touch the same counter.
const BATCHES_IN_FLIGHT: usize = 4;
/// Deadline of one flusher call to Redis: a batch pipeline is far bigger than one request.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between passes after repeated errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a pass stopped early. Nothing is lost: what was not unmarked is written again next time.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] StoreError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Dirty counters read.
    pub counters: u64,
    /// Postgres rows inserted or updated.
    pub rows: u64,
    /// Counters taken off the dirty sets.
    pub unmarked: u64,
    /// Dirty counters seen at the start of each batch, in all.
    pub backlog: u64,
    /// Age of the oldest dirty counter seen, in milliseconds.
    pub oldest_ms: u64,
    /// Some bucket had more dirty counters than one pass takes: run again at once.
    pub more: bool,
}

/// How a pass spends the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Every batch as fast as it goes, several in flight: for catching up, and for shutdown.
    Full,
    /// One batch at a time, each followed by a pause as long as it took, so a pass that keeps
    /// up leaves half the machine to the requests it shares it with.
    Gentle,
}

impl Pace {
    /// The pace of the next pass: full while behind (work left over, or a pass that took more
    /// than half the interval), else gentle.
    fn after(out: &FlushOutcome, took: Duration, interval: Duration) -> Pace {
        if out.more || took > interval / 2 {
            Pace::Full
        } else {
            Pace::Gentle
        }
    }
}

/// Writes Redis totals to Postgres.
#[derive(Clone)]
pub struct Flusher {
    store: RedisStore,
    db: PgPool,
}

impl Flusher {
    /// A flusher over the daemon's Redis and Postgres.
    pub fn new(store: &RedisStore, db: PgPool) -> Flusher {
        Flusher {
            store: store.with_timeout(REDIS_TIMEOUT),
            db,
        }
    }

    /// One pass over every bucket, at full pace.
    pub async fn flush_once(&self) -> Result<FlushOutcome, FlushError> {
        self.flush(Pace::Full).await
    }

    /// One pass over every bucket, at `pace`.
    pub async fn flush(&self, pace: Pace) -> Result<FlushOutcome, FlushError> {
        let started = Instant::now();
        let result = self.pass(pace).await;
        metrics::histogram!(m::FLUSH_SECONDS).record(started.elapsed());
        match &result {
            Ok(out) => {
                metrics::counter!(m::FLUSH_ROWS).increment(out.rows);
                metrics::histogram!(m::FLUSH_BATCH).record(out.counters as f64);
                metrics::gauge!(m::FLUSH_BACKLOG)
                    .set(out.backlog.saturating_sub(out.unmarked) as f64);
                metrics::gauge!(m::FLUSH_OLDEST_SECONDS).set(out.oldest_ms as f64 / 1000.0);
            }
            Err(_) => metrics::counter!(m::FLUSH_ERRORS).increment(1),
        }
        result
    }

    async fn pass(&self, pace: Pace) -> Result<FlushOutcome, FlushError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let in_flight = match pace {
            Pace::Full => BATCHES_IN_FLIGHT,
            Pace::Gentle => 1,
        };
        let mut batches =
            futures_util::stream::iter((0..BUCKETS).step_by(BUCKETS_PER_BATCH as usize).map(
                |start| async move {
                    let started = Instant::now();
                    let b = self.batch(start, now_ms).await?;
                    if pace == Pace::Gentle && b.counters > 0 {
                        tokio::time::sleep(started.elapsed()).await;
                    }
                    Ok::<_, FlushError>(b)
                },
            ))
            .buffer_unordered(in_flight);
        let mut out = FlushOutcome::default();
        while let Some(batch) = batches.next().await {
            let b = batch?;
            out.counters += b.counters;
            out.rows += b.rows;
            out.unmarked += b.unmarked;
            out.backlog += b.backlog;
            out.oldest_ms = out.oldest_ms.max(b.oldest_ms);
            out.more |= b.more;
        }
        Ok(out)
    }

    /// One group of buckets: read the oldest dirty counters, upsert them, unmark them.
    async fn batch(&self, start: u16, now_ms: i64) -> Result<FlushOutcome, FlushError> {
        let mut out = FlushOutcome::default();
        let scan = self
            .store
            .scan_dirty(start..start + BUCKETS_PER_BATCH, MEMBERS_PER_BUCKET)
            .await?;
        out.backlog = scan.backlog;
        self.store.drop_garbage(&scan.garbage).await?;
        if scan.members.is_empty() {
            return Ok(out);
        }
        out.more = scan.backlog > scan.members.len() as u64;
        if let Some(oldest) = scan.members.iter().map(|m| m.since_ms).min() {
            out.oldest_ms = (now_ms - oldest).max(0) as u64;
        }

        let hashes = self.store.read_dirty(&scan.members).await?;
        let mut totals = Totals::default();
        let mut written = Vec::with_capacity(scan.members.len());
        for (member, hash) in scan.members.iter().zip(&hashes) {
            let version = hash.get("v").and_then(|v| v.parse::<i64>().ok());
            if let Some(v) = version {
                for (ty, count, metadata) in rows_of(hash) {
                    totals.push(member.user, ty, count, member.period, metadata, v);
                }
            }
            written.push((member, version));
        }
        out.rows = db::upsert_totals(&self.db, &totals).await?;
        out.unmarked = self.store.unmark(&written).await?;
        out.counters = scan.members.len() as u64;
        Ok(out)
    }

    /// Starts a pass every `interval` (measured from the start of the last, so the lag bound is
    /// one interval plus one pass) until `stop` turns true. After an error it waits longer each
    /// time (up to 30 s); a pass that left work behind is followed at once by another. Passes
    /// that keep up run at [`Pace::Gentle`]; once behind, at [`Pace::Full`] until caught up.
    pub async fn run(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut next = tokio::time::Instant::now() + interval;
        let mut backoff = interval;
        let mut pace = Pace::Gentle;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let started = tokio::time::Instant::now();
            match self.flush(pace).await {
                Ok(out) => {
                    backoff = interval;
                    pace = Pace::after(&out, started.elapsed(), interval);
                    next = if out.more {
                        tokio::time::Instant::now()
                    } else {
                        started + interval
                    };
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(interval, MAX_BACKOFF);
                    next = tokio::time::Instant::now() + backoff;
                    tracing::warn!(error.message = %e, retry_in_ms = backoff.as_millis() as u64, "flush failed; will retry");
                }
            }
        }
    }

    /// Flushes until nothing is dirty or `bound` has passed; returns the counters still dirty.
    pub async fn drain(&self, bound: Duration) -> u64 {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            let attempt = tokio::time::timeout(deadline - Instant::now(), self.flush_once()).await;
            match attempt {
                Ok(Ok(out)) if out.counters == 0 => return 0,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error.message = %e, "final flush failed; retrying");
                    tokio::time::sleep(
                        Duration::from_millis(100)
                            .min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Err(_) => break,
            }
        }
        // Out of time: say how much is left (Redis still has it; the next flusher writes it).
        // 0 when a pass finished the work just as time ran out; unknown counts as some.
        self.store.backlog().await.unwrap_or(1)
    }
}

/// The Postgres rows of one counter hash: (type, count, metadata) for every type field.
/// Fields with a ':' are metadata (`m:`, `s:`, `n:`); `v`, `p` and `pv` are the hash's own.
fn rows_of(hash: &HashMap<String, String>) -> Vec<(String, i64, Value)> {
    let mut rows: Vec<(String, i64, Map<String, Value>)> = hash
        .iter()
        .filter(|(k, _)| !k.contains(':') && !matches!(k.as_str(), "v" | "p" | "pv"))
        .filter_map(|(k, v)| Some((k.clone(), v.parse::<i64>().ok()?, Map::new())))
        .collect();
    for (key, value) in hash {
        let Some((kind, rest)) = key.split_once(':') else {
            continue;
        };
        let Some((ty, name)) = rest.split_once(':') else {
            continue;
        };
        let Some(row) = rows.iter_mut().find(|r| r.0 == ty) else {
            continue;
        };
        match kind {
            "m" => {
                if let Some(n) = number(value) {
                    row.2.insert(name.to_owned(), n);
                }
            }
            // A name that is both summed and text keeps the sum.
            "s" if !hash.contains_key(&format!("m:{ty}:{name}")) => {
                let v =
                    serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone()));
                row.2.insert(name.to_owned(), v);
            }
            _ => {}
        }
    }
    rows.into_iter()
        .map(|(t, c, m)| (t, c, Value::Object(m)))
        .collect()
}

/// A summed metadata value as JSON: whole numbers stay integers.
fn number(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    let f: f64 = text.parse().ok()?;
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return Some(Value::Number((f as i64).into()));
    }
    Number::from_f64(f).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_go_gently_while_they_keep_up_and_at_full_pace_while_behind() {
        let second = Duration::from_secs(1);
        let kept_up = FlushOutcome::default();
        let left_work = FlushOutcome {
            more: true,
            ..FlushOutcome::default()
        };
        assert_eq!(
            Pace::after(&kept_up, Duration::from_millis(200), second),
            Pace::Gentle
        );
        assert_eq!(
            Pace::after(&kept_up, Duration::from_millis(600), second),
            Pace::Full
        );
        assert_eq!(
            Pace::after(&left_work, Duration::from_millis(10), second),
            Pace::Full
        );
    }

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_hash_becomes_one_row_per_type_with_its_metadata() {
        let h = hash(&[
            ("v", "9"),
            ("p", "PRO"),
            ("pv", "2"),
            ("ai_generation", "12"),
            ("export", "3"),
            ("n:ai_generation", "3"),
            ("m:ai_generation:prompt_tokens", "81200"),
            ("m:ai_generation:cost", "0.25"),
            ("s:ai_generation:model", "\"m-1\""),
        ]);
        let mut rows = rows_of(&h);
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "ai_generation");
        assert_eq!(rows[0].1, 12);
        assert_eq!(
            rows[0].2,
            serde_json::json!({"prompt_tokens": 81200, "cost": 0.25, "model": "m-1"})
        );
        assert_eq!(rows[1], ("export".to_owned(), 3, serde_json::json!({})));
    }

    #[test]
    fn whole_sums_stay_integers_and_fractions_stay_floats() {
        assert_eq!(number("812"), Some(serde_json::json!(812)));
        assert_eq!(number("1624.0"), Some(serde_json::json!(1624)));
        assert_eq!(number("0.5"), Some(serde_json::json!(0.5)));
        assert_eq!(number("x"), None);
    }
}
