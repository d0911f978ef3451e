//! The flusher and Postgres under faults: a row Postgres refuses, two replicas upserting the same
//! rows, its own named Redis connection, a Redis restored from an older dump, a Postgres that
//! hangs (a held table lock), and a shutdown that cannot count what it left.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use quotad::period::{Period, PeriodKind};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{postgres_totals, Options, PrivatePostgres, PrivateRedis, TestApp};

fn month(app: &TestApp) -> Period {
    Period::current(PeriodKind::Month, app.clock_now())
}

fn db_url(app: &TestApp) -> String {
    format!("{}/{}", app.postgres_url, app.db_name)
}

/// The score of `user`'s month counter in its dirty set (`None` = not dirty).
async fn dirty_score(app: &TestApp, user: Uuid) -> Option<f64> {
    let store = &app.state.quota.store;
    redis::cmd("ZSCORE")
        .arg(store.keys(user).dirty())
        .arg(quotad::store::keys::member(
            quotad::store::Owner::User(user),
            month(app),
        ))
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_nul_in_a_metadata_value_is_refused_at_the_api_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for path in ["/v1/consume", "/v1/check", "/v1/track"] {
        let a = app
            .post(
                path,
                json!({"user_id": user, "type": "ai_generation", "metadata": {"model": "a\u{0}b"}}),
            )
            .await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!("INVALID_METADATA"), &json!("metadata")),
            "{path}: {:?}",
            a.body
        );
        let msg = a.body["error"].as_str().unwrap();
        assert!(msg.contains("\"model\"") && msg.contains("NUL"), "{msg}");
    }
    // A lone surrogate (no character at all) is not JSON text serde takes: refused as such.
    let a = app
        .post_raw(
            "/v1/consume",
            format!(r#"{{"user_id": "{user}", "type": "ai_generation", "metadata": {{"model": "\ud800"}}}}"#),
        )
        .await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (400, &json!("MALFORMED_JSON")),
        "{:?}",
        a.body
    );
    assert_eq!(app.used(user, "ai_generation").await, 0);
    // The same text without the NUL is taken.
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "metadata": {"model": "ab"}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test]
async fn a_row_postgres_refuses_is_set_aside_and_every_other_counter_is_written() {
    let app = TestApp::spawn().await;
    let bad = Uuid::new_v4();
    assert_eq!(app.consume(bad, "ai_generation").await.status, 200);
    // What a bad day leaves in Redis: a text value Postgres' jsonb cannot hold (JSON text, as
    // the consume script stores it).
    let key = app.state.quota.store.keys(bad).counter(month(&app));
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("s:ai_generation:model")
        .arg(r#""a\u0000b""#)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let others: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    for u in &others {
        assert_eq!(app.consume(*u, "ai_generation").await.status, 200);
    }
    let before = dirty_score(&app, bad)
        .await
        .expect("the bad counter is dirty");

    let out = app.flusher.flush_once().await.expect("the pass succeeds");

    assert_eq!(out.rejected, 1, "{out:?}");
    assert_eq!(out.counters, 51, "{out:?}");
    let totals = postgres_totals(&db_url(&app), "ai_generation").await;
    for u in &others {
        assert_eq!(totals.get(u), Some(&1), "user {u}");
    }
    assert_eq!(totals.get(&bad), None, "Postgres refused it");
    let after = dirty_score(&app, bad)
        .await
        .expect("the refused counter is still dirty");
    assert!(after > before, "moved to the back: {before} -> {after}");

    // Later passes keep writing everyone else's new counts.
    for u in &others[..10] {
        assert_eq!(app.consume(*u, "ai_generation").await.status, 200);
    }
    let out = app
        .flusher
        .flush_once()
        .await
        .expect("the next pass succeeds");
    assert_eq!((out.rejected, out.counters), (1, 11), "{out:?}");
    let totals = postgres_totals(&db_url(&app), "ai_generation").await;
    for (i, u) in others.iter().enumerate() {
        assert_eq!(totals.get(u), Some(&if i < 10 { 2 } else { 1 }), "user {u}");
    }
    assert!(dirty_score(&app, bad).await.is_some());
    // Counted: the exported counter (one recorder per process, so at least this test's two).
    let text = app.metrics_text().await;
    let rejected: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("quotad_flush_rejected_counters_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("quotad_flush_rejected_counters_total is exported");
    assert!(rejected >= 2.0, "{rejected}");
}

/// Monthly types per counter hash in the two-replica test: each hash makes this many rows.
const TYPES: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_flushing_the_same_counters_at_once_never_fail_and_write_exact_totals() {
    // Many types per counter hash, so one counter is many rows: written in any order but one,
    // two replicas' upserts of the same counters could each lock a row the other waits for.
    let types: Vec<String> = (0..TYPES).map(|i| format!("t{i}")).collect();
    let mut plans = String::from("upgrade_url = \"/billing\"\ndefault_plan = \"FREE\"\n[types]\n");
    for t in &types {
        plans.push_str(&format!(
            "{t} = {{ period = \"month\", label = \"{t}\" }}\n"
        ));
    }
    plans.push_str("[plans.FREE]\n");
    for t in &types {
        plans.push_str(&format!("{t} = -1\n"));
    }
    let plans = crate::helpers::tempfile_path::write(&plans);
    let a = TestApp::spawn_with(Options {
        plans: Some(plans.0.clone()),
        ..Options::default()
    })
    .await;
    let b = TestApp::spawn_with(Options {
        plans: Some(plans.0.clone()),
        replica_of: Some((a.prefix.clone(), a.db_name.clone())),
        now: a.clock_now(),
        ..Options::default()
    })
    .await;
    let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let mut expected: HashMap<(Uuid, String), u64> = HashMap::new();
    for round in 0..5u64 {
        // New counts on both replicas while both flushers write the same dirty counters.
        let counting = {
            let (base_a, base_b, users) = (a.base.clone(), b.base.clone(), users.clone());
            let (client, types) = (a.client.clone(), types.clone());
            tokio::spawn(async move {
                let mut sent: Vec<(Uuid, String, u64)> = Vec::new();
                for (i, u) in users.iter().enumerate() {
                    let base = if i % 2 == 0 { &base_a } else { &base_b };
                    for ty in &types {
                        let amount = 1 + (i as u64 + round) % 3;
                        let r = client
                            .post(format!("{base}/v1/track"))
                            .json(&json!({"user_id": u, "type": ty, "amount": amount}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 200);
                        sent.push((*u, ty.clone(), amount));
                    }
                }
                sent
            })
        };
        let flushes: Vec<_> = [&a, &b]
            .iter()
            .flat_map(|app| [app.flusher.clone(), app.flusher.clone()])
            .map(|f| {
                tokio::spawn(async move {
                    let mut passes = Vec::new();
                    for _ in 0..4 {
                        passes.push(f.flush_once().await);
                    }
                    passes
                })
            })
            .collect();
        for f in flushes {
            for pass in f.await.unwrap() {
                let out = pass.expect("no flusher pass fails (a deadlock would fail it)");
                // The other replica's flush winning a race is not a Redis older than Postgres.
                assert_eq!(out.behind, 0, "{out:?}");
            }
        }
        for (u, ty, n) in counting.await.unwrap() {
            *expected.entry((u, ty)).or_default() += n;
        }
    }
    a.flush().await;
    b.flush().await;
    for ty in &types {
        let totals = postgres_totals(&db_url(&a), ty).await;
        for u in &users {
            assert_eq!(
                totals.get(u),
                expected.get(&(*u, ty.clone())),
                "{ty} of {u}"
            );
        }
    }
}

/// The names of the clients connected to the Redis at `url`.
async fn client_names(url: &str) -> Vec<String> {
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("name=")))
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_flusher_has_a_named_redis_connection_of_its_own() {
    let redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.consume(Uuid::new_v4(), "ai_generation").await.status,
        200
    );
    app.flush().await;

    let mut names = client_names(&redis.url()).await;
    names.sort();
    assert_eq!(
        names,
        vec![
            "quotad-flusher".to_owned(),
            "quotad-requests".to_owned(),
            "quotad-sweeper".to_owned()
        ],
        "one connection for requests, one for the flusher, one for the reservation sweeper (its first pass runs at start), each named"
    );
}

#[tokio::test]
async fn a_redis_restored_from_an_older_dump_is_raised_to_postgres_and_hands_back_no_spent_quota() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let generate = || async {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "metadata": {"tokens": 10, "model": "m-1"}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    };
    for _ in 0..5 {
        generate().await;
    }
    app.flush().await;
    let mut r = app.redis().await;
    let _: () = redis::cmd("SAVE").query_async(&mut r).await.unwrap();
    for _ in 0..5 {
        generate().await;
    }
    // A type the dump never saw.
    for _ in 0..2 {
        assert_eq!(app.consume(user, "export").await.status, 200);
    }
    app.flush().await;
    let db = app.db().await;
    let row = |ty: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (i64, i64, serde_json::Value)>(
                "SELECT count, version, metadata FROM usage_tracking WHERE user_id = $1 AND type = $2",
            )
            .bind(user)
            .bind(ty)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let (pg_count, pg_version, _) = row("ai_generation").await;
    assert_eq!(pg_count, 10);

    // Back to the dump: Redis holds 5 (and no export) at an older version than Postgres'.
    redis.restart();
    assert_eq!(
        app.used(user, "ai_generation").await,
        5,
        "restored from the dump"
    );
    assert_eq!(app.used(user, "export").await, 0, "restored from the dump");
    generate().await;

    let out = app.flusher.flush_once().await.expect("flush");
    assert_eq!(out.behind, 1, "{out:?}");
    let used = app.used(user, "ai_generation").await;
    assert!(
        used >= pg_count as u64,
        "spent quota is not handed back: {used} < {pg_count}"
    );
    assert_eq!(used, 10, "max(6 in Redis, 10 in Postgres)");
    assert_eq!(app.used(user, "export").await, 2, "taken from Postgres");
    let key = app.state.quota.store.keys(user).counter(month(&app));
    let tokens: String = redis::cmd("HGET")
        .arg(&key)
        .arg("m:ai_generation:tokens")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(tokens.parse::<f64>().unwrap(), 100.0, "max(60, 100)");

    app.flush().await;
    let (count, version, metadata) = row("ai_generation").await;
    assert_eq!(count, 10);
    assert!(
        version > pg_version,
        "Postgres took the next flush: v{version}"
    );
    assert_eq!(metadata, json!({"tokens": 100, "model": "m-1"}));
    assert_eq!(row("export").await.0, 2);

    let report = app
        .post("/v1/admin/reconcile", json!({"period": month(&app).id()}))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(report.body["drift"], json!([]), "{:?}", report.body);
    assert_eq!(report.body["in_sync"], json!(2), "{:?}", report.body);
}

/// A transaction holding `usage_tracking` and `user_plans` locked: every read of them waits.
async fn lock_tables(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = app.db().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_tracking, user_plans IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Sessions of the app's database waiting for a lock.
async fn lock_waiters(app: &TestApp) -> i64 {
    let pool = sqlx::PgPool::connect(&format!("{}/postgres", app.postgres_url))
        .await
        .unwrap();
    let n = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
    )
    .bind(&app.db_name)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

#[tokio::test]
async fn with_postgres_hung_on_a_lock_requests_get_their_fail_policy_within_the_database_timeout() {
    let app = TestApp::spawn().await;
    let known = Uuid::new_v4();
    assert_eq!(app.consume(known, "ai_generation").await.status, 200);
    let bound = Duration::from_millis(1000 + 700);

    let tx = lock_tables(&app).await;
    let fresh = Uuid::new_v4();
    let timed = |what: &'static str| {
        let started = Instant::now();
        move || {
            let took = started.elapsed();
            assert!(took < bound, "{what} took {took:?}");
            took
        }
    };

    let done = timed("a loaded counter");
    let loaded = app.consume(known, "ai_generation").await;
    assert!(done() < Duration::from_millis(500));
    assert_eq!((loaded.status, &loaded.body["used"]), (200, &json!(2)));

    let done = timed("fail open");
    let open = app.consume(fresh, "ai_generation").await;
    done();
    assert_eq!(
        (open.status, &open.body["degraded"]),
        (200, &json!(true)),
        "{:?}",
        open.body
    );

    let done = timed("fail closed");
    let closed = app.consume(fresh, "kb_file").await;
    done();
    assert_eq!(
        (closed.status, &closed.body["code"]),
        (503, &json!("DATABASE_UNAVAILABLE")),
        "{:?}",
        closed.body
    );

    let done = timed("PUT plan");
    let plan = app
        .send(
            reqwest::Method::PUT,
            &format!("/v1/users/{fresh}/plan"),
            Some(json!({"plan": "PRO"})),
            None,
        )
        .await;
    done();
    assert_eq!(
        (plan.status, &plan.body["code"]),
        (503, &json!("DATABASE_UNAVAILABLE")),
        "{:?}",
        plan.body
    );

    // The server gave up on them too (lock_timeout), not only quotad.
    let deadline = Instant::now() + Duration::from_secs(3);
    while lock_waiters(&app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "quotad's statements still wait for the lock on the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tx.rollback().await.unwrap();
    app.flush().await;
    let totals = postgres_totals(&db_url(&app), "ai_generation").await;
    assert_eq!(
        totals.get(&known),
        Some(&2),
        "everything counted reaches Postgres"
    );
    assert_eq!(
        totals.get(&fresh),
        None,
        "the degraded answer counted nothing"
    );
}

#[tokio::test]
async fn a_stop_while_a_flush_waits_on_a_locked_table_ends_within_the_shutdown_bound() {
    let mut app = TestApp::spawn_with(Options {
        flush_interval_ms: 50,
        shutdown_timeout_ms: 1000,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.flush().await;
    let tx = lock_tables(&app).await;
    // Loaded already: counted in Redis, to be flushed.
    let a = app.consume(user, "ai_generation").await;
    assert_eq!((a.status, &a.body["used"]), (200, &json!(2)));
    // Let a pass start and block on the lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock_waiters(&app).await == 0 {
        assert!(Instant::now() < deadline, "no flush waits on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let ended = app.stop().await;
    let took = started.elapsed();

    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert!(
        matches!(ended, Err(quotad::app::RunError::Incomplete(Some(1)))),
        "{ended:?}"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_stop_that_cannot_count_what_it_left_says_so() {
    let mut redis = PrivateRedis::start();
    let mut app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        shutdown_timeout_ms: 500,
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.consume(Uuid::new_v4(), "ai_generation").await.status,
        200
    );
    redis.kill();

    let ended = app.stop().await;

    match ended {
        Err(e @ quotad::app::RunError::Incomplete(None)) => {
            assert!(
                e.to_string().contains("an unknown number of counters"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn after_a_postgres_restart_loads_and_flushes_work_at_once() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        ..Options::default()
    })
    .await;
    let known = Uuid::new_v4();
    assert_eq!(app.consume(known, "kb_file").await.status, 200);
    app.flush().await;
    // Every pooled connection (the request path's and the flusher's) is now dead.
    pg.stop("fast");
    pg.resume();

    // The first calls after it is back get answers, not the fail policy.
    let fresh = Uuid::new_v4();
    let closed = app.consume(fresh, "kb_file").await;
    assert_eq!(
        (closed.status, &closed.body["used"]),
        (200, &json!(1)),
        "{:?}",
        closed.body
    );
    assert_eq!(app.consume(known, "kb_file").await.status, 200);
    let out = app
        .flusher
        .flush_once()
        .await
        .expect("the first pass after the restart succeeds");
    assert_eq!(out.counters, 2, "{out:?}");
    let totals = postgres_totals(&db_url(&app), "kb_file").await;
    assert_eq!(
        (totals.get(&known), totals.get(&fresh)),
        (Some(&2), Some(&1))
    );
}

/// The names of this process' threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// The flusher's passes run on a thread of their own (so they never hold a request worker), and
/// that thread lives exactly as long as the daemon: it flushes while serving, drains at the stop,
/// and is gone once the daemon has returned.
#[tokio::test]
async fn the_flusher_runs_on_a_thread_of_its_own_from_start_to_drain() {
    let mut app = TestApp::spawn_with(Options {
        flush_interval_ms: 50,
        ..Options::default()
    })
    .await;
    assert!(
        thread_names().iter().any(|n| n == "quotad-flusher"),
        "{:?}",
        thread_names()
    );
    let user = Uuid::new_v4();
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while postgres_totals(&db_url(&app), "ai_generation")
        .await
        .get(&user)
        != Some(&1)
    {
        assert!(Instant::now() < deadline, "no pass wrote the count in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Counted just before the stop: the drain, run on the flusher's thread, writes it.
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.stop().await.expect("a clean stop");
    assert_eq!(
        postgres_totals(&db_url(&app), "ai_generation")
            .await
            .get(&user),
        Some(&2)
    );
    assert!(
        !thread_names().iter().any(|n| n == "quotad-flusher"),
        "{:?}",
        thread_names()
    );
}
