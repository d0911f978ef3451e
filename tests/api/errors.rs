//! Bad input gets a 4xx with a code and a sentence, names the field, and changes nothing.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::TestApp;

#[tokio::test]
async fn every_bad_consume_gets_a_4xx_with_a_code_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (
            "not a uuid",
            json!({"user_id": "user-1", "type": "ai_generation"}),
            400,
            "INVALID_USER_ID",
            Some("user_id"),
        ),
        (
            "uuid as number",
            json!({"user_id": 12, "type": "ai_generation"}),
            400,
            "INVALID_FIELD",
            Some("user_id"),
        ),
        (
            "unknown type",
            json!({"user_id": u, "type": "video"}),
            400,
            "UNKNOWN_TYPE",
            Some("type"),
        ),
        (
            "missing type",
            json!({"user_id": u}),
            400,
            "MISSING_FIELD",
            Some("type"),
        ),
        (
            "missing user",
            json!({"type": "ai_generation"}),
            400,
            "MISSING_FIELD",
            Some("user_id"),
        ),
        (
            "amount 0",
            json!({"user_id": u, "type": "ai_generation", "amount": 0}),
            400,
            "INVALID_AMOUNT",
            Some("amount"),
        ),
        (
            "negative amount",
            json!({"user_id": u, "type": "ai_generation", "amount": -3}),
            400,
            "INVALID_AMOUNT",
            Some("amount"),
        ),
        (
            "amount too big",
            json!({"user_id": u, "type": "ai_generation", "amount": 1_000_001}),
            400,
            "INVALID_AMOUNT",
            Some("amount"),
        ),
        (
            "fractional amount",
            json!({"user_id": u, "type": "ai_generation", "amount": 1.5}),
            400,
            "INVALID_AMOUNT",
            Some("amount"),
        ),
        (
            "amount as text",
            json!({"user_id": u, "type": "ai_generation", "amount": "2"}),
            400,
            "INVALID_AMOUNT",
            Some("amount"),
        ),
        (
            "unknown field",
            json!({"user_id": u, "type": "ai_generation", "colour": "red"}),
            400,
            "UNKNOWN_FIELD",
            Some("colour"),
        ),
        (
            "unknown plan",
            json!({"user_id": u, "type": "ai_generation", "plan": "GOLD"}),
            400,
            "UNKNOWN_PLAN",
            Some("plan"),
        ),
        (
            "empty idempotency key",
            json!({"user_id": u, "type": "ai_generation", "idempotency_key": ""}),
            400,
            "INVALID_IDEMPOTENCY_KEY",
            Some("idempotency_key"),
        ),
        (
            "nested metadata",
            json!({"user_id": u, "type": "ai_generation", "metadata": {"a": {"b": 1}}}),
            400,
            "INVALID_METADATA",
            Some("metadata"),
        ),
        (
            "body is an array",
            json!([u, "ai_generation"]),
            400,
            "NOT_AN_OBJECT",
            Some("body"),
        ),
    ];

    for (what, body, status, code, field) in cases {
        for path in ["/v1/consume", "/v1/check", "/v1/track"] {
            let a = app.post(path, body.clone()).await;
            assert_eq!(a.status, status, "{what} on {path}: {:?}", a.body);
            assert_eq!(a.body["code"], code, "{what} on {path}: {:?}", a.body);
            assert_eq!(
                a.body["field"].as_str(),
                field,
                "{what} on {path}: {:?}",
                a.body
            );
            assert!(
                a.body["error"].as_str().is_some_and(|e| e.len() > 10),
                "{what}: a sentence: {:?}",
                a.body
            );
        }
    }

    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    for ty in ["ai_generation", "export", "kb_file"] {
        assert_eq!(usage.body["usage"][ty]["used"], 0, "{ty} untouched");
    }
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_refused_and_count_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let malformed = app
        .post_raw(
            "/v1/consume",
            format!(r#"{{"user_id": "{user}", "type": "ai_generation""#),
        )
        .await;
    let trailing = app
        .post_raw(
            "/v1/consume",
            format!(r#"{{"user_id": "{user}", "type": "ai_generation"}} x"#),
        )
        .await;
    let empty = app.post_raw("/v1/consume", "").await;
    let padding = "x".repeat(17 * 1024);
    let oversized = app
        .post_raw("/v1/consume", format!(r#"{{"user_id": "{user}", "type": "ai_generation", "idempotency_key": "{padding}"}}"#))
        .await;

    assert_eq!(
        (malformed.status, &malformed.body["code"]),
        (400, &json!("MALFORMED_JSON"))
    );
    assert_eq!(
        (trailing.status, &trailing.body["code"]),
        (400, &json!("MALFORMED_JSON"))
    );
    assert_eq!(
        (empty.status, &empty.body["code"]),
        (400, &json!("MALFORMED_JSON"))
    );
    assert_eq!(
        (oversized.status, &oversized.body["code"]),
        (413, &json!("PAYLOAD_TOO_LARGE"))
    );
    assert_eq!(app.used(user, "ai_generation").await, 0);
}

#[tokio::test]
async fn bad_refund_release_and_plan_calls_name_their_fault() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let refund = app.post("/v1/refund", json!({"user_id": user})).await;
    let release = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 0}),
        )
        .await;
    let plan = app
        .send(
            reqwest::Method::PUT,
            &format!("/v1/users/{user}/plan"),
            Some(json!({"plan": "GOLD"})),
            None,
        )
        .await;
    let path = app.get("/v1/users/not-a-uuid/usage").await;

    assert_eq!(
        (refund.status, &refund.body["code"], &refund.body["field"]),
        (400, &json!("MISSING_FIELD"), &json!("idempotency_key"))
    );
    assert_eq!(
        (release.status, &release.body["code"]),
        (400, &json!("INVALID_AMOUNT"))
    );
    assert_eq!(
        (plan.status, &plan.body["code"]),
        (400, &json!("UNKNOWN_PLAN"))
    );
    assert!(plan.body["error"]
        .as_str()
        .unwrap()
        .contains("ENTERPRISE, FREE, PRO"));
    assert_eq!(
        (path.status, &path.body["code"]),
        (400, &json!("INVALID_USER_ID"))
    );
    let stored = app.get(&format!("/v1/users/{user}/plan")).await;
    assert_eq!(
        (&stored.body["plan"], &stored.body["is_default"]),
        (&json!("FREE"), &json!(true))
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let app = TestApp::spawn().await;

    let missing = app.get("/v2/consume").await;
    let wrong_method = app.get("/v1/consume").await;

    assert_eq!(
        (missing.status, &missing.body["code"]),
        (404, &json!("NOT_FOUND"))
    );
    assert_eq!(
        (wrong_method.status, &wrong_method.body["code"]),
        (405, &json!("METHOD_NOT_ALLOWED"))
    );
}

#[tokio::test]
async fn a_body_that_cannot_be_read_is_400_unreadable_body_and_counts_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let json = format!(r#"{{"user_id": "{user}", "type": "ai_generation"}}"#);
    // Chunked encoding whose second chunk size is not hexadecimal: the body breaks off midway.
    let request = format!(
        "POST /v1/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{json}\r\nzz\r\n\r\n",
        json.len()
    );
    let mut s = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_string(&mut answer),
    )
    .await;

    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(body["code"], "UNREADABLE_BODY", "{answer}");
    assert!(body["error"].is_string(), "{answer}");
    assert_eq!(app.used(user, "ai_generation").await, 0);
}
