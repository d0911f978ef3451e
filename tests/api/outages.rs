//! Redis going away under a running daemon: fail-open types answer degraded, fail-closed types
//! answer 503, and service resumes when Redis is back.

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
