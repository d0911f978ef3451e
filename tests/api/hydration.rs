//! Counters Redis does not hold are loaded from Postgres in batches: concurrent loads share one
//! Postgres statement and one Redis pipeline, and each gets the answer it would get alone.

use std::time::{Duration, Instant};

use deadpool_redis::redis::AsyncCommands;
use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use quotad::period::Period;
use quotad::store::{count_reply, CountCall, Mode, Status};

use crate::helpers::{month_period, month_start, Options, PrivateRedis, TestApp};

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

    let filled = join_all(keys.iter().map(|k| hydrator.load(k, month_period(0)))).await;

    assert!(filled.iter().all(|f| matches!(f, Ok(true))), "{filled:?}");
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

    let filled = join_all((0..10).map(|_| hydrator.load(&keys, month_period(0)))).await;

    let firsts = filled.iter().filter(|f| matches!(f, Ok(true))).count();
    let others = filled.iter().filter(|f| matches!(f, Ok(false))).count();
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

    let filled = join_all(keys.iter().map(|k| hydrator.load(k, month_period(0)))).await;

    assert!(filled[0].is_err(), "{:?}", filled[0]);
    assert!(
        filled[1..].iter().all(|f| matches!(f, Ok(true))),
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

/// The consume call of one `ai_generation` for `keys`' user, as the request path sends it.
fn consume_call(
    app: &TestApp,
    keys: &quotad::store::UserKeys,
) -> deadpool_redis::redis::ScriptInvocation<'static> {
    let plans = app.state.quota.plans.current();
    let ty = plans.usage_type("ai_generation").unwrap();
    app.state.quota.store.count_invocation(&CountCall {
        mode: Mode::Consume,
        keys,
        usage_type: ty,
        amount: 1,
        period: Period::current(ty.period, app.clock_now()),
        plan_override: None,
        default_plan: &plans.default_plan,
        idempotency_key: None,
        metadata: &[],
    })
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

    // Two calls per user in one batch: the counter is filled once, and each call rides after
    // the fill with its own reply.
    let loads = join_all(keys.iter().flat_map(|k| {
        [
            hydrator.load_then(k, month_period(0), Some(consume_call(&app, k))),
            hydrator.load_then(k, month_period(0), Some(consume_call(&app, k))),
        ]
    }))
    .await;

    assert_eq!(hydrator.queries() - before, 1, "one postgres statement");
    for (i, pair) in loads.chunks(2).enumerate() {
        let fills = pair.iter().filter(|l| l.as_ref().unwrap().filled).count();
        assert_eq!(fills, 1, "user {i}: {pair:?}");
        let mut used: Vec<u64> = pair
            .iter()
            .map(|l| {
                let raw = l
                    .as_ref()
                    .unwrap()
                    .follow_up
                    .clone()
                    .unwrap_or_else(|| panic!("run after the fill: {pair:?}"));
                let reply = count_reply(raw.unwrap()).unwrap();
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
async fn after_redis_loses_its_scripts_a_batch_still_loads_and_its_calls_count_once() {
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis_server.url(),
        ..Options::default()
    })
    .await;
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
    let loads = join_all(
        keys.iter()
            .map(|k| hydrator.load_then(k, month_period(0), Some(consume_call(&app, k)))),
    )
    .await;
    for load in &loads {
        let load = load.as_ref().expect("loaded");
        assert!(load.filled);
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
