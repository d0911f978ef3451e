//! Sequential consume latency over loopback, against the raw-Redis floor measured in the same run.
//!
//! `cargo run --release --example consume_latency -- [URL] [REDIS_URL] [CALLS] [RUNS]`
//! (defaults `http://127.0.0.1:8080`, `redis://127.0.0.1:6379`, 3000, 3). Point it at a running
//! quotad (`deploy/bench-latency.sh` starts one). Each run makes CALLS consumes one after another
//! on one keep-alive connection, spread over 100 users whose counters are already loaded (so no
//! call pays a first-use hydration), then CALLS EVALSHA calls of the same consume script straight
//! to Redis on one connection. It prints p50/p90/p99 of both and the ratio of the medians; the
//! last line is the median of the runs.

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use uuid::Uuid;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    let (p50, p90, p99) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
    );
    println!(
        "  {label:<22} p50 {:>7.1} µs   p90 {:>7.1} µs   p99 {:>7.1} µs",
        p50.as_secs_f64() * 1e6,
        p90.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p50
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let redis_url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let calls: usize = args
        .get(2)
        .map_or(3000, |s| s.parse().expect("CALLS is a number"));
    let runs: usize = args
        .get(3)
        .map_or(3, |s| s.parse().expect("RUNS is a number"));

    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let plans = quotad::plans::Plans::built_in();
    let ty = plans.usage_type("ai_generation").unwrap();
    let mut ratios = Vec::new();
    let mut medians = Vec::new();

    for run in 1..=runs {
        println!("run {run}/{runs}: {calls} sequential calls each");
        let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        let body =
            |u: &Uuid| serde_json::json!({"user_id": u, "type": "ai_generation", "plan": "PRO"});
        for u in &users {
            let r = client
                .post(format!("{url}/v1/consume"))
                .json(&body(u))
                .send()
                .await
                .expect("quotad answers");
            assert_eq!(
                r.status(),
                200,
                "warm-up consume failed: {}",
                r.text().await.unwrap_or_default()
            );
        }
        let mut http = Vec::with_capacity(calls);
        for i in 0..calls {
            let b = body(&users[i % users.len()]);
            let started = Instant::now();
            let r = client
                .post(format!("{url}/v1/consume"))
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let _ = r.bytes().await.unwrap();
            http.push(started.elapsed());
            assert_eq!(status, 200);
        }

        // The floor: the same script, same argument shape, straight to Redis.
        let prefix = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
        let keys: Vec<(String, String)> = users
            .iter()
            .map(|u| {
                let b = quotad::store::RedisStore::bucket(u);
                (
                    format!("{prefix}:1:{{{b}}}:c:{u}:2026-11"),
                    format!("{prefix}:1:{{{b}}}:dirty"),
                )
            })
            .collect();
        for (k, _) in &keys {
            let _: () = redis::cmd("HSET")
                .arg(k)
                .arg("v")
                .arg(0)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        let mut raw = Vec::with_capacity(calls);
        for i in 0..calls {
            let (k, d) = &keys[i % keys.len()];
            let mut inv = quotad::store::scripts::CONSUME.prepare_invoke();
            inv.key(k)
                .key(d)
                .arg("consume")
                .arg("ai_generation")
                .arg(1)
                .arg("x:2026-11")
                .arg("PRO")
                .arg("FREE")
                .arg(86400)
                .arg("2026-11")
                .arg(0)
                .arg(&ty.script_limits);
            let started = Instant::now();
            let _: (String, i64, String, i64, String) = inv.invoke_async(&mut redis).await.unwrap();
            raw.push(started.elapsed());
        }
        let mut cleanup: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        cleanup.extend(keys.iter().map(|(_, d)| d.clone()));
        let _: i64 = redis::cmd("DEL")
            .arg(cleanup)
            .query_async(&mut redis)
            .await
            .unwrap();

        let h = summary("quotad HTTP consume", http);
        let r = summary("raw Redis EVALSHA", raw);
        let ratio = h.as_secs_f64() / r.as_secs_f64();
        println!("  median ratio quotad / raw Redis: {ratio:.2}");
        ratios.push(ratio);
        medians.push(h);
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    medians.sort_unstable();
    println!(
        "median of {runs} runs: consume p50 {:.1} µs, {:.2}x the raw-Redis p50",
        medians[runs / 2].as_secs_f64() * 1e6,
        ratios[runs / 2]
    );
}
