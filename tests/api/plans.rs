//! Per-user plans: stored in Postgres, in force on the next request on every replica.

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{month_start, TestApp};

#[tokio::test]
async fn a_plan_set_through_one_daemon_is_in_force_on_the_next_request_to_another() {
    let a = TestApp::spawn().await;
    let b = a.replica().await;
    let user = Uuid::new_v4();
    for _ in 0..50 {
        assert_eq!(b.consume(user, "ai_generation").await.status, 200);
    }
    assert_eq!(b.consume(user, "ai_generation").await.status, 402);

    a.set_plan(user, "PRO").await;
    // b may remember its refusal: it forgets it when the change's announcement reaches it
    // (milliseconds; tests/api/refusals.rs covers that path), after which Redis decides.
    heard_the_change(&b).await;
    let upgraded = b.consume(user, "ai_generation").await;

    assert_eq!(
        (
            upgraded.status,
            &upgraded.body["plan"],
            &upgraded.body["used"]
        ),
        (200, &json!("PRO"), &json!(51))
    );

    b.set_plan(user, "FREE").await;
    heard_the_change(&a).await;
    let downgraded = a.consume(user, "ai_generation").await;
    assert_eq!(
        (downgraded.status, &downgraded.body["plan"]),
        (402, &json!("FREE"))
    );
    let stored = b.get(&format!("/v1/users/{user}/plan")).await;
    assert_eq!(
        (&stored.body["plan"], &stored.body["is_default"]),
        (&json!("FREE"), &json!(false))
    );
}

/// Waits until `app` remembers no refusal (it has heard every plan-change announcement).
async fn heard_the_change(app: &TestApp) {
    let started = std::time::Instant::now();
    while app.state.quota.refusals.users() > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the replica did not hear the plan change within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_plan_set_before_any_usage_applies_to_the_first_request_and_every_type() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    app.set_plan(user, "ENTERPRISE").await;
    let first = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "kb_file", "amount": 5000}),
        )
        .await;
    let usage = app.get(&format!("/v1/users/{user}/usage")).await;

    assert_eq!(
        (first.status, &first.body["plan"]),
        (200, &json!("ENTERPRISE"))
    );
    assert_eq!(usage.body["plan"], "ENTERPRISE");
    assert_eq!(usage.body["usage"]["export"]["unlimited"], true);
}

#[tokio::test]
async fn a_plan_is_loaded_from_postgres_when_redis_has_no_counter_yet() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    // Stored in Postgres only, as after a Redis restart or in a month not yet started.
    sqlx::query("INSERT INTO user_plans (user_id, plan, version) VALUES ($1, 'PRO', 3)")
        .bind(user)
        .execute(&app.db().await)
        .await
        .unwrap();

    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 11}),
        )
        .await;

    assert_eq!((a.status, &a.body["plan"]), (200, &json!("PRO")));
}

#[tokio::test]
async fn a_plan_change_carries_into_the_next_month() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.set_plan(user, "PRO").await;
    app.consume(user, "export").await;

    app.set_at(month_start(1) + chrono::Duration::days(1));
    let next_month = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 50}),
        )
        .await;

    assert_eq!(
        (
            next_month.status,
            &next_month.body["plan"],
            &next_month.body["used"]
        ),
        (200, &json!("PRO"), &json!(50))
    );
}
