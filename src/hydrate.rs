//! Loading counters from Postgres into Redis in batches.
//!
//! A counter Redis does not hold (a new month without a marker, a Redis that lost its data) is
//! loaded from Postgres before it is used. When many are missing at once (every user's first
//! request after a Redis restart, say), loading each alone costs a Postgres query and a Redis
//! round trip per counter. The [`Hydrator`] gathers the loads asked for within [`WINDOW`] (or
//! until [`MAX_BATCH`] are waiting) and serves them together:
//!
//! - **one Postgres statement** reads every (user, period) of the batch ([`db::snapshots`]);
//!   the same pair asked for twice is read once;
//! - **one Redis pipeline** of `lua/hydrate.lua` scripts fills them, each script armed with its
//!   deadline as when sent alone ([`RedisStore::hydrate_many`]); a waiter's own call (the
//!   consume that found the counter missing) rides in the same pipeline right after its fill
//!   ([`Hydrator::load_then`]), so a first request costs one round trip to Redis after its load
//!   instead of two.
//!
//! Each waiter gets the answer it would have got alone. A failed statement or pipeline fails
//! every waiter of the batch with that error (each then follows its own type's fail policy); a
//! row Postgres cannot decode, or a script Redis refuses, fails only its own counter. The
//! statement's deadline is the batch's oldest waiter's `QUOTAD_DATABASE_TIMEOUT_MS`, so no waiter
//! waits on Postgres longer than it would have alone (the gathering window, at most
//! [`WINDOW`], comes before it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, ScriptInvocation};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::db;
use crate::metrics as m;
use crate::period::Period;
use crate::store::{Hydrated, Load, Owner, OwnerKeys, RedisStore, Snapshot, StoreError};

/// How long the first load of a batch waits for others to join it.
pub const WINDOW: Duration = Duration::from_millis(1);
/// Most counters in one batch: a full batch goes at once.
pub const MAX_BATCH: usize = 256;

/// Why a counter could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Postgres failed, or did not answer by the deadline (always an outage).
    #[error(transparent)]
    Db(sqlx::Error),
    /// Redis failed.
    #[error(transparent)]
    Redis(StoreError),
}

/// One load asked for, and where its answer goes.
struct Waiter {
    keys: OwnerKeys,
    /// The route the caller's call was sent under (see [`RedisStore::hydrate_invocation`]).
    believed: String,
    period: Period,
    /// When it was asked for: its Postgres deadline runs from here.
    asked: Instant,
    /// The script to run right after the fill, in the same pipeline (taken by the batch).
    follow_up: Option<ScriptInvocation<'static>>,
    reply: oneshot::Sender<Result<Loaded, LoadError>>,
}

/// What one load did.
#[derive(Debug)]
pub struct Loaded {
    /// [`Hydrated::Filled`] for the one waiter of a counter whose load filled it;
    /// [`Hydrated::Loaded`] for the others; [`Hydrated::Moved`] when the owner's counters live
    /// elsewhere (nothing filled).
    pub filled: Hydrated,
    /// The reply of the waiter's follow-up script; `None` when it had none, or Redis did not run
    /// it (send it again alone).
    pub follow_up: Option<Result<redis::Value, StoreError>>,
}

/// Loads counters from Postgres into Redis in batches (see the module's documentation). A cheap
/// handle: clones share the batches.
#[derive(Clone)]
pub struct Hydrator {
    queue: mpsc::UnboundedSender<Waiter>,
    /// Postgres statements sent (one per batch), for tests and the bench.
    queries: Arc<AtomicU64>,
    /// Loads asked for and not answered yet.
    waiting: Arc<AtomicUsize>,
}

/// What every batch needs.
struct Loader {
    db: PgPool,
    store: RedisStore,
    db_timeout: Duration,
    clock: Arc<dyn Clock>,
    queries: Arc<AtomicU64>,
}

impl Hydrator {
    /// Starts the task that gathers loads into batches; it ends when the last handle is dropped.
    /// Needs a Tokio runtime.
    pub fn new(
        db: PgPool,
        store: RedisStore,
        db_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Hydrator {
        let (queue, waiting) = mpsc::unbounded_channel();
        let queries = Arc::new(AtomicU64::new(0));
        let loader = Arc::new(Loader {
            db,
            store,
            db_timeout,
            clock,
            queries: queries.clone(),
        });
        tokio::spawn(gather(loader, waiting));
        Hydrator {
            queue,
            queries,
            waiting: Arc::default(),
        }
    }

    /// Loads (owner, period) from Postgres into Redis (in the bucket of `keys`, where the caller
    /// believes the owner's route is `believed`) unless it is loaded already. See
    /// [`Loaded::filled`] for the answer.
    pub async fn load(
        &self,
        keys: &OwnerKeys,
        believed: &str,
        period: Period,
    ) -> Result<Hydrated, LoadError> {
        Ok(self.load_then(keys, believed, period, None).await?.filled)
    }

    /// [`Self::load`], then `follow_up` (a script for the same owner, unarmed) in the same Redis
    /// pipeline right after the fill: its reply comes back with the load's.
    pub async fn load_then(
        &self,
        keys: &OwnerKeys,
        believed: &str,
        period: Period,
        follow_up: Option<ScriptInvocation<'static>>,
    ) -> Result<Loaded, LoadError> {
        let _waiting = Waiting::count(&self.waiting);
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            keys: keys.clone(),
            believed: believed.to_owned(),
            period,
            asked: Instant::now(),
            follow_up,
            reply,
        };
        if self.queue.send(waiter).is_err() {
            return Err(abandoned());
        }
        // The batch runs in a task of its own: a caller that gives up (its request timed out)
        // does not take the others' loads down with it.
        answer.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// Postgres statements sent so far (one per batch).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Loads asked for and not answered yet (nor given up on by their callers).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One load counted in [`Hydrator::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The error of a load whose batch ended without answering it (it cannot happen unless a batch
/// panicked): an outage, like Postgres not answering.
fn abandoned() -> LoadError {
    LoadError::Db(sqlx::Error::Io(std::io::Error::other(
        "the counter's load was abandoned",
    )))
}

/// Takes loads off the queue: the first waits up to [`WINDOW`] for others, up to [`MAX_BATCH`];
/// each batch then runs in a task of its own while the next gathers.
async fn gather(loader: Arc<Loader>, mut waiting: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = waiting.recv().await {
        let until = Instant::now() + WINDOW;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, waiting.recv()).await {
                Ok(Some(w)) => batch.push(w),
                Ok(None) | Err(_) => break,
            }
        }
        tokio::spawn(loader.clone().run(batch));
    }
}

impl Loader {
    /// One batch: one Postgres statement, one Redis pipeline, one answer per waiter.
    async fn run(self: Arc<Self>, batch: Vec<Waiter>) {
        // Each distinct counter (owner, period, in one bucket, under one route) once; `pairs[i]`
        // is read for `by_pair[i]`'s waiters.
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut pairs: Vec<(Owner, Period)> = Vec::new();
        let mut by_pair: Vec<Vec<Waiter>> = Vec::new();
        for w in batch {
            let pair = (w.keys.owner(), w.period);
            let at = (w.keys.counter(w.period), w.believed.clone());
            let i = *index.entry(at).or_insert_with(|| {
                pairs.push(pair);
                by_pair.push(Vec::new());
                pairs.len() - 1
            });
            by_pair[i].push(w);
        }
        metrics::counter!(m::HYDRATE_BATCHES).increment(1);
        metrics::histogram!(m::HYDRATE_BATCH_COUNTERS).record(pairs.len() as f64);

        // The oldest waiter's deadline bounds the statement: nobody waits on it longer than alone.
        let oldest = by_pair.iter().flatten().map(|w| w.asked).min();
        let deadline = oldest.unwrap_or_else(Instant::now) + self.db_timeout;
        let left = deadline.saturating_duration_since(Instant::now());
        let snaps = match db::within(left, db::snapshots_counted(&self.db, &pairs)).await {
            Ok((snaps, statements)) => {
                self.queries.fetch_add(statements, Ordering::Relaxed);
                snaps
            }
            Err(e) => {
                for w in by_pair.into_iter().flatten() {
                    let _ = w.reply.send(Err(LoadError::Db(copy_of(&e))));
                }
                return;
            }
        };

        // Pairs whose rows were read go to Redis; the others answer their own error now.
        let mut loaded: Vec<(Vec<Waiter>, Snapshot)> = Vec::new();
        for (waiters, snap) in by_pair.into_iter().zip(snaps) {
            match snap {
                Ok(snap) => loaded.push((waiters, snap)),
                Err(e) => {
                    tracing::warn!(error.message = %e, owner = ?waiters[0].keys.owner(), "a counter's rows in postgres could not be read");
                    answer_all(waiters, || Err(LoadError::Db(copy_of(&e))));
                }
            }
        }
        if loaded.is_empty() {
            return;
        }
        // Each pair's follow-ups go after its fill, one slot per waiter, in order.
        let mut loads: Vec<Load<'_>> = loaded
            .iter_mut()
            .map(|(waiters, snap)| {
                let follow_ups = waiters.iter_mut().map(|w| w.follow_up.take()).collect();
                Load {
                    keys: &waiters[0].keys,
                    believed: &waiters[0].believed,
                    period: waiters[0].period,
                    snapshot: snap,
                    follow_ups,
                }
            })
            .collect();
        let filled = self.store.hydrate_many(&mut loads, self.clock.now()).await;
        drop(loads);
        match filled {
            Ok(outcomes) => {
                for ((waiters, _), outcome) in loaded.into_iter().zip(outcomes) {
                    match outcome.filled {
                        Ok(filled) => {
                            // Only the first waiter of a pair reports the fill; each gets its
                            // own follow-up's reply.
                            let mut first = Some(filled.clone());
                            for (w, follow_up) in waiters.into_iter().zip(outcome.follow_ups) {
                                let filled = match (&filled, first.take()) {
                                    (Hydrated::Moved(route), _) => Hydrated::Moved(route.clone()),
                                    (_, Some(f)) => f,
                                    (_, None) => Hydrated::Loaded,
                                };
                                let _ = w.reply.send(Ok(Loaded { filled, follow_up }));
                            }
                        }
                        Err(e) => answer_all(waiters, || Err(LoadError::Redis(e.clone()))),
                    }
                }
            }
            Err(e) => {
                for (waiters, _) in loaded {
                    answer_all(waiters, || Err(LoadError::Redis(e.clone())));
                }
            }
        }
    }
}

/// Sends each waiter the answer `answer` makes for it.
fn answer_all(waiters: Vec<Waiter>, mut answer: impl FnMut() -> Result<Loaded, LoadError>) {
    for w in waiters {
        // A waiter that gave up (its request ended) has dropped its receiver: nothing to do.
        let _ = w.reply.send(answer());
    }
}

/// The same Postgres failure for another waiter of the batch (`sqlx::Error` cannot be cloned).
/// Every Postgres failure while loading is an outage, whatever its kind: the copy keeps what the
/// answer and the log show, its text and, for I/O errors (a missed deadline), its kind.
fn copy_of(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
