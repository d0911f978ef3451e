//! Request tracing, request ids, and health endpoints with their dependencies down.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{Daemon, Options, PrivatePostgres, PrivateRedis, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_a_span_with_method_route_status_latency_and_user_in_json_logs() {
    let daemon = Daemon::spawn(&[("QUOTAD_LOG_FORMAT", "json".into())]);
    daemon.wait_ready();
    let user = Uuid::new_v4();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    let given = client
        .post(format!("{}/v1/consume", daemon.base()))
        .header("x-request-id", "req-abc-123")
        .json(&json!({"user_id": user, "type": "ai_generation"}))
        .send()
        .await
        .unwrap();
    let made = client
        .get(format!("{}/v1/plans", daemon.base()))
        .send()
        .await
        .unwrap();

    assert_eq!(
        given.headers()["x-request-id"],
        "req-abc-123",
        "the caller's id is echoed"
    );
    let made_id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        Uuid::parse_str(&made_id).is_ok(),
        "a new id is made: {made_id}"
    );

    let line = |id: &str| {
        daemon
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "quotad::access" && v["span"]["request_id"] == id)
    };
    daemon.wait_for("the access lines", |_| {
        line("req-abc-123").is_some() && line(&made_id).is_some()
    });
    let access = line("req-abc-123").unwrap();
    let span = &access["span"];
    assert_eq!(span["method"], "POST");
    assert_eq!(span["route"], "/v1/consume");
    assert_eq!(span["status"], 200);
    assert_eq!(span["user"], user.to_string());
    assert!(span["latency_us"].as_u64().is_some(), "{access}");
    assert_eq!(access["level"], "INFO");
    let plans = line(&made_id).unwrap();
    assert_eq!(plans["span"]["route"], "/v1/plans");
}

#[tokio::test]
async fn healthz_stays_up_and_readyz_names_redis_when_redis_is_down() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;

    redis.kill();
    let health = app.get("/healthz").await;
    let ready = app.get("/readyz").await;

    assert_eq!(health.status, 200);
    assert_eq!(
        (ready.status, &ready.body["code"]),
        (503, &json!("NOT_READY"))
    );
    // A fixed sentence: anyone may ask /readyz, so no driver text (addresses, OS errors).
    assert_eq!(
        ready.body["redis"], "redis: not answering",
        "{:?}",
        ready.body
    );
    assert_no_driver_text(&ready.body);
    assert_eq!(ready.body["postgres"], "ok");
}

/// The driver's own words never reach /readyz: no source locations, OS errors or addresses.
fn assert_no_driver_text(body: &serde_json::Value) {
    let text = body.to_string().to_lowercase();
    for leak in [
        "line",
        "os error",
        "refused",
        "127.0.0.1",
        "error:",
        "io error",
        "connection",
    ] {
        assert!(!text.contains(leak), "{leak:?} in {text}");
    }
}

#[tokio::test]
async fn healthz_stays_up_and_readyz_names_postgres_when_postgres_is_down() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        ..Options::default()
    })
    .await;

    pg.stop("fast");
    let health = app.get("/healthz").await;
    let ready = app.get("/readyz").await;
    pg.resume();
    let mut back = app.get("/readyz").await;
    for _ in 0..50 {
        if back.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        back = app.get("/readyz").await;
    }

    assert_eq!(health.status, 200);
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.body["postgres"], "postgres: not answering",
        "{:?}",
        ready.body
    );
    assert_no_driver_text(&ready.body);
    assert_eq!(ready.body["redis"], "ok");
    assert_eq!(
        back.status, 200,
        "ready again once Postgres is back: {:?}",
        back.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_before_postgres_answers_healthz_at_once_and_becomes_ready_when_it_comes()
{
    let pg = PrivatePostgres::start();
    pg.stop("fast");
    let daemon = Daemon::spawn(&[("QUOTAD_TEST_POSTGRES", pg.url())]);
    daemon.wait_for("healthz", |d| {
        d.get("/healthz").is_some_and(|(s, _)| s == 200)
    });
    let (status, body) = daemon.get("/readyz").unwrap();
    let (api_status, api) = daemon.get("/v1/plans").unwrap();

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["postgres"], "postgres: not answering", "{body}");
    assert_no_driver_text(&body);
    assert_eq!((api_status, &api["code"]), (503, &json!("NOT_READY")));
    pg.resume();
    daemon.wait_ready();
    drop(daemon);
}
