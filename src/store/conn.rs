//! The connection to Redis and the rules every call follows: one multiplexed connection per
//! store, a deadline per call (and, for scripts, a deadline Redis itself checks), one resend
//! after a connection fault, the daemon's estimate of Redis' clock, and the classification of
//! what went wrong into [`StoreError`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use deadpool_redis::redis::cluster::{ClusterClient, ClusterConfig};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use deadpool_redis::redis::{
    self, Cmd, Pipeline, RedisError, RedisFuture, ScriptInvocation, Value,
};

use super::direct::Direct;
use super::{RedisStore, StoreError, REQUESTS_CONNECTION};

/// The shortest time between two slot-map refreshes quotad starts itself (see
/// [`RedisStore::remap`]).
const REMAP_EVERY_MS: i64 = 200;

/// How long a cluster connection waits for each node to accept: a new cluster connection
/// connects to every node, and one node that hangs (stopped, or deep in a fork) must not hold
/// it up for longer than this. A connect on a LAN takes well under 10 ms.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a new cluster connection made after a fault may take.
const REMAP_TIMEOUT: Duration = Duration::from_secs(2);

/// A store's connection: made at the first call, replaced when a cluster's map changed.
#[derive(Default)]
pub(super) struct Link {
    current: std::sync::RwLock<Option<Conn>>,
    /// One connection is made at a time.
    making: tokio::sync::Mutex<()>,
    /// When (ms) the slot map was last read again.
    remapped_ms: AtomicI64,
    /// The server's [`Server::faults`] when the current connection was made.
    seen: AtomicU64,
}

impl Link {
    fn current(&self) -> Option<Conn> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What `QUOTAD_REDIS_URL` names: one Redis, or the seed nodes of a Redis Cluster. Which one is
/// found out at the first connection (`INFO cluster`), not configured, and shared by every
/// store made from the same URL (the request path's, the flusher's, reconcile's).
#[derive(Debug)]
pub(super) struct Server {
    /// The URLs given, in order.
    seeds: Vec<String>,
    found: tokio::sync::OnceCell<Found>,
    /// Masters serving slots, as last counted (1 for a single Redis; 0 until known).
    masters: AtomicUsize,
    /// How many times a store on this server saw a fault that made it read the slot map again:
    /// the other stores' connections, made before, are made again before their next call.
    faults: AtomicU64,
}

/// What the first connection found.
#[derive(Debug, Clone)]
enum Found {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// Whether quotad talks to one Redis or a cluster, and how many masters it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// `"single"` or `"cluster"`.
    pub mode: &'static str,
    /// Masters serving slots (1 for a single Redis).
    pub masters: usize,
}

/// A connection to whichever server quotad found: one multiplexed connection to a single Redis
/// (reconnecting by itself), or a cluster client that sends each command to the master owning
/// its key's slot and follows `MOVED`, `ASK` and `TRYAGAIN` (and failovers) by itself, with
/// the request path's scripts sent straight to their master when possible (`direct.rs`).
#[derive(Clone)]
pub(super) enum Conn {
    /// A single Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection, Arc<Direct>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, direct) => Box::pin(super::direct::send(c, direct, cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c, direct) => Box::pin(super::direct::send_pipeline(
                c, direct, pipeline, offset, count,
            )),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(..) => 0,
        }
    }
}

impl Server {
    /// The server(s) `urls` names: one URL, or several separated by commas (seed nodes of a
    /// cluster). Nothing is connected yet.
    pub(super) fn parse(urls: &str) -> Result<Server, String> {
        let seeds: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if seeds.is_empty() {
            return Err("QUOTAD_REDIS_URL: give one Redis URL, or several separated by commas (the seed nodes of a Redis Cluster)".into());
        }
        for url in &seeds {
            // The URL parser drops some control characters silently: refuse them all instead.
            if url.chars().any(char::is_control) {
                return Err(format!(
                    "QUOTAD_REDIS_URL: {url:?} holds a control character; give plain redis:// URLs"
                ));
            }
            redis::Client::open(url.as_str())
                .map_err(|e| format!("QUOTAD_REDIS_URL: {url:?}: {e}"))?;
        }
        Ok(Server {
            seeds,
            found: tokio::sync::OnceCell::new(),
            masters: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
        })
    }

    /// One client per URL given (the invalidation subscription tries them in turn).
    pub(super) fn seed_clients(&self) -> Vec<redis::Client> {
        self.seeds
            .iter()
            .filter_map(|u| redis::Client::open(u.as_str()).ok())
            .collect()
    }

    /// What quotad talks to, once the first connection found out.
    pub(super) fn topology(&self) -> Option<Topology> {
        let found = self.found.get()?;
        Some(Topology {
            mode: match found {
                Found::Single(_) => "single",
                Found::Cluster(_) => "cluster",
            },
            masters: self.masters.load(Ordering::Relaxed),
        })
    }

    /// Asks the seed nodes, in order, whether they are in a cluster (`INFO cluster`), and keeps
    /// the answer of the first that replies. Several URLs of Redis servers that are not in a
    /// cluster are a configuration error: quotad would not know which one holds the counters.
    async fn find(&self, timeout: Duration) -> Result<&Found, RedisError> {
        self.found
            .get_or_try_init(|| async {
                let mut last = None;
                for url in &self.seeds {
                    let client = redis::Client::open(url.as_str())?;
                    let asked = tokio::time::timeout(timeout, async {
                        let mut c = client.get_multiplexed_async_connection().await?;
                        redis::cmd("INFO")
                            .arg("cluster")
                            .query_async::<String>(&mut c)
                            .await
                    })
                    .await;
                    let info = match asked {
                        Ok(Ok(info)) => info,
                        Ok(Err(e)) => {
                            last = Some(e);
                            continue;
                        }
                        Err(_) => {
                            last = Some(timed_out(url));
                            continue;
                        }
                    };
                    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                        let found = Found::Cluster(Box::new(cluster_client(&self.seeds)?));
                        tracing::info!(seeds = self.seeds.len(), "redis: a cluster (found with INFO cluster); commands go to the master owning each key's slot");
                        return Ok(found);
                    }
                    if self.seeds.len() > 1 {
                        return Err(RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "QUOTAD_REDIS_URL names several servers, but they are not a Redis Cluster (INFO cluster: cluster_enabled:0); give one URL for a single Redis",
                        )));
                    }
                    self.masters.store(1, Ordering::Relaxed);
                    tracing::info!("redis: a single server (INFO cluster: cluster_enabled:0)");
                    return Ok(Found::Single(client));
                }
                Err(last.unwrap_or_else(|| timed_out("QUOTAD_REDIS_URL")))
            })
            .await
    }

    /// A new connection (lazy for a single Redis, which reconnects by itself; a cluster
    /// connection reads the slot map first).
    async fn connect(&self, timeout: Duration) -> Result<Conn, RedisError> {
        Ok(match self.find(timeout).await? {
            Found::Single(client) => Conn::Single(RedisStore::connect(client, timeout)?),
            Found::Cluster(client) => {
                // The library's own answer timeout also bounds the PING each new node connection
                // starts with: a node that accepts and then hangs holds a new connection up for
                // no longer than this. Calls have their own, usually shorter, deadlines.
                let config = ClusterConfig::new()
                    .set_connection_timeout(NODE_CONNECT_TIMEOUT)
                    .set_response_timeout(
                        timeout.clamp(NODE_CONNECT_TIMEOUT, 2 * NODE_CONNECT_TIMEOUT),
                    );
                let cluster = client.get_async_connection_with_config(config).await?;
                let direct = Arc::new(Direct::new(&self.seeds[0], NODE_CONNECT_TIMEOUT));
                direct.refresh(&cluster);
                Conn::Cluster(cluster, direct)
            }
        })
    }
}

/// The cluster client for `seeds`. Its retries of `MOVED`, `ASK`, `TRYAGAIN` and lost nodes are
/// quick and short, and a call's deadline bounds them all (each connection's answer timeout is
/// set where it is made, in [`Server::connect`]).
fn cluster_client(seeds: &[String]) -> Result<ClusterClient, RedisError> {
    ClusterClient::builder(seeds.iter().map(String::as_str))
        .retries(8)
        .min_retry_wait(5)
        .max_retry_wait(250)
        .connection_timeout(NODE_CONNECT_TIMEOUT)
        .build()
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer in time"),
    ))
}

/// Commands for many buckets, each command on its bucket's key: one pipeline on a single Redis
/// (one round trip, as ever); on a cluster, where a pipeline may touch one slot only, one
/// pipeline per bucket, all sent at once. Which of the two is decided when the batch is sent,
/// once the first connection has found out what the server is. Replies come back in the order
/// the commands were added.
pub(super) struct Batch {
    /// Added to the front of every pipeline sent (ignored commands: a name, a script load).
    prelude: Pipeline,
    /// Replicas every pipeline waits for at its end (`WAIT`, ignored); 0: none.
    wait: Option<(u64, u64)>,
    /// The commands added, by bucket.
    buckets: Vec<Pipeline>,
    at: HashMap<u16, usize>,
    /// Per command added, in order: its bucket's place in `buckets`.
    order: Vec<usize>,
    ignore_errors: bool,
}

impl Batch {
    /// Each reply stands alone (pipelines of scripts): see [`redis::Pipeline::ignore_errors`].
    pub(super) fn ignore_errors(&mut self) -> &mut Self {
        self.ignore_errors = true;
        self
    }

    /// Ends every pipeline with `WAIT replicas ms` (its answer ignored): for batches of
    /// counting scripts when quotad waits for replicas.
    pub(super) fn wait_for(&mut self, replicas: u64, ms: u64) -> &mut Self {
        if replicas > 0 {
            self.wait = Some((replicas, ms));
        }
        self
    }

    /// The pipeline for the next command, which is on `bucket`'s keys. Add exactly one command,
    /// not ignored.
    pub(super) fn to(&mut self, bucket: u16) -> &mut Pipeline {
        let i = *self.at.entry(bucket).or_insert_with(|| {
            self.buckets.push(redis::pipe());
            self.buckets.len() - 1
        });
        self.order.push(i);
        &mut self.buckets[i]
    }

    /// The pipelines to send: one per bucket on a cluster, else one with every command in the
    /// order added; each with the prelude, the wait and the error handling asked for.
    fn pipelines(&self, cluster: bool) -> Vec<Pipeline> {
        let start = || {
            let mut pipe = self.prelude.clone();
            if self.ignore_errors {
                pipe.ignore_errors();
            }
            pipe
        };
        let mut pipes: Vec<Pipeline> = if cluster {
            self.buckets
                .iter()
                .map(|commands| {
                    let mut pipe = start();
                    for cmd in commands.cmd_iter() {
                        pipe.add_command(cmd.clone());
                    }
                    pipe
                })
                .collect()
        } else {
            let mut pipe = start();
            let mut commands: Vec<_> = self.buckets.iter().map(|b| b.cmd_iter()).collect();
            for i in &self.order {
                if let Some(cmd) = commands[*i].next() {
                    pipe.add_command(cmd.clone());
                }
            }
            vec![pipe]
        };
        if let Some((replicas, ms)) = self.wait {
            for pipe in &mut pipes {
                pipe.cmd("WAIT").arg(replicas).arg(ms).ignore();
            }
        }
        pipes
    }
}

impl RedisStore {
    /// A batch whose pipelines each start with `prelude`.
    pub(super) fn batch(&self, prelude: Pipeline) -> Batch {
        Batch {
            prelude,
            wait: None,
            buckets: Vec::new(),
            at: HashMap::new(),
            order: Vec::new(),
            ignore_errors: false,
        }
    }

    /// Whether quotad found a cluster (false until the first connection).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.server.found.get(), Some(Found::Cluster(_)))
    }

    /// Connects (and so finds out whether this is a cluster) if nothing has yet, within
    /// `deadline`.
    pub(super) async fn found(&self, deadline: tokio::time::Instant) -> Result<(), StoreError> {
        if self.server.found.get().is_some() {
            return Ok(());
        }
        self.with_retry(deadline, |_| async { Ok(()) }).await
    }

    /// Sends a batch (its pipelines at once) with the connection-fault resend of
    /// [`Self::with_retry`], waiting until `deadline`; the replies in the order the commands
    /// were added. Each reply is the command's own outcome: with [`Batch::ignore_errors`], a
    /// failed command fails alone; otherwise the first failed pipeline fails the batch.
    pub(super) async fn run_batch(
        &self,
        batch: Batch,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<redis::RedisResult<Value>>, StoreError> {
        if batch.order.is_empty() {
            return Ok(Vec::new());
        }
        self.found(deadline).await?;
        let cluster = self.is_cluster();
        let ignore_errors = batch.ignore_errors;
        let sends = batch.pipelines(cluster).into_iter().map(|pipe| async move {
            let pipe = &pipe;
            if ignore_errors {
                self.with_retry(deadline, |mut c| async move {
                    pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut c)
                        .await
                })
                .await
            } else {
                self.with_retry(deadline, |mut c| async move {
                    pipe.query_async::<Vec<Value>>(&mut c).await
                })
                .await
                .map(|v| v.into_iter().map(Ok).collect())
            }
        });
        let replies = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut replies: Vec<std::vec::IntoIter<redis::RedisResult<Value>>> =
            replies.into_iter().map(Vec::into_iter).collect();
        // One pipeline in the order added, or one per bucket.
        let of = |i: usize| if cluster { i } else { 0 };
        Ok(batch
            .order
            .iter()
            .map(|i| {
                replies[of(*i)]
                    .next()
                    .unwrap_or_else(|| Err(super::short_reply()))
            })
            .collect())
    }

    /// Like [`Self::run_batch`] for pipelines that ignore no errors: the replies as `T`s.
    pub(super) async fn run_batch_as<T: redis::FromRedisValue>(
        &self,
        batch: Batch,
    ) -> Result<Vec<T>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.run_batch(batch, deadline)
            .await?
            .into_iter()
            .map(|r| self.reply_as(r))
            .collect()
    }

    /// One reply of a batch as a `T`, or its failure classified (and counted).
    pub(super) fn reply_as<T: redis::FromRedisValue>(
        &self,
        reply: redis::RedisResult<Value>,
    ) -> Result<T, StoreError> {
        self.settle(Some(
            reply.and_then(|v| redis::from_redis_value(v).map_err(Into::into)),
        ))
    }

    /// The masters serving slots, as `(host, port)`, from `CLUSTER NODES` (a single Redis: none).
    pub(super) async fn masters(&self) -> Result<Vec<(String, u16)>, StoreError> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        let nodes: String = self
            .with_conn(|mut c| async move {
                match &mut c {
                    Conn::Cluster(c, _) => {
                        let v = c
                            .route_command(
                                redis::cmd("CLUSTER").arg("NODES").clone(),
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                            )
                            .await?;
                        redis::from_redis_value(v).map_err(Into::into)
                    }
                    Conn::Single(_) => Ok(String::new()),
                }
            })
            .await?;
        let masters = parse_masters(&nodes);
        self.server.masters.store(masters.len(), Ordering::Relaxed);
        Ok(masters)
    }

    /// Asks every master `cmd` (the one Redis, or each master of a cluster), within
    /// `timeout`; the Redis error as it came (a refusal of the command is an answer here).
    pub async fn ask_each_master<T: redis::FromRedisValue>(
        &self,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Option<Result<Vec<T>, RedisError>> {
        tokio::time::timeout(timeout, async {
            let conn = self.conn().await?;
            let mut out = Vec::new();
            match conn {
                Conn::Single(mut c) => out.push(cmd.query_async(&mut c).await?),
                Conn::Cluster(mut c, _) => {
                    let nodes = self.masters().await.map_err(|e| match e {
                        StoreError::Redis(e) => e,
                        other => timed_out(&other.to_string()),
                    })?;
                    for (host, port) in nodes {
                        let v = c
                            .route_command(
                                cmd.clone(),
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host,
                                    port,
                                }),
                            )
                            .await?;
                        out.push(redis::from_redis_value(v)?);
                    }
                }
            }
            Ok(out)
        })
        .await
        .ok()
    }

    /// Runs `cmd` on the node at `(host, port)` of a cluster (`SCAN`, asked of each master), or,
    /// with `None`, on the one Redis.
    pub(super) async fn on_node<T: redis::FromRedisValue>(
        &self,
        node: Option<&(String, u16)>,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.with_conn(|mut c| async move {
            let v = match (&mut c, node) {
                (Conn::Cluster(c, _), Some((host, port))) => {
                    c.route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?
                }
                (c, _) => cmd.query_async(c).await?,
            };
            redis::from_redis_value(v).map_err(Into::into)
        })
        .await
    }
}

/// The masters that serve slots and are not failed, from `CLUSTER NODES`' text:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_masters(nodes: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serving = fields.len() > 8;
            if !flags.split(',').any(|f| f == "master")
                || flags.split(',').any(|f| f == "fail" || f == "noaddr")
                || !serving
            {
                return None;
            }
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

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
    fn connect(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, RedisError> {
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
    /// batch's. Not on a cluster: a batch there is one pipeline per bucket, and a name in each
    /// would add a command per bucket to every flusher pass; a cluster's connections go unnamed.
    pub(super) fn set_name(&self, pipe: &mut redis::Pipeline) {
        if !self.is_cluster() {
            pipe.cmd("CLIENT").arg("SETNAME").arg(self.name).ignore();
        }
    }

    /// The connection (a cheap handle to the shared one), made at the first call; the first
    /// connection also finds out whether quotad talks to a cluster.
    ///
    /// A background store's connection (the flusher's, reconcile's) made before a fault another
    /// store saw on a cluster is made again first, within [`REMAP_TIMEOUT`] and the call's
    /// deadline: otherwise the flusher's next pass would wait out its deadline on a master that
    /// died, which the request path had already found out about. The request path's own
    /// connection is replaced in the background instead ([`Self::remap`]).
    pub(super) async fn conn(&self) -> Result<Conn, RedisError> {
        if let Some(c) = self.conn.current() {
            if !self.behind() {
                return Ok(c);
            }
            let _one = self.conn.making.lock().await;
            if !self.behind() {
                return Ok(self.conn.current().unwrap_or(c));
            }
            let faults = self.server.faults.load(Ordering::Acquire);
            let made = tokio::time::timeout(REMAP_TIMEOUT, self.server.connect(self.timeout)).await;
            // Tried once per fault, made or not: a call does not pay for it twice.
            self.conn.seen.store(faults, Ordering::Release);
            return Ok(match made {
                Ok(Ok(fresh)) => {
                    *self.conn.current.write().unwrap_or_else(|e| e.into_inner()) =
                        Some(fresh.clone());
                    fresh
                }
                _ => c,
            });
        }
        let _one = self.conn.making.lock().await;
        if let Some(c) = self.conn.current() {
            return Ok(c);
        }
        let faults = self.server.faults.load(Ordering::Acquire);
        let c = self.server.connect(self.timeout).await?;
        *self.conn.current.write().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        self.conn.seen.store(faults, Ordering::Release);
        Ok(c)
    }

    /// Whether this is a background store whose connection predates a fault another store saw.
    fn behind(&self) -> bool {
        self.name != REQUESTS_CONNECTION
            && self.conn.seen.load(Ordering::Acquire) < self.server.faults.load(Ordering::Acquire)
    }

    /// After a connection fault on a cluster (at most every [`REMAP_EVERY_MS`] per store): the
    /// request path's connection is replaced by a new one, made in the background from a fresh
    /// slot map; every background store's (this one's included) is made again before its next
    /// call (see [`Self::conn`]). The cluster client follows `MOVED` by itself, but a master that
    /// died answers nothing, so without a new map quotad would keep calling the dead address
    /// after its replica took over.
    fn remap(&self) {
        if !self.is_cluster() {
            return;
        }
        let now = wall_ms(SystemTime::now());
        let last = self.conn.remapped_ms.load(Ordering::Relaxed);
        if now - last < REMAP_EVERY_MS
            || self
                .conn
                .remapped_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let faults = self.server.faults.fetch_add(1, Ordering::AcqRel) + 1;
        if self.name != REQUESTS_CONNECTION {
            // A background store makes its connection again before its next call (`conn`).
            return;
        }
        let store = self.clone();
        rt.spawn(async move {
            // Bounded: a node that hangs must not keep this task (and its sockets) forever.
            let made = tokio::time::timeout(REMAP_TIMEOUT, store.server.connect(store.timeout))
                .await
                .unwrap_or_else(|_| Err(timed_out("a new cluster connection")));
            match made {
                Ok(c) => {
                    *store
                        .conn
                        .current
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = Some(c);
                    store.conn.seen.fetch_max(faults, Ordering::AcqRel);
                    tracing::info!("redis cluster: slot map read again after a connection fault");
                }
                Err(e) => {
                    tracing::debug!(error.message = %e, "redis cluster: slot map not read again")
                }
            }
        });
    }

    /// Runs `f` with the connection, under the Redis deadline, once.
    pub(super) async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = attempt(deadline, async { f(self.conn().await?).await }).await;
        if needs_remap(&result) {
            self.remap();
        }
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
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let send = || async { f(self.conn().await?).await };
        let mut result = attempt(deadline, send()).await;
        if needs_remap(&result) {
            self.remap();
        }
        if matches!(&result, Some(Err(e)) if is_connection_fault(e))
            && tokio::time::Instant::now() < deadline
        {
            // The manager reconnects in the background (a cluster client refreshes its slot
            // map); this send waits for it.
            result = attempt(deadline, send()).await;
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
    /// sent armed, by `run_script` or (the bench, pipelines) by calling this.
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
        if self.is_cluster() {
            // Every readiness check counts the masters again (a failover, a new shard).
            self.masters().await?;
        }
        if let Some(t) = self.server.topology() {
            metrics::gauge!(crate::metrics::REDIS_MASTERS, "mode" => t.mode).set(t.masters as f64);
        }
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
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// Whether a call's outcome may mean the slot map is out of date: no answer in time (a master
/// that died or hangs), a lost connection, or a cluster that is reshaping.
fn needs_remap<T>(result: &Option<Result<T, RedisError>>) -> bool {
    match result {
        None => true,
        Some(Err(e)) => is_connection_fault(e) || is_cluster_fault(e),
        Some(Ok(_)) => false,
    }
}

/// A cluster that is reshaping (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `READONLY`: a node
/// that lost its slots or its master): a fresh slot map may send the call elsewhere.
fn is_cluster_fault(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "MOVED" | "ASK")
    )
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
        "MOVED" | "ASK" => {
            "the key's slot is served by another cluster node (a failover or resharding is under way)"
        }
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
    fn masters_are_the_serving_nodes_flagged_master_and_not_failed() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host2 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
e5 127.0.0.1:7005@17005 master - 0 1 5 connected
f6 127.0.0.1:7006@17006 master - 0 1 6 connected 10923-16383
";
        assert_eq!(
            parse_masters(nodes),
            vec![
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002),
                ("127.0.0.1".to_owned(), 7006)
            ]
        );
    }

    #[test]
    fn one_url_or_several_seeds_and_nothing_else() {
        let one = Server::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(one.seeds.len(), 1);
        let seeds = Server::parse(" redis://a:7001 , redis://b:7002,redis://c:7003 ").unwrap();
        assert_eq!(
            seeds.seeds,
            ["redis://a:7001", "redis://b:7002", "redis://c:7003"]
        );
        for bad in [
            "",
            " , ",
            "redis://a:7001,nonsense://x",
            "redis://a:7001,redis://\u{1}b:7002",
            "redis://a:7001,redis://b\t:7002",
        ] {
            let e = Server::parse(bad).unwrap_err();
            assert!(e.starts_with("QUOTAD_REDIS_URL"), "{bad:?}: {e}");
        }
        assert!(
            one.topology().is_none(),
            "nothing is known before a connection"
        );
    }

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
