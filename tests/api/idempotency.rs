//! Idempotent retries and refunds.

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{month_start, rfc, TestApp};

#[tokio::test]
async fn a_retried_consume_returns_the_first_answer_and_counts_once() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let body = json!({"user_id": user, "type": "ai_generation", "idempotency_key": "req-123"});

    let first = app.post("/v1/consume", body.clone()).await;
    app.consume(user, "ai_generation").await; // someone else's consume in between
    let retry = app.post("/v1/consume", body).await;

    assert_eq!(first.status, 200);
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body, "same body, status and all");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.used(user, "ai_generation").await, 2);
}

#[tokio::test]
async fn a_refused_consume_is_not_remembered() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/track",
        json!({"user_id": user, "type": "export", "amount": 10}),
    )
    .await;
    let body = json!({"user_id": user, "type": "export", "idempotency_key": "k1"});
    assert_eq!(app.post("/v1/consume", body.clone()).await.status, 402);

    app.set_plan(user, "PRO").await;
    let retry = app.post("/v1/consume", body).await;

    assert_eq!(
        (retry.status, &retry.body["used"]),
        (200, &json!(11)),
        "the retry is decided afresh"
    );
}

#[tokio::test]
async fn a_key_reused_for_a_different_call_is_a_conflict_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "export", "idempotency_key": "k"}),
    )
    .await;

    let other_amount = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "k"}),
        )
        .await;
    let other_type = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k"}),
        )
        .await;

    assert_eq!(
        (other_amount.status, &other_amount.body["code"]),
        (409, &json!("IDEMPOTENCY_KEY_REUSED"))
    );
    assert_eq!(other_type.status, 409);
    assert_eq!(app.used(user, "export").await, 1);
    assert_eq!(app.used(user, "ai_generation").await, 0);
}

#[tokio::test]
async fn keys_belong_to_their_user() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    app.post(
        "/v1/consume",
        json!({"user_id": alice, "type": "export", "idempotency_key": "same"}),
    )
    .await;

    let bobs = app
        .post(
            "/v1/consume",
            json!({"user_id": bob, "type": "export", "idempotency_key": "same"}),
        )
        .await;

    assert_eq!((bobs.status, &bobs.body["used"]), (200, &json!(1)));
    assert!(bobs.header("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_refund_gives_the_unit_back_once_then_409_and_an_unknown_key_is_404() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for i in 0..3 {
        app.post("/v1/consume", json!({"user_id": user, "type": "ai_generation", "amount": 2, "idempotency_key": format!("gen-{i}")}))
            .await;
    }

    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "gen-1"}),
        )
        .await;
    let again = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "gen-1"}),
        )
        .await;
    let unknown = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "never-sent"}),
        )
        .await;
    let other_user = app
        .post(
            "/v1/refund",
            json!({"user_id": Uuid::new_v4(), "idempotency_key": "gen-2"}),
        )
        .await;

    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(refund.body["refunded"], 2);
    assert_eq!(refund.body["type"], "ai_generation");
    assert_eq!(refund.body["used"], 4);
    assert_eq!(refund.body["remaining"], 46);
    assert_eq!(
        (again.status, &again.body["code"]),
        (409, &json!("ALREADY_REFUNDED"))
    );
    assert_eq!(
        (unknown.status, &unknown.body["code"]),
        (404, &json!("UNKNOWN_IDEMPOTENCY_KEY"))
    );
    assert_eq!(other_user.status, 404);
    assert_eq!(app.used(user, "ai_generation").await, 4);
}

#[tokio::test]
async fn a_refund_after_the_month_ended_gives_back_to_the_month_it_was_counted_in() {
    let app = TestApp::spawn_with(crate::helpers::Options {
        now: month_start(1) - chrono::Duration::minutes(1),
        ..Default::default()
    })
    .await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "ai_generation", "idempotency_key": "late"}),
    )
    .await;
    app.set_at(month_start(1) + chrono::Duration::minutes(1));
    app.consume(user, "ai_generation").await;

    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "late"}),
        )
        .await;

    assert_eq!(refund.status, 200);
    assert_eq!(refund.body["period_start"], rfc(month_start(0)).as_str());
    assert_eq!(refund.body["used"], 0);
    assert_eq!(
        app.used(user, "ai_generation").await,
        1,
        "the new month is untouched"
    );
}

#[tokio::test]
async fn a_refunded_call_retried_stays_refunded_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let body = json!({"user_id": user, "type": "export", "idempotency_key": "once"});
    app.post("/v1/consume", body.clone()).await;
    app.post(
        "/v1/refund",
        json!({"user_id": user, "idempotency_key": "once"}),
    )
    .await;

    let retry = app.post("/v1/consume", body).await;

    // Not a replay of "allowed": that would be one free action per key.
    assert_eq!(
        (retry.status, &retry.body["code"]),
        (409, &json!("IDEMPOTENCY_KEY_REFUNDED"))
    );
    assert!(retry.header("idempotent-replayed").is_none());
    assert_eq!(
        app.used(user, "export").await,
        0,
        "a refunded call retried stays refunded"
    );
}

#[tokio::test]
async fn a_key_reused_on_another_endpoint_is_a_conflict_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let consumed = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "c"}),
        )
        .await;
    let tracked = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "t"}),
        )
        .await;
    assert_eq!((consumed.status, tracked.status), (200, 200));

    // The same user, type and amount: only the endpoint differs.
    let track_with_c = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "c"}),
        )
        .await;
    let consume_with_t = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "t"}),
        )
        .await;

    for a in [&track_with_c, &consume_with_t] {
        assert_eq!(
            (a.status, &a.body["code"]),
            (409, &json!("IDEMPOTENCY_KEY_REUSED")),
            "{:?}",
            a.body
        );
        assert!(a.body["error"].is_string(), "{:?}", a.body);
        assert!(a.header("idempotent-replayed").is_none());
    }
    assert_eq!(app.used(user, "export").await, 4, "nothing counted");
    let retry = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 2, "idempotency_key": "c"}),
        )
        .await;
    assert_eq!(
        (retry.body.clone(), retry.header("idempotent-replayed")),
        (consumed.body, Some("true")),
        "the key still answers its own call"
    );
}

#[tokio::test]
async fn a_refund_of_a_key_redis_has_expired_is_404_and_gives_nothing_back() {
    use deadpool_redis::redis;
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "old"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let record = app.state.quota.store.keys(user).idempotency("old");
    let mut conn = app.redis().await;

    // Redis expires the record by its own clock, as it would 24 h on (not a delete).
    let set: i64 = redis::cmd("PEXPIRE")
        .arg(&record)
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(set, 1, "the record exists before it expires");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);

    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "old"}),
        )
        .await;

    assert_eq!(
        (refund.status, &refund.body["code"]),
        (404, &json!("UNKNOWN_IDEMPOTENCY_KEY")),
        "{:?}",
        refund.body
    );
    assert!(refund.body["error"].is_string(), "{:?}", refund.body);
    assert_eq!(
        app.used(user, "ai_generation").await,
        1,
        "nothing given back"
    );
}
