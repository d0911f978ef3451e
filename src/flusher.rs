//! The flusher: writes Redis' counters through to Postgres' `usage_tracking`.
//!
//! One pass walks the 1024 buckets in groups: it reads the oldest members of each group's dirty
//! sets, reads those counter hashes in one pipeline, writes their absolute totals in one
//! multi-row upsert guarded by version, then takes each member off its dirty set only if its
//! version is still the one written. At-least-once and idempotent: a crash anywhere leaves the
//! member dirty and the next pass (of this or any replica) writes it again; a lower version never
//! overwrites a higher one, so replicas flushing at once cannot double count or go backwards.
//!
//! Rows go to Postgres in (user, type, period) order, so two replicas' upserts cannot deadlock.
//! A row Postgres refuses for its data (a `\u0000` in metadata) is isolated by halving the batch
//! until it is alone; every other row is written, and the refused counter stays dirty, moved to
//! the back of its dirty set. A counter Postgres holds at a higher version than Redis (a Redis
//! restored from an older dump) is raised to Postgres' counts in Redis (`lua/catch_up.lua`), so
//! spent quota is not handed back and the next flush is accepted.
//!
//! A counter that recorded threshold events not yet in Postgres (`x:ev`) carries them to the
//! outbox in the same statement as its rows ([`db::write_totals`]); unmarking it clears the flag.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::db::{self, Table, Totals};
use crate::events::ThresholdEvent;
use crate::metrics as m;
use crate::period::Period;
use crate::store::{CounterHash, DirtyMember, RedisStore, StoreError, BUCKETS};

/// Buckets scanned per batch: one pipeline, one upsert, one unmark pipeline each.
const BUCKETS_PER_BATCH: u16 = 128;
/// Oldest members taken from each bucket's dirty set per batch.
const MEMBERS_PER_BUCKET: usize = 128;
/// Further rounds a batch makes over its hot buckets (those with more dirty counters than one
/// round takes: a large account's bucket, whose members' counters all share it), before the pass
/// goes on: a hot bucket is drained without scanning all 1,024 buckets again for it.
const HOT_ROUNDS: usize = 16;
/// Batches in flight at once: one waits on Postgres while the next reads Redis. They cover
/// disjoint buckets, so they never touch the same counter.
const BATCHES_IN_FLIGHT: usize = 4;
/// Deadline of one flusher call to Redis: a batch pipeline is far bigger than one request.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one flusher statement, enforced by quotad and by Postgres (`statement_timeout`,
/// `lock_timeout`): a hung Postgres fails the pass instead of holding it (and a shutdown's
/// drain, which has its own bound) forever.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// The name of the flusher's Redis connection (`CLIENT LIST`).
pub const FLUSHER_CONNECTION: &str = "quotad-flusher";
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
    /// Counters Postgres refused for their data: left dirty, moved to the back of the line.
    pub rejected: u64,
    /// Counters Redis held older than Postgres, raised to Postgres' counts.
    pub behind: u64,
    /// Threshold events new to the outbox.
    pub events: u64,
}

/// What a drain left in Redis for the next flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing: Postgres has everything.
    All,
    /// This many counters are still dirty.
    Left(u64),
    /// Some may be: the backlog could not be read (Redis did not answer).
    Unknown,
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
    /// Rows (user, type, period) whose refusal was logged at error already: a refused counter
    /// is tried on every pass, and one error line per second per row would drown the log.
    reported: Arc<Mutex<HashSet<(uuid::Uuid, String, String)>>>,
    /// The webhook endpoints a new event gets a delivery for.
    endpoints: Arc<Vec<String>>,
    /// Told when a pass wrote new events (the webhook dispatcher waits on it).
    wake: Option<Arc<tokio::sync::Notify>>,
}

/// Most refused rows remembered as reported; past it the memory starts again.
const REPORTED_MAX: usize = 10_000;

impl Flusher {
    /// A flusher over the daemon's Redis and Postgres, on connections of its own (a Redis
    /// connection named [`FLUSHER_CONNECTION`], a small Postgres pool), so its large pipelines
    /// and upserts never queue ahead of requests.
    pub fn new(store: &RedisStore, db: &PgPool) -> Flusher {
        Flusher {
            store: store.dedicated(FLUSHER_CONNECTION, REDIS_TIMEOUT),
            db: db::pool_like(db, DB_TIMEOUT, BATCHES_IN_FLIGHT as u32 + 1),
            reported: Arc::default(),
            endpoints: Arc::default(),
            wake: None,
        }
    }

    /// The same flusher, giving every event it writes to the outbox a delivery to each of
    /// `endpoints` (the webhook URLs), and telling `wake` when it wrote new ones.
    pub fn with_endpoints(
        mut self,
        endpoints: Vec<String>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Flusher {
        self.endpoints = Arc::new(endpoints);
        self.wake = Some(wake);
        self
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
                metrics::counter!(m::FLUSH_REJECTED).increment(out.rejected);
                metrics::counter!(m::FLUSH_BEHIND).increment(out.behind);
                metrics::counter!(m::EVENTS_RECORDED).increment(out.events);
                if out.events > 0 {
                    if let Some(wake) = &self.wake {
                        wake.notify_one();
                    }
                }
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
                    let (mut b, mut hot) =
                        self.batch(start..start + BUCKETS_PER_BATCH, now_ms).await?;
                    for _ in 0..HOT_ROUNDS {
                        if hot.is_empty() {
                            break;
                        }
                        let (more, still) = self.batch(hot, now_ms).await?;
                        b.counters += more.counters;
                        b.rows += more.rows;
                        b.unmarked += more.unmarked;
                        b.rejected += more.rejected;
                        b.behind += more.behind;
                        b.events += more.events;
                        hot = still;
                    }
                    b.more = !hot.is_empty();
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
            out.rejected += b.rejected;
            out.behind += b.behind;
            out.events += b.events;
        }
        Ok(out)
    }

    /// One round over some buckets: read the oldest dirty counters, upsert them, unmark them.
    /// Also returns the buckets that held more than the round took.
    async fn batch(
        &self,
        buckets: impl IntoIterator<Item = u16>,
        now_ms: i64,
    ) -> Result<(FlushOutcome, Vec<u16>), FlushError> {
        let mut out = FlushOutcome::default();
        let scan = self.store.scan_dirty(buckets, MEMBERS_PER_BUCKET).await?;
        out.backlog = scan.backlog;
        self.store.drop_garbage(&scan.garbage).await?;
        if scan.members.is_empty() {
            return Ok((out, Vec::new()));
        }
        out.more = !scan.hot.is_empty();
        if let Some(oldest) = scan.members.iter().map(|m| m.since_ms).min() {
            out.oldest_ms = (now_ms - oldest).max(0) as u64;
        }

        let hashes = self.store.read_dirty(&scan.members).await?;
        let versions: Vec<Option<i64>> = hashes.iter().map(|h| h.version).collect();
        let mut quarantined = HashSet::new();
        // Users' counters to usage_tracking, accounts' to account_usage: one upsert each.
        for table in [Table::Users, Table::Accounts] {
            let mut totals = Totals::default();
            // The member each row comes from.
            let mut owners = Vec::new();
            for (i, (member, hash)) in scan.members.iter().zip(&hashes).enumerate() {
                if Table::of(member.owner) != table {
                    continue;
                }
                if let Some(v) = hash.version {
                    for row in hash.rows() {
                        let events = hash
                            .events_of(&row.usage_type)
                            .map(|f| {
                                ThresholdEvent::from_fired(member.owner.id(), member.period, f)
                            })
                            .collect();
                        totals.push_row(member.owner.id(), row, member.period, v);
                        totals.attach(events);
                        owners.push(i);
                    }
                }
            }
            if totals.is_empty() {
                continue;
            }
            let order = totals.sort();
            let owners: Vec<usize> = order.into_iter().map(|i| owners[i]).collect();

            let written = self.write(table, &totals).await?;
            out.rows += written.rows;
            out.events += written.events;
            for (row, reason) in &written.refused {
                let member = &scan.members[owners[*row]];
                let ty = &totals.types[*row];
                let first = {
                    let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
                    if reported.len() >= REPORTED_MAX {
                        reported.clear();
                    }
                    reported.insert((member.owner.id(), ty.clone(), member.period.id()))
                };
                if first {
                    tracing::error!(
                        owner = ?member.owner,
                        usage_type = %ty,
                        period = %member.period.id(),
                        error.message = %reason,
                        "postgres refused this counter's row; it stays dirty in Redis and is tried again after the others (logged once; quotad_flush_rejected_counters_total counts every refusal)"
                    );
                } else {
                    tracing::debug!(owner = ?member.owner, usage_type = %ty, period = %member.period.id(), error.message = %reason, "postgres refused this counter's row again");
                }
                quarantined.insert(owners[*row]);
            }
            if written.rows + (written.refused.len() as u64) < totals.len() as u64 {
                // Some rows were refused by the version guard: an ordinary race with another
                // replica's flush, or a Redis older than Postgres.
                out.behind += self
                    .catch_up(table, &totals, &owners, &scan.members)
                    .await?;
            }
        }
        let requeue: Vec<&DirtyMember> = quarantined.iter().map(|i| &scan.members[*i]).collect();
        self.store.requeue(&requeue, now_ms).await?;
        out.rejected = quarantined.len() as u64;

        let flushed: Vec<(&DirtyMember, Option<i64>)> = scan
            .members
            .iter()
            .zip(versions)
            .enumerate()
            .filter(|(i, _)| !quarantined.contains(i))
            .map(|(_, mv)| mv)
            .collect();
        out.unmarked = self.store.unmark(&flushed).await?;
        out.counters = scan.members.len() as u64;
        Ok((out, scan.hot))
    }

    /// One upsert with the rows' events, under the flusher's deadline.
    async fn upsert(&self, table: Table, t: &Totals) -> Result<db::TotalsWritten, sqlx::Error> {
        db::within(
            DB_TIMEOUT,
            db::write_totals(&self.db, table, t, &self.endpoints),
        )
        .await
    }

    /// Writes `t`. When Postgres refuses the statement for its data, halves it until each
    /// refused row is alone: n rows with one bad among them take about 2·log2(n) more
    /// statements, and every other row is written. Other errors (Postgres down, out of time)
    /// fail the pass.
    async fn write(&self, table: Table, t: &Totals) -> Result<Written, FlushError> {
        let mut written = Written::default();
        // Parts still to send; each holds at least one row.
        let mut parts = Vec::new();
        parts.push(0..t.len());
        while let Some(range) = parts.pop() {
            let result = if range.len() == t.len() {
                self.upsert(table, t).await
            } else {
                self.upsert(table, &t.pick(range.clone())).await
            };
            match result {
                Ok(n) => {
                    written.rows += n.rows;
                    written.events += n.events;
                }
                Err(e) if db::is_data_refusal(&e) && range.len() == 1 => {
                    // The row's events are true whatever its totals hold: written alone.
                    let events: Vec<&ThresholdEvent> = t.events[range.start].iter().collect();
                    written.events += db::within(
                        DB_TIMEOUT,
                        db::record_events(&self.db, &events, &self.endpoints),
                    )
                    .await?;
                    written.refused.push((range.start, e.to_string()))
                }
                Err(e) if db::is_data_refusal(&e) => {
                    let mid = range.start + range.len() / 2;
                    parts.push(mid..range.end);
                    parts.push(range.start..mid);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Finds the counters of `t` that Postgres holds at a higher version than Redis sent (or at
    /// the same version with another count) and raises each in Redis to Postgres' counts.
    /// Returns how many Redis was really behind on (the script leaves alone a counter that has
    /// moved past Postgres meanwhile: another replica's flush raced this one).
    async fn catch_up(
        &self,
        table: Table,
        t: &Totals,
        owners: &[usize],
        members: &[DirtyMember],
    ) -> Result<u64, FlushError> {
        let ahead = db::within(DB_TIMEOUT, db::ahead_of(&self.db, table, t)).await?;
        if ahead.is_empty() {
            return Ok(0);
        }
        #[allow(clippy::type_complexity)]
        let periods: HashMap<
            (uuid::Uuid, chrono::DateTime<chrono::Utc>),
            (Period, i64, u16),
        > = (0..t.len())
            .map(|i| {
                let m = &members[owners[i]];
                (
                    (t.users[i], t.starts[i]),
                    (m.period, t.versions[i], m.bucket),
                )
            })
            .collect();
        let mut by_counter: BTreeMap<_, (i64, Vec<(String, String)>)> = BTreeMap::new();
        for row in ahead {
            let entry = by_counter
                .entry((row.user, row.period_start))
                .or_insert((0, Vec::new()));
            entry.0 = entry.0.max(row.version);
            entry.1.extend(CounterHash::row_fields(
                &row.usage_type,
                row.count,
                row.overage,
                row.metadata,
                false,
            ));
        }
        let mut behind = 0;
        for ((user, start), (version, fields)) in by_counter {
            let Some((period, sent, bucket)) = periods.get(&(user, start)).copied() else {
                continue;
            };
            let keys = self.store.keys_of(table.owner(user), bucket);
            if self.store.catch_up(&keys, period, version, &fields).await? {
                behind += 1;
                tracing::warn!(
                    owner = ?table.owner(user),
                    period = %period.id(),
                    redis_version = sent,
                    postgres_version = version,
                    "redis held this counter at an older version than postgres (restored from an older dump?); raised it to postgres' counts"
                );
            }
        }
        Ok(behind)
    }

    /// Starts a pass every `interval` (measured from the start of the last, so the lag bound is
    /// one interval plus one pass) until `stop` turns true. After an error it waits longer each
    /// time (up to 30 s); a pass that left work behind is followed at once by another. Passes
    /// that keep up run at [`Pace::Gentle`]; once behind, at [`Pace::Full`] until caught up.
    /// A pass under way when `stop` turns true is dropped (what it did not unmark stays dirty),
    /// so a shutdown never waits on it: the drain that follows has a bound of its own.
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
            let result = tokio::select! {
                r = self.flush(pace) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match result {
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

    /// Flushes until nothing is dirty (or only counters Postgres refuses are) or `bound` has
    /// passed; says what is left.
    pub async fn drain(&self, bound: Duration) -> Drained {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            let attempt = tokio::time::timeout(deadline - Instant::now(), self.flush_once()).await;
            match attempt {
                Ok(Ok(out)) if out.counters == 0 => return Drained::All,
                // Everything left is refused by Postgres: passes cannot change that.
                Ok(Ok(out)) if out.counters == out.rejected => break,
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
        // 0 when a pass finished the work just as time ran out.
        // Bounded too (Redis may be what hangs): past a second the number is unknown.
        match tokio::time::timeout(Duration::from_secs(1), self.store.backlog()).await {
            Ok(Ok(0)) => Drained::All,
            Ok(Ok(n)) => Drained::Left(n),
            Ok(Err(e)) => {
                tracing::warn!(error.message = %e, "cannot count the counters left dirty");
                Drained::Unknown
            }
            Err(_) => {
                tracing::warn!(
                    "cannot count the counters left dirty: redis did not answer within 1 s"
                );
                Drained::Unknown
            }
        }
    }
}

/// What [`Flusher::write`] did.
#[derive(Debug, Default)]
struct Written {
    /// Rows inserted or updated.
    rows: u64,
    /// Events new to the outbox.
    events: u64,
    /// Rows Postgres refused for their data (index into the batch), with its reason.
    refused: Vec<(usize, String)>,
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
}
