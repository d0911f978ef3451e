//! `--recovery`: how long quotad takes to get back to its hot throughput after its Redis lost
//! every counter (a restart without persistence, modelled by `FLUSHALL`). A closed loop on warm
//! users runs throughout; answers are counted per 100 ms. Each run measures the hot rate for
//! `--duration` seconds (its second half), empties Redis, and reports how long after it a 100 ms
//! window first reaches 90 % of that rate again. Every counter is then loaded back from
//! Postgres by the requests that find it missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use tokio::time::Instant;
use uuid::Uuid;

use super::{http_request, redis_side, send_all, BenchArgs, Client, Figures, HttpClient};

/// The sampling period.
const TICK: Duration = Duration::from_millis(100);
/// Share of the hot rate that counts as recovered.
const RECOVERED: f64 = 0.9;
/// Longest wait for a recovery.
const GIVE_UP: Duration = Duration::from_secs(60);

/// What one run saw.
struct Recovery {
    /// Answers/s before the flush.
    hot: f64,
    /// The lowest 100 ms window after it, in answers/s.
    lowest: f64,
    /// From the flush to the end of the first window at 90 % of `hot` (`None`: not within
    /// [`GIVE_UP`]).
    back_after: Option<Duration>,
    /// Answers other than 200 between the flush and the recovery.
    failed: u64,
}

/// Runs `--recovery` against quotad at `addr`.
pub(super) async fn run(args: &BenchArgs, addr: &str) -> Result<Vec<Figures>, String> {
    let users: Vec<Uuid> = (0..args.users.max(1)).map(|_| Uuid::new_v4()).collect();
    println!(
        "quotad bench --recovery: {} users, {} connections, hot phase {:.0} s, then FLUSHALL on {}",
        users.len(),
        args.connections,
        args.duration,
        args.redis_url
    );
    let requests = Arc::new(
        users
            .iter()
            .map(|u| http_request(args, "consume", u, &args.plan, 1))
            .collect::<Vec<_>>(),
    );
    send_all(addr, args, requests.clone(), 200).await?;
    let mut redis = redis_side::connect(&args.redis_url).await?;

    // The load: closed loop, counting answers as they come.
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = args.connections.max(1);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut client =
            HttpClient::new(addr.to_owned(), args.token.clone(), requests.clone(), 200).await?;
        let (answered, failed, stop) = (answered.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                match client.call(n).await {
                    Ok(true) => answered.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => failed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => return Err(e),
                };
                n += clients;
            }
            Ok(())
        }));
    }

    let mut runs = Vec::new();
    let mut outcome = Ok(());
    for run in 1..=args.runs.max(1) {
        match once(args, &mut redis, &answered, &failed).await {
            Ok(r) => {
                println!(
                    "run {run}: hot {:.0} req/s; after FLUSHALL lowest 100 ms {:.0} req/s ({:.0} %), back to 90 % after {}; {} answers not 200 meanwhile",
                    r.hot,
                    r.lowest,
                    100.0 * r.lowest / r.hot,
                    r.back_after.map_or("never (60 s)".to_owned(), |d| format!("{} ms", d.as_millis())),
                    r.failed
                );
                runs.push(r);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            outcome = outcome.and(Err(e));
        }
    }
    outcome?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let hot = median(runs.iter().map(|r| r.hot).collect());
    let back = median(
        runs.iter()
            .map(|r| {
                r.back_after
                    .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0)
            })
            .collect(),
    );
    println!(
        "median of {} runs: hot {hot:.0} req/s, back to 90 % of it {back:.0} ms after FLUSHALL ({} users to load again)",
        runs.len(),
        users.len()
    );
    Ok(Vec::new())
}

/// One run: the hot phase, the flush, the wait for the recovery.
async fn once(
    args: &BenchArgs,
    redis: &mut redis::aio::MultiplexedConnection,
    answered: &AtomicU64,
    failed: &AtomicU64,
) -> Result<Recovery, String> {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    // The hot rate: the second half of the phase (the first half settles the previous run's
    // recovery, if any).
    let phase = Duration::from_secs_f64(args.duration.max(0.4));
    let started = Instant::now();
    let mut half: Option<(Instant, u64)> = None;
    while started.elapsed() < phase {
        ticks.tick().await;
        if half.is_none() && started.elapsed() >= phase / 2 {
            half = Some((Instant::now(), answered.load(Ordering::Relaxed)));
        }
    }
    let (from, count) = half.unwrap_or((started, 0));
    let hot = (answered.load(Ordering::Relaxed) - count) as f64 / from.elapsed().as_secs_f64();

    let failed_before = failed.load(Ordering::Relaxed);
    let () = redis::cmd("FLUSHALL")
        .query_async(redis)
        .await
        .map_err(|e| format!("FLUSHALL: {e}"))?;
    let flushed = Instant::now();
    let mut last = (flushed, answered.load(Ordering::Relaxed));
    let mut lowest = f64::INFINITY;
    loop {
        ticks.tick().await;
        let now = (Instant::now(), answered.load(Ordering::Relaxed));
        let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
        lowest = lowest.min(rate);
        last = now;
        let back = rate >= RECOVERED * hot;
        if back || flushed.elapsed() >= GIVE_UP {
            return Ok(Recovery {
                hot,
                lowest,
                back_after: back.then(|| now.0 - flushed),
                failed: failed.load(Ordering::Relaxed) - failed_before,
            });
        }
    }
}
