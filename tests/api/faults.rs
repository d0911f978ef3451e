//! Real faults on servers of the tests' own: Postgres stopped under load, the daemon killed with
//! SIGKILL and stopped with SIGTERM under load, three daemons at once. In every case Postgres
//! ends up holding exactly what the daemons answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::helpers::{
    consume_load, postgres_totals, Daemon, LoadTally, Options, PrivatePostgres, TestApp,
};

fn users(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

/// Polls until Postgres holds `expected` for every user (the flusher runs on its own clock).
async fn wait_for_totals(
    db_url: &str,
    expected: &HashMap<Uuid, u64>,
    limit: Duration,
) -> HashMap<Uuid, u64> {
    let deadline = Instant::now() + limit;
    loop {
        let totals = postgres_totals(db_url, "ai_generation").await;
        if expected
            .iter()
            .all(|(u, n)| totals.get(u).copied().unwrap_or(0) == *n)
            || Instant::now() > deadline
        {
            return totals;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_5s_under_load_loses_nothing() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        flush_interval_ms: 50,
        ..Options::default()
    })
    .await;
    let users = users(20);
    for u in &users {
        assert_eq!(
            app.consume(*u, "ai_generation").await.status,
            200,
            "warm-up"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(consume_load(
        app.base.clone(),
        users.clone(),
        "ai_generation",
        4,
        Duration::from_secs(9),
        stop,
    ));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.stop("fast");
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.resume();
    let tally: LoadTally = load.await.unwrap();

    assert!(down_at.elapsed() >= Duration::from_secs(5));
    assert_eq!(
        (tally.failed, tally.degraded),
        (0, 0),
        "every request was answered from Redis: {tally:?}"
    );
    let expected: HashMap<Uuid, u64> = users
        .iter()
        .map(|u| (*u, tally.allowed.get(u).copied().unwrap_or(0) + 1))
        .collect();
    let db_url = format!("{}/{}", pg.url(), app.db_name);
    let totals = wait_for_totals(&db_url, &expected, Duration::from_secs(40)).await;
    assert_eq!(
        totals,
        expected,
        "Postgres totals equal the allowed answers ({} allowed, {} refused)",
        tally.total_allowed(),
        tally.refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_sigkill_under_load_loses_no_allowed_answer() {
    let first = Daemon::spawn(&[]);
    first.wait_ready();
    let users = users(20);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = 4;
    let load = tokio::spawn(consume_load(
        first.base(),
        users.clone(),
        "ai_generation",
        clients,
        Duration::from_secs(5),
        stop.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(1000)).await;
    first.signal("-KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let tally = load.await.unwrap();
    let second = first.replica();
    second.wait_ready();

    assert!(tally.total_allowed() > 0, "{tally:?}");
    // Answers lost with the process may still have counted: at most one in flight per client.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (totals, redis) = loop {
        let totals = postgres_totals(&first.database_url(), "ai_generation").await;
        let redis: HashMap<Uuid, u64> = users
            .iter()
            .map(|u| {
                let used = second.get(&format!("/v1/users/{u}/usage")).unwrap().1["usage"]
                    ["ai_generation"]["used"]
                    .as_u64()
                    .unwrap();
                (*u, used)
            })
            .collect();
        let flushed = users
            .iter()
            .all(|u| totals.get(u).copied().unwrap_or(0) == redis[u]);
        if flushed || Instant::now() > deadline {
            break (totals, redis);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut extra = 0;
    for u in &users {
        let allowed = tally.allowed.get(u).copied().unwrap_or(0);
        let in_pg = totals.get(u).copied().unwrap_or(0);
        assert_eq!(
            in_pg, redis[u],
            "the restarted daemon flushed what the killed one left dirty"
        );
        assert!(
            in_pg >= allowed,
            "user {u}: {in_pg} in Postgres < {allowed} allowed"
        );
        extra += in_pg - allowed;
    }
    assert!(
        extra <= clients as u64,
        "{extra} counted beyond the answers seen, more than {clients} in flight"
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_with_sigterm_under_load_flushes_every_allowed_answer_and_exits_0() {
    let mut daemon = Daemon::spawn(&[("QUOTAD_FLUSH_INTERVAL_MS", "60000".into())]);
    daemon.wait_ready();
    let users = users(20);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(consume_load(
        daemon.base(),
        users.clone(),
        "ai_generation",
        4,
        Duration::from_secs(5),
        stop.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(1000)).await;
    daemon.signal("-TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = daemon.wait_exit(Duration::from_secs(15));
        (code, daemon)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let tally = load.await.unwrap();
    let (code, daemon) = code;

    assert_eq!(code, Some(0), "log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("everything flushed"));
    // The interval is a minute: only the shutdown flush can have written these.
    let totals = postgres_totals(&daemon.database_url(), "ai_generation").await;
    let expected: HashMap<Uuid, u64> = tally.allowed.clone();
    assert!(!expected.is_empty());
    for (u, n) in &expected {
        assert_eq!(totals.get(u).copied().unwrap_or(0), *n, "user {u}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_on_the_same_users_write_exactly_the_allowed_answers() {
    let a = TestApp::spawn_with(Options {
        flush_interval_ms: 20,
        ..Options::default()
    })
    .await;
    let b = a.replica().await;
    let c = a.replica().await;
    let users = users(10);
    let stop = Arc::new(AtomicBool::new(false));

    let loads: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|app| {
            tokio::spawn(consume_load(
                app.base.clone(),
                users.clone(),
                "ai_generation",
                2,
                Duration::from_secs(60),
                stop.clone(),
            ))
        })
        .collect();
    // The load runs until every user has reached the limit (and a little past, so the clients
    // race on the boundary and are refused), not for a fixed time that might stop short of it.
    let started = Instant::now();
    'watch: loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "the users did not all reach 50 within 50 s"
        );
        for u in &users {
            if a.used(*u, "ai_generation").await < 50 {
                continue 'watch;
            }
        }
        break;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut allowed: HashMap<Uuid, u64> = HashMap::new();
    let mut refused = 0;
    for l in loads {
        let t = l.await.unwrap();
        assert_eq!((t.failed, t.degraded), (0, 0));
        refused += t.refused;
        for (u, n) in t.allowed {
            *allowed.entry(u).or_default() += n;
        }
    }
    let (mut b, mut c) = (b, c);
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    a.flush().await;

    assert_eq!(allowed.len(), users.len(), "{allowed:?}");
    assert!(
        allowed.values().all(|n| *n == 50),
        "exactly the FREE limit, never past it, for every user: {allowed:?}"
    );
    assert!(refused > 0, "the load went past the limit");
    let totals = postgres_totals(
        &format!("{}/{}", a.postgres_url, a.db_name),
        "ai_generation",
    )
    .await;
    assert_eq!(totals, allowed);
}

#[tokio::test]
async fn a_stop_with_postgres_down_ends_within_its_bound_and_says_what_it_left() {
    let pg = PrivatePostgres::start();
    let mut app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        shutdown_timeout_ms: 1000,
        ..Options::default()
    })
    .await;
    app.consume(Uuid::new_v4(), "ai_generation").await;
    pg.stop("immediate");

    let started = Instant::now();
    let ended = app.stop().await;

    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(ended, Err(quotad::app::RunError::Incomplete(Some(1)))),
        "{ended:?}"
    );
}

#[tokio::test]
async fn with_postgres_down_a_counter_redis_does_not_hold_follows_its_types_fail_policy() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        ..Options::default()
    })
    .await;
    let (known, new) = (Uuid::new_v4(), Uuid::new_v4());
    app.consume(known, "ai_generation").await;

    pg.stop("fast");
    let loaded = app.consume(known, "ai_generation").await;
    let open = app.consume(new, "ai_generation").await;
    let closed = app.consume(new, "kb_file").await;

    assert_eq!(
        (loaded.status, &loaded.body["used"]),
        (200, &serde_json::json!(2)),
        "a loaded counter needs no Postgres"
    );
    assert_eq!(
        (open.status, &open.body["degraded"]),
        (200, &serde_json::json!(true)),
        "{:?}",
        open.body
    );
    assert_eq!(open.body["used"], serde_json::Value::Null);
    assert_eq!(
        (closed.status, &closed.body["code"]),
        (503, &serde_json::json!("DATABASE_UNAVAILABLE")),
        "{:?}",
        closed.body
    );
    pg.resume();
}

/// How many counters are marked dirty under `prefix` in the shared test Redis.
async fn dirty_counters(prefix: &str) -> u64 {
    use deadpool_redis::redis;
    let mut r = redis::Client::open(crate::helpers::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*:dirty"))
        .query_async(&mut r)
        .await
        .unwrap();
    let mut n = 0;
    for k in keys {
        n += redis::cmd("ZCARD")
            .arg(k)
            .query_async::<u64>(&mut r)
            .await
            .unwrap();
    }
    n
}

#[tokio::test]
async fn sigterm_with_postgres_down_exits_2_naming_the_counters_left_dirty_for_the_next_flusher() {
    let pg = PrivatePostgres::start();
    let mut daemon = Daemon::spawn(&[
        ("QUOTAD_TEST_POSTGRES", pg.url()),
        // Nothing is flushed before the stop: every count is still only in Redis then.
        ("QUOTAD_FLUSH_INTERVAL_MS", "3600000".into()),
        ("QUOTAD_SHUTDOWN_TIMEOUT_MS", "1000".into()),
    ]);
    daemon.wait_ready();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut expected = HashMap::new();
    for (i, u) in users(3).into_iter().enumerate() {
        let r = client
            .post(format!("{}/v1/consume", daemon.base()))
            .json(&serde_json::json!({"user_id": u, "type": "ai_generation", "amount": i + 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        expected.insert(u, i as u64 + 1);
    }
    assert_eq!(dirty_counters(&daemon.prefix).await, 3);

    pg.stop("immediate");
    let started = Instant::now();
    daemon.signal("-TERM");
    let code = daemon.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();

    let log = daemon.log_text();
    assert_eq!(code, Some(2), "log:\n{log}");
    assert!(
        took < Duration::from_secs(4),
        "a 1 s shutdown bound took {took:?}"
    );
    assert!(
        log.contains("shutdown bound reached with 3 counters not yet flushed to Postgres"),
        "the log names the count left: {log}"
    );
    assert_eq!(
        dirty_counters(&daemon.prefix).await,
        3,
        "the counters left are still marked dirty in Redis"
    );

    // Postgres is back: the next daemon on the same Redis and database writes them.
    pg.resume();
    let next = daemon.replica();
    next.wait_ready();
    let totals = wait_for_totals(&daemon.database_url(), &expected, Duration::from_secs(20)).await;
    assert_eq!(totals, expected);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dirty_counters(&daemon.prefix).await > 0 {
        assert!(Instant::now() < deadline, "still dirty after the flush");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(next);
}
