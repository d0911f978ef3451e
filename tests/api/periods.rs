//! Month boundaries, crossed by setting the injected clock.

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Options, TestApp};

#[tokio::test]
async fn fifty_used_at_the_last_second_of_november_and_a_fresh_month_at_midnight_utc() {
    let app = TestApp::spawn_with(Options {
        now: "2026-11-30T23:59:59Z".parse().unwrap(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    for _ in 0..50 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    let refused = app.consume(user, "ai_generation").await;
    assert_eq!(refused.status, 402);
    assert_eq!(
        refused.header("retry-after"),
        Some("1"),
        "one second to the reset"
    );

    app.set_now("2026-12-01T00:00:00Z");
    let december = app.consume(user, "ai_generation").await;

    assert_eq!(december.status, 200, "{:?}", december.body);
    assert_eq!(december.body["used"], 1);
    assert_eq!(december.body["period_start"], "2026-12-01T00:00:00Z");
    assert_eq!(december.body["resets_at"], "2027-01-01T00:00:00Z");
}

#[tokio::test]
async fn december_rolls_into_january_of_the_next_year() {
    let app = TestApp::spawn_with(Options {
        now: "2026-12-31T23:59:59.999Z".parse().unwrap(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "export", "amount": 10}),
    )
    .await;
    assert_eq!(app.consume(user, "export").await.status, 402);

    app.set_now("2027-01-01T00:00:00Z");
    let january = app.consume(user, "export").await;

    assert_eq!((january.status, &january.body["used"]), (200, &json!(1)));
    assert_eq!(january.body["period_start"], "2027-01-01T00:00:00Z");
}

#[tokio::test]
async fn lifetime_counters_do_not_reset_with_the_month() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "kb_file", "amount": 4}),
    )
    .await;

    app.set_now("2027-03-02T00:00:00Z");

    assert_eq!(app.used(user, "kb_file").await, 4);
    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(
        usage.body["usage"]["ai_generation"]["period_start"],
        "2027-03-01T00:00:00Z"
    );
}

#[tokio::test]
async fn leap_day_belongs_to_february() {
    let app = TestApp::spawn_with(Options {
        now: "2028-02-29T23:59:59Z".parse().unwrap(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();

    let a = app.consume(user, "ai_generation").await;

    assert_eq!(a.body["period_start"], "2028-02-01T00:00:00Z");
    assert_eq!(a.body["period_end"], "2028-03-01T00:00:00Z");
    assert_eq!(a.header("ratelimit-reset"), Some("1"));
}
