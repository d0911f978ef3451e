//! Bench work done straight in Redis, with quotad's own scripts and keys: loading many users'
//! counters at once (`--preload`, for growth runs with millions of users) and measuring the
//! memory one active (user, month) takes (`--memory`).

use std::time::Instant;

use deadpool_redis::redis;
use uuid::Uuid;

use super::bench_period;
use quotad::period::Period;
use quotad::plans::Plans;
use quotad::store::{scripts, CountCall, Mode, RedisStore, Snapshot};

/// Users per pipeline.
const CHUNK: usize = 2_000;

/// The monthly types an active (user, month) is measured with.
const MEMORY_TYPES: [&str; 3] = ["ai_generation", "export", "api_call"];

/// Connects to `url`.
pub(super) async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    // Big pipelines: no response timeout (the client's default is 500 ms).
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)
        .map_err(|e| format!("--redis-url: {e}"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("redis: {e}"))
}

/// Loads a fresh counter for each of `users` in `period`, as a first request does (the hydrate
/// script with nothing from Postgres), pipelined. With `consume`, each of [`MEMORY_TYPES`] is
/// then consumed once.
pub(super) async fn load_counters(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    users: &[Uuid],
    period: Period,
    now: chrono::DateTime<chrono::Utc>,
    consume: bool,
) -> Result<(), String> {
    let plans = Plans::parse(&memory_plans(), "bench").map_err(|e| e.to_string())?;
    let types: &[&str] = if consume { &MEMORY_TYPES } else { &[] };
    // Measures the offset to Redis' clock, which the scripts' deadlines are written in.
    store.ping().await.map_err(|e| e.to_string())?;
    for chunk in users.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        // A pipeline cannot retry on NOSCRIPT: load the scripts first (cheap when loaded).
        pipe.load_script(&scripts::HYDRATE)
            .ignore()
            .load_script(&scripts::CONSUME)
            .ignore();
        for u in chunk {
            let keys = store.keys(*u);
            let mut hydrate =
                store.hydrate_invocation(keys.own(), period, &Snapshot::default(), now, "");
            store.arm(&mut hydrate);
            pipe.invoke_script(&hydrate).ignore();
            for ty in types {
                consume_in(&mut pipe, store, &plans, &keys, ty, period, None);
            }
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
    }
    Ok(())
}

/// Adds to `pipe` one consume of `ty` (a [`MEMORY_TYPES`] type) for `keys`' user, under `key`.
fn consume_in(
    pipe: &mut redis::Pipeline,
    store: &RedisStore,
    plans: &Plans,
    keys: &quotad::store::UserKeys,
    ty: &str,
    period: Period,
    key: Option<&str>,
) {
    let call = CountCall {
        mode: Mode::Consume,
        keys,
        usage_type: plans.usage_type(ty).expect("in memory_plans"),
        amount: 1,
        period,
        plan_override: None,
        default_plan: &plans.default_plan,
        idempotency_key: key,
        metadata: &[],
    };
    let mut count = store.count_invocation(&call);
    store.arm(&mut count);
    pipe.invoke_script(&count).ignore();
}

/// One `ai_generation` consume per user, pipelined; under a key of 32 hex digits when `keyed`.
async fn consume_each(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    users: &[Uuid],
    keyed: bool,
) -> Result<(), String> {
    let plans = Plans::parse(&memory_plans(), "bench").map_err(|e| e.to_string())?;
    let period = bench_period();
    for chunk in users.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        pipe.load_script(&scripts::CONSUME).ignore();
        for u in chunk {
            let keys = store.keys(*u);
            let key = keyed.then(|| Uuid::new_v4().simple().to_string());
            consume_in(
                &mut pipe,
                store,
                &plans,
                &keys,
                MEMORY_TYPES[0],
                period,
                key.as_deref(),
            );
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
    }
    Ok(())
}

/// A plans file with [`MEMORY_TYPES`] as monthly types, each limited to 1,000 on the default plan.
fn memory_plans() -> String {
    let mut text = String::from("upgrade_url = \"/\"\ndefault_plan = \"FREE\"\n\n[types]\n");
    for t in MEMORY_TYPES {
        text.push_str(&format!("{t} = {{ period = \"month\" }}\n"));
    }
    text.push_str("\n[plans.FREE]\n");
    for t in MEMORY_TYPES {
        text.push_str(&format!("{t} = 1000\n"));
    }
    text
}

/// Loads `users`' counters of `period` into the Redis of a quotad keyed by `prefix`, as each
/// user's first request would at `now` (which also sets the buckets' markers to `now` where
/// missing): a growth run starts with them all loaded.
pub async fn preload(
    url: &str,
    prefix: &str,
    users: &[Uuid],
    period: Period,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let mut conn = connect(url).await?;
    let store = RedisStore::new(url, prefix, std::time::Duration::from_secs(5))?;
    let started = Instant::now();
    load_counters(&mut conn, &store, users, period, now, false).await?;
    println!(
        "  (preload: {} counters of {} loaded straight into Redis in {:.1} s)",
        users.len(),
        period.id(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `used_memory` of `INFO memory`.
async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Result<i64, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".to_owned())
}

/// Every key under `prefix`, unlinked.
pub(super) async fn remove_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("UNLINK").arg(keys).query_async(conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Bytes of Redis per active (user, month) with three types: `users` users' counters made by
/// quotad's scripts (loaded, then each type consumed once), `INFO memory` before and after.
/// Printed twice: with the dirty-set entries the flusher has not yet taken, and without them
/// (after a flush, the steady state).
pub async fn memory(url: &str, users: usize) -> Result<(f64, f64), String> {
    let mut conn = connect(url).await?;
    let prefix = format!("qmem{}", &Uuid::new_v4().simple().to_string()[..8]);
    let store = RedisStore::new(url, &prefix, std::time::Duration::from_secs(5))?;
    let ids: Vec<Uuid> = (0..users.max(1)).map(|_| Uuid::new_v4()).collect();
    println!(
        "quotad bench --memory: {} users, one month, types {}",
        ids.len(),
        MEMORY_TYPES.join(", ")
    );
    let outcome = async {
        let before = used_memory(&mut conn).await?;
        let started = Instant::now();
        load_counters(
            &mut conn,
            &store,
            &ids,
            bench_period(),
            chrono::Utc::now(),
            true,
        )
        .await?;
        let loaded = used_memory(&mut conn).await?;
        // What the flusher leaves: the counters, with their dirty-set entries taken off. DEL, not
        // UNLINK: memory freed in the background would still be counted.
        for b in 0..quotad::store::BUCKETS {
            let _: i64 = redis::cmd("DEL")
                .arg(quotad::store::keys::dirty_of(&prefix, b))
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
        }
        let flushed = used_memory(&mut conn).await?;
        let sample: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(store.keys(ids[0]).counter(bench_period()))
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let n = ids.len() as f64;
        // One more consume per user, now under an idempotency key of 32 hex digits (as a gateway
        // makes for a request that brings none): what the record of a keyed call adds, on top of
        // a counter that is already dirty again.
        consume_each(&mut conn, &store, &ids, false).await?;
        let unkeyed = used_memory(&mut conn).await?;
        consume_each(&mut conn, &store, &ids, true).await?;
        let keyed = used_memory(&mut conn).await?;
        let record = (keyed - unkeyed) as f64 / n;
        // A second keyed call per user: its record joins the user's index, which now exists.
        consume_each(&mut conn, &store, &ids, true).await?;
        let again = (used_memory(&mut conn).await? - keyed) as f64 / n;
        let dirty = (loaded - before) as f64 / n;
        let steady = (flushed - before) as f64 / n;
        println!(
            "  loaded in {:.1} s; used_memory {} → {} B (→ {} B without dirty-set entries)",
            started.elapsed().as_secs_f64(),
            before,
            loaded,
            flushed
        );
        println!("  bytes per active (user, month), after a flush:    {steady:>7.1}");
        println!("  bytes per active (user, month), not yet flushed: {dirty:>7.1}");
        if let Some(s) = sample {
            println!("  MEMORY USAGE of one counter hash (Redis' estimate): {s} B");
        }
        println!("  bytes per idempotency record (kept 24 h), a user's first: {record:>7.1}");
        println!("  bytes per idempotency record (kept 24 h), a user's next:  {again:>7.1}");
        Ok::<_, String>((steady, dirty))
    }
    .await;
    remove_prefix(&mut conn, &prefix).await;
    outcome
}
