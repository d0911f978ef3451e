//! Redis going away under a running daemon: fail-open types answer degraded, fail-closed types
//! answer 503, and service resumes when Redis is back.

use deadpool_redis::redis;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Options, PrivateRedis, TestApp};

#[tokio::test]
async fn with_redis_killed_open_types_are_allowed_degraded_and_closed_types_are_503() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);

    redis.kill();
    let open = app.consume(user, "ai_generation").await;
    let closed = app.consume(user, "kb_file").await;
    let ready = app.get("/readyz").await;

    assert_eq!(open.status, 200, "{:?}", open.body);
    assert_eq!(open.body["allowed"], true);
    assert_eq!(open.body["degraded"], true);
    assert_eq!(
        open.body["used"],
        serde_json::Value::Null,
        "an unknown count is not reported as a number"
    );
    assert_eq!(
        (closed.status, &closed.body["code"]),
        (503, &json!("REDIS_UNAVAILABLE"))
    );
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["postgres"], "ok");

    redis.restart();
    let back = app.consume(user, "kb_file").await;
    assert_eq!(
        (back.status, &back.body["degraded"]),
        (200, &serde_json::Value::Null),
        "{:?}",
        back.body
    );
    assert_eq!(app.get("/readyz").await.status, 200);
}

async fn put_plan(app: &TestApp, user: Uuid, plan: &str) -> crate::helpers::Answer {
    app.send(
        reqwest::Method::PUT,
        &format!("/v1/users/{user}/plan"),
        Some(json!({ "plan": plan })),
        None,
    )
    .await
}

/// A counter hash's `v`, `p` and `pv`.
async fn plan_fields(app: &TestApp, hash: &str) -> (Option<i64>, Option<String>, Option<i64>) {
    redis::cmd("HMGET")
        .arg(hash)
        .arg("v")
        .arg("p")
        .arg("pv")
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_plan_change_with_redis_down_is_stored_answers_503_and_a_repeat_puts_it_in_force() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(app.consume(user, "export").await.status, 200);
    app.flush().await;
    let hash = app
        .state
        .quota
        .store
        .keys(user)
        .counter(crate::helpers::month_period(0));
    // A snapshot the restarted server loads again, so the user's counter (FREE) survives the
    // outage and only the PUT can change its plan.
    let mut conn = app.redis().await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();

    redis.kill();
    let refused = put_plan(&app, user, "PRO").await;

    assert_eq!(
        (refused.status, &refused.body["code"]),
        (503, &json!("REDIS_UNAVAILABLE")),
        "{:?}",
        refused.body
    );
    assert!(
        refused.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("repeat")),
        "says what to do: {:?}",
        refused.body
    );
    let stored: (String, i64) =
        sqlx::query_as("SELECT plan, version FROM user_plans WHERE user_id = $1")
            .bind(user)
            .fetch_one(&app.db().await)
            .await
            .unwrap();
    assert_eq!(stored, ("PRO".to_owned(), 1), "the plan is in Postgres");

    redis.restart();
    assert_eq!(
        plan_fields(&app, &hash).await,
        (Some(1), None, None),
        "the restarted Redis holds the counter, without the plan"
    );
    let mut again = put_plan(&app, user, "PRO").await;
    for _ in 0..100 {
        if again.status != 503 {
            break;
        }
        // The daemon's connection notices the restart on its first call.
        again = put_plan(&app, user, "PRO").await;
    }
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(
        plan_fields(&app, &hash).await,
        (Some(1), Some("PRO".to_owned()), Some(2))
    );
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 50}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body["plan"], &a.body["used"]),
        (200, &json!("PRO"), &json!(51)),
        "{:?}",
        a.body
    );
}
