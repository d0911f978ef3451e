//! `quotad-bench` (run as `quotad bench`): a load generator that ships with quotad, as
//! `redis-benchmark` ships with Redis. A crate of its own, so the daemon's library carries none
//! of it.
//!
//! It drives a running quotad's `POST /v1/consume` with N distinct users over C keep-alive
//! connections, closed loop (each connection sends its next request when the last is answered)
//! or, with `--rate`, open loop at a constant offered load, where each request's latency is
//! measured from its *intended* start so a stall is not hidden (no coordinated omission). In the
//! same run it measures the ceiling: the same consume script sent straight to Redis by EVALSHA at
//! the same concurrency, one connection per client and no pipelining. `--seed` also measures the
//! original design: per request a `SELECT` of the count and a call of `increment_usage()` in
//! Postgres (made in a scratch schema, dropped afterwards).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use deadpool_redis::redis;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use uuid::Uuid;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use quotad::period::{Period, PeriodKind};
use quotad::plans::Plans;
use quotad::store::{CountCall, Mode, RedisStore};

mod cost;
mod recovery;
mod redis_side;

pub use cost::Cost;
use cost::Probe;

/// Arguments of `quotad bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// quotad's base URL (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Distinct users, taken in turn.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Concurrent connections (clients).
    #[arg(long, short = 'c', default_value_t = 50)]
    pub connections: usize,
    /// How long each measurement runs, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Offer a constant load of this many requests/s instead of a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Usage type to consume.
    #[arg(long = "type", default_value = "ai_generation")]
    pub usage_type: String,
    /// Plan sent with each call (an unlimited plan measures allowed answers); "" sends none.
    #[arg(long, default_value = "PRO")]
    pub plan: String,
    /// Bearer token, when quotad has tokens configured.
    #[arg(long, env = "QUOTAD_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Skip the first-use request per user (then first uses, with their hydration, are measured).
    #[arg(long)]
    pub no_warmup: bool,
    /// Redis for the ceiling measurement.
    #[arg(
        long,
        env = "QUOTAD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Skip the raw-Redis ceiling.
    #[arg(long)]
    pub no_redis: bool,
    /// Also measure the original design (SELECT + increment_usage() per request) in Postgres.
    #[arg(long)]
    pub seed: bool,
    /// Repeat the measurements this many times and print the median of each.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Also measure refused consumes: a second set of users, each tracked far over the default
    /// plan's limit first, consuming with no plan (402 each; the near-cache answers them).
    #[arg(long)]
    pub refused: bool,
    /// Instead of the warm-up over HTTP, load every user's counter of this month straight into
    /// quotad's Redis (under `--key-prefix`), as their first request would: fast enough for
    /// millions of users.
    #[arg(long)]
    pub preload: bool,
    /// Measure a month start: load every user's counter of *last* month straight into Redis (as
    /// their requests then would have), then measure this month's first requests, one per user
    /// (no warm-up). With the buckets' markers older than this month, none reads Postgres.
    #[arg(long)]
    pub month_start: bool,
    /// quotad's Redis key prefix, for `--preload` and `--month-start`.
    #[arg(long, env = "QUOTAD_KEY_PREFIX", default_value = "q")]
    pub key_prefix: String,
    /// Measure only Redis memory per active (user, month) with three types, for `--users`
    /// users (no quotad needed).
    #[arg(long)]
    pub memory: bool,
    /// Measure first requests: no warm-up, and every request of every run is its user's first
    /// (users are taken once each, across runs), so each one loads its counter from Postgres.
    /// Needs `--users` above the requests made (a million is plenty on one machine).
    #[arg(long)]
    pub first_use: bool,
    /// Measure the recovery after a Redis restart without persistence: a closed loop on warm
    /// users for `--duration` seconds (the hot figure), then `FLUSHALL` on `--redis-url`, then
    /// the time until the rate, sampled per 100 ms, is back to 90 % of the hot figure. Only on a
    /// Redis of the bench's own (deploy/bench.sh's): it empties it.
    #[arg(long)]
    pub recovery: bool,
    /// Also measure consumes by members of accounts: a second set of `--users` users, made
    /// members of this many accounts (each account's plan ENTERPRISE, an unlimited pool) before
    /// the runs, so each consume checks and counts the user and the account's pool in one script.
    /// Needs an admin token (or none configured).
    #[arg(long)]
    pub accounts: Option<usize>,
    /// Also measure `/v1/gate` (the same consume, the user and type in headers) on the same
    /// users. The gate takes no plan override, so the users' stored plan is set to `--plan` first
    /// (an admin call per user; needs an admin token, or none configured).
    #[arg(long)]
    pub gate: bool,
    /// Also measure Envoy's rate-limit call (`ShouldRateLimit`) on quotad's gRPC port at this
    /// address (host:port; QUOTAD_GRPC_LISTEN), one HTTP/2 connection per client, one call at a
    /// time, on the same users (their plan stored, as for `--gate`), in quotad's default domain
    /// and descriptor keys, `--token` as its `authorization` metadata.
    #[arg(long)]
    pub grpc: Option<String>,
    /// Postgres for `--seed`.
    #[arg(
        long,
        env = "QUOTAD_DATABASE_URL",
        default_value = "postgres://127.0.0.1:5432/quotad"
    )]
    pub database_url: String,
}

/// The figures of one measurement.
#[derive(Debug, Clone)]
pub struct Figures {
    /// What was measured.
    pub name: String,
    /// Answered requests per second.
    pub rate: f64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9.
    pub percentiles: [f64; 4],
    /// Requests answered.
    pub ok: u64,
    /// Requests that failed (connection errors, unexpected statuses).
    pub errors: u64,
    /// CPU and Redis commands per decision.
    pub cost: Cost,
}

impl Figures {
    fn from_samples(name: &str, mut micros: Vec<u32>, errors: u64, elapsed: Duration) -> Figures {
        micros.sort_unstable();
        let pick = |p: f64| {
            if micros.is_empty() {
                0.0
            } else {
                micros[((micros.len() - 1) as f64 * p).round() as usize] as f64
            }
        };
        Figures {
            name: name.to_owned(),
            rate: micros.len() as f64 / elapsed.as_secs_f64(),
            percentiles: [pick(0.5), pick(0.9), pick(0.99), pick(0.999)],
            ok: micros.len() as u64,
            errors,
            cost: Cost::default(),
        }
    }

    /// Rate, percentiles in ms and errors; under it, the cost per decision and the Redis commands
    /// by kind.
    pub fn line(&self) -> String {
        let ms = |us: f64| us / 1000.0;
        let mut text = format!(
            "{:<38} {:>9.0} req/s   p50 {:>6.3} ms  p90 {:>6.3} ms  p99 {:>6.3} ms  p99.9 {:>6.3} ms   errors {}",
            self.name,
            self.rate,
            ms(self.percentiles[0]),
            ms(self.percentiles[1]),
            ms(self.percentiles[2]),
            ms(self.percentiles[3]),
            self.errors
        );
        let summary = self.cost.summary();
        if !summary.is_empty() {
            text.push_str(&format!("\n    {summary}"));
        }
        let breakdown = self.cost.breakdown();
        if !breakdown.is_empty() {
            text.push_str(&format!("\n    redis commands per decision: {breakdown}"));
        }
        text
    }
}

/// Runs the benchmark and prints its figures; returns them (quotad first).
pub async fn run(args: &BenchArgs) -> Result<Vec<Figures>, String> {
    if args.memory {
        redis_side::memory(&args.redis_url, args.users).await?;
        return Ok(Vec::new());
    }
    let addr = args
        .url
        .strip_prefix("http://")
        .ok_or("--url must start with http://")?
        .trim_end_matches('/')
        .to_owned();
    if args.recovery {
        return recovery::run(args, &addr).await;
    }
    let users: Arc<Vec<Uuid>> = Arc::new((0..args.users.max(1)).map(|_| Uuid::new_v4()).collect());
    let load = match args.rate {
        Some(r) => format!("open loop at {r:.0} req/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "quotad bench: {} users, {} connections, {:.0} s each, {load}",
        users.len(),
        args.connections,
        args.duration
    );
    let requests: Arc<Vec<Call>> = Arc::new(
        users
            .iter()
            .map(|u| http_request(args, "consume", u, &args.plan, 1))
            .collect(),
    );
    let now = chrono::Utc::now();
    let this_month = Period::current(PeriodKind::Month, now);
    if args.month_start {
        let last_month = this_month.previous().expect("a month");
        let at = last_month.start();
        redis_side::preload(&args.redis_url, &args.key_prefix, &users, last_month, at).await?;
    } else if args.preload {
        redis_side::preload(&args.redis_url, &args.key_prefix, &users, this_month, now).await?;
    } else if !args.no_warmup && !args.first_use {
        let started = Instant::now();
        send_all(&addr, args, requests.clone(), 200).await?;
        println!(
            "  (warm-up: one call per user in {:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
    // Users over the default plan's limit: tracked far past it, then consuming with no plan.
    let refused: Option<Arc<Vec<Call>>> = match args.refused {
        false => None,
        true => {
            let over: Vec<Uuid> = (0..args.users.max(1)).map(|_| Uuid::new_v4()).collect();
            let tracks = over
                .iter()
                .map(|u| http_request(args, "track", u, "", 1_000_000))
                .collect();
            send_all(&addr, args, Arc::new(tracks), 200).await?;
            let consumes: Vec<Call> = over
                .iter()
                .map(|u| http_request(args, "consume", u, "", 1))
                .collect();
            let consumes = Arc::new(consumes);
            // One refusal per user from Redis; the near-cache remembers it.
            send_all(&addr, args, consumes.clone(), 402).await?;
            Some(consumes)
        }
    };
    // Members of accounts: a second set of users, spread over `--accounts` unlimited pools.
    let members: Option<Arc<Vec<Call>>> = match args.accounts {
        None => None,
        Some(n) => {
            let accounts: Vec<Uuid> = (0..n.max(1)).map(|_| Uuid::new_v4()).collect();
            let plans = accounts
                .iter()
                .map(|a| {
                    http_put(
                        format!("/v1/accounts/{a}/plan"),
                        r#"{"plan":"ENTERPRISE"}"#.to_owned(),
                    )
                })
                .collect();
            send_all(&addr, args, Arc::new(plans), 200).await?;
            let joined: Vec<Uuid> = (0..args.users.max(1)).map(|_| Uuid::new_v4()).collect();
            let joins = joined
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    http_put(
                        format!("/v1/users/{u}/account"),
                        format!(r#"{{"account_id":"{}"}}"#, accounts[i % accounts.len()]),
                    )
                })
                .collect();
            let started = Instant::now();
            send_all(&addr, args, Arc::new(joins), 200).await?;
            let consumes: Arc<Vec<Call>> = Arc::new(
                joined
                    .iter()
                    .map(|u| http_request(args, "consume", u, &args.plan, 1))
                    .collect(),
            );
            if !args.no_warmup {
                send_all(&addr, args, consumes.clone(), 200).await?;
            }
            println!(
                "  ({} members of {} accounts joined and warmed up in {:.1} s)",
                joined.len(),
                accounts.len(),
                started.elapsed().as_secs_f64()
            );
            Some(consumes)
        }
    };
    // The gate's users are the same users, their plan stored (the gate sends none).
    if (args.gate || args.grpc.is_some()) && !args.plan.is_empty() {
        let plans = users
            .iter()
            .map(|u| {
                http_put(
                    format!("/v1/users/{u}/plan"),
                    format!(r#"{{"plan":"{}"}}"#, args.plan),
                )
            })
            .collect();
        send_all(&addr, args, Arc::new(plans), 200).await?;
    }
    let gate: Option<Arc<Vec<Call>>> = match args.gate {
        false => None,
        true => Some(Arc::new(
            users.iter().map(|u| gate_request(args, u)).collect(),
        )),
    };
    let raw = match args.no_redis {
        true => None,
        false => Some(RawRedis::prepare(&args.redis_url, &users, &args.usage_type).await?),
    };
    let seed = match args.seed {
        true => Some(
            seed::Seed::prepare(
                &args.database_url,
                args.connections,
                &users,
                &args.usage_type,
            )
            .await?,
        ),
        false => None,
    };
    let probe = Probe::new(&args.redis_url, &addr);
    if !probe.sees_quotad() {
        println!("  (quotad at {addr} is not a process of this machine: its CPU is not read)");
    }
    // --first-use: the next user never asked for yet, shared by every client of every run.
    let cursor = args.first_use.then(|| Arc::new(AtomicUsize::new(0)));
    let mut runs: Vec<Vec<Figures>> = Vec::new();
    let outcome = async {
        for run in 1..=args.runs.max(1) {
            if args.runs > 1 {
                println!("run {run}/{}:", args.runs);
            }
            let name = match args.first_use {
                true => "quotad HTTP consume, first use",
                false => "quotad HTTP consume",
            };
            let mut figures = vec![
                measure(name, args, &probe, {
                    let (addr, token, requests, cursor) = (
                        addr.clone(),
                        args.token.clone(),
                        requests.clone(),
                        cursor.clone(),
                    );
                    move |_| {
                        let client =
                            HttpClient::new(addr.clone(), token.clone(), requests.clone(), 200);
                        match &cursor {
                            Some(c) => HttpClient::taking_each_once(client, c.clone()),
                            None => client,
                        }
                    }
                })
                .await?,
            ];
            // The other HTTP measurements, each on its own prepared calls.
            for (name, calls, expect) in [
                (GATE, &gate, 200),
                (REFUSED, &refused, 402),
                (MEMBERS, &members, 200),
            ] {
                let Some(calls) = calls else { continue };
                figures.push(
                    measure(name, args, &probe, {
                        let (addr, token, requests) =
                            (addr.clone(), args.token.clone(), calls.clone());
                        move |_| {
                            HttpClient::new(addr.clone(), token.clone(), requests.clone(), expect)
                        }
                    })
                    .await?,
                );
            }
            if let Some(at) = &args.grpc {
                figures.push(
                    measure(GRPC, args, &probe, {
                        let (at, users, usage_type, token) = (
                            at.clone(),
                            users.clone(),
                            args.usage_type.clone(),
                            args.token.clone(),
                        );
                        move |_| {
                            GrpcClient::new(
                                at.clone(),
                                token.clone(),
                                users.clone(),
                                usage_type.clone(),
                            )
                        }
                    })
                    .await?,
                );
            }
            if let Some(raw) = &raw {
                let raw = raw.clone();
                figures.push(
                    measure("raw Redis EVALSHA (same script)", args, &probe, move |_| {
                        raw.client()
                    })
                    .await?,
                );
            }
            if let Some(seed) = &seed {
                let seed = seed.clone();
                figures.push(
                    measure(
                        "seed design (SELECT + increment_usage)",
                        args,
                        &probe,
                        move |i| seed.client(i),
                    )
                    .await?,
                );
            }
            report(&figures);
            runs.push(figures);
        }
        Ok::<_, String>(())
    }
    .await;
    if let Some(raw) = &raw {
        raw.cleanup().await;
    }
    if let Some(seed) = &seed {
        seed.cleanup().await;
    }
    outcome?;
    if runs.len() == 1 {
        return Ok(runs.remove(0));
    }
    // The median of each figure over the runs.
    let medians: Vec<Figures> = (0..runs[0].len())
        .map(|i| {
            let mut by_rate: Vec<&Figures> = runs.iter().map(|r| &r[i]).collect();
            by_rate.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let mut f = by_rate[by_rate.len() / 2].clone();
            for (p, slot) in f.percentiles.iter_mut().enumerate() {
                let mut v: Vec<f64> = runs.iter().map(|r| r[i].percentiles[p]).collect();
                v.sort_by(f64::total_cmp);
                *slot = v[v.len() / 2];
            }
            let median_of = |get: &dyn Fn(&Figures) -> Option<f64>| {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| get(&r[i])).collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            f.cost.quotad_us = median_of(&|x| x.cost.quotad_us);
            f.cost.redis_us = median_of(&|x| x.cost.redis_us);
            f.cost.commands = median_of(&|x| x.cost.commands);
            f.name = format!("median: {}", f.name);
            f
        })
        .collect();
    println!("median of {} runs:", runs.len());
    for f in &medians {
        println!("{}", f.line());
    }
    let ratios = |i: usize| {
        let mut v: Vec<f64> = runs.iter().map(|r| r[0].rate / r[i].rate).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, other) in runs[0].iter().enumerate().skip(1) {
        if other.name == REFUSED {
            println!("  median ratio refused / allowed: {:.2}x", 1.0 / ratios(i));
        } else if other.name == MEMBERS {
            println!(
                "  median ratio members of accounts / users without: {:.2}x the rate",
                1.0 / ratios(i)
            );
        } else if other.name == GATE || other.name == GRPC {
            println!(
                "  median ratio {} / HTTP consume: {:.2}x the rate",
                other.name,
                1.0 / ratios(i)
            );
        } else {
            println!("  median ratio quotad / {}: {:.2}x", other.name, ratios(i));
        }
    }
    Ok(medians)
}

fn report(figures: &[Figures]) {
    for f in figures {
        println!("{}", f.line());
    }
    for f in &figures[1..] {
        if f.name == REFUSED {
            println!(
                "  refused / allowed: {:.2}x the rate",
                f.rate / figures[0].rate
            );
        } else if f.name == MEMBERS {
            println!(
                "  members of accounts / users without: {:.2}x the rate",
                f.rate / figures[0].rate
            );
        } else if f.name == GATE || f.name == GRPC {
            println!(
                "  {} / HTTP consume: {:.2}x the rate",
                f.name,
                f.rate / figures[0].rate
            );
        } else {
            println!(
                "  quotad / {}: {:.2}x the rate",
                f.name,
                figures[0].rate / f.rate
            );
        }
    }
}

/// The name of the gate measurement.
const GATE: &str = "quotad HTTP gate (headers)";
/// The name of the gRPC measurement.
const GRPC: &str = "quotad gRPC ShouldRateLimit";
/// The name of the refused-consume measurement.
const REFUSED: &str = "quotad HTTP consume, refused (402)";
/// The name of the measurement of consumes by members of accounts.
const MEMBERS: &str = "quotad HTTP consume, account members";

/// Sends each of `requests` once, over the configured connections, expecting `expect`.
async fn send_all(
    addr: &str,
    args: &BenchArgs,
    requests: Arc<Vec<Call>>,
    expect: u16,
) -> Result<(), String> {
    let total = requests.len();
    let (_, errors) = drive(args.connections, None, Duration::ZERO, Some(total), {
        let (addr, token) = (addr.to_owned(), args.token.clone());
        move |_| HttpClient::new(addr.clone(), token.clone(), requests.clone(), expect)
    })
    .await?;
    if errors > 0 {
        return Err(format!(
            "{errors} of {total} preparatory calls were not answered {expect}"
        ));
    }
    Ok(())
}

/// A client that makes one request at a time.
trait Client: Send + 'static {
    /// Makes request number `n` (users are taken in turn); Ok(true) if answered as expected.
    fn call(&mut self, n: usize) -> impl std::future::Future<Output = Result<bool, String>> + Send;
}

async fn measure<C, F>(
    name: &str,
    args: &BenchArgs,
    probe: &Probe,
    make: F,
) -> Result<Figures, String>
where
    C: Client,
    F: Fn(usize) -> BoxFut<C> + Send + Sync + 'static,
{
    let duration = Duration::from_secs_f64(args.duration);
    let before = probe.read().await;
    let started = Instant::now();
    let (samples, errors) = drive(args.connections, args.rate, duration, None, make).await?;
    let elapsed = started.elapsed();
    let after = probe.read().await;
    let mut figures = Figures::from_samples(name, samples, errors, elapsed);
    figures.cost = probe.cost(&before, &after, figures.ok + figures.errors);
    Ok(figures)
}

/// Runs `clients` clients for `duration` (or until `total` calls are made), closed loop or at
/// `rate` requests/s in all; returns latency samples (µs) and the error count.
async fn drive<C, F>(
    clients: usize,
    rate: Option<f64>,
    duration: Duration,
    total: Option<usize>,
    make: F,
) -> Result<(Vec<u32>, u64), String>
where
    C: Client,
    F: Fn(usize) -> BoxFut<C> + Send + Sync + 'static,
{
    let clients = clients.max(1);
    // Every client connects first; the clock starts when all are ready, so set-up time is not
    // counted as latency.
    let mut ready = Vec::with_capacity(clients);
    for i in 0..clients {
        ready.push(make(i).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut client) in ready.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / r));
            let mut n = i;
            let mut k = 0u32;
            tokio::time::sleep_until(start).await;
            loop {
                if let Some(total) = total {
                    if n >= total {
                        break;
                    }
                } else if tokio::time::Instant::now() >= end {
                    break;
                }
                // Open loop: a request the service made late (the previous answer came after
                // this one's intended start) counts from its intended start, so a stall shows in
                // full. A request that was only waiting for its slot counts from when it was
                // sent: the timer's own wake-up delay (up to a millisecond) is not the service's.
                let intended = match interval {
                    Some(iv) => {
                        let at = start + iv * k + iv.mul_f64(i as f64 / clients as f64);
                        if at >= end {
                            break;
                        }
                        if tokio::time::Instant::now() < at {
                            tokio::time::sleep_until(at).await;
                            tokio::time::Instant::now()
                        } else {
                            at
                        }
                    }
                    None => tokio::time::Instant::now(),
                };
                match client.call(n).await {
                    Ok(true) => {
                        samples.push(intended.elapsed().as_micros().min(u32::MAX as u128) as u32)
                    }
                    Ok(false) => errors += 1,
                    Err(e) => return Err(e),
                }
                n += clients;
                k += 1;
            }
            Ok::<_, String>((samples, errors))
        }));
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await.map_err(|e| e.to_string())??;
        samples.extend(s);
        errors += e;
    }
    Ok((samples, errors))
}

/// A boxed, sendable future that makes a client.
type BoxFut<C> = BoxFuture<'static, Result<C, String>>;

/// One prepared request: method, path, extra headers and JSON body (empty: none).
struct Call {
    method: hyper::Method,
    path: std::borrow::Cow<'static, str>,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    body: Bytes,
}

/// A prepared `POST /v1/<call>` for `user`: `plan` sent when not empty, `amount` when not 1.
fn http_request(args: &BenchArgs, call: &str, user: &Uuid, plan: &str, amount: u64) -> Call {
    let mut body = format!(r#"{{"user_id":"{user}","type":"{}""#, args.usage_type);
    if !plan.is_empty() {
        body.push_str(&format!(r#","plan":"{plan}""#));
    }
    if amount != 1 {
        body.push_str(&format!(r#","amount":{amount}"#));
    }
    body.push('}');
    let path = match call {
        "consume" => "/v1/consume",
        "track" => "/v1/track",
        other => unreachable!("no bench call {other}"),
    };
    Call {
        method: hyper::Method::POST,
        path: path.into(),
        headers: Vec::new(),
        body: Bytes::from(body),
    }
}

/// A prepared `GET /v1/gate` for `user`: one unit of `--type`, everything in headers.
fn gate_request(args: &BenchArgs, user: &Uuid) -> Call {
    let header = |v: &str| HeaderValue::from_str(v).expect("a header value");
    Call {
        method: hyper::Method::GET,
        path: "/v1/gate".into(),
        headers: vec![
            (
                hyper::header::HeaderName::from_static("x-user-id"),
                header(&user.to_string()),
            ),
            (
                hyper::header::HeaderName::from_static("x-usage-type"),
                header(&args.usage_type),
            ),
        ],
        body: Bytes::new(),
    }
}

/// A prepared `PUT` of `body` (JSON) to `path`.
fn http_put(path: String, body: String) -> Call {
    Call {
        method: hyper::Method::PUT,
        path: path.into(),
        headers: Vec::new(),
        body: Bytes::from(body),
    }
}

/// One keep-alive HTTP/1.1 connection (hyper's client), one request at a time.
struct HttpClient {
    sender: SendRequest<Full<Bytes>>,
    requests: Arc<Vec<Call>>,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    /// The status that counts as answered as expected.
    expect: u16,
    /// Set: each call takes the next request from it instead of request `n`, and no request
    /// is sent twice (`--first-use`).
    cursor: Option<Arc<AtomicUsize>>,
}

impl HttpClient {
    fn new(
        addr: String,
        token: Option<String>,
        requests: Arc<Vec<Call>>,
        expect: u16,
    ) -> BoxFut<HttpClient> {
        Box::pin(async move {
            let stream = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            tokio::spawn(connection);
            let host = HeaderValue::from_str(&addr).map_err(|e| e.to_string())?;
            let auth = token
                .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
                .transpose()
                .map_err(|e| format!("--token: {e}"))?;
            Ok(HttpClient {
                sender,
                requests,
                host,
                auth,
                expect,
                cursor: None,
            })
        })
    }

    /// The client `made` will be, taking requests from `cursor`, each once.
    fn taking_each_once(made: BoxFut<HttpClient>, cursor: Arc<AtomicUsize>) -> BoxFut<HttpClient> {
        Box::pin(async move {
            let mut client = made.await?;
            client.cursor = Some(cursor);
            Ok(client)
        })
    }
}

impl Client for HttpClient {
    async fn call(&mut self, n: usize) -> Result<bool, String> {
        let n = match &self.cursor {
            None => n % self.requests.len(),
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
        };
        let call = self.requests.get(n).ok_or_else(|| {
            format!(
                "--first-use took all {} users; give more with --users",
                self.requests.len()
            )
        })?;
        let mut request = hyper::Request::builder()
            .method(call.method.clone())
            .uri(call.path.as_ref())
            .header(HOST, self.host.clone());
        if !call.body.is_empty() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        for (name, value) in &call.headers {
            request = request.header(name, value.clone());
        }
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(call.body.clone()))
            .map_err(|e| e.to_string())?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("quotad closed the connection: {e}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading: {e}"))?;
        Ok(status == self.expect)
    }
}

/// Envoy's rate-limit call on quotad's gRPC port: one HTTP/2 connection, one call at a time.
struct GrpcClient {
    client: RateLimitServiceClient<tonic::transport::Channel>,
    /// `authorization` metadata, when quotad has tokens.
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    users: Arc<Vec<Uuid>>,
    usage_type: String,
}

impl GrpcClient {
    fn new(
        at: String,
        token: Option<String>,
        users: Arc<Vec<Uuid>>,
        usage_type: String,
    ) -> BoxFut<GrpcClient> {
        Box::pin(async move {
            let auth = token
                .map(|t| format!("Bearer {t}").parse())
                .transpose()
                .map_err(|e| format!("--token: {e}"))?;
            let channel = tonic::transport::Channel::from_shared(format!("http://{at}"))
                .map_err(|e| format!("--grpc {at}: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("connecting to --grpc {at}: {e}"))?;
            Ok(GrpcClient {
                client: RateLimitServiceClient::new(channel),
                auth,
                users,
                usage_type,
            })
        })
    }
}

impl Client for GrpcClient {
    async fn call(&mut self, n: usize) -> Result<bool, String> {
        let user = self.users[n % self.users.len()].to_string();
        let entry = |key: &str, value: String| Entry {
            key: key.to_owned(),
            value,
        };
        let mut request = tonic::Request::new(RateLimitRequest {
            domain: "quotad".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    entry("user_id", user),
                    entry("usage_type", self.usage_type.clone()),
                ],
                ..Default::default()
            }],
            hits_addend: 1,
        });
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        match self.client.should_rate_limit(request).await {
            Ok(answer) => Ok(answer.into_inner().overall_code == Code::Ok as i32),
            Err(status) if status.code() == tonic::Code::Unavailable => Ok(false),
            Err(status) => Err(format!("gRPC: {status}")),
        }
    }
}

/// The ceiling: the consume script straight to Redis, one connection per client.
#[derive(Clone)]
struct RawRedis {
    client: redis::Client,
    prefix: String,
    /// Builds the same invocation quotad sends, under this measurement's own prefix.
    store: RedisStore,
    plans: Arc<Plans>,
    usage_type: String,
    users: Arc<Vec<Uuid>>,
}

struct RawRedisClient {
    conn: redis::aio::MultiplexedConnection,
    raw: RawRedis,
}

/// The month the raw-Redis ceiling counts in: the real current month, so its counters' expiry
/// (the month's end plus the grace) lies ahead on any day the bench runs.
fn bench_period() -> Period {
    Period::current(PeriodKind::Month, chrono::Utc::now())
}

impl RawRedis {
    async fn prepare(
        url: &str,
        users: &Arc<Vec<Uuid>>,
        usage_type: &str,
    ) -> Result<RawRedis, String> {
        let client = redis::Client::open(url).map_err(|e| format!("--redis-url: {e}"))?;
        let prefix = format!("qbench{}", &Uuid::new_v4().simple().to_string()[..8]);
        let store = RedisStore::new(url, &prefix, Duration::from_secs(5))?;
        // Loaded counters, as quotad's are after their first use.
        let mut conn = redis_side::connect(url).await?;
        redis_side::load_counters(
            &mut conn,
            &store,
            users,
            bench_period(),
            chrono::Utc::now(),
            false,
        )
        .await?;
        let plans = Plans::built_in();
        if plans.usage_type(usage_type).is_none() {
            return Err(format!("--type {usage_type} is not a built-in usage type"));
        }
        Ok(RawRedis {
            client,
            prefix,
            store,
            plans: Arc::new(plans),
            usage_type: usage_type.to_owned(),
            users: users.clone(),
        })
    }

    fn client(&self) -> BoxFut<RawRedisClient> {
        let raw = self.clone();
        Box::pin(async move {
            // Its own connection: no pipelining across clients.
            let conn = raw
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("redis: {e}"))?;
            Ok(RawRedisClient { conn, raw })
        })
    }

    async fn cleanup(&self) {
        if let Ok(mut conn) = self.client.get_multiplexed_async_connection().await {
            redis_side::remove_prefix(&mut conn, &self.prefix).await;
        }
    }
}

impl Client for RawRedisClient {
    async fn call(&mut self, n: usize) -> Result<bool, String> {
        let raw = &self.raw;
        // Built per call, as quotad builds them per request.
        let keys = raw.store.keys(raw.users[n % raw.users.len()]);
        let call = CountCall {
            mode: Mode::Consume,
            keys: &keys,
            usage_type: raw.plans.usage_type(&raw.usage_type).expect("checked"),
            amount: 1,
            period: bench_period(),
            plan_override: Some("PRO"),
            default_plan: &raw.plans.default_plan,
            idempotency_key: None,
            metadata: &[],
        };
        let mut inv = raw.store.count_invocation(&call);
        raw.store.arm(&mut inv);
        let reply: Result<Vec<redis::Value>, _> = inv.invoke_async(&mut self.conn).await;
        Ok(reply.is_ok_and(|r| {
            r.first()
                .and_then(|s| redis::from_redis_value_ref::<String>(s).ok())
                .is_some_and(|s| s == "ok")
        }))
    }
}

mod seed {
    //! The original design, for comparison: per request a SELECT of the count, then the
    //! `increment_usage()` function of the original migration, in a scratch schema.

    use std::sync::Arc;

    use chrono::{DateTime, Utc};
    use sqlx::postgres::PgPoolOptions;
    use sqlx::PgPool;
    use uuid::Uuid;

    use super::{bench_period, BoxFut, Client};

    #[derive(Clone)]
    pub struct Seed {
        pool: PgPool,
        schema: String,
        users: Arc<Vec<Uuid>>,
        usage_type: String,
    }

    pub struct SeedClient {
        seed: Seed,
        select: String,
        increment: String,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    }

    impl Seed {
        pub async fn prepare(
            url: &str,
            clients: usize,
            users: &Arc<Vec<Uuid>>,
            usage_type: &str,
        ) -> Result<Seed, String> {
            let pool = PgPoolOptions::new()
                .max_connections(clients as u32)
                .connect(url)
                .await
                .map_err(|e| format!("--database-url: {e}"))?;
            let schema = format!(
                "quotad_bench_seed_{}",
                &Uuid::new_v4().simple().to_string()[..8]
            );
            let ddl = format!(
                r#"CREATE SCHEMA {schema};
                CREATE TABLE {schema}.usage_tracking (
                    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, type text NOT NULL,
                    count integer NOT NULL DEFAULT 0, period_start timestamptz NOT NULL, period_end timestamptz NOT NULL,
                    metadata jsonb DEFAULT '{{}}'::jsonb, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
                    UNIQUE (user_id, type, period_start));
                CREATE FUNCTION {schema}.increment_usage(p_user_id uuid, p_type text, p_period_start timestamptz,
                    p_period_end timestamptz, p_metadata jsonb DEFAULT '{{}}'::jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN
                  INSERT INTO {schema}.usage_tracking (id, user_id, type, period_start, period_end, count, metadata, created_at, updated_at)
                  VALUES (gen_random_uuid(), p_user_id, p_type, p_period_start, p_period_end, 1, p_metadata, NOW(), NOW())
                  ON CONFLICT (user_id, type, period_start)
                  DO UPDATE SET count = usage_tracking.count + 1, metadata = p_metadata, updated_at = NOW();
                END; $$;"#
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
                .execute(&pool)
                .await
                .map_err(|e| format!("seed schema: {e}"))?;
            Ok(Seed {
                pool,
                schema,
                users: users.clone(),
                usage_type: usage_type.to_owned(),
            })
        }

        pub fn client(&self, _: usize) -> BoxFut<SeedClient> {
            let seed = self.clone();
            Box::pin(async move {
                let s = &seed.schema;
                Ok(SeedClient {
                    select: format!(
                        "SELECT count FROM {s}.usage_tracking WHERE user_id = $1 AND type = $2 AND period_start >= $3"
                    ),
                    increment: format!("SELECT {s}.increment_usage($1, $2, $3, $4, '{{}}'::jsonb)"),
                    start: bench_period().start(),
                    end: bench_period().end().expect("a month ends"),
                    seed,
                })
            })
        }

        pub async fn cleanup(&self) {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA {} CASCADE",
                self.schema
            )))
            .execute(&self.pool)
            .await;
            self.pool.close().await;
        }
    }

    impl Client for SeedClient {
        async fn call(&mut self, n: usize) -> Result<bool, String> {
            let user = self.seed.users[n % self.seed.users.len()];
            let pool = &self.seed.pool;
            let current: Result<Option<i32>, _> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(self.select.as_str()))
                    .bind(user)
                    .bind(&self.seed.usage_type)
                    .bind(self.start)
                    .fetch_optional(pool)
                    .await;
            if current.is_err() {
                return Ok(false);
            }
            let done = sqlx::query(sqlx::AssertSqlSafe(self.increment.as_str()))
                .bind(user)
                .bind(&self.seed.usage_type)
                .bind(self.start)
                .bind(self.end)
                .execute(pool)
                .await;
            Ok(done.is_ok())
        }
    }
}
