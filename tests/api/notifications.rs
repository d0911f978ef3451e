//! Threshold notifications: recorded once per threshold and period in the counting step, written
//! to the Postgres outbox with the totals, delivered as signed webhooks to a real receiver on a
//! loopback port, at least once, with a stable id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use crate::helpers::*;

/// The secret every test daemon signs with, and the receiver checks against.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The built-in plans, `ai_generation` notifying at 80 and 100 %, and a plan `PLUS` with 100
/// generations a month.
pub fn notify_plans() -> tempfile_path::TempPath {
    let text = quotad::plans::BUILT_IN
        .replace(
            "ai_generation = { period = \"month\", label = \"AI generations\" }",
            "ai_generation = { period = \"month\", label = \"AI generations\", notify = [80, 100] }",
        )
        .replace(
            "[plans.ENTERPRISE]",
            "[plans.PLUS]\nai_generation = 100\nexport = 10\nkb_file = 20\n\n[plans.ENTERPRISE]",
        );
    assert!(text.contains("notify = [80, 100]") && text.contains("[plans.PLUS]"));
    tempfile_path::write(&text)
}

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub raw: String,
    /// Whether the signature verified (checked here, independently of quotad's code).
    pub signed: bool,
}

/// What the receiver answers.
pub const ANSWER_OK: u16 = 204;
/// Never answer (hold the request until the client gives up).
pub const HANG: u16 = 0;
/// Answer 204 once [`Receiver::release`] is called.
pub const HOLD: u16 = 1;

/// A webhook receiver: an HTTP server on a loopback port, recording every request.
pub struct Receiver {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Got>>>,
    /// The status it answers; [`HANG`] to never answer, [`HOLD`] to wait for a release.
    pub answer: Arc<AtomicU16>,
    hold: Arc<tokio::sync::Notify>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Verifies a Standard Webhooks signature: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
/// under the secret's key (the bytes after `whsec_`, base64-decoded).
pub fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signature
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

impl Receiver {
    /// A receiver on a free port, answering 204.
    pub async fn start() -> Receiver {
        Self::start_on(free_port()).await
    }

    /// A receiver on `port`, answering 204.
    pub async fn start_on(port: u16) -> Receiver {
        let mut r = Receiver {
            port,
            got: Arc::default(),
            answer: Arc::new(AtomicU16::new(ANSWER_OK)),
            hold: Arc::default(),
            stop: None,
            task: None,
        };
        r.up().await;
        r
    }

    /// A receiver whose port is taken by nothing yet: connections are refused until [`up`].
    pub fn down() -> Receiver {
        Receiver {
            port: free_port(),
            got: Arc::default(),
            answer: Arc::new(AtomicU16::new(ANSWER_OK)),
            hold: Arc::default(),
            stop: None,
            task: None,
        }
    }

    /// Lets one held request ([`HOLD`]) be answered 204.
    pub fn release(&self) {
        self.hold.notify_one();
    }

    /// Starts listening (again).
    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the receiver's port is free");
        let (got, answer, hold) = (self.got.clone(), self.answer.clone(), self.hold.clone());
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (got, answer, hold) = (got.clone(), answer.clone(), hold.clone());
                async move {
                    let header = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let signed = verify(
                        SECRET,
                        &header("webhook-id"),
                        &header("webhook-timestamp"),
                        &body,
                        &header("webhook-signature"),
                    );
                    let raw = String::from_utf8_lossy(&body).into_owned();
                    got.lock().unwrap().push(Got {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            .collect(),
                        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
                        raw,
                        signed,
                    });
                    match answer.load(Ordering::SeqCst) {
                        HANG => {
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        HOLD => {
                            hold.notified().await;
                            StatusCode::NO_CONTENT.into_response()
                        }
                        302 => (
                            StatusCode::FOUND,
                            [("location", "http://127.0.0.1:9/elsewhere")],
                        )
                            .into_response(),
                        s => StatusCode::from_u16(s).unwrap().into_response(),
                    }
                }
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        }));
    }

    /// Stops listening: idle connections close, new ones are refused.
    pub async fn go_down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    pub fn requests(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests came, and returns them.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Got> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} requests, not {n}, within {within:?}: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The ids of the requests answered 2xx so far (the answer at the time they came).
    pub fn ids(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|g| g.headers["webhook-id"].clone())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A daemon with the notify plans, sending to `urls`, retrying after 50 ms, attempts bounded at
/// 1 s, giving up after `QUOTAD_WEBHOOK_MAX_ATTEMPTS` = 100.
async fn app_sending_to(urls: Vec<String>) -> (TestApp, tempfile_path::TempPath) {
    let plans = notify_plans();
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        webhook_urls: urls,
        tune: |c| {
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_ms = 50;
            c.webhook_timeout_ms = 1000;
            c.webhook_max_attempts = 100;
        },
        ..Options::default()
    })
    .await;
    (app, plans)
}

/// The outbox rows: (id, user, threshold, used, limit, plan, period_start).
async fn outbox(
    app: &TestApp,
) -> Vec<(
    String,
    Uuid,
    i32,
    i64,
    i64,
    String,
    chrono::DateTime<chrono::Utc>,
)> {
    let db = app.db().await;
    let rows = sqlx::query_as(
        r#"SELECT id, user_id, threshold, used, "limit", plan, period_start FROM usage_events
           ORDER BY user_id, period_start, threshold, "limit""#,
    )
    .fetch_all(&db)
    .await
    .unwrap();
    db.close().await;
    rows
}

async fn consume_n(app: &TestApp, user: Uuid, n: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..n {
        let a = app.consume(user, "ai_generation").await;
        if a.status == 200 {
            allowed += 1;
        }
    }
    allowed
}

/// Asserts one request is the event `id` as the issue's contract has it.
fn assert_event(got: &Got, user: Uuid, threshold: i64, used: i64, limit: i64, plan: &str) {
    assert!(got.signed, "the signature does not verify: {got:#?}");
    let ts: i64 = got.headers["webhook-timestamp"].parse().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - ts).abs() < 120,
        "webhook-timestamp {ts} is not now ({now})"
    );
    assert_eq!(got.headers["content-type"], "application/json");
    assert!(got.headers["webhook-id"].starts_with("evt_"));
    assert_eq!(got.body["type"], "usage.threshold");
    assert!(got.body["timestamp"].as_str().unwrap().ends_with('Z'));
    let d = &got.body["data"];
    assert_eq!(d["user_id"], json!(user));
    assert_eq!(d["usage_type"], "ai_generation");
    assert_eq!(d["threshold"], threshold);
    assert_eq!(d["used"], used);
    assert_eq!(d["limit"], limit);
    assert_eq!(d["plan"], plan);
}

#[tokio::test]
async fn two_hundred_concurrent_consumes_on_two_replicas_record_each_threshold_once_and_deliver_it_once(
) {
    let receiver = Receiver::start().await;
    let (app, plans) = app_sending_to(vec![receiver.url()]).await;
    let other = TestApp::spawn_with(Options {
        replica_of: Some((app.prefix.clone(), app.db_name.clone())),
        plans: Some(plans.to_path_buf()),
        now: app.clock_now(),
        webhook_urls: vec![receiver.url()],
        tune: |c| {
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_ms = 50;
        },
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let calls = (0..200).map(|i| {
        let target = if i % 2 == 0 { &app } else { &other };
        async move { target.consume(user, "ai_generation").await.status }
    });
    let statuses = futures::future::join_all(calls).await;
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((allowed, refused), (50, 150), "FREE allows 50 generations");

    // Both replicas flush (the same counter, at once) and both dispatchers run.
    tokio::join!(app.flush(), other.flush());
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    let rows = outbox(&app).await;
    assert_eq!(rows.len(), 2, "one event per threshold: {rows:?}");
    assert_eq!((rows[0].2, rows[0].3, rows[0].4), (80, 40, 50));
    assert_eq!((rows[1].2, rows[1].3, rows[1].4), (100, 50, 50));
    let period = month_period(0);
    for (row, t) in rows.iter().zip([80, 100]) {
        assert_eq!(
            row.0,
            quotad::events::ThresholdEvent::id_of(user, "ai_generation", period, t, 50),
            "the id is derived from the crossing"
        );
    }
    // Nothing more comes: a second pass of both flushers and time for both dispatchers.
    tokio::join!(app.flush(), other.flush());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got_after = receiver.requests();
    assert_eq!(got_after.len(), 2, "each event once: {got_after:#?}");
    let mut by_threshold: Vec<&Got> = got.iter().collect();
    by_threshold.sort_by_key(|g| g.body["data"]["threshold"].as_i64());
    assert_event(by_threshold[0], user, 80, 40, 50, "FREE");
    assert_event(by_threshold[1], user, 100, 50, 50, "FREE");
    assert_eq!(by_threshold[0].headers["webhook-id"], rows[0].0);
    assert_eq!(
        by_threshold[0].body["data"]["period_start"],
        rfc(month_start(0))
    );
    assert_eq!(
        by_threshold[0].body["data"]["period_end"],
        rfc(month_start(1))
    );
    println!(
        "notifications: 200 concurrent consumes over 2 replicas: {allowed} allowed, {refused} refused; outbox {} events; receiver got {} requests:\n{}",
        rows.len(),
        got_after.len(),
        got_after
            .iter()
            .map(|g| format!(
                "{}\n\n{}",
                g.headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                g.raw
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The hash keeps the marks and no longer says an event is pending.
    let mut redis = app.redis().await;
    let keys = app.state.quota.store.keys(user);
    let fields: BTreeMap<String, String> = deadpool_redis::redis::cmd("HGETALL")
        .arg(keys.counter(period))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(fields.contains_key("e:ai_generation:80"), "{fields:?}");
    assert!(fields.contains_key("e:ai_generation:100"), "{fields:?}");
    assert!(!fields.contains_key("x:ev"), "{fields:?}");
    // The admin view shows both delivered.
    let listed = app.get("/v1/admin/events?status=delivered").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(listed.body["events"].as_array().unwrap().len(), 2);
    let d = &listed.body["events"][0]["deliveries"][0];
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["endpoint"], receiver.url());
    assert_eq!(d["last_status"], 204);
}

#[tokio::test]
async fn many_users_at_once_each_get_their_own_events() {
    let receiver = Receiver::start().await;
    let (app, _plans) = app_sending_to(vec![receiver.url()]).await;
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let app = &app;
    let per_user = users
        .iter()
        .map(|u| async move { consume_n(app, *u, 45).await });
    let allowed = futures::future::join_all(per_user).await;
    assert!(allowed.iter().all(|n| *n == 45), "{allowed:?}");
    app.flush().await;
    receiver.wait_for(20, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.requests();
    assert_eq!(got.len(), 20, "one 80 % event per user, none at 100 %");
    let mut seen: Vec<String> = got
        .iter()
        .map(|g| g.body["data"]["user_id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let mut want: Vec<String> = users.iter().map(|u| u.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    assert!(got.iter().all(|g| g.signed && g.body["data"]["used"] == 40));
}

#[tokio::test]
async fn a_refund_does_not_rearm_a_threshold_a_new_month_and_a_new_limit_do() {
    let (app, _plans) = app_sending_to(vec![]).await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 39).await, 39);
    let crossing = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k-40"}),
        )
        .await;
    assert_eq!(crossing.status, 200);
    app.flush().await;
    assert_eq!(outbox(&app).await.len(), 1);

    // Back under 80 % and over it again: still one event.
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "k-40"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(app.used(user, "ai_generation").await, 39);
    assert_eq!(consume_n(&app, user, 1).await, 1);
    app.flush().await;
    let rows = outbox(&app).await;
    assert_eq!(
        rows.len(),
        1,
        "a refund does not re-arm the threshold: {rows:?}"
    );

    // A larger plan: its 80 % is a threshold of its own.
    app.set_plan(user, "PLUS").await;
    assert_eq!(consume_n(&app, user, 39).await, 39); // 79 of 100
    app.flush().await;
    assert_eq!(outbox(&app).await.len(), 1);
    assert_eq!(consume_n(&app, user, 1).await, 1); // 80 of 100
    app.flush().await;
    let rows = outbox(&app).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .any(|r| (r.2, r.3, r.4, r.5.as_str()) == (80, 80, 100, "PLUS")));

    // Next month: the counter starts again and every threshold is armed again.
    app.set_at(month_start(1) + chrono::Duration::days(2));
    assert_eq!(consume_n(&app, user, 80).await, 80);
    app.flush().await;
    let rows = outbox(&app).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let next = rows
        .iter()
        .find(|r| r.6 == month_start(1))
        .expect("next month's event");
    assert_eq!((next.2, next.3, next.4), (80, 80, 100));
    // Unlimited plans never notify.
    let unlimited = Uuid::new_v4();
    app.set_plan(unlimited, "PRO").await;
    assert_eq!(consume_n(&app, unlimited, 60).await, 60);
    app.flush().await;
    assert!(outbox(&app).await.iter().all(|r| r.1 != unlimited));
    // A refused consume records nothing; track counts past the limit and notifies like consume.
    let tracked = Uuid::new_v4();
    let t = app
        .post(
            "/v1/track",
            json!({"user_id": tracked, "type": "ai_generation", "amount": 60}),
        )
        .await;
    assert_eq!(t.status, 200, "{:?}", t.body);
    app.flush().await;
    let mine: Vec<_> = outbox(&app)
        .await
        .into_iter()
        .filter(|r| r.1 == tracked)
        .map(|r| (r.2, r.3))
        .collect();
    assert_eq!(
        mine,
        [(80, 60), (100, 60)],
        "one call past both thresholds records both"
    );
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_once_it_is_up() {
    let mut receiver = Receiver::down();
    let (app, _plans) = app_sending_to(vec![receiver.url()]).await;
    let users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    for u in users {
        assert_eq!(consume_n(&app, u, 40).await, 40);
    }
    app.flush().await;
    // Failing: retried, and visible as such.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = app.get("/v1/admin/events?status=retrying").await;
        assert_eq!(listed.status, 200, "{:?}", listed.body);
        let events = listed.body["events"].as_array().unwrap();
        if events.len() == 3
            && events
                .iter()
                .all(|e| e["deliveries"][0]["attempts"].as_i64().unwrap() >= 3)
        {
            let d = &events[0]["deliveries"][0];
            assert!(
                d["last_error"].as_str().unwrap().contains("cannot connect"),
                "{d}"
            );
            assert!(d["last_status"].is_null());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retries seen: {:?}",
            listed.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quotad_webhook_attempts_total{result=\"failed\"}"),
        "failures are counted"
    );
    // Up again: every event arrives, once each.
    receiver.up().await;
    receiver.wait_for(3, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = receiver.ids();
    ids.sort();
    let mut want: Vec<String> = outbox(&app).await.into_iter().map(|r| r.0).collect();
    want.sort();
    assert_eq!(ids, want, "each event delivered once by id");
    assert!(receiver.requests().iter().all(|g| g.signed));
    let listed = app.get("/v1/admin/events?status=delivered").await;
    assert_eq!(listed.body["events"].as_array().unwrap().len(), 3);
    assert_eq!(
        app.get("/v1/admin/events?status=retrying").await.body["events"],
        json!([])
    );

    // Down again after serving (the daemon holds kept-alive connections to it): a new event
    // waits, and arrives once it is back.
    receiver.go_down().await;
    let late = Uuid::new_v4();
    assert_eq!(consume_n(&app, late, 40).await, 40);
    app.flush().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.get("/v1/admin/events?status=retrying").await.body["events"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the new event was not retried");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    receiver.up().await;
    let got = receiver.wait_for(4, Duration::from_secs(20)).await;
    assert_eq!(got[3].body["data"]["user_id"], json!(late));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 4);
}

#[tokio::test]
async fn a_delivery_failing_every_attempt_is_listed_failed_and_can_be_redelivered() {
    let receiver = Receiver::start().await;
    receiver.answer.store(500, Ordering::SeqCst);
    let plans = notify_plans();
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        webhook_urls: vec![receiver.url()],
        tune: |c| {
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_ms = 20;
            c.webhook_max_attempts = 3;
        },
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 40).await, 40);
    app.flush().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let listed = app.get("/v1/admin/events?status=failed").await;
        assert_eq!(listed.status, 200, "{:?}", listed.body);
        if listed.body["events"].as_array().unwrap().len() == 1 {
            break listed.body;
        }
        assert!(Instant::now() < deadline, "not failed in time");
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    let d = &failed["events"][0]["deliveries"][0];
    assert_eq!(d["status"], "failed");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["last_status"], 500);
    assert!(d["next_attempt_at"].is_null());
    assert_eq!(receiver.requests().len(), 3, "three attempts, then no more");
    let id = failed["events"][0]["id"].as_str().unwrap().to_owned();
    assert!(app
        .metrics_text()
        .await
        .contains("quotad_webhook_attempts_total{result=\"gave_up\"}"));

    receiver.answer.store(200, Ordering::SeqCst);
    let again = app
        .post(&format!("/v1/admin/events/{id}/redeliver"), json!({}))
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body, json!({"id": id, "requeued": 1}));
    receiver.wait_for(4, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get("/v1/admin/events?status=delivered").await.body["events"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "not delivered after a redelivery"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Redelivering a delivered event puts nothing back.
    let none = app
        .post(&format!("/v1/admin/events/{id}/redeliver"), json!({}))
        .await;
    assert_eq!(none.body["requeued"], 0);
}

#[tokio::test]
async fn a_receiver_that_hangs_or_redirects_is_a_failed_attempt_and_holds_back_no_other() {
    let hanging = Receiver::start().await;
    hanging.answer.store(HANG, Ordering::SeqCst);
    let redirecting = Receiver::start().await;
    redirecting.answer.store(302, Ordering::SeqCst);
    let good = Receiver::start().await;
    let plans = notify_plans();
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        webhook_urls: vec![hanging.url(), redirecting.url(), good.url()],
        tune: |c| {
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_ms = 50;
            c.webhook_timeout_ms = 300;
        },
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 40).await, 40);
    let started = Instant::now();
    app.flush().await;
    good.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "a hanging endpoint held back another's delivery"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = app.get("/v1/admin/events").await;
        let ds = listed.body["events"][0]["deliveries"].clone();
        let by: BTreeMap<String, Value> = ds
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["endpoint"].as_str().unwrap().to_owned(), d.clone()))
            .collect();
        let hang = &by[&hanging.url()];
        let redirect = &by[&redirecting.url()];
        if hang["status"] == "retrying" && redirect["status"] == "retrying" {
            assert!(
                hang["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("no answer within 300 ms"),
                "{hang}"
            );
            assert_eq!(redirect["last_status"], 302);
            assert!(
                redirect["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("redirects are not followed"),
                "{redirect}"
            );
            assert_eq!(by[&good.url()]["status"], "delivered");
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", listed.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_that_lost_its_marks_records_the_same_event_again_and_nothing_is_sent_twice() {
    let receiver = Receiver::start().await;
    let (app, _plans) = app_sending_to(vec![receiver.url()]).await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 40).await, 40);
    app.flush().await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    // Redis loses the counter (a restart without persistence, a restore from before the
    // crossing): it is loaded back from Postgres, without the marks.
    let mut redis = app.redis().await;
    let keys = app.state.quota.store.keys(user);
    let _: () = deadpool_redis::redis::cmd("DEL")
        .arg(keys.counter(month_period(0)))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(consume_n(&app, user, 1).await, 1);
    app.flush().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        outbox(&app).await.len(),
        1,
        "the same crossing is one event"
    );
    assert_eq!(receiver.requests().len(), 1, "and is sent once");
}

#[tokio::test]
async fn without_webhook_urls_events_are_recorded_with_no_delivery() {
    let (app, _plans) = app_sending_to(vec![]).await;
    let plans = app.get("/v1/plans").await;
    assert_eq!(
        plans.body["types"]["ai_generation"]["notify"],
        json!([80, 100])
    );
    assert_eq!(plans.body["types"]["export"]["notify"], json!([]));
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 50).await, 50);
    app.flush().await;
    let listed = app.get(&format!("/v1/admin/events?user_id={user}")).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let events = listed.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["deliveries"], json!([]));
    assert_eq!(events[0]["type"], "usage.threshold");
    assert_eq!(
        app.get(&format!("/v1/admin/events?user_id={}", Uuid::new_v4()))
            .await
            .body["events"],
        json!([])
    );
    assert_eq!(
        app.get("/v1/admin/events?limit=1").await.body["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn bad_event_queries_are_refused_with_a_code() {
    let (app, _plans) = app_sending_to(vec![]).await;
    for (query, code, field) in [
        ("status=bogus", "INVALID_QUERY", "status"),
        ("status=", "INVALID_QUERY", "status"),
        ("limit=0", "INVALID_QUERY", "limit"),
        ("limit=1001", "INVALID_QUERY", "limit"),
        ("limit=abc", "INVALID_QUERY", "limit"),
        ("limit=99999999999999999999999", "INVALID_QUERY", "limit"),
        ("user_id=nope", "INVALID_USER_ID", "user_id"),
        ("user_id=%00", "INVALID_USER_ID", "user_id"),
        ("colour=red", "INVALID_QUERY", "colour"),
    ] {
        let a = app.get(&format!("/v1/admin/events?{query}")).await;
        assert_eq!(a.status, 400, "{query}: {:?}", a.body);
        assert_eq!(a.body["code"], code, "{query}: {:?}", a.body);
        assert_eq!(a.body["field"], field, "{query}: {:?}", a.body);
    }
    for (id, status, code) in [
        (
            "evt_0123456789abcdef0123456789abcdef",
            404,
            "EVENT_NOT_FOUND",
        ),
        ("nope", 400, "INVALID_EVENT_ID"),
        ("evt_", 400, "INVALID_EVENT_ID"),
        ("evt_xyz", 400, "INVALID_EVENT_ID"),
        ("evt_%0a", 400, "INVALID_EVENT_ID"),
        (&format!("evt_{}", "a".repeat(200)), 400, "INVALID_EVENT_ID"),
    ] {
        let a = app
            .post(&format!("/v1/admin/events/{id}/redeliver"), json!({}))
            .await;
        assert_eq!(a.status, status, "{id}: {:?}", a.body);
        assert_eq!(a.body["code"], code, "{id}: {:?}", a.body);
    }
    let wrong = app
        .send(reqwest::Method::DELETE, "/v1/admin/events", None, None)
        .await;
    assert_eq!(wrong.status, 405);
}

#[tokio::test]
async fn the_events_api_needs_an_admin_token_when_tokens_are_set() {
    let app = TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw".into()],
        admin_tokens: vec!["ad".into()],
        ..Options::default()
    })
    .await;
    for token in [None, Some("gw")] {
        let a = app
            .send(reqwest::Method::GET, "/v1/admin/events", None, token)
            .await;
        assert!(matches!(a.status, 401 | 403), "{token:?}: {:?}", a.body);
    }
    let a = app
        .send(reqwest::Method::GET, "/v1/admin/events", None, Some("ad"))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

/// The daemon process, sending to `url`, on `prefix`/`database` when given (a restart).
fn daemon_sending_to(
    url: &str,
    plans: &std::path::Path,
    flush_ms: u64,
    restart_of: Option<&Daemon>,
) -> Daemon {
    let mut vars = vec![
        ("QUOTAD_PLANS", plans.display().to_string()),
        ("QUOTAD_WEBHOOK_URLS", url.to_owned()),
        ("QUOTAD_WEBHOOK_SECRET", SECRET.to_owned()),
        ("QUOTAD_WEBHOOK_RETRY_MS", "50".to_owned()),
        ("QUOTAD_FLUSH_INTERVAL_MS", flush_ms.to_string()),
    ];
    if let Some(d) = restart_of {
        vars.push(("QUOTAD_KEY_PREFIX", d.prefix.clone()));
        vars.push(("QUOTAD_DATABASE_URL", d.database_url()));
        vars.push(("QUOTAD_TEST_POSTGRES", d.postgres_url.clone()));
    }
    let d = Daemon::spawn(&vars);
    d.wait_ready();
    d
}

async fn consume_on(d: &Daemon, user: Uuid, n: usize) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..n {
        let r = client
            .post(format!("{}/v1/consume", d.base()))
            .json(&json!({"user_id": user, "type": "ai_generation"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

async fn outbox_at(url: &str) -> Vec<(String, i32, i64)> {
    let db = sqlx::PgPool::connect(url).await.unwrap();
    let rows = sqlx::query_as("SELECT e.id, e.threshold, (SELECT count(*) FROM event_deliveries d WHERE d.event_id = e.id AND d.attempts > 0) FROM usage_events e ORDER BY threshold")
        .fetch_all(&db)
        .await
        .unwrap_or_default();
    db.close().await;
    rows
}

#[tokio::test]
async fn a_daemon_killed_after_counting_and_before_flushing_delivers_the_event_after_restart() {
    let receiver = Receiver::start().await;
    let plans = notify_plans();
    // Flushes once an hour: the event is in Redis only when the daemon dies.
    let mut first = daemon_sending_to(&receiver.url(), &plans, 3_600_000, None);
    let user = Uuid::new_v4();
    consume_on(&first, user, 40).await;
    first.signal("-KILL");
    let _ = first.child.wait();
    assert!(outbox_at(&first.database_url()).await.is_empty());
    assert!(receiver.requests().is_empty());

    let second = daemon_sending_to(&receiver.url(), &plans, 50, Some(&first));
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    let id = quotad::events::ThresholdEvent::id_of(
        user,
        "ai_generation",
        quotad::period::Period::current(quotad::period::PeriodKind::Month, chrono::Utc::now()),
        80,
        50,
    );
    assert_eq!(got[0].headers["webhook-id"], id);
    assert_event(&got[0], user, 80, 40, 50, "FREE");
    drop(second);
}

#[tokio::test]
async fn a_daemon_killed_after_recording_and_before_delivering_delivers_the_same_id_after_restart()
{
    let mut receiver = Receiver::down();
    let plans = notify_plans();
    let mut first = daemon_sending_to(&receiver.url(), &plans, 50, None);
    let user = Uuid::new_v4();
    consume_on(&first, user, 40).await;
    // Recorded in Postgres, and tried (the receiver is down): then the daemon dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    let recorded = loop {
        let rows = outbox_at(&first.database_url()).await;
        if rows.len() == 1 && rows[0].2 == 1 {
            break rows;
        }
        assert!(Instant::now() < deadline, "no attempt recorded: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.signal("-KILL");
    let _ = first.child.wait();
    receiver.up().await;
    assert!(receiver.requests().is_empty());

    let _second = daemon_sending_to(&receiver.url(), &plans, 50, Some(&first));
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].headers["webhook-id"], recorded[0].0, "the same id");
    assert_event(&got[0], user, 80, 40, 50, "FREE");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn postgres_down_while_a_delivery_is_recorded_delays_the_record_and_sends_nothing_twice() {
    let pg = PrivatePostgres::start();
    let receiver = Receiver::start().await;
    receiver.answer.store(HOLD, Ordering::SeqCst);
    let plans = notify_plans();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        plans: Some(plans.to_path_buf()),
        webhook_urls: vec![receiver.url()],
        tune: |c| {
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_ms = 50;
            c.webhook_timeout_ms = 3000;
        },
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 40).await, 40);
    app.flush().await;
    // The receiver has the event; before it answers, Postgres crashes, so the dispatcher cannot
    // record the delivery until it is back (within the statement's deadline here).
    receiver.wait_for(1, Duration::from_secs(10)).await;
    pg.stop("immediate");
    receiver.release();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/v1/admin/events?status=delivered").await.body["events"]
        .as_array()
        .is_none_or(|e| e.is_empty())
    {
        assert!(Instant::now() < deadline, "not recorded as delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the claim's lease: nothing is sent again.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(receiver.requests().len(), 1);
    assert_eq!(outbox(&app).await.len(), 1);
}

#[tokio::test]
async fn a_daemon_killed_while_its_attempt_is_in_flight_sends_it_again_with_the_same_id() {
    let receiver = Receiver::start().await;
    receiver.answer.store(HOLD, Ordering::SeqCst);
    let plans = notify_plans();
    let vars = |restart: Option<&Daemon>| {
        let mut v = vec![
            ("QUOTAD_PLANS", plans.display().to_string()),
            ("QUOTAD_WEBHOOK_URLS", receiver.url()),
            ("QUOTAD_WEBHOOK_SECRET", SECRET.to_owned()),
            ("QUOTAD_WEBHOOK_RETRY_MS", "50".to_owned()),
            ("QUOTAD_WEBHOOK_TIMEOUT_MS", "1000".to_owned()),
        ];
        if let Some(d) = restart {
            v.push(("QUOTAD_KEY_PREFIX", d.prefix.clone()));
            v.push(("QUOTAD_DATABASE_URL", d.database_url()));
            v.push(("QUOTAD_TEST_POSTGRES", d.postgres_url.clone()));
        }
        v
    };
    let mut first = Daemon::spawn(&vars(None));
    first.wait_ready();
    let user = Uuid::new_v4();
    consume_on(&first, user, 40).await;
    // The attempt is in flight (the receiver holds it) when the daemon dies: its outcome is never
    // recorded.
    let held = receiver.wait_for(1, Duration::from_secs(20)).await;
    first.signal("-KILL");
    let _ = first.child.wait();
    receiver.answer.store(ANSWER_OK, Ordering::SeqCst);
    receiver.release();

    let second = Daemon::spawn(&vars(Some(&first)));
    second.wait_ready();
    // Once the dead daemon's claim ends (timeout + 2 s), the new one sends it again.
    let got = receiver.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(got[1].headers["webhook-id"], held[0].headers["webhook-id"]);
    assert_eq!(got[1].raw, held[0].raw);
    assert!(got[1].signed);
    assert_event(&got[1], user, 80, 40, 50, "FREE");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows: Vec<(String, i32)> = {
            let db = sqlx::PgPool::connect(&first.database_url()).await.unwrap();
            let r = sqlx::query_as("SELECT status, attempts FROM event_deliveries")
                .fetch_all(&db)
                .await
                .unwrap();
            db.close().await;
            r
        };
        if rows == [("delivered".to_owned(), 2)] {
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
}

#[tokio::test]
async fn thresholds_past_100_percent_fire_in_overage() {
    let text = quotad::plans::BUILT_IN
        .replace(
            "ai_generation = { period = \"month\", label = \"AI generations\" }",
            "ai_generation = { period = \"month\", notify = [100, 200, 300] }",
        )
        .replace(
            "ai_generation = 50",
            "ai_generation = { limit = 50, overage = 100 }",
        );
    let plans = tempfile_path::write(&text);
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 99).await, 99);
    app.flush().await;
    let fired: Vec<(i32, i64)> = outbox(&app).await.iter().map(|r| (r.2, r.3)).collect();
    assert_eq!(fired, [(100, 50)], "100 % at the limit; 200 % not yet");
    assert_eq!(consume_n(&app, user, 60).await, 51, "the cap is 150");
    app.flush().await;
    let fired: Vec<(i32, i64)> = outbox(&app).await.iter().map(|r| (r.2, r.3)).collect();
    assert_eq!(fired, [(100, 50), (200, 100), (300, 150)]);
}

#[tokio::test]
async fn old_events_are_pruned_from_the_outbox_unless_a_delivery_is_still_pending() {
    let (app, _plans) = app_sending_to(vec![]).await;
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for user in &users {
        assert_eq!(consume_n(&app, *user, 40).await, 40);
    }
    app.flush().await;
    let db = app.db().await;
    let id_of = |user: Uuid| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT id FROM usage_events WHERE user_id = $1")
                .bind(user)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    // Four events recorded 100 days ago: one without deliveries, one delivered, one failed, one
    // still pending; the fifth is recent.
    for user in &users[..4] {
        sqlx::query(
            "UPDATE usage_events SET recorded_at = now() - interval '100 days' WHERE user_id = $1",
        )
        .bind(user)
        .execute(&db)
        .await
        .unwrap();
    }
    for (user, status) in [
        (users[1], "delivered"),
        (users[2], "failed"),
        (users[3], "pending"),
    ] {
        sqlx::query(
            "INSERT INTO event_deliveries (event_id, endpoint, status) VALUES ($1, 'http://127.0.0.1:9/h', $2)",
        )
        .bind(id_of(user).await)
        .bind(status)
        .execute(&db)
        .await
        .unwrap();
    }
    // The instants are the database's own clock, so the cutoff is derived from the real one.
    let now = chrono::Utc::now();
    let pruned = quotad::events::prune(&db, now, chrono::Duration::days(90))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM usage_events ORDER BY recorded_at")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        left,
        [users[3], users[4]],
        "the pending one and the recent one stay"
    );
    let deliveries: Vec<String> = sqlx::query_scalar("SELECT status FROM event_deliveries")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        deliveries,
        ["pending"],
        "the pruned events' deliveries went with them"
    );
    // Nothing more to prune; a shorter retention would take the recent one too.
    assert_eq!(
        quotad::events::prune(&db, now, chrono::Duration::days(90))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        quotad::events::prune(
            &db,
            now + chrono::Duration::days(1),
            chrono::Duration::hours(1)
        )
        .await
        .unwrap(),
        1
    );
}
