//! The server under pressure: load shedding, the request deadline, header-read and idle
//! timeouts, the connection cap, and a SIGTERM that half-open connections cannot hold up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{postgres_totals, Daemon, Options, TestApp};

/// Holds `usage_tracking` in ACCESS EXCLUSIVE mode (a real lock, in a transaction left open),
/// so every consume that must load its counter from Postgres waits. Released on drop of the
/// returned transaction.
async fn lock_usage_table(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = app.db().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_tracking IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until `n` sessions of the app's database wait on a lock (one per batch of loads).
async fn wait_for_lock_waiters(app: &TestApp, n: i64) {
    let pool = app.db().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&app.db_name)
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} of {n} requests reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_in_flight_cap_a_request_is_refused_at_once_and_served_once_the_others_finish() {
    let app = TestApp::spawn_with(Options {
        tune: |c| {
            c.max_in_flight = 2;
            c.database_timeout_ms = 60_000;
            c.request_timeout_ms = 600_000;
        },
        ..Options::default()
    })
    .await;
    let lock = lock_usage_table(&app).await;
    // Two consumes for users Redis does not hold: each waits on its Postgres read.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (client, base) = (app.client.clone(), app.base.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{base}/v1/consume"))
                    .json(&json!({"user_id": Uuid::new_v4(), "type": "ai_generation"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    // Both wait on their loads, which go to Postgres together or one after the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.quota.hydrator.waiting() < 2 {
        assert!(Instant::now() < deadline, "the two requests did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_lock_waiters(&app, 1).await;

    let sent = Instant::now();
    let shed = app.consume(Uuid::new_v4(), "ai_generation").await;
    let took = sent.elapsed();
    eprintln!("measured: OVERLOADED answered in {took:?} with 2 requests held");
    let still_held = held.iter().all(|h| !h.is_finished());
    let health = app.get("/healthz").await;
    let ready = app.get("/readyz").await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    let metrics_status = metrics.status().as_u16();
    let metrics_text = metrics.text().await.unwrap();

    assert_eq!(
        (shed.status, &shed.body["code"]),
        (503, &json!("OVERLOADED")),
        "{:?}",
        shed.body
    );
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert!(
        still_held,
        "the shed answer came while the two held requests were in flight"
    );
    assert!(
        took < Duration::from_millis(500),
        "shed at once, not queued: {took:?}"
    );
    assert_eq!(
        (health.status, ready.status, metrics_status),
        (200, 200, 200),
        "health, readiness and metrics stay answerable when the API is saturated"
    );
    assert!(
        metrics_text.contains("quotad_http_shed_total{reason=\"overloaded\"}"),
        "{metrics_text}"
    );

    drop(lock.rollback().await);
    for h in held {
        assert_eq!(
            h.await.unwrap(),
            200,
            "the held requests finish once Postgres answers"
        );
    }
    let user = Uuid::new_v4();
    let after = app.consume(user, "ai_generation").await;
    assert_eq!(after.status, 200, "served again: {:?}", after.body);
    assert_eq!(app.used(user, "ai_generation").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_answered_503_timeout() {
    // Every Redis and Postgres call of a decision has its own, shorter deadline (config
    // validation makes sure), so what runs into the request deadline is a client: here one that
    // sends its headers and then dribbles out half its body and stalls.
    let app = TestApp::spawn_with(Options {
        tune: |c| {
            c.redis_timeout_ms = 100;
            c.database_timeout_ms = 1_000;
            c.request_timeout_ms = 2_400; // over 3 x 100 + 1000
        },
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let body = format!(r#"{{"user_id": "{user}", "type": "ai_generation"}}"#);
    let sent = Instant::now();
    let answer = tokio::task::spawn_blocking({
        let mut s = connect(&app);
        move || {
            s.write_all(
                format!(
                    "POST /v1/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                    body.len(),
                    &body[..body.len() / 2]
                )
                .as_bytes(),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut text = Vec::new();
            let _ = s.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        }
    })
    .await
    .unwrap();
    let took = sent.elapsed();

    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"TIMEOUT""#), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(2_400) && took < Duration::from_millis(4_000),
        "answered at the deadline: {took:?}"
    );
    // The body never arrived whole, so nothing was decided or counted.
    assert_eq!(app.used(user, "ai_generation").await, 0);
    assert!(app
        .metrics_text()
        .await
        .contains("quotad_http_shed_total{reason=\"timeout\"}"));
}

fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_half_a_header_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(Options {
        tune: |c| c.header_timeout_ms = 400,
        ..Options::default()
    })
    .await;
    let closed = tokio::task::spawn_blocking({
        let mut s = connect(&app);
        move || {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            time_to_close(&mut s, Duration::from_secs(5))
        }
    })
    .await
    .unwrap();

    let closed = closed.expect("the daemon closes a connection whose header never completes");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(2_000),
        "closed after about the header timeout (400 ms): {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(Options {
        tune: |c| c.header_timeout_ms = 400,
        ..Options::default()
    })
    .await;
    let (answer, closed) = tokio::task::spawn_blocking({
        let mut s = connect(&app);
        move || {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            (answer, time_to_close(&mut s, Duration::from_secs(5)))
        }
    })
    .await
    .unwrap();

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "the connection was kept alive after the answer: {answer}"
    );
    let closed = closed.expect("an idle keep-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(2_000),
        "closed after about the idle timeout (400 ms): {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_wait_until_one_closes() {
    let app = TestApp::spawn_with(Options {
        tune: |c| {
            c.max_connections = 3;
            c.header_timeout_ms = 60_000;
        },
        ..Options::default()
    })
    .await;
    // wait_ready's connection may still be open (keep-alive in the shared client): use a
    // client of our own for the probes, and fill the remaining slots with silent sockets.
    let fresh = || {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_millis(700))
            .build()
            .unwrap()
    };
    let mut silent: Vec<TcpStream> = Vec::new();
    // Open silent sockets until a probe is no longer answered: at most the cap.
    let mut probe = fresh().get(format!("{}/healthz", app.base)).send().await;
    while probe.is_ok() {
        silent.push(connect(&app));
        assert!(
            silent.len() <= 3,
            "more than 3 connections were served at once"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        probe = fresh().get(format!("{}/healthz", app.base)).send().await;
    }
    let blocked = probe.unwrap_err();

    silent.pop();
    let served = fresh().get(format!("{}/healthz", app.base)).send().await;

    assert!(blocked.is_timeout(), "{blocked}");
    assert!(
        !silent.is_empty(),
        "the cap was reached by silent connections"
    );
    assert_eq!(served.expect("served once a slot is free").status(), 200);
}

#[test]
fn sigterm_with_fifty_half_open_connections_exits_0_within_the_bound_with_the_counts_in_postgres() {
    let mut daemon = Daemon::spawn(&[
        ("QUOTAD_SHUTDOWN_TIMEOUT_MS", "4000".into()),
        // Longer than the bound: only shutdown itself may close the half-open connections.
        ("QUOTAD_HEADER_TIMEOUT_MS", "60000".into()),
        ("QUOTAD_FLUSH_INTERVAL_MS", "3600000".into()),
    ]);
    daemon.wait_ready();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for user in &users {
            for _ in 0..2 {
                let r = client
                    .post(format!("{}/v1/consume", daemon.base()))
                    .json(&json!({"user_id": user, "type": "ai_generation"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    });
    let half_open: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
            if i % 2 == 0 {
                s.write_all(b"POST /v1/consume HTTP/1.1\r\nHost: x\r\nContent-Le")
                    .unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    let sent = Instant::now();
    daemon.signal("-TERM");
    let code = daemon.wait_exit(Duration::from_secs(8));
    let took = sent.elapsed();
    eprintln!("measured: SIGTERM to exit with 50 half-open connections: {took:?}");
    drop(half_open);

    assert_eq!(code, Some(0), "log:\n{}", daemon.log_text());
    assert!(
        took < Duration::from_millis(4_000),
        "within the 4 s bound: {took:?}"
    );
    let totals = rt.block_on(postgres_totals(&daemon.database_url(), "ai_generation"));
    for user in &users {
        assert_eq!(totals.get(user), Some(&2), "{totals:?}");
    }
}

/// A consume for a new user, held by the Postgres lock; its status, or 0 when the connection
/// was closed without an answer.
fn held_consume(app: &TestApp) -> tokio::task::JoinHandle<u16> {
    let (client, base) = (app.client.clone(), app.base.clone());
    tokio::spawn(async move {
        match client
            .post(format!("{base}/v1/consume"))
            .json(&json!({"user_id": Uuid::new_v4(), "type": "ai_generation"}))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    })
}

/// A daemon whose requests wait on a Postgres lock for longer than any bound under test, stopping
/// within `shutdown_timeout_ms`.
async fn app_for_a_held_lock(shutdown_timeout_ms: u64) -> TestApp {
    TestApp::spawn_with(Options {
        shutdown_timeout_ms,
        tune: |c| {
            c.database_timeout_ms = 60_000;
            c.request_timeout_ms = 600_000;
        },
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_a_running_request_finish_and_answer() {
    let mut app = app_for_a_held_lock(5_000).await;
    let lock = lock_usage_table(&app).await;
    let held = held_consume(&app);
    wait_for_lock_waiters(&app, 1).await;

    let stopping = {
        let started = Instant::now();
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(lock.rollback().await);
        };
        let (stopped, ()) = tokio::join!(app.stop(), release);
        (stopped, started.elapsed())
    };

    assert!(stopping.0.is_ok(), "{:?}", stopping.0);
    assert_eq!(held.await.unwrap(), 200, "the running request was answered");
    assert!(stopping.1 < Duration::from_secs(3), "{:?}", stopping.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_waits_for_a_stuck_request_only_up_to_the_bound() {
    let mut app = app_for_a_held_lock(1_500).await;
    let lock = lock_usage_table(&app).await;
    let held = held_consume(&app);
    wait_for_lock_waiters(&app, 1).await;

    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(10), app.stop()).await;
    let took = started.elapsed();
    let answer = held.await.unwrap();
    drop(lock.rollback().await);

    let stopped = stopped.expect("shutdown does not hang on a stuck request");
    assert!(
        stopped.is_ok(),
        "nothing was counted, so nothing is left: {stopped:?}"
    );
    assert!(
        took >= Duration::from_millis(1_400) && took < Duration::from_millis(3_000),
        "waited about the 1.5 s bound, then closed: {took:?}"
    );
    assert_eq!(answer, 0, "the stuck request's connection was closed");
}
