//! Wiring: pools, state, background tasks, the server, and an orderly shutdown.
//!
//! Start-up never exits because a dependency is down: the HTTP listener answers `/healthz` at
//! once, while a task creates and migrates the database and waits for Redis with backoff; `/v1`
//! answers 503 and `/readyz` stays unready until both answer.

mod background;
mod serve;
mod supervise;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::db;
use crate::flusher::{Drained, Flusher};
use crate::grpc;
use crate::http::health::Policy;
use crate::http::ui::LinkSigner;
use crate::http::{self, AppState, Tokens};
use crate::hydrate::Hydrator;
use crate::metrics as m;
use crate::plans::PlanBook;
use crate::quota::Quota;
use crate::refusals::Refusals;
use crate::reservations::{OpenHolds, Sweeper};
use crate::store::RedisStore;
use crate::webhooks::Dispatcher;
use background::Background;
use supervise::supervise;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// The plans file was refused.
    #[error(transparent)]
    Plans(#[from] crate::plans::PlansError),
    /// The listener failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
    /// `QUOTAD_GRPC_LISTEN` could not be bound.
    #[error("cannot listen on {addr} (QUOTAD_GRPC_LISTEN): {source}")]
    GrpcListen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// Shutdown ran out of time with counters not yet in Postgres. They are not lost: they stay
    /// dirty in Redis, and the next flusher (another replica, or this one restarted) writes them.
    /// `None`: how many could not be counted (Redis did not answer).
    #[error("shutdown bound reached with {} not yet flushed to Postgres (they stay dirty in Redis for the next flusher)", left_text(*.0))]
    Incomplete(Option<u64>),
}

fn left_text(left: Option<u64>) -> String {
    match left {
        Some(n) => format!("{n} counters"),
        None => "an unknown number of counters".into(),
    }
}

/// A configured daemon, not yet serving. Tests reach its state (and its flusher) through it.
pub struct App {
    config: Config,
    state: AppState,
    flusher: Flusher,
    /// Frees the holds of expired reservations.
    sweeper: Sweeper,
    /// The webhook dispatcher, when `QUOTAD_WEBHOOK_URLS` is set.
    dispatcher: Option<Dispatcher>,
    /// The gRPC listener, once bound.
    grpc: Option<TcpListener>,
}

impl App {
    /// Builds pools and state for `config`; connects nothing yet.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<App, RunError> {
        config.validate().map_err(RunError::Config)?;
        let plans = PlanBook::open(config.plans.clone())?;
        let refusals = Refusals::new(
            config.refusal_cache_ttl(),
            config.refusal_cache_users,
            clock.clone(),
        );
        let store = RedisStore::new(
            &config.redis_url,
            &config.key_prefix,
            config.redis_timeout(),
        )
        .map_err(RunError::Config)?
        .with_wait_replicas(config.redis_wait_replicas);
        let db = db::lazy_pool(&config.database_url, Some(config.database_timeout()))
            .map_err(|e| RunError::Config(format!("QUOTAD_DATABASE_URL: {e}")))?;
        let webhooks = config.webhooks().map_err(RunError::Config)?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut flusher = Flusher::new(&store, &db);
        let dispatcher = webhooks.map(|hooks| {
            flusher = flusher
                .clone()
                .with_endpoints(hooks.endpoints.clone(), wake.clone());
            Dispatcher::new(&db, hooks, wake)
        });
        let holds = OpenHolds::default();
        let sweeper = Sweeper::new(&store, holds.clone());
        let exports = Arc::new(crate::export::Exports::new(&db));
        let state = AppState::new(http::Shared {
            quota: Quota {
                hydrator: Hydrator::new(
                    db.clone(),
                    store.clone(),
                    config.database_timeout(),
                    clock.clone(),
                ),
                store,
                db,
                db_timeout: config.database_timeout(),
                plans,
                clock,
                refusals,
                routes: Default::default(),
                holds,
            },
            tokens: Arc::new(Tokens {
                gateway: config.gateway_tokens().map(str::to_owned).collect(),
                admin: config.admin_tokens().map(str::to_owned).collect(),
            }),
            ready: Arc::new(AtomicBool::new(false)),
            metrics: m::install(),
            links: Arc::new(LinkSigner::new(&link_secret(&config))),
            limits: Arc::new(http::Limits::new(
                config.max_in_flight as usize,
                config.request_timeout(),
            )),
            eviction: Arc::new(http::health::EvictionCheck::default()),
            exports,
        });
        Ok(App {
            config,
            state,
            flusher,
            sweeper,
            dispatcher,
            grpc: None,
        })
    }

    /// Binds `QUOTAD_GRPC_LISTEN`, when it is set, and returns the address bound (port 0 picks
    /// a free one). [`App::run`] binds it itself when this was not called first.
    pub async fn bind_grpc(&mut self) -> Result<Option<SocketAddr>, RunError> {
        let Some(addr) = self.config.grpc_listen else {
            return Ok(None);
        };
        let failed = |source| RunError::GrpcListen { addr, source };
        if self.grpc.is_none() {
            self.grpc = Some(TcpListener::bind(addr).await.map_err(failed)?);
        }
        let bound = self.grpc.as_ref().map(TcpListener::local_addr);
        bound.transpose().map_err(failed)
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The flusher (tests run passes by hand).
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// The reservation sweeper (tests run passes by hand).
    pub fn sweeper(&self) -> &Sweeper {
        &self.sweeper
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, finishes in-flight
    /// requests, flushes everything dirty to Postgres and returns, all within the shutdown bound.
    pub async fn run(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        self.bind_grpc().await?;
        let App {
            config,
            state,
            flusher,
            sweeper,
            dispatcher,
            grpc: grpc_listener,
        } = self;
        let plans = state.quota.plans.current();
        tracing::info!(config = ?config, plans = %plans.source, types = plans.types.len(), "quotad starting");

        let (stop, stopped) = watch::channel(false);
        let mut tasks = vec![
            supervise("startup", stopped.clone(), {
                let (url, state, timeout) = (
                    config.database_url.clone(),
                    state.clone(),
                    config.redis_timeout(),
                );
                move |_| prepare(url.clone(), state.clone(), timeout)
            }),
            supervise("reload", stopped.clone(), {
                let quota = state.quota.clone();
                move |_| reload_on_sighup(quota.clone())
            }),
        ];
        let background = Background::start("quotad-flusher")?;
        tasks.push(background.enter(|| {
            supervise("flusher", stopped.clone(), {
                let (flusher, interval) = (flusher.clone(), config.flush_interval());
                move |stop| flusher.clone().run(interval, stop)
            })
        }));
        // Expired reservations are freed at the flusher's pace, on its thread: both are passes
        // over every bucket, neither on the request path.
        tasks.push(background.enter(|| {
            supervise("sweeper", stopped.clone(), {
                let (sweeper, interval) = (sweeper.clone(), config.flush_interval());
                move |stop| sweeper.clone().run(interval, stop)
            })
        }));
        if let Some(dispatcher) = dispatcher {
            tasks.push(background.enter(|| {
                supervise("webhooks", stopped.clone(), move |stop| {
                    dispatcher.clone().run(stop)
                })
            }));
        }
        // The outbox is pruned whether or not webhooks are configured: events are recorded
        // either way.
        tasks.push(background.enter(|| {
            supervise("prune", stopped.clone(), {
                let (db, clock) = (state.quota.db.clone(), state.quota.clock.clone());
                let retention = config.event_retention();
                move |stop| crate::events::prune_every(db.clone(), retention, clock.clone(), stop)
            })
        }));
        if state.quota.refusals.enabled() {
            let (refusals, clients, channel) = (
                state.quota.refusals.clone(),
                state.quota.store.seed_clients(),
                state.quota.store.changes_channel(),
            );
            tasks.push(supervise("invalidations", stopped, move |_| {
                refusals.clone().listen(clients.clone(), channel.clone())
            }));
        }

        tracing::info!(addr = %listener.local_addr()?, "listening");
        let bound = config.shutdown_timeout();
        let began = Arc::new(std::sync::OnceLock::<Instant>::new());
        // One shutdown for both servers: HTTP's waits on it, and tells gRPC's.
        let (stopping, stopping_seen) = watch::channel(false);
        let shutdown = {
            let began = began.clone();
            async move {
                shutdown.await;
                let _ = began.set(Instant::now());
                let _ = stopping.send(true);
            }
        };
        let grpc_served = async {
            let Some(listener) = grpc_listener else {
                return Ok(());
            };
            tracing::info!(addr = %listener.local_addr()?, domain = %config.grpc_domain, "gRPC listening (Envoy rate-limit service, grpc.health.v1)");
            let settings = grpc::Settings {
                names: grpc::Names {
                    domain: config.grpc_domain.clone(),
                    user: config.grpc_user_key.clone(),
                    usage_type: config.grpc_type_key.clone(),
                    idempotency: config.grpc_idempotency_key.clone(),
                },
                max_streams: u32::try_from(config.max_in_flight).unwrap_or(u32::MAX),
                max_connections: config.max_connections as usize,
                preface_timeout: config.header_timeout(),
                bound,
            };
            let served = grpc::serve(listener, state.clone(), settings, stopping_seen).await;
            if let Err(e) = &served {
                tracing::error!(error.message = %e, "gRPC server failed");
            }
            served.map_err(RunError::from)
        };
        let http_served = serve::serve(
            listener,
            http::router(state.clone()),
            serve::Settings {
                header_timeout: config.header_timeout(),
                max_connections: config.max_connections as usize,
                bound,
            },
            shutdown,
        );
        let (served, grpc_served) = tokio::join!(http_served, grpc_served);
        let began = began.get().copied().unwrap_or_else(Instant::now);
        let _ = stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
        served?;
        grpc_served?;

        // Everything counted is in Redis; write what Postgres does not have yet.
        let drained = if state.ready.load(Ordering::Acquire) {
            let left = bound.saturating_sub(began.elapsed());
            let drain = background.run(async move { flusher.drain(left).await });
            drain.await.unwrap_or(Drained::Unknown)
        } else {
            Drained::All
        };
        match drained {
            Drained::All => {}
            Drained::Left(n) => return Err(RunError::Incomplete(Some(n))),
            Drained::Unknown => return Err(RunError::Incomplete(None)),
        }
        tracing::info!(
            took_ms = began.elapsed().as_millis() as u64,
            "quotad stopped; everything flushed"
        );
        Ok(())
    }
}

/// The configured link key, or a random one (links then work on this replica only).
fn link_secret(config: &Config) -> Vec<u8> {
    match config.link_secret.as_deref().filter(|s| !s.is_empty()) {
        Some(secret) => secret.as_bytes().to_vec(),
        None => {
            tracing::warn!("QUOTAD_LINK_SECRET is not set: usage-page links will only work on this replica, until it restarts");
            let mut key = uuid::Uuid::new_v4().as_bytes().to_vec();
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            key
        }
    }
}

/// Serves `config` until `shutdown`: [`App::new`] then [`App::run`].
pub async fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    App::new(config, clock)?.run(listener, shutdown).await
}

/// Creates and migrates the database and waits for Redis, retrying with backoff, checks Redis's
/// eviction policy, then marks the daemon ready and keeps checking the policy.
async fn prepare(database_url: String, state: AppState, redis_timeout: Duration) {
    let mut delay = Duration::from_millis(100);
    loop {
        match db::prepare(&database_url, &state.quota.db).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error.message = %e, retry_in_ms = delay.as_millis() as u64, "postgres not ready")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    let mut delay = Duration::from_millis(100);
    while let Err(e) = state.quota.store.ping().await {
        tracing::warn!(error.message = %e, retry_in_ms = delay.as_millis() as u64, "redis not ready");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    let store = state.quota.store.clone();
    // The policy is known before the first request is taken: counting on an evicting Redis
    // for even a moment could hand back spent quota.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.eviction.run(&store, redis_timeout).await == Policy::Unknown
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state.ready.store(true, Ordering::Release);
    match store.topology() {
        Some(t) => tracing::info!(
            redis.mode = t.mode,
            redis.masters = t.masters,
            "ready: postgres migrated, redis answering"
        ),
        None => tracing::info!("ready: postgres migrated, redis answering"),
    }
    // A Redis reconfigured (or replaced by one configured otherwise) later is noticed too.
    loop {
        tokio::time::sleep(EVICTION_RECHECK).await;
        state.eviction.run(&store, redis_timeout).await;
    }
}

/// How often Redis's eviction policy is checked again.
const EVICTION_RECHECK: Duration = Duration::from_secs(5);

/// Re-reads the plans file on every SIGHUP; a bad file is logged and the last good one stays.
async fn reload_on_sighup(quota: Quota) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; plans reload is off");
            return std::future::pending().await;
        };
        while hangups.recv().await.is_some() {
            match quota.reload_plans() {
                Ok(p) => {
                    metrics::counter!(m::PLAN_RELOADS, "result" => "ok").increment(1);
                    tracing::info!(plans = %p.source, types = p.types.len(), "plans reloaded");
                }
                Err(e) => {
                    metrics::counter!(m::PLAN_RELOADS, "result" => "error").increment(1);
                    tracing::error!(error.message = %e, "plans reload refused; the previous plans stay in force");
                }
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
