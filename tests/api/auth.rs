//! Bearer tokens of two scopes.

use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Options, TestApp};

async fn with_tokens() -> TestApp {
    TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw-token".into()],
        admin_tokens: vec!["admin-token".into()],
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn no_token_is_401_and_counts_nothing() {
    let app = with_tokens().await;
    let user = Uuid::new_v4();

    let a = app.consume(user, "ai_generation").await;
    let wrong = app
        .send(
            Method::POST,
            "/v1/consume",
            Some(json!({"user_id": user, "type": "ai_generation"})),
            Some("nope"),
        )
        .await;

    assert_eq!((a.status, &a.body["code"]), (401, &json!("UNAUTHORIZED")));
    assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        (wrong.status, &wrong.body["code"]),
        (401, &json!("INVALID_TOKEN"))
    );
    let usage = app
        .send(
            Method::GET,
            &format!("/v1/users/{user}/usage"),
            None,
            Some("gw-token"),
        )
        .await;
    assert_eq!(usage.body["usage"]["ai_generation"]["used"], 0);
}

#[tokio::test]
async fn a_gateway_token_may_consume_but_not_set_a_plan() {
    let app = with_tokens().await;
    let user = Uuid::new_v4();

    let consume = app
        .send(
            Method::POST,
            "/v1/consume",
            Some(json!({"user_id": user, "type": "ai_generation"})),
            Some("gw-token"),
        )
        .await;
    let set_plan = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/plan"),
            Some(json!({"plan": "PRO"})),
            Some("gw-token"),
        )
        .await;
    let read_plan = app
        .send(
            Method::GET,
            &format!("/v1/users/{user}/plan"),
            None,
            Some("gw-token"),
        )
        .await;

    assert_eq!(consume.status, 200);
    assert_eq!(
        (set_plan.status, &set_plan.body["code"]),
        (403, &json!("FORBIDDEN"))
    );
    assert_eq!(read_plan.status, 403);
    let stored = app
        .send(
            Method::GET,
            &format!("/v1/users/{user}/plan"),
            None,
            Some("admin-token"),
        )
        .await;
    assert_eq!(
        stored.body["plan"], "FREE",
        "the refused plan change changed nothing"
    );
}

#[tokio::test]
async fn an_admin_token_may_do_everything() {
    let app = with_tokens().await;
    let user = Uuid::new_v4();

    let set_plan = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/plan"),
            Some(json!({"plan": "PRO"})),
            Some("admin-token"),
        )
        .await;
    let consume = app
        .send(
            Method::POST,
            "/v1/consume",
            Some(json!({"user_id": user, "type": "ai_generation"})),
            Some("admin-token"),
        )
        .await;

    assert_eq!(set_plan.status, 200);
    assert_eq!(
        (consume.status, &consume.body["plan"]),
        (200, &json!("PRO"))
    );
}

#[tokio::test]
async fn health_endpoints_need_no_token() {
    let app = with_tokens().await;

    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 200);
}
