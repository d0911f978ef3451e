//! What one very large account costs: every member's counters live in the account's one Redis
//! slot, and `GET /v1/accounts/{id}/usage` reads them all.
//!
//! `cargo run --release --example account_scale -- [SIZES] [RUNS]` (defaults
//! `1000,10000,100000`, 3), with Redis on `QUOTAD_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! and Postgres on `QUOTAD_PG` (default `postgres://postgres@127.0.0.1:5432`); it makes its own
//! key prefix and database and removes both.
//!
//! For each size N, an account gets N members (rows in `account_members`, as N `PUT
//! /v1/users/{id}/account` would leave them for users who never counted), each of whom then
//! counts once through quotad's HTTP API (so every member's counter is live in the account's
//! slot); then the account's usage read runs RUNS times: its time (median), the members it
//! lists and the bytes Redis holds in the slot's keys of one member (`MEMORY USAGE`), times N.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use futures_util::StreamExt;
use uuid::Uuid;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = args
        .first()
        .map_or("1000,10000,100000", String::as_str)
        .split(',')
        .map(|s| s.parse().expect("SIZES: whole numbers separated by commas"))
        .collect();
    let runs: usize = args.get(1).map_or(3, |s| s.parse().expect("RUNS"));
    let redis_url = env_or("QUOTAD_REDIS_URL", "redis://127.0.0.1:6379");
    let pg = env_or("QUOTAD_PG", "postgres://postgres@127.0.0.1:5432");
    let id = &Uuid::new_v4().simple().to_string()[..8];
    let (prefix, db_name) = (format!("ascale{id}"), format!("quotad_ascale_{id}"));
    let db_url = format!("{pg}/{db_name}");

    let mut config = quotad::config::Config::defaults();
    config.redis_url = redis_url.clone();
    config.database_url = db_url.clone();
    config.key_prefix = prefix.clone();
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
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    println!("account size  usage read (median of {runs})  members listed  Redis bytes in the slot (members' counters)");
    for n in sizes {
        let account = Uuid::new_v4();
        let members: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        sqlx::query(
            "INSERT INTO account_members (user_id, account_id, version) SELECT u, $2, 1 FROM UNNEST($1::uuid[]) AS u",
        )
        .bind(&members)
        .bind(account)
        .execute(&pool)
        .await
        .unwrap();
        // One consume each (32 at a time): a replica that never saw them follows their routes
        // from their own buckets to the account's, loads their counters there, and counts.
        let started = Instant::now();
        let failed = futures_util::stream::iter(members.iter().map(|m| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                client
                    .post(format!("{base}/v1/track"))
                    .json(&serde_json::json!({"user_id": m, "type": "ai_generation"}))
                    .send()
                    .await
                    .map(|r| r.status() != 200)
                    .unwrap_or(true)
            }
        }))
        .buffer_unordered(32)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
        assert_eq!(failed, 0, "every member's first call is counted");
        let first_calls = started.elapsed();

        let mut times = Vec::new();
        let mut listed = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let r = client
                .get(format!("{base}/v1/accounts/{account}/usage?limit=1000"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: serde_json::Value = r.json().await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(body["usage"]["ai_generation"]["used"], n as u64);
            assert_eq!(body["member_count"], n as u64);
            listed = body["members"].as_array().unwrap().len();
        }
        let store =
            quotad::store::RedisStore::new(&redis_url, &prefix, Duration::from_secs(5)).unwrap();
        let keys = store.keys_in(members[0], Some(account));
        let month =
            quotad::period::Period::current(quotad::period::PeriodKind::Month, chrono::Utc::now());
        let mut bytes = 0i64;
        for key in [keys.counter(month), keys.route()] {
            let b: Option<i64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            bytes += b.unwrap_or(0);
        }
        println!(
            "{n:>12}  {:>10.1} ms                  {listed:>14}  {:>8.1} MB ({bytes} B a member; first calls of all members took {:.1} s)",
            median(times),
            (bytes * n as i64) as f64 / 1e6,
            first_calls.as_secs_f64()
        );
    }

    let _ = tx.send(());
    let _ = daemon.await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    pool.close().await;
    let admin = sqlx::PgPool::connect(&format!("{pg}/postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}
