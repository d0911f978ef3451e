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

/// Serves `app`'s router (its real state: Redis, Postgres) on a loopback port of its own, with
/// every connection seen as coming from `peer`. The daemon itself refuses to listen beyond
/// loopback without tokens, so a non-loopback peer is given by axum's `MockConnectInfo`.
async fn serve_as_seen_from(app: &TestApp, peer: std::net::SocketAddr) -> String {
    use axum::extract::connect_info::MockConnectInfo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = quotad::http::router(app.state.clone()).layer(MockConnectInfo(peer));
    tokio::spawn(async move { axum::serve(listener, router).await });
    base
}

#[tokio::test]
async fn without_tokens_a_non_loopback_client_is_refused_and_a_loopback_one_served() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let remote = serve_as_seen_from(&app, "192.0.2.7:40000".parse().unwrap()).await;
    let local = serve_as_seen_from(&app, "127.0.0.1:40000".parse().unwrap()).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = |base: &str, method: Method, path: String, body: serde_json::Value| {
        client
            .request(method, format!("{base}{path}"))
            .json(&body)
            .send()
    };
    let consume = json!({"user_id": user, "type": "ai_generation"});

    let refused = call(&remote, Method::POST, "/v1/consume".into(), consume.clone())
        .await
        .unwrap();
    let refused_status = refused.status().as_u16();
    let refused_body: serde_json::Value = refused.json().await.unwrap();
    let plan = call(
        &remote,
        Method::PUT,
        format!("/v1/users/{user}/plan"),
        json!({"plan": "PRO"}),
    )
    .await
    .unwrap();
    let plan_status = plan.status().as_u16();
    let plan_body: serde_json::Value = plan.json().await.unwrap();
    let served = call(&local, Method::POST, "/v1/consume".into(), consume)
        .await
        .unwrap();
    let served_status = served.status().as_u16();
    let served_body: serde_json::Value = served.json().await.unwrap();

    assert_eq!(
        (refused_status, &refused_body["code"]),
        (403, &json!("LOOPBACK_ONLY")),
        "{refused_body:?}"
    );
    assert!(
        refused_body["error"]
            .as_str()
            .is_some_and(|e| e.contains("QUOTAD_GATEWAY_TOKENS")),
        "says how to serve other clients: {refused_body:?}"
    );
    assert_eq!(
        (plan_status, &plan_body["code"]),
        (403, &json!("LOOPBACK_ONLY")),
        "{plan_body:?}"
    );
    assert_eq!(
        (served_status, &served_body["used"], &served_body["plan"]),
        (200, &json!(1), &json!("FREE")),
        "the loopback client is served; the refused calls counted and changed nothing: {served_body:?}"
    );
}
