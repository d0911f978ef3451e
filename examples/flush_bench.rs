//! The flusher's throughput, and its lag under consume load.
//!
//! `cargo run --release --example flush_bench -- [COUNTERS] [RUNS] [LOAD_SECONDS]`
//! (defaults 100000, 3, 10), with Redis on `QUOTAD_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! and Postgres on `QUOTAD_PG` (default `postgres://postgres@127.0.0.1:5432`); it makes its own
//! key prefix and database and removes both.
//!
//! 1. Throughput: COUNTERS dirty counters (one type each, as consume leaves them) are written to
//!    Redis, then flusher passes run until none is dirty: counters/s. The baseline, in the same
//!    run, is the per-event write of the original design: one `INSERT … ON CONFLICT DO UPDATE`
//!    statement per counter, for a tenth of the counters.
//! 2. Lag: a quotad (in this process, flushing every second as by default) takes consume load
//!    from 32 connections over 10,000 users; every 200 ms a probe counts once and waits until
//!    Postgres holds its count. Lag is the time from the allowed answer to the row in Postgres.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use quotad::flusher::Flusher;
use quotad::period::Period;
use quotad::store::RedisStore;
use uuid::Uuid;

/// The real current month: its counters' expiry lies ahead on any day the bench runs.
fn this_month() -> Period {
    Period::current(quotad::period::PeriodKind::Month, chrono::Utc::now())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counters: usize = args
        .first()
        .map_or(100_000, |s| s.parse().expect("COUNTERS"));
    let runs: usize = args.get(1).map_or(3, |s| s.parse().expect("RUNS"));
    let load_secs: u64 = args.get(2).map_or(10, |s| s.parse().expect("LOAD_SECONDS"));
    let redis_url = env_or("QUOTAD_REDIS_URL", "redis://127.0.0.1:6379");
    let pg = env_or("QUOTAD_PG", "postgres://postgres@127.0.0.1:5432");
    let id = &Uuid::new_v4().simple().to_string()[..8];
    let (prefix, db_name) = (format!("fbench{id}"), format!("quotad_fbench_{id}"));
    let db_url = format!("{pg}/{db_name}");
    let pool = quotad::db::lazy_pool(&db_url, None).unwrap();
    quotad::db::prepare(&db_url, &pool)
        .await
        .expect("postgres reachable");
    let store = RedisStore::new(&redis_url, &prefix, Duration::from_secs(10)).unwrap();
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    println!("flusher throughput: {counters} dirty counters, {runs} runs");
    let (mut rates, mut ratios) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        sqlx::query("TRUNCATE usage_tracking")
            .execute(&pool)
            .await
            .unwrap();
        let users: Vec<Uuid> = (0..counters).map(|_| Uuid::new_v4()).collect();
        for chunk in users.chunks(5000) {
            let mut pipe = redis::pipe();
            for u in chunk {
                let keys = store.keys(*u);
                pipe.hset_multiple(
                    keys.counter(this_month()),
                    &[("ai_generation", "3"), ("v", "3")],
                )
                .ignore();
                pipe.zadd(keys.dirty(), keys.member(this_month()), 0)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut redis).await.unwrap();
        }
        let flusher = Flusher::new(&store, &pool);
        let started = Instant::now();
        let mut written = 0;
        loop {
            let out = flusher.flush_once().await.expect("flush");
            written += out.counters;
            if out.counters == 0 {
                break;
            }
        }
        let flush_rate = written as f64 / started.elapsed().as_secs_f64();

        let sample = counters / 10;
        let started = Instant::now();
        for u in users.iter().take(sample) {
            sqlx::query(
                "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, version)
                 VALUES ($1, 'export', 1, $2, $3, 1)
                 ON CONFLICT (user_id, type, period_start) DO UPDATE SET count = usage_tracking.count + 1",
            )
            .bind(u)
            .bind(this_month().start())
            .bind(this_month().end())
            .execute(&pool)
            .await
            .unwrap();
        }
        let single_rate = sample as f64 / started.elapsed().as_secs_f64();
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM usage_tracking WHERE type = 'ai_generation'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(rows as usize, counters, "every counter reached Postgres");
        println!(
            "  run {run}: flusher {flush_rate:>9.0} counters/s   one statement per counter {single_rate:>7.0}/s   ratio {:.1}x",
            flush_rate / single_rate
        );
        rates.push(flush_rate);
        ratios.push(flush_rate / single_rate);
        delete_prefix(&mut redis, &prefix).await;
    }
    println!(
        "median: flusher {:.0} counters/s, {:.1}x one statement per counter",
        median(rates),
        median(ratios)
    );

    println!("flush lag under consume load: {load_secs} s, 32 connections, 10000 users, flush every 1000 ms");
    let (mut p50s, mut p99s, mut rps) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let (p50, p99, max, throughput) = lag_run(&redis_url, &prefix, &db_url, load_secs).await;
        println!(
            "  run {run}: lag p50 {:>6.0} ms   p99 {:>6.0} ms   max {:>6.0} ms   while serving {throughput:>6.0} consumes/s",
            p50, p99, max
        );
        p50s.push(p50);
        p99s.push(p99);
        rps.push(throughput);
        delete_prefix(&mut redis, &prefix).await;
    }
    println!(
        "median: lag p50 {:.0} ms, p99 {:.0} ms, at {:.0} consumes/s",
        median(p50s),
        median(p99s),
        median(rps)
    );

    pool.close().await;
    let admin = sqlx::PgPool::connect(&format!("{pg}/postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

async fn delete_prefix(redis: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(redis)
        .await
        .unwrap();
    for chunk in keys.chunks(10_000) {
        let _: i64 = redis::cmd("DEL")
            .arg(chunk)
            .query_async(redis)
            .await
            .unwrap();
    }
}

/// One lag run: returns lag p50, p99, max (ms) and the consume rate served meanwhile.
async fn lag_run(redis_url: &str, prefix: &str, db_url: &str, secs: u64) -> (f64, f64, f64, f64) {
    let mut config = quotad::config::Config::defaults();
    config.redis_url = redis_url.to_owned();
    config.database_url = db_url.to_owned();
    config.key_prefix = prefix.to_owned();
    config.redis_timeout_ms = 1000;
    config.log = "warn".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = quotad::app::App::new(config, Arc::new(quotad::clock::SystemClock)).unwrap();
    let daemon = tokio::spawn(app.run(listener, async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    while client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::PgPool::connect(db_url).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let users: Arc<Vec<Uuid>> = Arc::new((0..10_000).map(|_| Uuid::new_v4()).collect());
    let load: Vec<_> = (0..32)
        .map(|c| {
            let (base, stop, served, users) = (base.clone(), stop.clone(), served.clone(), users.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let body = serde_json::json!({"user_id": users[i % users.len()], "type": "ai_generation", "plan": "PRO"});
                    i += 32;
                    if let Ok(r) = client.post(format!("{base}/v1/consume")).json(&body).send().await {
                        let _ = r.bytes().await;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let probe = Uuid::new_v4();
    let started = Instant::now();
    let mut lags = Vec::new();
    let mut n = 0i64;
    while started.elapsed() < Duration::from_secs(secs) {
        let body = serde_json::json!({"user_id": probe, "type": "export", "plan": "PRO"});
        let r = client
            .post(format!("{base}/v1/track"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answered = Instant::now();
        n += 1;
        loop {
            let count: Option<i64> = sqlx::query_scalar(
                "SELECT count FROM usage_tracking WHERE user_id = $1 AND type = 'export'",
            )
            .bind(probe)
            .fetch_optional(&pool)
            .await
            .unwrap();
            if count.unwrap_or(0) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags.push(answered.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let throughput = served.load(Ordering::Relaxed) as f64 / elapsed;
    let _ = tx.send(());
    let _ = daemon.await;
    pool.close().await;
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    (pick(0.5), pick(0.99), *lags.last().unwrap(), throughput)
}
