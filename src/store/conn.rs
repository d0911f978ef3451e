//! The connection to Redis and the rules every call follows: one multiplexed connection per
//! store, a deadline per call (and, for scripts, a deadline Redis itself checks), one resend
//! after a connection fault, the daemon's estimate of Redis' clock, and the classification of
//! what went wrong into [`StoreError`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use deadpool_redis::redis::{self, RedisError, ScriptInvocation};

use super::{RedisStore, StoreError};

/// How often the offset between the daemon's wall clock and Redis' is measured again (besides
/// every readiness check): clocks kept by NTP drift far less than the grace in this time.
const CLOCK_RESYNC_MS: i64 = 60_000;

/// The daemon's estimate of Redis' clock, for script deadlines (see [`RedisStore::arm`]).
#[derive(Debug, Default)]
pub(super) struct ServerClock {
    /// Redis' `TIME` minus the daemon's wall clock, in ms (0 until measured: a Redis on the same
    /// host shares the daemon's clock).
    offset_ms: AtomicI64,
    /// When (daemon wall clock, ms) the next measurement is due.
    next_sync_ms: AtomicI64,
    /// Whether `offset_ms` has been measured.
    measured: AtomicBool,
}

impl RedisStore {
    pub(super) fn connect(
        client: &redis::Client,
        timeout: Duration,
    ) -> Result<ConnectionManager, RedisError> {
        // No response timeout of the client's own (its default is 500 ms): each call has its
        // deadline (`timeout`, or the flusher's and reconcile's longer ones for big pipelines).
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        ConnectionManager::new_lazy_with_config(client.clone(), config)
    }

    /// `CLIENT SETNAME` for this store's connections, to send ahead of other commands in a
    /// pipeline. A reconnected connection has no name until the next such pipeline: the
    /// readiness check's, for the request path (a consume stays one command), and every flusher
    /// batch's.
    pub(super) fn set_name(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("CLIENT").arg("SETNAME").arg(self.name).ignore();
    }

    /// The connection (a cheap handle to the shared one).
    pub(super) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs `f` with the connection, under the Redis deadline, once.
    pub(super) async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = attempt(deadline, f(self.conn())).await;
        self.settle(result)
    }

    /// Like [`Self::with_conn`], but a call that failed at the connection (typically one Redis
    /// had already closed: a restarted or failed-over server) is sent once more, on a reconnected
    /// connection, within the same deadline. Without this the first request after a Redis restart
    /// would get the fail policy's answer. The resend could double a count only if Redis ran the
    /// first send and then lost the connection before answering; a Redis that crashes there
    /// loses the write too unless it persists every write (appendfsync always). A script's resend
    /// carries the first send's deadline, so it cannot run later than the first could have.
    ///
    /// Refusals (OOM, LOADING, READONLY…) are not resent: nothing ran, but the condition outlasts
    /// a deadline of milliseconds, and a resend would only add load to a struggling server.
    pub(super) async fn with_retry<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = self.conn();
        let mut result = attempt(deadline, f(conn.clone())).await;
        if matches!(&result, Some(Err(e)) if is_connection_fault(e))
            && tokio::time::Instant::now() < deadline
        {
            // The manager reconnects in the background; this send waits for it.
            result = attempt(deadline, f(conn)).await;
        }
        self.settle(result)
    }

    /// Classifies a call's outcome (`None` = no answer by its deadline) and counts its failure.
    pub(super) fn settle<T>(&self, result: Option<Result<T, RedisError>>) -> Result<T, StoreError> {
        let result = match result {
            Some(r) => r.map_err(classify),
            None => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        if let Err(e) = &result {
            let kind = match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Refused { .. } => "refused",
                StoreError::Redis(_) => "error",
            };
            metrics::counter!(crate::metrics::REDIS_ERRORS, "kind" => kind).increment(1);
        }
        result
    }

    /// How much of the Redis deadline is kept back, after a script's own deadline, for its reply
    /// to reach quotad: a quarter (25 ms at the default 100 ms). A script starts by 3/4 of the
    /// timeout or not at all, and quotad waits the full timeout for the answer. The grace covers
    /// the script's run (well under 1 ms), the reply's way back (µs on one host, under 1 ms on a
    /// LAN), the error of the clock offset (at most half the round trip that measured it, which
    /// must be under the grace to be used) and the daemon being slow to poll the reply.
    pub(super) fn grace(&self) -> Duration {
        self.timeout / 4
    }

    /// Appends the call's deadline (ms, in Redis' clock) as the invocation's last argument and
    /// returns how long quotad waits for the answer. The prologue of `lua/common.lua` takes the
    /// deadline off `ARGV` and, once Redis' clock is past it, refuses the call without touching
    /// anything: a script sent to a Redis that hangs (SIGSTOP, a long fork) and answered as
    /// failed does not count when Redis resumes. Every script that includes `common.lua` must be
    /// sent armed, by [`Self::run_script`] or (the bench, pipelines) by calling this.
    ///
    /// The script's deadline is `timeout - grace` after now; quotad waits `timeout`. A call
    /// answered as failed can still have counted only if Redis ran it before its deadline and
    /// its reply then took longer than the grace to arrive (Redis stopped between running the
    /// script and writing the reply, or the daemon did not poll it for that long).
    pub fn arm(&self, inv: &mut ScriptInvocation<'_>) -> tokio::time::Instant {
        let until = tokio::time::Instant::now() + self.timeout;
        let now_ms = wall_ms(SystemTime::now());
        let budget = self.timeout.saturating_sub(self.grace());
        inv.arg(now_ms + self.clock.offset_ms.load(Ordering::Relaxed) + budget.as_millis() as i64);
        self.resync_when_due(now_ms);
        until
    }

    /// Measures the clock offset again in the background when the last measurement is older
    /// than [`CLOCK_RESYNC_MS`] (one measurement at a time).
    pub(super) fn resync_when_due(&self, now_ms: i64) {
        let due = self.clock.next_sync_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self
                .clock
                .next_sync_ms
                .compare_exchange(
                    due,
                    now_ms + CLOCK_RESYNC_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            rt.spawn(async move {
                if let Err(e) = store.ping().await {
                    tracing::debug!(error.message = %e, "redis clock offset not measured");
                }
            });
        }
    }

    /// Runs a script invocation, armed with its deadline (EVALSHA; on NOSCRIPT it loads the
    /// script and runs it again).
    pub(super) async fn run_script<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let until = self.arm(inv);
        let inv = &*inv;
        self.with_retry(until, |mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }

    /// Sends a pipeline, one round trip, unarmed: for pipelines that carry no script that
    /// includes `common.lua` (reads, `ZREM`s and `lua/unmark.lua`, which can do no harm when run
    /// late). The one pipeline of such scripts, [`Self::hydrate_many`]'s, arms each script and
    /// waits for its own deadline.
    pub(super) async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.with_retry(
            deadline,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
    }

    /// Redis' clock minus the daemon's wall clock, in ms, as last measured (`None` until then).
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.clock
            .measured
            .load(Ordering::Relaxed)
            .then(|| self.clock.offset_ms.load(Ordering::Relaxed))
    }

    /// PING, for readiness; with it, in the same round trip, `CLIENT SETNAME` (naming the
    /// connection) and `TIME`, to measure the offset
    /// between the daemon's wall clock and Redis' (script deadlines are in Redis' clock). The
    /// offset is taken as Redis' time minus the middle of the round trip, so its error is at most
    /// half the round trip; a measurement whose round trip exceeds the grace is not used.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.set_name(&mut pipe);
        pipe.cmd("PING").ignore().cmd("TIME");
        let pipe = &pipe;
        let sent = SystemTime::now();
        let started = std::time::Instant::now();
        let ((secs, micros),): ((i64, i64),) = self
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let rtt = started.elapsed();
        if rtt <= self.grace() {
            self.clock
                .offset_ms
                .store(clock_offset(sent, rtt, secs, micros), Ordering::Relaxed);
            self.clock.measured.store(true, Ordering::Relaxed);
            self.clock.next_sync_ms.store(
                wall_ms(SystemTime::now()) + CLOCK_RESYNC_MS,
                Ordering::Relaxed,
            );
        }
        Ok(())
    }
}

/// Sends `work`, waiting until `deadline`; `None` = no answer by then.
pub(super) async fn attempt<T>(
    deadline: tokio::time::Instant,
    work: impl Future<Output = Result<T, RedisError>>,
) -> Option<Result<T, RedisError>> {
    tokio::time::timeout_at(deadline, work).await.ok()
}

/// Redis' clock minus the daemon's, in ms, from a `TIME` answer (`secs`, `micros`) to a request
/// sent at `sent` that took `rtt` there and back: Redis read its clock about half-way.
fn clock_offset(sent: SystemTime, rtt: Duration, secs: i64, micros: i64) -> i64 {
    let redis_ms = secs * 1000 + micros / 1000;
    redis_ms - (wall_ms(sent) + (rtt.as_millis() / 2) as i64)
}

/// Milliseconds since the Unix epoch.
fn wall_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The failure happened at the connection (refused, reset, closed): the call may not have
/// reached Redis, and a reconnected connection may do better.
fn is_connection_fault(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// The error code a script's deadline check answers with (see `lua/common.lua`).
const EXPIRED: &str = "EXPIRED";

/// Redis' replies that mean "I cannot take this call now" and that nothing ran, with the reason
/// told to a person. A refused script did nothing: Redis refuses the first write of a script
/// (OOM, READONLY, NOREPLICAS, MISCONF) before any write, and the others before the script starts.
fn refusal(code: &str) -> Option<&'static str> {
    Some(match code {
        "OOM" => "it is out of memory (maxmemory reached)",
        "LOADING" => "it is still loading its data set",
        "READONLY" => "it is a read-only replica (a failover may have moved the primary)",
        "BUSY" => "it is busy running a long script",
        "MASTERDOWN" => "it is a replica that lost its link to the primary",
        "CLUSTERDOWN" => "the cluster is down",
        "TRYAGAIN" => "the keys are being moved between cluster nodes",
        "NOREPLICAS" => "too few replicas are connected for it to take writes",
        "MISCONF" => "it cannot save to disk and refuses writes",
        _ => return None,
    })
}

/// Connection faults, late scripts and refusals are outages (the fail policy applies); other
/// server replies are bugs.
pub(super) fn classify(e: RedisError) -> StoreError {
    if is_connection_fault(&e) {
        return StoreError::Unavailable(e.to_string());
    }
    // A pipeline's error carries each failed command's reply; its first refusal decides.
    let codes: Vec<(String, String)> = match e.clone().into_server_errors() {
        Some(errors) => errors
            .iter()
            .map(|(_, s)| (s.code().to_owned(), s.details().unwrap_or("").to_owned()))
            .collect(),
        None => Vec::new(),
    };
    for (code, detail) in codes {
        if code == EXPIRED {
            return StoreError::Unavailable(format!(
                "redis ran the call after its deadline, so it did nothing: {detail}"
            ));
        }
        if let Some(reason) = refusal(&code) {
            return StoreError::Refused {
                reason,
                detail: format!("{code} {detail}"),
            };
        }
    }
    StoreError::Redis(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_offset_is_redis_time_minus_the_middle_of_the_round_trip() {
        let sent = UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        // Redis an hour ahead, read 4 ms after the send of an 8 ms round trip.
        let (secs, micros) = (1_800_003_600, 4_000);
        let offset = clock_offset(sent, Duration::from_millis(8), secs, micros);
        assert_eq!(offset, 3_600_000);
        // Redis 250 ms behind.
        let offset = clock_offset(sent, Duration::from_millis(2), 1_799_999_999, 751_000);
        assert_eq!(offset, -250);
    }

    #[test]
    fn refusals_are_outages_late_scripts_are_unavailable_other_replies_are_bugs() {
        for (code, reason) in [
            ("OOM", "out of memory"),
            ("BUSY", "busy running a long script"),
            ("NOREPLICAS", "too few replicas"),
            ("MISCONF", "cannot save to disk"),
        ] {
            let e = classify(redis::make_extension_error(code.into(), Some("x".into())));
            match &e {
                StoreError::Refused { reason: r, .. } => assert!(r.contains(reason), "{code}: {r}"),
                other => panic!("{code}: {other:?}"),
            }
            assert!(e.is_outage());
        }
        let late = classify(redis::make_extension_error(
            EXPIRED.into(),
            Some("ran 3 ms after the call's deadline".into()),
        ));
        assert!(matches!(late, StoreError::Unavailable(_)), "{late:?}");
        let bug = classify(redis::make_extension_error(
            "WRONGTYPE".into(),
            Some("Operation against a key holding the wrong kind of value".into()),
        ));
        assert!(matches!(bug, StoreError::Redis(_)), "{bug:?}");
        assert!(!bug.is_outage());
    }
}
