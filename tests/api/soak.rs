//! The chaos soak: two quotad daemons (real processes) share a private Redis and a private
//! Postgres under consume load while faults are injected in a loop — Redis killed and restarted
//! with its append-only file, Redis killed and restarted empty, Redis paused past its timeout,
//! Postgres restarted, a daemon SIGKILLed and started again — and the month ends halfway through
//! (the daemons' clocks are set so that it does). At the end everything is flushed and checked:
//! `quotad reconcile` finds no drift, Postgres holds every allowed answer except what the
//! Guarantees table allows to be lost for the faults injected, holds nothing that was not answered
//! allowed except calls whose answer was lost or failed, and no counter went over its limit.
//!
//! `QUOTAD_SOAK_SECS` sets the length (default 36 s, run by CI); `deploy/soak.sh [secs]` runs
//! just this test and prints its `soak:` summary line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use deadpool_redis::redis;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{
    free_port, month_start, period_id, rfc, tempfile_path, PrivatePostgres, PrivateRedis,
};

/// FREE's limits in the soak's plans file: small, so every user reaches them.
const AI_LIMIT: u64 = 30;
const KB_LIMIT: u64 = 10;
const TYPES: [&str; 2] = ["ai_generation", "kb_file"];
const FLUSH_MS: u64 = 200;
const REDIS_TIMEOUT_MS: u64 = 500;
/// Users enter the load at this rate, and each stays for `WINDOW / USERS_PER_SEC` seconds: at any
/// moment some users are counting and others are at their limits and being refused.
const USERS_PER_SEC: f64 = 5.0;
const WINDOW: usize = 20;
/// Load clients, half on each daemon.
const CLIENTS: usize = 16;
const PREFIX: &str = "soak";
const DB: &str = "quotad_soak";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The soak daemon's clock: the system clock moved by an offset that follows a file the soak
/// rewrites (read every 20 ms), so the soak moves both daemons (and a daemon started again after
/// SIGKILL) to just before the month end together, and they cross it together.
#[derive(Clone)]
struct FileClock(Arc<AtomicI64>);

impl FileClock {
    /// Follows the offset (ms) in `path`. The thread that reads it also ends the process when the
    /// soak that started it is gone (killed before it could kill its daemons).
    fn follow(path: PathBuf) -> FileClock {
        let read = move || -> Option<i64> {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        let first = read().expect("the soak's clock file holds an offset in ms");
        let clock = FileClock(Arc::new(AtomicI64::new(first)));
        let offset = clock.0.clone();
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            // A rewrite caught half done reads as nothing: keep the last offset.
            if let Some(now) = read() {
                offset.store(now, Ordering::SeqCst);
            }
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
        });
        clock
    }
}

impl quotad::clock::Clock for FileClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.0.load(Ordering::SeqCst))
    }
}

/// Not a test of its own: the daemon process of [`chaos_soak`], which runs this test binary with
/// the daemon's settings in `QUOTAD_*` variables (read exactly as `quotad serve` reads them) and
/// the path of its clock file in `QUOTAD_SOAK_CLOCK_FILE`. Run without them, it does nothing.
#[test]
#[ignore = "the chaos soak's daemon process; chaos_soak starts it"]
fn daemon_process() {
    use clap::Parser;
    let Ok(clock_file) = std::env::var("QUOTAD_SOAK_CLOCK_FILE") else {
        return;
    };
    let clock = FileClock::follow(clock_file.into());
    let cli = quotad::config::Cli::try_parse_from(["quotad", "serve"]).expect("soak settings");
    let quotad::config::Command::Serve(config) = cli.command else {
        unreachable!("serve was asked for")
    };
    config.validate().expect("soak settings");
    let _guard = quotad::telemetry::init(&config.log, config.log_format).expect("log filter");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("soak port");
        quotad::app::run(config, Arc::new(clock), listener, std::future::pending())
            .await
            .expect("daemon runs");
    });
}

/// One daemon process of the soak, started again on the same port after a kill.
struct SoakDaemon {
    child: Option<Child>,
    port: u16,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
}

impl SoakDaemon {
    fn start(env: Vec<(&'static str, String)>) -> SoakDaemon {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "quotad-soak-{port}-{}.log",
            Uuid::new_v4().simple()
        ));
        let mut d = SoakDaemon {
            child: None,
            port,
            env,
            log,
        };
        d.launch();
        d
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // This very test binary, by its open file: a rebuild that replaces the file on disk
        // during the soak does not change what the daemons run.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args([
            "soak::daemon_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QUOTAD_LISTEN", format!("127.0.0.1:{}", self.port))
        .env_remove("QUOTAD_GATEWAY_TOKENS")
        .env_remove("QUOTAD_ADMIN_TOKENS")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("soak daemon process starts"));
    }

    /// SIGKILL, and wait for the process to go.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for SoakDaemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn wait_ready(client: &reqwest::Client, d: &SoakDaemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", d.base())).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "soak daemon on port {} not ready within 60 s; log:\n{}",
            d.port,
            d.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What became of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 200, counted.
    Allowed,
    /// 200 with `"degraded": true`: fail open, not counted.
    Degraded,
    /// 402.
    Refused,
    /// 503 (`REDIS_UNAVAILABLE`, `DATABASE_UNAVAILABLE`, `NOT_READY`…): fail closed, not counted.
    Unavailable,
    /// No answer (timeout, connection lost mid-call) or 503 `TIMEOUT`: it may have counted.
    NoAnswer,
    /// The daemon was down: the connection was refused, nothing reached it.
    NotSent,
    /// Any other status: a bug.
    Other,
}

/// Period index: 0 the month that ends halfway, 1 the next month, 2 lifetime.
const LIFE: u8 = 2;
const UNKNOWN: u8 = u8::MAX;

#[derive(Debug, Clone, Copy)]
struct Record {
    user: u32,
    ty: u8,
    period: u8,
    outcome: Outcome,
    sent: u64,
    received: u64,
    keyed: bool,
    /// A keyed call whose first attempt got no answer, sent again with the same key.
    retried: bool,
    replayed: bool,
    /// An allowed answer whose `used` is over its `limit`.
    used_over_limit: bool,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct LoadPlan {
    users: Arc<Vec<Uuid>>,
    periods: Arc<[String; 2]>,
    started: Instant,
    stop: Arc<AtomicBool>,
}

async fn send_once(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    periods: &[String; 2],
) -> (Outcome, u8, bool, bool) {
    let resp = match client
        .post(format!("{base}/v1/consume"))
        .json(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if e.is_connect() => return (Outcome::NotSent, UNKNOWN, false, false),
        Err(_) => return (Outcome::NoAnswer, UNKNOWN, false, false),
    };
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    let answer: Value = match resp.json().await {
        Ok(v) => v,
        Err(_) => return (Outcome::NoAnswer, UNKNOWN, false, false),
    };
    let period = match answer["period_start"].as_str() {
        Some(p) if p == periods[0] => 0,
        Some(p) if p == periods[1] => 1,
        Some(_) => UNKNOWN,
        None if answer.get("period_start").is_some() => LIFE,
        None => UNKNOWN,
    };
    let outcome = match (status, answer["degraded"].as_bool()) {
        (200, Some(true)) => Outcome::Degraded,
        (200, _) => Outcome::Allowed,
        (402, _) => Outcome::Refused,
        (503, _) if answer["code"] == "TIMEOUT" => Outcome::NoAnswer,
        (503, _) => Outcome::Unavailable,
        _ => Outcome::Other,
    };
    let over = outcome == Outcome::Allowed
        && matches!((answer["used"].as_u64(), answer["limit"].as_u64()), (Some(u), Some(l)) if u > l);
    (outcome, period, replayed, over)
}

/// One load client: consumes for the users of the moment on `base` until told to stop.
async fn load_client(c: usize, base: String, plan: LoadPlan) -> Vec<Record> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut records = Vec::new();
    let mut n = 0u64;
    while !plan.stop.load(Ordering::Relaxed) {
        let first = (plan.started.elapsed().as_secs_f64() * USERS_PER_SEC) as usize;
        let user =
            (first + (xorshift(&mut rng) % WINDOW as u64) as usize).min(plan.users.len() - 1);
        let ty = u8::from(xorshift(&mut rng).is_multiple_of(4));
        let keyed = xorshift(&mut rng).is_multiple_of(4);
        n += 1;
        let mut body = serde_json::json!({"user_id": plan.users[user], "type": TYPES[ty as usize]});
        if keyed {
            body["idempotency_key"] = format!("soak-{c}-{n}").into();
        }
        let sent = now_ms();
        let (mut outcome, mut period, mut replayed, mut over) =
            send_once(&client, &base, &body, &plan.periods).await;
        let mut retried = false;
        // A keyed call that got no answer is sent again with its key, as a gateway would: the
        // answer then says whether the first attempt counted.
        let mut tries = 0;
        while keyed
            && outcome == Outcome::NoAnswer
            && tries < 3
            && !plan.stop.load(Ordering::Relaxed)
        {
            tries += 1;
            retried = true;
            tokio::time::sleep(Duration::from_millis(300)).await;
            (outcome, period, replayed, over) =
                send_once(&client, &base, &body, &plan.periods).await;
            if outcome == Outcome::NotSent {
                outcome = Outcome::NoAnswer;
            }
        }
        records.push(Record {
            user: user as u32,
            ty,
            period,
            outcome,
            sent,
            received: now_ms(),
            keyed,
            retried,
            replayed,
            used_over_limit: over,
        });
        if outcome == Outcome::NotSent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    records
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    RedisRestartKept,
    RedisPause,
    PostgresRestart,
    DaemonKill,
    RedisRestartEmpty,
}

const FAULT_CYCLE: [Fault; 5] = [
    Fault::RedisRestartKept,
    Fault::RedisPause,
    Fault::PostgresRestart,
    Fault::DaemonKill,
    Fault::RedisRestartEmpty,
];

/// One command per bucket's dirty set (`add` appends it for the set's key), sent in one pipeline;
/// `None` when Redis does not connect within 2 s or answer within 3 s.
async fn over_dirty_sets<T: redis::FromRedisValue>(
    url: &str,
    add: impl Fn(&mut redis::Pipeline, String),
) -> Option<Vec<T>> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let mut pipe = redis::pipe();
    for b in 0..quotad::store::BUCKETS {
        add(&mut pipe, quotad::store::keys::dirty_of(PREFIX, b));
    }
    tokio::time::timeout(Duration::from_secs(3), pipe.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

/// The Redis time (ms) of the oldest change not yet in Postgres, from the dirty sets' scores
/// (each member is scored by its first change since its last flush); the time of the scan when
/// nothing is dirty. Every count Redis could lose after this call was made at or after it.
async fn oldest_unflushed_ms(url: &str) -> Option<u64> {
    let scanned = now_ms();
    let heads: Vec<Vec<(String, f64)>> = over_dirty_sets(url, |pipe, key| {
        pipe.cmd("ZRANGE").arg(key).arg(0).arg(0).arg("WITHSCORES");
    })
    .await?;
    Some(
        heads
            .iter()
            .flatten()
            .map(|(_, score)| *score as u64)
            .min()
            .unwrap_or(scanned)
            .min(scanned),
    )
}

/// Members waiting in the dirty sets, or `None` when Redis does not answer.
async fn dirty_count(url: &str) -> Option<u64> {
    let counts: Vec<u64> = over_dirty_sets(url, |pipe, key| {
        pipe.cmd("ZCARD").arg(key);
    })
    .await?;
    Some(counts.iter().sum())
}

/// Runs `quotad reconcile --json` (plus `extra`) on the soak's Redis and database.
fn reconcile(redis_url: &str, db_url: &str, period: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args(["reconcile", "--json", "--period", period])
        .args(extra)
        .env("QUOTAD_REDIS_URL", redis_url)
        .env("QUOTAD_DATABASE_URL", db_url)
        .env("QUOTAD_KEY_PREFIX", PREFIX)
        .env("QUOTAD_LOG", "warn")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "reconcile {period}: no report: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak() {
    let secs: u64 = std::env::var("QUOTAD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(36)
        .max(20);
    let run_for = Duration::from_secs(secs);

    // Redis keeps an append-only file, written before each answer (`appendfsync always`), so a
    // restart that keeps it loses nothing; the "empty" restarts delete it first.
    let mut redis_server =
        PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let pg = PrivatePostgres::start();
    let redis_url = redis_server.url();
    let db_url = format!("{}/{DB}", pg.url());
    let plans = tempfile_path::write(
        &quotad::plans::BUILT_IN
            .replace("ai_generation = 50", &format!("ai_generation = {AI_LIMIT}"))
            .replace("kb_file = 20", &format!("kb_file = {KB_LIMIT}")),
    );
    // The daemons' clocks: the month ends a minute after they start (they take a few seconds to
    // be ready), then, once the load starts, halfway through it.
    let clock_file = tempfile_path::write("");
    let set_crossing = |at_ms: u64| {
        let offset = month_start(1).timestamp_millis() - at_ms as i64;
        tempfile_path::rewrite(&clock_file, &offset.to_string());
    };
    set_crossing(now_ms() + secs * 500 + 60_000);
    let env = vec![
        ("QUOTAD_REDIS_URL", redis_url.clone()),
        ("QUOTAD_DATABASE_URL", db_url.clone()),
        ("QUOTAD_KEY_PREFIX", PREFIX.to_owned()),
        ("QUOTAD_PLANS", plans.display().to_string()),
        ("QUOTAD_FLUSH_INTERVAL_MS", FLUSH_MS.to_string()),
        ("QUOTAD_REDIS_TIMEOUT_MS", REDIS_TIMEOUT_MS.to_string()),
        ("QUOTAD_LOG", "warn".to_owned()),
        ("QUOTAD_SOAK_CLOCK_FILE", clock_file.display().to_string()),
    ];
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut daemons = [SoakDaemon::start(env.clone()), SoakDaemon::start(env)];
    wait_ready(&http, &daemons[0]).await;
    wait_ready(&http, &daemons[1]).await;

    let users: Arc<Vec<Uuid>> = Arc::new(
        (0..(secs as f64 * USERS_PER_SEC) as usize + WINDOW + 8)
            .map(|_| Uuid::new_v4())
            .collect(),
    );
    let periods = Arc::new([rfc(month_start(0)), rfc(month_start(1))]);
    let stop = Arc::new(AtomicBool::new(false));
    // Both daemons read the clock file every 20 ms: the load starts once they have.
    let crossing_ms = now_ms() + 100 + secs * 500;
    set_crossing(crossing_ms);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let started_ms = now_ms();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let plan = LoadPlan {
                users: users.clone(),
                periods: periods.clone(),
                started,
                stop: stop.clone(),
            };
            tokio::spawn(load_client(c, daemons[c % 2].base(), plan))
        })
        .collect();

    // Faults, one after another, until shortly before the end.
    let mut faults: HashMap<Fault, u64> = HashMap::new();
    // For each empty restart: (oldest unflushed change, kill), both in ms.
    let mut loss_windows: Vec<(u64, u64)> = Vec::new();
    // Each Redis fault: (pause?, from, to), in ms.
    let mut redis_faults: Vec<(bool, u64, u64)> = Vec::new();
    let mut unscanned = 0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut i = 0;
    while started.elapsed() + Duration::from_secs(5) < run_for {
        let fault = FAULT_CYCLE[i % FAULT_CYCLE.len()];
        let fault_from = now_ms();
        match fault {
            Fault::RedisRestartKept => {
                tokio::task::block_in_place(|| redis_server.kill());
                tokio::time::sleep(Duration::from_millis(800)).await;
                tokio::task::block_in_place(|| redis_server.restart());
            }
            Fault::RedisRestartEmpty => {
                let oldest = oldest_unflushed_ms(&redis_url).await;
                if oldest.is_none() {
                    unscanned += 1;
                }
                tokio::task::block_in_place(|| redis_server.kill());
                loss_windows.push((oldest.unwrap_or(0), now_ms()));
                for entry in std::fs::read_dir(redis_server.dir()).unwrap().flatten() {
                    let path = entry.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
                tokio::time::sleep(Duration::from_millis(800)).await;
                tokio::task::block_in_place(|| redis_server.restart());
            }
            Fault::RedisPause => {
                redis_server.pause();
                tokio::time::sleep(Duration::from_millis(REDIS_TIMEOUT_MS * 4)).await;
                redis_server.resume();
            }
            Fault::PostgresRestart => {
                let mode = if faults.get(&fault).copied().unwrap_or(0).is_multiple_of(2) {
                    "fast"
                } else {
                    "immediate"
                };
                tokio::task::block_in_place(|| pg.stop(mode));
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tokio::task::block_in_place(|| pg.resume());
            }
            Fault::DaemonKill => {
                let d = &mut daemons[(faults.get(&fault).copied().unwrap_or(0) % 2) as usize];
                tokio::task::block_in_place(|| d.kill());
                tokio::time::sleep(Duration::from_millis(500)).await;
                d.launch();
            }
        }
        if matches!(
            fault,
            Fault::RedisPause | Fault::RedisRestartKept | Fault::RedisRestartEmpty
        ) {
            redis_faults.push((fault == Fault::RedisPause, fault_from, now_ms()));
        }
        *faults.entry(fault).or_default() += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if let Some(left) = run_for.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for c in clients {
        records.extend(c.await.unwrap());
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Everything is flushed once the dirty sets are empty (a member leaves only after its row is
    // in Postgres); the flusher may be backing off after the last Postgres restart.
    wait_ready(&http, &daemons[0]).await;
    wait_ready(&http, &daemons[1]).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if dirty_count(&redis_url).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still dirty 90 s after the load; logs:\n{}\n{}",
            daemons[0].log_tail(),
            daemons[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Reconcile each period: no drift; counters Redis has not loaded since an empty restart are
    // `not_loaded`, and a repair loads them, after which a second reconcile finds everything in sync.
    let mut reconciled = Vec::new();
    for period in [period_id(0), period_id(1), "lifetime".to_owned()] {
        let (code, found) = reconcile(&redis_url, &db_url, &period, &["--repair"]);
        let (after_code, after) = reconcile(&redis_url, &db_url, &period, &[]);
        reconciled.push((period, code, found, after_code, after));
    }

    // Postgres' totals per (user, type, period).
    let pool = sqlx::PgPool::connect(&db_url).await.expect("soak database");
    let rows: Vec<(Uuid, String, DateTime<Utc>, i64)> =
        sqlx::query_as("SELECT user_id, type, period_start, count FROM usage_tracking")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let index: HashMap<Uuid, u32> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (*u, i as u32))
        .collect();
    type Counter = (u32, u8, u8);
    let mut in_pg: HashMap<Counter, u64> = HashMap::new();
    for (user, ty, start, count) in &rows {
        let u = *index.get(user).expect("a soak user");
        let t = TYPES.iter().position(|t| t == ty).expect("a soak type") as u8;
        let p = if *start == month_start(0) {
            0
        } else if *start == month_start(1) {
            1
        } else {
            LIFE
        };
        in_pg.insert((u, t, p), *count as u64);
    }

    // The answers, per counter.
    let mut tally: HashMap<&str, u64> = HashMap::new();
    let mut allowed: HashMap<Counter, u64> = HashMap::new();
    let mut refused_counters: std::collections::HashSet<Counter> = Default::default();
    let mut ambiguous: HashMap<(u32, u8), u64> = HashMap::new();
    let mut unanswered: HashMap<(u32, u8), u64> = HashMap::new();
    // Calls answered degraded or 503, per (user, type): during a Redis pause, a Redis kill, other.
    let mut failed_during: HashMap<(u32, u8), [u64; 3]> = HashMap::new();
    let mut bound: HashMap<Counter, u64> = HashMap::new();
    let (mut keyed, mut retried, mut replayed, mut used_over, mut unattributed) = (0, 0, 0, 0, 0);
    for r in &records {
        let name = match r.outcome {
            Outcome::Allowed => "allowed",
            Outcome::Degraded => "degraded",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
            Outcome::NoAnswer => "no_answer",
            Outcome::NotSent => "not_sent",
            Outcome::Other => "other",
        };
        *tally.entry(name).or_default() += 1;
        keyed += u64::from(r.keyed);
        retried += u64::from(r.retried);
        replayed += u64::from(r.replayed);
        used_over += u64::from(r.used_over_limit);
        // A call that failed or got no answer may still have counted: no answer at all (lost
        // with a killed daemon or Redis, or past the client's timeout), or failed because Redis
        // stopped between running the script and replying (README, Redis hung). A keyed call
        // sent again is counted here too: its key's record is lost with an empty Redis.
        if matches!(
            r.outcome,
            Outcome::NoAnswer | Outcome::Degraded | Outcome::Unavailable
        ) || r.retried
        {
            *ambiguous.entry((r.user, r.ty)).or_default() += 1;
        }
        if r.outcome == Outcome::NoAnswer || r.retried {
            *unanswered.entry((r.user, r.ty)).or_default() += 1;
        }
        if matches!(r.outcome, Outcome::Degraded | Outcome::Unavailable) {
            // Which Redis fault the call overlapped, if any (a second's slack after it).
            let during = redis_faults
                .iter()
                .find(|(_, from, to)| r.sent <= to + 1000 && r.received >= *from)
                .map(|(pause, _, _)| usize::from(!*pause))
                .unwrap_or(2);
            failed_during.entry((r.user, r.ty)).or_default()[during] += 1;
        }
        let counter = (r.user, r.ty, r.period);
        match r.outcome {
            Outcome::Allowed if r.period == UNKNOWN => unattributed += 1,
            Outcome::Allowed => {
                *allowed.entry(counter).or_default() += 1;
                // The Guarantees table: a Redis restart without its data loses what was not
                // flushed yet: changes made at or after the oldest unflushed one, before the kill.
                let at_risk = loss_windows
                    .iter()
                    .filter(|(oldest, kill)| r.received + 50 >= *oldest && r.sent <= *kill)
                    .count() as u64;
                if at_risk > 0 {
                    *bound.entry(counter).or_default() += 1;
                }
            }
            Outcome::Refused => {
                refused_counters.insert(counter);
            }
            _ => {}
        }
    }

    let limit = |ty: u8| if ty == 0 { AI_LIMIT } else { KB_LIMIT };
    let mut counters: Vec<Counter> = allowed.keys().chain(in_pg.keys()).copied().collect();
    counters.sort();
    counters.dedup();
    let (mut lost, mut lost_over_bound, mut extra, mut overshoot, mut allowed_over_limit) = (
        0u64,
        Vec::new(),
        HashMap::<(u32, u8), u64>::new(),
        Vec::new(),
        0u64,
    );
    for c in &counters {
        let a = allowed.get(c).copied().unwrap_or(0);
        let p = in_pg.get(c).copied().unwrap_or(0);
        if a > p {
            lost += a - p;
            if a - p > bound.get(c).copied().unwrap_or(0) {
                lost_over_bound.push((*c, a, p));
            }
        } else {
            *extra.entry((c.0, c.1)).or_default() += p - a;
        }
        if p > limit(c.1) {
            overshoot.push((*c, p));
        }
        allowed_over_limit += a.saturating_sub(limit(c.1));
    }
    let extra_total: u64 = extra.values().sum();
    let failed_by_fault = failed_during.values().fold([0u64; 3], |mut sum, n| {
        for (s, v) in sum.iter_mut().zip(n) {
            *s += v;
        }
        sum
    });
    let extra_unexplained: Vec<_> = extra
        .iter()
        .filter(|(k, e)| **e > ambiguous.get(k).copied().unwrap_or(0))
        .collect();
    // How much of the extra the calls without an answer alone do not explain (the rest were
    // answered degraded or 503 after Redis had run their script).
    // Each such count is put down to a failed answer of the same user and type: during a Redis
    // pause first, then a Redis kill, then any other.
    let mut extra_beyond_unanswered = [0u64; 3];
    for (k, e) in &extra {
        let mut left = e.saturating_sub(unanswered.get(k).copied().unwrap_or(0));
        let failed = failed_during.get(k).copied().unwrap_or_default();
        for (slot, n) in failed.iter().enumerate() {
            let take = left.min(*n);
            extra_beyond_unanswered[slot] += take;
            left -= take;
        }
        extra_beyond_unanswered[2] += left;
    }
    let at_limit = counters
        .iter()
        .filter(|c| refused_counters.contains(c))
        .count();
    let bound_total: u64 = bound.values().sum();
    let pg_total: u64 = in_pg.values().sum();
    let month_allowed = |p: u8| {
        allowed
            .iter()
            .filter(|((_, _, q), _)| *q == p)
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let drift: usize = reconciled
        .iter()
        .map(|(_, _, found, _, after)| {
            found["drift"].as_array().map_or(999, |d| d.len())
                + after["drift"].as_array().map_or(999, |d| d.len())
        })
        .sum();
    let not_loaded: u64 = reconciled
        .iter()
        .map(|(_, _, found, _, _)| found["not_loaded"].as_u64().unwrap_or(0))
        .sum();
    let compared: u64 = reconciled
        .iter()
        .map(|(_, _, found, _, _)| found["compared"].as_u64().unwrap_or(0))
        .sum();
    let t = |k: &str| tally.get(k).copied().unwrap_or(0);
    let f = |k: Fault| faults.get(&k).copied().unwrap_or(0);
    let summary = format!(
        "soak: {load_secs:.0} s, 2 daemons, {CLIENTS} clients, {} users ({WINDOW} at a time, FREE: {AI_LIMIT} ai_generation a month, {KB_LIMIT} kb_file), \
         month end crossed at {:.0} s; requests {} ({:.0}/s; {keyed} with an idempotency key, {retried} sent again, {replayed} replayed); \
         faults {}: redis restart kept {}, redis restart empty {}, redis pause {}, postgres restart {}, daemon SIGKILL {}; \
         answers: allowed {} (month 1 {}, month 2 {}, lifetime {}), degraded {}, 402 {}, 503 {} (degraded or 503 during a Redis pause {}, a Redis kill {}, neither {}), no answer {}, not sent {}, other {}; \
         postgres total {pg_total}; lost {lost} (bound {bound_total}, {} empty restarts{}); extra {extra_total} (ambiguous answers {}; {} beyond the calls without an answer, with failed answers during a Redis pause {}, a Redis kill {}, neither {}); \
         overshoot {} counters; allowed over limit {allowed_over_limit}; counters {} ({at_limit} refused at their limit); \
         reconcile: {compared} counters compared, drift {drift}, not loaded {not_loaded} (loaded by --repair); used over limit in answers {used_over}",
        users.len(),
        (crossing_ms as f64 - started_ms as f64) / 1000.0,
        records.len(),
        records.len() as f64 / load_secs,
        faults.values().sum::<u64>(),
        f(Fault::RedisRestartKept),
        f(Fault::RedisRestartEmpty),
        f(Fault::RedisPause),
        f(Fault::PostgresRestart),
        f(Fault::DaemonKill),
        t("allowed"),
        month_allowed(0),
        month_allowed(1),
        month_allowed(LIFE),
        t("degraded"),
        t("refused"),
        t("unavailable"),
        failed_by_fault[0],
        failed_by_fault[1],
        failed_by_fault[2],
        t("no_answer"),
        t("not_sent"),
        t("other"),
        loss_windows.len(),
        if unscanned > 0 { format!(", {unscanned} unscanned") } else { String::new() },
        ambiguous.values().sum::<u64>(),
        extra_beyond_unanswered.iter().sum::<u64>(),
        extra_beyond_unanswered[0],
        extra_beyond_unanswered[1],
        extra_beyond_unanswered[2],
        overshoot.len(),
        counters.len(),
    );
    println!("{summary}");

    for (period, code, found, after_code, after) in &reconciled {
        assert_eq!(
            found["drift"].as_array().map(Vec::len),
            Some(0),
            "reconcile {period} found drift (exit {code:?}): {found}\n{summary}"
        );
        assert_eq!(*code, Some(0), "reconcile {period}: {found}");
        assert_eq!(*after_code, Some(0), "second reconcile {period}: {after}");
        assert_eq!(
            after["not_loaded"], 0,
            "the repair loaded every counter: {after}"
        );
        assert_eq!(after["unflushed"], 0, "{period}: {after}");
    }
    assert!(
        overshoot.is_empty(),
        "counters over their limit in Postgres (user, type, period), total: {overshoot:?}\n{summary}"
    );
    assert_eq!(
        used_over, 0,
        "allowed answers reporting used over the limit\n{summary}"
    );
    assert!(
        lost_over_bound.is_empty(),
        "allowed answers missing from Postgres beyond what empty Redis restarts may lose \
         ((user, type, period), allowed, in Postgres): {lost_over_bound:?}\n{summary}"
    );
    assert!(
        extra_unexplained.is_empty(),
        "counted beyond the allowed answers, more than the calls that failed or got no answer \
         ((user, type), extra): {extra_unexplained:?}\n{summary}"
    );
    assert_eq!(t("other"), 0, "unexpected statuses\n{summary}");
    assert_eq!(
        unattributed, 0,
        "allowed answers naming no known period\n{summary}"
    );
    // The soak must have stressed what it checks.
    for fault in FAULT_CYCLE {
        assert!(f(fault) >= 1, "{fault:?} never injected\n{summary}");
    }
    assert!(
        month_allowed(0) > 0 && month_allowed(1) > 0,
        "allowed answers on both sides of the month end\n{summary}"
    );
    assert!(
        at_limit * 2 >= counters.len(),
        "fewer than half the counters reached their limit: the load did not press on the limits\n{summary}"
    );
    drop(daemons);
    drop(redis_server);
}
