//! The seed's checklist: FREE users stop at 50 with a 402 that says why and where to upgrade;
//! PRO users are counted but never refused; concurrent consumes never overshoot.

use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{mid_month, month_start, rfc, TestApp};

#[tokio::test]
async fn a_free_user_gets_50_generations_and_the_51st_is_refused_with_an_upgrade_link() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    for n in 1..=50u64 {
        let a = app.consume(user, "ai_generation").await;
        assert_eq!(a.status, 200, "consume {n}: {:?}", a.body);
        assert_eq!(a.body["allowed"], true);
        assert_eq!(a.body["used"], n);
        assert_eq!(a.body["remaining"], 50 - n);
        assert_eq!(
            a.header("ratelimit-remaining"),
            Some((50 - n).to_string().as_str())
        );
    }
    let refused = app.consume(user, "ai_generation").await;

    assert_eq!(refused.status, 402);
    let b = &refused.body;
    assert_eq!(b["allowed"], false);
    assert_eq!(b["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(b["upgrade_url"], "/settings/billing");
    assert_eq!(b["plan"], "FREE");
    assert_eq!(b["used"], 50);
    assert_eq!(b["limit"], 50);
    assert_eq!(b["remaining"], 0);
    assert_eq!(b["unlimited"], false);
    assert_eq!(b["resets_at"], rfc(month_start(1)).as_str());
    assert_eq!(
        b["error"],
        "Usage limit exceeded for ai_generation. Your FREE plan allows 50 per month. You've used 50."
    );
    // Noon on the 15th to midnight on the 1st of next month: 15.5 days in a 30-day month.
    let days_in_month = (month_start(1) - month_start(0)).num_days();
    let until_reset = (days_in_month - 15) * 86_400 + 12 * 3600;
    assert_eq!(until_reset, (month_start(1) - mid_month()).num_seconds());
    assert_eq!(
        refused.header("retry-after"),
        Some(until_reset.to_string().as_str())
    );
    assert_eq!(
        refused.header("ratelimit-reset"),
        Some(until_reset.to_string().as_str())
    );
    assert_eq!(refused.header("ratelimit-limit"), Some("50"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        app.used(user, "ai_generation").await,
        50,
        "a refused consume counts nothing"
    );
}

#[tokio::test]
async fn a_pro_user_makes_120_generations_counted_but_never_refused() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.set_plan(user, "PRO").await;

    for n in 1..=120u64 {
        let a = app.consume(user, "ai_generation").await;
        assert_eq!(a.status, 200, "consume {n}: {:?}", a.body);
        assert_eq!(a.body["unlimited"], true);
        assert_eq!(a.body["limit"], serde_json::Value::Null);
        assert_eq!(a.body["remaining"], serde_json::Value::Null);
        assert_eq!(a.body["plan"], "PRO");
        assert!(
            a.header("ratelimit-limit").is_none(),
            "no limit header when unlimited"
        );
    }

    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(usage.body["plan"], "PRO");
    assert_eq!(usage.body["usage"]["ai_generation"]["used"], 120);
    assert_eq!(usage.body["usage"]["ai_generation"]["unlimited"], true);
    assert_eq!(usage.body["usage"]["kb_file"]["limit"], 1000);
}

#[tokio::test]
async fn two_hundred_concurrent_consumes_for_a_fresh_free_user_allow_exactly_50() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let answers = join_all((0..200).map(|_| app.consume(user, "ai_generation"))).await;

    let allowed = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers.iter().filter(|a| a.status == 402).count();
    assert_eq!((allowed, refused), (50, 150));
    let mut used: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.body["used"].as_u64().unwrap())
        .collect();
    used.sort_unstable();
    assert_eq!(
        used,
        (1..=50).collect::<Vec<_>>(),
        "every allowed answer saw its own count"
    );
    assert_eq!(app.used(user, "ai_generation").await, 50);
}

#[tokio::test]
async fn a_consume_larger_than_what_is_left_is_refused_whole_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 8}),
        )
        .await;
    assert_eq!(a.status, 200);

    let refused = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 3}),
        )
        .await;

    assert_eq!(refused.status, 402);
    assert_eq!(refused.body["used"], 8);
    assert_eq!(refused.body["remaining"], 2);
    assert!(refused.body["error"]
        .as_str()
        .unwrap()
        .ends_with("You've used 8. This request needs 3, and 2 remain."));
    assert_eq!(app.used(user, "export").await, 8);
    let fits = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 2}),
        )
        .await;
    assert_eq!((fits.status, fits.body["used"].as_u64()), (200, Some(10)));
}

#[tokio::test]
async fn check_decides_without_counting() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "export", "amount": 10}),
    )
    .await;

    let full = app
        .post("/v1/check", json!({"user_id": user, "type": "export"}))
        .await;
    let other = app
        .post(
            "/v1/check",
            json!({"user_id": user, "type": "ai_generation", "amount": 50}),
        )
        .await;

    assert_eq!(
        (full.status, &full.body["allowed"], &full.body["used"]),
        (200, &json!(false), &json!(10))
    );
    assert!(
        full.body.get("code").is_none(),
        "check is not an error: {:?}",
        full.body
    );
    assert_eq!(full.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        (other.status, &other.body["allowed"], &other.body["used"]),
        (200, &json!(true), &json!(0))
    );
    assert_eq!(app.used(user, "ai_generation").await, 0);
    assert_eq!(app.used(user, "export").await, 10);
}

#[tokio::test]
async fn track_counts_past_the_limit_and_consume_then_refuses() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let tracked = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "export", "amount": 12}),
        )
        .await;
    let refused = app.consume(user, "export").await;

    assert_eq!((tracked.status, &tracked.body["used"]), (200, &json!(12)));
    assert_eq!(
        tracked.body["remaining"], 0,
        "remaining never goes negative"
    );
    assert_eq!(refused.status, 402);
    assert_eq!(refused.body["used"], 12);
}

#[tokio::test]
async fn a_plan_given_by_the_caller_overrides_the_stored_one_for_that_call_only() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/track",
        json!({"user_id": user, "type": "export", "amount": 10}),
    )
    .await;

    let as_pro = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "plan": "PRO"}),
        )
        .await;
    let as_stored = app.consume(user, "export").await;

    assert_eq!(
        (as_pro.status, &as_pro.body["plan"], &as_pro.body["used"]),
        (200, &json!("PRO"), &json!(11))
    );
    assert_eq!(
        (as_stored.status, &as_stored.body["plan"]),
        (402, &json!("FREE"))
    );
}

#[tokio::test]
async fn lifetime_counters_have_no_period_and_release_lowers_them_never_below_zero() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let added = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "kb_file", "amount": 3}),
        )
        .await;
    assert_eq!(added.status, 200);
    assert_eq!(added.body["period_start"], serde_json::Value::Null);
    assert_eq!(added.body["resets_at"], serde_json::Value::Null);
    assert!(added.header("ratelimit-reset").is_none());

    let released = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 2}),
        )
        .await;
    let floored = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 5}),
        )
        .await;
    let monthly = app
        .post("/v1/release", json!({"user_id": user, "type": "export"}))
        .await;

    assert_eq!(
        (
            released.status,
            &released.body["used"],
            &released.body["remaining"]
        ),
        (200, &json!(1), &json!(19))
    );
    assert_eq!((floored.status, &floored.body["used"]), (200, &json!(0)));
    assert_eq!(
        (
            monthly.status,
            &monthly.body["code"],
            &monthly.body["field"]
        ),
        (400, &json!("NOT_A_LIFETIME_TYPE"), &json!("type"))
    );
    assert_eq!(app.used(user, "kb_file").await, 0);
}

#[tokio::test]
async fn a_lifetime_limit_is_refused_without_a_retry_after() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "kb_file", "amount": 20}),
    )
    .await;

    let refused = app.consume(user, "kb_file").await;

    assert_eq!(refused.status, 402);
    assert_eq!(
        refused.body["error"],
        "Usage limit exceeded for kb_file. Your FREE plan allows 20 in total. You've used 20."
    );
    assert!(
        refused.header("retry-after").is_none(),
        "nothing resets a lifetime counter by itself"
    );
}

#[tokio::test]
async fn the_plans_in_force_are_listed() {
    let app = TestApp::spawn().await;

    let a = app.get("/v1/plans").await;

    assert_eq!(a.status, 200);
    assert_eq!(a.body["default_plan"], "FREE");
    assert_eq!(
        a.body["types"]["kb_file"],
        json!({"period": "lifetime", "fail": "closed", "notify": []})
    );
    assert_eq!(a.body["plans"]["FREE"]["ai_generation"], 50);
    assert_eq!(
        a.body["plans"]["PRO"]["ai_generation"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn a_counter_missing_from_redis_is_loaded_from_postgres() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let db = app.db().await;
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, version)
         VALUES ($1, 'ai_generation', 50, $2, $3, 7)",
    )
    .bind(user)
    .bind(month_start(0))
    .bind(month_start(1))
    .execute(&db)
    .await
    .unwrap();

    let refused = app.consume(user, "ai_generation").await;
    let export = app.consume(user, "export").await;

    assert_eq!((refused.status, &refused.body["used"]), (402, &json!(50)));
    assert_eq!(export.body["used"], 1);
}
