//! Counters Redis does not hold are loaded from Postgres in batches: concurrent loads share one
//! Postgres statement and one Redis pipeline, and each gets the answer it would get alone.

use std::time::{Duration, Instant};

use deadpool_redis::redis::AsyncCommands;
use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use quotad::store::{decision_reply, Hydrated, Status};

use crate::helpers::{month_period, month_start, PrivateRedis, TestApp};

/// Writes `count` as `user`'s ai_generation total of this month in Postgres, at version 3.
async fn earlier_total(db: &sqlx::PgPool, user: Uuid, count: i64) {
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, version)
         VALUES ($1, 'ai_generation', $2, $3, $4, 3)",
    )
    .bind(user)
    .bind(count)
    .bind(month_start(0))
    .bind(month_start(1))
    .execute(db)
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_first_requests_get_their_earlier_totals_from_a_few_postgres_statements() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let users: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    for (i, user) in users.iter().enumerate() {
        earlier_total(&db, *user, i as i64 % 40).await;
    }
    // Every tenth user has a stored plan: it comes with the same statement.
    for user in users.iter().step_by(10) {
        sqlx::query("INSERT INTO user_plans (user_id, plan, version) VALUES ($1, 'PRO', 1)")
            .bind(user)
            .execute(&db)
            .await
            .unwrap();
    }
    let before = app.state.quota.hydrator.queries();

    let answers = join_all(users.iter().map(|u| app.consume(*u, "ai_generation"))).await;

    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200, "user {i}: {:?}", a.body);
        assert_eq!(
            a.body["used"],
            json!(i as u64 % 40 + 1),
            "user {i}: {:?}",
            a.body
        );
        let plan = if i % 10 == 0 { "PRO" } else { "FREE" };
        assert_eq!(a.body["plan"], json!(plan), "user {i}: {:?}", a.body);
    }
    let queries = app.state.quota.hydrator.queries() - before;
    println!("200 first requests loaded their counters with {queries} postgres statements");
    assert!(
        (1..=50).contains(&queries),
        "{queries} statements for 200 loads"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quotad_hydrate_batches_total"),
        "the batches are exported"
    );
    assert!(metrics.contains("quotad_hydrate_batch_counters_bucket"));
}

#[tokio::test]
async fn loads_asked_for_at_once_go_to_postgres_as_one_statement() {
    let app = TestApp::spawn().await;
    let hydrator = &app.state.quota.hydrator;
    let keys: Vec<_> = (0..100)
        .map(|_| app.state.quota.store.keys(Uuid::new_v4()))
        .collect();
    let before = hydrator.queries();

    let filled = join_all(
        keys.iter()
            .map(|k| hydrator.load(k.own(), "", month_period(0))),
    )
    .await;

    assert!(
        filled.iter().all(|f| matches!(f, Ok(Hydrated::Filled))),
        "{filled:?}"
    );
    assert_eq!(hydrator.queries() - before, 1);
}

#[tokio::test]
async fn the_same_counter_asked_for_many_times_in_one_batch_is_read_and_filled_once() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    earlier_total(&app.db().await, user, 5).await;
    let hydrator = &app.state.quota.hydrator;
    let keys = app.state.quota.store.keys(user);
    let before = hydrator.queries();

    let filled = join_all((0..10).map(|_| hydrator.load(keys.own(), "", month_period(0)))).await;

    let firsts = filled
        .iter()
        .filter(|f| matches!(f, Ok(Hydrated::Filled)))
        .count();
    let others = filled
        .iter()
        .filter(|f| matches!(f, Ok(Hydrated::Loaded)))
        .count();
    assert_eq!((firsts, others), (1, 9), "{filled:?}");
    assert_eq!(hydrator.queries() - before, 1);
    // Concurrent first requests of one user: every count lands once, on top of Postgres' 5.
    let answers = join_all((0..20).map(|_| app.consume(user, "ai_generation"))).await;
    let mut used: Vec<u64> = answers
        .iter()
        .map(|a| a.body["used"].as_u64().expect("counted"))
        .collect();
    used.sort_unstable();
    assert_eq!(used, (6..=25).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_counter_redis_cannot_fill_fails_alone_and_the_rest_of_its_batch_is_loaded() {
    let app = TestApp::spawn().await;
    let hydrator = &app.state.quota.hydrator;
    let keys: Vec<_> = (0..10)
        .map(|_| app.state.quota.store.keys(Uuid::new_v4()))
        .collect();
    // The first user's counter key holds a string: its hydrate script fails (WRONGTYPE).
    let mut redis = app.redis().await;
    let _: () = redis
        .set(keys[0].counter(month_period(0)), "not a hash")
        .await
        .unwrap();

    let filled = join_all(
        keys.iter()
            .map(|k| hydrator.load(k.own(), "", month_period(0))),
    )
    .await;

    assert!(filled[0].is_err(), "{:?}", filled[0]);
    assert!(
        filled[1..]
            .iter()
            .all(|f| matches!(f, Ok(Hydrated::Filled))),
        "{filled:?}"
    );
}

#[tokio::test]
async fn with_postgres_hung_every_waiter_of_a_batch_gets_its_own_fail_policy_in_time() {
    let app = TestApp::spawn().await;
    let pool = app.db().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_tracking, user_plans IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    // ai_generation fails open, kb_file fails closed; the default database timeout is 1 s.
    let bound = Duration::from_millis(1000 + 700);
    let started = Instant::now();

    let open = join_all((0..10).map(|_| app.consume(Uuid::new_v4(), "ai_generation")));
    let closed = join_all((0..10).map(|_| app.consume(Uuid::new_v4(), "kb_file")));
    let (open, closed) = tokio::join!(open, closed);

    let took = started.elapsed();
    assert!(took < bound, "the batch answered after {took:?}");
    for a in &open {
        assert_eq!(
            (a.status, &a.body["degraded"]),
            (200, &json!(true)),
            "{:?}",
            a.body
        );
    }
    for a in &closed {
        assert_eq!(
            (a.status, &a.body["code"]),
            (503, &json!("DATABASE_UNAVAILABLE")),
            "{:?}",
            a.body
        );
    }
    tx.rollback().await.unwrap();
    let after = app.consume(Uuid::new_v4(), "kb_file").await;
    assert_eq!((after.status, &after.body["used"]), (200, &json!(1)));
}

#[tokio::test]
async fn a_usage_read_loads_all_its_missing_periods_with_one_postgres_statement() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let user = Uuid::new_v4();
    earlier_total(&db, user, 7).await;
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, version)
         VALUES ($1, 'kb_file', 12, '1970-01-01T00:00:00Z', NULL, 2)",
    )
    .bind(user)
    .execute(&db)
    .await
    .unwrap();
    let before = app.state.quota.hydrator.queries();

    let usage = app.get(&format!("/v1/users/{user}/usage")).await;

    assert_eq!(usage.status, 200, "{:?}", usage.body);
    assert_eq!(
        app.state.quota.hydrator.queries() - before,
        1,
        "the month and the lifetime counter load together"
    );
    assert_eq!(app.used(user, "ai_generation").await, 7);
    assert_eq!(app.used(user, "kb_file").await, 12);
}

#[tokio::test]
async fn a_first_request_is_counted_in_the_same_pipeline_as_its_load() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let hydrator = &app.state.quota.hydrator;
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, user) in users.iter().enumerate() {
        earlier_total(&db, *user, i as i64).await;
    }
    let keys: Vec<_> = users
        .iter()
        .map(|u| app.state.quota.store.keys(*u))
        .collect();
    // As on the request path, the consume script has run alone once (so Redis holds it: a
    // follow-up Redis does not know is not run, see the next test).
    app.consume(Uuid::new_v4(), "ai_generation").await;
    let before = hydrator.queries();

    // Per user in one batch: a call, a load without one, another call. The counter is filled
    // once, and each call rides after the fill with its own reply.
    let loads = join_all(keys.iter().flat_map(|k| {
        [
            hydrator.load_then(
                k.own(),
                "",
                month_period(0),
                Some(app.consume_invocation(k, None)),
            ),
            hydrator.load_then(k.own(), "", month_period(0), None),
            hydrator.load_then(
                k.own(),
                "",
                month_period(0),
                Some(app.consume_invocation(k, None)),
            ),
        ]
    }))
    .await;

    assert_eq!(hydrator.queries() - before, 1, "one postgres statement");
    for (i, three) in loads.chunks(3).enumerate() {
        let three: Vec<_> = three.iter().map(|l| l.as_ref().unwrap()).collect();
        let fills = three
            .iter()
            .filter(|l| l.filled == Hydrated::Filled)
            .count();
        assert_eq!(fills, 1, "user {i}: {three:?}");
        assert!(three[1].follow_up.is_none(), "user {i}: {three:?}");
        let mut used: Vec<u64> = [three[0], three[2]]
            .iter()
            .map(|l| {
                let raw = l
                    .follow_up
                    .clone()
                    .unwrap_or_else(|| panic!("run after the fill: {three:?}"));
                let reply = decision_reply(raw.unwrap(), month_period(0)).unwrap();
                assert_eq!(reply.status, Status::Ok);
                reply.used
            })
            .collect();
        used.sort_unstable();
        // On top of Postgres' total (i), each call once.
        assert_eq!(used, vec![i as u64 + 1, i as u64 + 2], "user {i}");
    }
    assert_eq!(app.used(users[7], "ai_generation").await, 9);
}

#[tokio::test]
async fn a_call_that_fails_after_its_fill_fails_alone_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let hydrator = &app.state.quota.hydrator;
    let (broken, other) = (Uuid::new_v4(), Uuid::new_v4());
    earlier_total(&db, broken, 4).await;
    earlier_total(&db, other, 6).await;
    let (broken_keys, other_keys) = (
        app.state.quota.store.keys(broken),
        app.state.quota.store.keys(other),
    );
    // The broken call's idempotency record is a string, not a hash: its script fails (WRONGTYPE)
    // after the fill, in the same pipeline as the other user's load and call.
    let _: () = app
        .redis()
        .await
        .set(broken_keys.idempotency("k1"), "not a hash")
        .await
        .unwrap();
    app.consume(Uuid::new_v4(), "ai_generation").await;

    let loads = join_all([
        hydrator.load_then(
            broken_keys.own(),
            "",
            month_period(0),
            Some(app.consume_invocation(&broken_keys, Some("k1"))),
        ),
        hydrator.load_then(
            other_keys.own(),
            "",
            month_period(0),
            Some(app.consume_invocation(&other_keys, None)),
        ),
    ])
    .await;
    let [a, b]: [_; 2] = loads.try_into().unwrap();

    let a = a.expect("the load itself succeeded");
    assert_eq!(a.filled, Hydrated::Filled);
    let failed = a.follow_up.expect("the call was run");
    assert!(
        matches!(&failed, Err(quotad::store::StoreError::Redis(e)) if e.to_string().contains("WRONGTYPE")),
        "{failed:?}"
    );
    let b = b.expect("loaded");
    let reply = decision_reply(b.follow_up.expect("run").unwrap(), month_period(0)).unwrap();
    assert_eq!((reply.status, reply.used), (Status::Ok, 7));
    assert_eq!(
        app.used(broken, "ai_generation").await,
        4,
        "nothing counted"
    );
}

#[tokio::test]
async fn after_redis_loses_its_scripts_a_batch_still_loads_and_its_calls_count_once() {
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let db = app.db().await;
    let hydrator = &app.state.quota.hydrator;
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for user in &users {
        earlier_total(&db, *user, 10).await;
    }
    let keys: Vec<_> = users
        .iter()
        .map(|u| app.state.quota.store.keys(*u))
        .collect();
    let _: String = redis_server.call(&["SCRIPT", "FLUSH"]).await.unwrap();

    // Redis knows neither script: the fills are loaded and sent again; the calls did not run
    // (no reply), and nothing was counted.
    let loads = join_all(keys.iter().map(|k| {
        hydrator.load_then(
            k.own(),
            "",
            month_period(0),
            Some(app.consume_invocation(k, None)),
        )
    }))
    .await;
    for load in &loads {
        let load = load.as_ref().expect("loaded");
        assert_eq!(load.filled, Hydrated::Filled);
        assert!(load.follow_up.is_none(), "{:?}", load.follow_up);
    }
    assert_eq!(app.used(users[0], "ai_generation").await, 10);

    // Through the request path: a first request after the scripts are gone counts once.
    let _: String = redis_server.call(&["SCRIPT", "FLUSH"]).await.unwrap();
    let _: () = app
        .redis()
        .await
        .del(keys[1].counter(month_period(0)))
        .await
        .unwrap();
    let answer = app.consume(users[1], "ai_generation").await;
    assert_eq!((answer.status, &answer.body["used"]), (200, &json!(11)));
    assert_eq!(app.used(users[1], "ai_generation").await, 11);
}
