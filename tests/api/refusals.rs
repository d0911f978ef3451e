//! The near-cache of refusals: a user over a limit is refused without a Redis call, until
//! something could change the answer; every replica hears of such a change over pub/sub.

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    month_period, month_start, plans_file, tempfile_path, Options, PrivateRedis, TestApp,
};
use crate::performance::commandstats;

/// Counts `amount` of `usage_type` regardless of the limit (track).
async fn track(app: &TestApp, user: Uuid, usage_type: &str, amount: u64) {
    let a = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": usage_type, "amount": amount}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

/// Consumes one unit and asserts it was refused; afterwards the refusal is remembered. (Twice:
/// the first refusal is not remembered when the announcement of the counter's first load reaches
/// the cache while it is under way, as it must not be.)
async fn refused(app: &TestApp, user: Uuid, usage_type: &str) {
    for _ in 0..2 {
        let a = app.consume(user, usage_type).await;
        assert_eq!(a.status, 402, "{:?}", a.body);
        assert_eq!(a.body["code"], "USAGE_LIMIT_EXCEEDED", "{:?}", a.body);
    }
}

/// Two replicas on one Redis and database, and a user whose `usage_type` is tracked to `used`
/// on the first and then refused there, so the first remembers the refusal.
async fn replicas_with_a_remembered_refusal(
    usage_type: &str,
    used: u64,
) -> (TestApp, TestApp, Uuid) {
    let a = TestApp::spawn().await;
    let b = a.replica().await;
    a.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&a, user, usage_type, used).await;
    refused(&a, user, usage_type).await;
    assert_eq!(
        a.state.quota.refusals.users(),
        1,
        "the refusal is remembered"
    );
    (a, b, user)
}

/// Waits until `app` has forgotten every refusal (it heard an invalidation); returns how long
/// that took.
async fn forgotten(app: &TestApp) -> Duration {
    let started = Instant::now();
    while app.state.quota.refusals.users() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the replica did not hear the change within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_user_over_the_limit_is_refused_without_a_redis_call() {
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&app, user, "ai_generation", 50).await;
    refused(&app, user, "ai_generation").await;
    assert_eq!(app.state.quota.refusals.users(), 1);

    let mut conn = app.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..20 {
        let a = app.consume(user, "ai_generation").await;
        assert_eq!(a.status, 402);
        // The same answer Redis gave: the count, the limit and the upgrade link.
        assert_eq!(a.body["used"], 50, "{:?}", a.body);
        assert_eq!(a.body["limit"], 50);
        assert_eq!(a.body["plan"], "FREE");
        assert!(a.body["upgrade_url"].is_string(), "{:?}", a.body);
        let check = app
            .post(
                "/v1/check",
                json!({"user_id": user, "type": "ai_generation"}),
            )
            .await;
        assert_eq!(check.body["allowed"], false, "{:?}", check.body);
    }
    let stats = commandstats(&mut conn).await;
    assert_eq!(stats.get("evalsha"), None, "no script ran: {stats:?}");

    // An amount that fits is not refused from memory: a smaller consume still reaches Redis.
    let other = Uuid::new_v4();
    track(&app, other, "ai_generation", 45).await;
    let big = app
        .post(
            "/v1/consume",
            json!({"user_id": other, "type": "ai_generation", "amount": 10}),
        )
        .await;
    assert_eq!(big.status, 402);
    let small = app
        .post(
            "/v1/consume",
            json!({"user_id": other, "type": "ai_generation", "amount": 5}),
        )
        .await;
    assert_eq!(small.status, 200, "{:?}", small.body);
    assert_eq!(small.body["used"], 50);
}

#[tokio::test]
async fn a_new_month_is_counted_afresh_at_once() {
    let app = TestApp::spawn().await;
    app.wait_refusal_cache_live().await;
    app.set_at(month_start(1) - chrono::Duration::seconds(1));
    let user = Uuid::new_v4();
    track(&app, user, "ai_generation", 50).await;
    refused(&app, user, "ai_generation").await;
    assert_eq!(app.state.quota.refusals.users(), 1);

    app.set_at(month_start(1));
    let a = app.consume(user, "ai_generation").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["used"], 1);
}

#[tokio::test]
async fn a_plan_change_on_another_replica_lifts_the_refusal_everywhere() {
    let (a, b, user) = replicas_with_a_remembered_refusal("ai_generation", 50).await;

    b.set_plan(user, "PRO").await;
    let took = forgotten(&a).await;
    let after = a.consume(user, "ai_generation").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert_eq!(after.body["plan"], "PRO");
    eprintln!("replica heard the plan change in {took:?}");
}

#[tokio::test]
async fn a_refund_on_another_replica_lifts_the_refusal_everywhere() {
    let a = TestApp::spawn().await;
    let b = a.replica().await;
    a.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&a, user, "ai_generation", 49).await;
    let last = a
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "gen-50"}),
        )
        .await;
    assert_eq!(last.status, 200);
    refused(&a, user, "ai_generation").await;
    assert_eq!(
        a.state.quota.refusals.users(),
        1,
        "the refusal is remembered"
    );

    let refund = b
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "gen-50"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    forgotten(&a).await;
    let after = a.consume(user, "ai_generation").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert_eq!(after.body["used"], 50);
}

/// The replica that makes the change forgets at once, not when its own pub/sub message comes
/// back: the very next request it serves is counted. Pub/sub usually wins the race to the next
/// request, so the sequence runs many times; each round checks the cache right after the answer.
#[tokio::test]
async fn the_replica_that_refunds_releases_or_changes_the_plan_forgets_at_once() {
    let app = TestApp::spawn().await;
    app.wait_refusal_cache_live().await;
    for round in 0..120 {
        let user = Uuid::new_v4();
        track(&app, user, "ai_generation", 49).await;
        let key = format!("gen-{round}");
        let last = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "idempotency_key": key}),
            )
            .await;
        assert_eq!(last.status, 200, "{:?}", last.body);
        refused(&app, user, "ai_generation").await;
        track(&app, user, "kb_file", 20).await;
        refused(&app, user, "kb_file").await;
        let change = match round % 3 {
            0 => {
                app.post(
                    "/v1/refund",
                    json!({"user_id": user, "idempotency_key": key}),
                )
                .await
            }
            1 => {
                app.post(
                    "/v1/release",
                    json!({"user_id": user, "type": "kb_file", "amount": 1}),
                )
                .await
            }
            _ => {
                app.send(
                    reqwest::Method::PUT,
                    &format!("/v1/users/{user}/plan"),
                    Some(json!({"plan": "PRO"})),
                    None,
                )
                .await
            }
        };
        assert_eq!(change.status, 200, "round {round}: {:?}", change.body);
        assert_eq!(
            app.state.quota.refusals.users(),
            0,
            "round {round}: a refusal outlived this replica's own change"
        );
        let kind = if round % 3 == 0 {
            "ai_generation"
        } else {
            "kb_file"
        };
        let after = app.consume(user, kind).await;
        assert_eq!(after.status, 200, "round {round}: {:?}", after.body);
    }
}

#[tokio::test]
async fn a_release_on_another_replica_lifts_the_refusal_everywhere() {
    let (a, b, user) = replicas_with_a_remembered_refusal("kb_file", 20).await;

    let released = b
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 1}),
        )
        .await;
    assert_eq!(released.status, 200, "{:?}", released.body);
    forgotten(&a).await;
    let after = a.consume(user, "kb_file").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert_eq!(after.body["used"], 20);
}

#[tokio::test]
async fn a_raised_limit_counts_at_once() {
    let plans = plans_file("5");
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.0.clone()),
        ..Options::default()
    })
    .await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&app, user, "ai_generation", 5).await;
    refused(&app, user, "ai_generation").await;
    assert_eq!(app.state.quota.refusals.users(), 1);

    tempfile_path::rewrite(
        &plans,
        &quotad::plans::BUILT_IN.replace("ai_generation = 50", "ai_generation = 6"),
    );
    app.state.quota.reload_plans().expect("valid plans");
    let a = app.consume(user, "ai_generation").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["limit"], 6);
    refused(&app, user, "ai_generation").await;
}

#[tokio::test]
async fn a_counter_reloaded_from_postgres_lifts_the_refusal_everywhere() {
    let a = TestApp::spawn().await;
    let b = a.replica().await;
    a.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&a, user, "ai_generation", 48).await;
    a.flush().await;
    track(&a, user, "ai_generation", 2).await;
    refused(&a, user, "ai_generation").await;
    assert_eq!(
        a.state.quota.refusals.users(),
        1,
        "the refusal is remembered"
    );

    // Redis loses the counter before its last two units reached Postgres; another replica loads
    // it again (48) and announces it.
    let mut conn = a.redis().await;
    let key = a.state.quota.store.keys(user).counter(month_period(0));
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(b.used(user, "ai_generation").await, 48);
    forgotten(&a).await;
    let after = a.consume(user, "ai_generation").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert_eq!(after.body["used"], 49);
}

#[tokio::test]
async fn a_retried_idempotent_call_replays_its_answer_while_the_user_is_refused() {
    let app = TestApp::spawn().await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&app, user, "ai_generation", 49).await;
    let body = json!({"user_id": user, "type": "ai_generation", "idempotency_key": "gen-50"});
    assert_eq!(app.post("/v1/consume", body.clone()).await.status, 200);
    refused(&app, user, "ai_generation").await;
    assert_eq!(
        app.state.quota.refusals.users(),
        1,
        "the refusal is remembered"
    );

    let retry = app.post("/v1/consume", body).await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body["used"], 50);
}

#[tokio::test]
async fn nothing_is_answered_from_memory_while_invalidations_cannot_be_heard() {
    let mut redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    track(&app, user, "ai_generation", 50).await;
    refused(&app, user, "ai_generation").await;
    assert_eq!(app.state.quota.refusals.users(), 1);

    // Redis restarts empty: the subscription drops, and everything remembered is forgotten, since
    // changes made meanwhile would not be heard.
    redis_server.restart();
    let started = Instant::now();
    while app.state.quota.refusals.is_live() && app.state.quota.refusals.users() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the dropped subscription went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.state.quota.refusals.users(), 0);
    // The counter is loaded again from Postgres (which has nothing: never flushed) and counts.
    let mut answer = app.consume(user, "ai_generation").await;
    while answer.status != 200 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = app.consume(user, "ai_generation").await;
    }
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    app.wait_refusal_cache_live().await;
}

#[tokio::test]
async fn a_reconcile_repair_lifts_remembered_refusals() {
    let app = TestApp::spawn().await;
    app.wait_refusal_cache_live().await;
    let db = app.db().await;
    // `corrected`: Postgres is corrected down (a lower count, a higher version); `lost`: Redis
    // loses the counter while Postgres holds a lower count.
    let (corrected, lost) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [corrected, lost] {
        track(&app, u, "ai_generation", 50).await;
    }
    app.flush().await;
    for u in [corrected, lost] {
        refused(&app, u, "ai_generation").await;
    }
    assert_eq!(
        app.state.quota.refusals.users(),
        2,
        "both refusals are remembered"
    );
    for (u, count, bump) in [(corrected, 40, 5), (lost, 30, 0)] {
        sqlx::query(
            "UPDATE usage_tracking SET count = $2, version = version + $3 WHERE user_id = $1",
        )
        .bind(u)
        .bind(count)
        .bind(bump)
        .execute(&db)
        .await
        .unwrap();
    }
    let _: i64 = redis::cmd("DEL")
        .arg(app.state.quota.store.keys(lost).counter(month_period(0)))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    // Still refused from memory: nothing told the cache yet.
    refused(&app, corrected, "ai_generation").await;
    refused(&app, lost, "ai_generation").await;

    let repaired = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": crate::helpers::period_id(0), "repair": true}),
        )
        .await;
    assert_eq!(repaired.status, 200, "{:?}", repaired.body);
    assert_eq!(
        (&repaired.body["repaired"], &repaired.body["loaded"]),
        (&json!(1), &json!(1)),
        "{:?}",
        repaired.body
    );
    forgotten(&app).await;

    let a = app.consume(corrected, "ai_generation").await;
    let b = app.consume(lost, "ai_generation").await;
    assert_eq!(
        (a.status, &a.body["used"]),
        (200, &json!(41)),
        "{:?}",
        a.body
    );
    assert_eq!(
        (b.status, &b.body["used"]),
        (200, &json!(31)),
        "{:?}",
        b.body
    );
}
