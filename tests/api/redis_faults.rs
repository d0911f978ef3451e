//! Redis having a bad day, each on a redis-server of the test's own: refusing calls (OOM,
//! LOADING, READONLY, BUSY, MASTERDOWN, NOREPLICAS, MISCONF), hanging (SIGSTOP) past the
//! deadline, and killed. In every case `ai_generation` (fail open) answers 200
//! `"degraded": true` and `kb_file` (fail closed) answers 503 `REDIS_UNAVAILABLE`, within a stated
//! bound; nothing is counted for those calls, not even after Redis comes back; and the first call
//! after the fault counts as usual.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{free_port, month_period, Answer, Options, PrivateRedis, TestApp};

/// `QUOTAD_REDIS_TIMEOUT_MS` of the refusal tests: a refusal must be answered well within it.
const REFUSAL_TIMEOUT_MS: u64 = 1000;

/// A daemon on `redis` with `timeout_ms`, and a user who has consumed each type once.
async fn daemon_with_a_counted_user(redis: &PrivateRedis, timeout_ms: u64) -> (TestApp, Uuid) {
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        redis_timeout_ms: timeout_ms,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    for ty in ["ai_generation", "kb_file"] {
        assert_counted(&app.consume(user, ty).await, 1, ty);
    }
    (app, user)
}

/// A consume and how long its answer took.
async fn timed_consume(app: &TestApp, user: Uuid, ty: &str) -> (Answer, Duration) {
    let started = Instant::now();
    let a = app.consume(user, ty).await;
    (a, started.elapsed())
}

/// Allowed and counted (not degraded): `used` after it.
fn assert_counted(a: &Answer, used: u64, what: &str) {
    assert_eq!(a.status, 200, "{what}: {:?}", a.body);
    assert_ne!(a.body["degraded"], true, "{what}: {:?}", a.body);
    assert_eq!(a.body["used"], json!(used), "{what}: {:?}", a.body);
}

fn assert_degraded(a: &Answer, what: &str) {
    assert_eq!(a.status, 200, "{what}: {:?}", a.body);
    assert_eq!(a.body["allowed"], true, "{what}: {:?}", a.body);
    assert_eq!(a.body["degraded"], true, "{what}: {:?}", a.body);
    assert_eq!(
        a.body["used"],
        serde_json::Value::Null,
        "{what}: {:?}",
        a.body
    );
}

fn assert_unavailable(a: &Answer, what: &str) {
    assert_eq!(
        (a.status, &a.body["code"]),
        (503, &json!("REDIS_UNAVAILABLE")),
        "{what}: {:?}",
        a.body
    );
}

/// `quotad_redis_errors_total{kind=...}` as this process' recorder has it (0 when absent).
async fn redis_errors(app: &TestApp, kind: &str) -> f64 {
    let text = app.metrics_text().await;
    let series = format!("quotad_redis_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// While Redis refuses calls with `fault`: both types follow their fail policy, each answered
/// within `REFUSAL_TIMEOUT_MS` (a refusal is an answer, not a wait), the 503 says Redis refused
/// and why (`reason`), a user Redis does not hold yet (whose load from Postgres is refused)
/// fares the same, and every refusal is counted as `kind="refused"`.
async fn assert_refused(app: &TestApp, user: Uuid, fault: &str, reason: &str) {
    let before = redis_errors(app, "refused").await;
    let fresh = Uuid::new_v4();
    let mut calls = 0.0;
    let mut slowest = Duration::ZERO;
    for u in [user, fresh] {
        let (open, t_open) = timed_consume(app, u, "ai_generation").await;
        assert_degraded(&open, fault);
        let (closed, t_closed) = timed_consume(app, u, "kb_file").await;
        assert_unavailable(&closed, fault);
        let message = closed.body["error"].as_str().unwrap();
        assert!(
            message.contains("refused") && message.contains(reason),
            "{fault}: the 503 says Redis refused, and why ({reason}): {message}"
        );
        for t in [t_open, t_closed] {
            assert!(
                t < Duration::from_millis(REFUSAL_TIMEOUT_MS),
                "{fault}: answered in {t:?}, not within QUOTAD_REDIS_TIMEOUT_MS"
            );
            slowest = slowest.max(t);
        }
        calls += 2.0;
    }
    eprintln!("{fault}: slowest answer {slowest:?}");
    let after = redis_errors(app, "refused").await;
    assert!(
        after - before >= calls,
        "{fault}: {calls} refusals counted as kind=\"refused\" (before {before}, after {after})"
    );
}

/// After the fault: nothing the refused calls asked for was counted, and a consume counts.
async fn assert_counts_resume(app: &TestApp, user: Uuid, fault: &str) {
    for ty in ["ai_generation", "kb_file"] {
        assert_eq!(
            app.used(user, ty).await,
            1,
            "{fault}: {ty} counted during the fault"
        );
        let a = app.consume(user, ty).await;
        assert_counted(&a, 2, &format!("{fault}: {ty} after the fault"));
    }
}

// Bound: with Redis out of memory (maxmemory below what it uses, noeviction), each call gets the
// fail policy's answer within QUOTAD_REDIS_TIMEOUT_MS, and counts nothing.
#[tokio::test]
async fn out_of_memory_redis_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let used: u64 = redis.info("used_memory").await.parse().unwrap();
    let _: () = redis
        .call(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await
        .unwrap();
    let _: () = redis
        .call(&["CONFIG", "SET", "maxmemory", &(used / 2).to_string()])
        .await
        .unwrap();
    let refused: Result<(), _> = redis.call(&["SET", "probe", "x"]).await;
    assert_eq!(
        refused.unwrap_err().code(),
        Some("OOM"),
        "Redis refuses writes"
    );

    assert_refused(&app, user, "OOM", "out of memory").await;

    let _: () = redis
        .call(&["CONFIG", "SET", "maxmemory", "0"])
        .await
        .unwrap();
    assert_counts_resume(&app, user, "OOM").await;
}

// Bound: a Redis turned into a read-only replica (REPLICAOF a dead primary, as after a failover)
// refuses every write; each call gets the fail policy's answer within QUOTAD_REDIS_TIMEOUT_MS.
#[tokio::test]
async fn read_only_replica_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let dead = free_port().to_string();
    let _: () = redis
        .call(&["REPLICAOF", "127.0.0.1", &dead])
        .await
        .unwrap();
    assert_refused(&app, user, "READONLY", "read-only replica").await;

    let _: () = redis.call(&["REPLICAOF", "NO", "ONE"]).await.unwrap();
    assert_counts_resume(&app, user, "READONLY").await;
}

// Bound: a replica whose primary is gone, set not to serve stale data, answers MASTERDOWN to
// everything; each call gets the fail policy's answer within QUOTAD_REDIS_TIMEOUT_MS.
#[tokio::test]
async fn replica_without_its_primary_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let _: () = redis
        .call(&["CONFIG", "SET", "replica-serve-stale-data", "no"])
        .await
        .unwrap();
    let dead = free_port().to_string();
    let _: () = redis
        .call(&["REPLICAOF", "127.0.0.1", &dead])
        .await
        .unwrap();
    assert_refused(&app, user, "MASTERDOWN", "lost its link to the primary").await;

    let _: () = redis.call(&["REPLICAOF", "NO", "ONE"]).await.unwrap();
    assert_counts_resume(&app, user, "MASTERDOWN").await;
}

// Bound: a primary told to take writes only with a replica connected (min-replicas-to-write 1),
// with none, answers NOREPLICAS to every write; each call gets the fail policy's answer within
// QUOTAD_REDIS_TIMEOUT_MS.
#[tokio::test]
async fn primary_without_enough_replicas_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let _: () = redis
        .call(&["CONFIG", "SET", "min-replicas-to-write", "1"])
        .await
        .unwrap();
    assert_refused(&app, user, "NOREPLICAS", "too few replicas").await;

    let _: () = redis
        .call(&["CONFIG", "SET", "min-replicas-to-write", "0"])
        .await
        .unwrap();
    assert_counts_resume(&app, user, "NOREPLICAS").await;
}

// Bound: a Redis whose last snapshot failed (its folder is gone) stops taking writes
// (stop-writes-on-bgsave-error) and answers MISCONF; each call gets the fail policy's answer
// within QUOTAD_REDIS_TIMEOUT_MS.
#[tokio::test]
async fn redis_unable_to_save_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let _: () = redis
        .call(&["CONFIG", "SET", "save", "3600 1"])
        .await
        .unwrap();
    std::fs::remove_dir_all(redis.dir()).unwrap();
    let _: String = redis.call(&["BGSAVE"]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = redis.info("rdb_last_bgsave_status").await;
        let running = redis.info("rdb_bgsave_in_progress").await;
        if status == "err" && running == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot did not fail");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_refused(&app, user, "MISCONF", "cannot save to disk").await;

    let _: () = redis
        .call(&["CONFIG", "SET", "stop-writes-on-bgsave-error", "no"])
        .await
        .unwrap();
    assert_counts_resume(&app, user, "MISCONF").await;
}

// Bound: while another client's script runs past busy-reply-threshold (50 ms here), Redis
// answers BUSY; each call gets the fail policy's answer within QUOTAD_REDIS_TIMEOUT_MS.
#[tokio::test]
async fn redis_busy_with_a_script_gets_the_fail_policy_and_counts_nothing() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;

    let _: () = redis
        .call(&["CONFIG", "SET", "busy-reply-threshold", "50"])
        .await
        .unwrap();
    let url = redis.url();
    let endless = tokio::spawn(async move {
        let client = deadpool_redis::redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        deadpool_redis::redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<()>(&mut conn)
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match redis.call::<String>(&["PING"]).await {
            Err(e) if e.code() == Some("BUSY") => break,
            other => assert!(Instant::now() < deadline, "Redis never got busy: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_refused(&app, user, "BUSY", "busy running a long script").await;

    let _: () = redis.call(&["SCRIPT", "KILL"]).await.unwrap();
    let killed = endless.await.unwrap();
    assert!(killed.is_err(), "the endless script was killed");
    assert_counts_resume(&app, user, "BUSY").await;
}

// Bound: while Redis loads its data set at start (a real load from its dump, slowed down with
// key-load-delay so that it lasts), it answers LOADING; each call gets the fail policy's answer
// within QUOTAD_REDIS_TIMEOUT_MS, and the counts in the dump are intact once it has loaded.
#[tokio::test]
async fn redis_loading_its_data_set_gets_the_fail_policy_and_counts_nothing() {
    let mut redis = PrivateRedis::start_with(&[
        "--key-load-delay",
        "200",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    let (app, user) = daemon_with_a_counted_user(&redis, REFUSAL_TIMEOUT_MS).await;
    // Enough keys for a load of a few seconds at 200 µs each.
    let _: () = redis
        .call(&[
            "EVAL",
            "for i = 1, 20000 do redis.call('SET', 'filler:' .. i, i) end",
            "0",
        ])
        .await
        .unwrap();
    let _: () = redis.call(&["SAVE"]).await.unwrap();
    redis.restart();
    assert_eq!(
        redis.info("loading").await,
        "1",
        "Redis is loading its dump"
    );

    assert_refused(&app, user, "LOADING", "loading its data set").await;
    assert_eq!(
        redis.info("loading").await,
        "1",
        "the calls above were made while Redis was loading"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while redis.info("loading").await == "1" {
        assert!(Instant::now() < deadline, "Redis still loading after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_counts_resume(&app, user, "LOADING").await;
}

/// `QUOTAD_REDIS_TIMEOUT_MS` of the hung and down tests.
const HUNG_TIMEOUT_MS: u64 = 500;
/// What an answer may take beyond `QUOTAD_REDIS_TIMEOUT_MS`: the HTTP round trip and the
/// daemon's own work, on a loaded test machine.
const SLACK_MS: u64 = 250;

// Bound: with Redis stopped (SIGSTOP), every call is answered within QUOTAD_REDIS_TIMEOUT_MS +
// 250 ms, by its type's fail policy; and the scripts Redis received meanwhile, which it runs when
// it resumes, do nothing (each carries its deadline and Redis refuses it past it): a refused
// or "not counted" call is never counted later.
#[tokio::test]
async fn calls_answered_while_redis_hangs_never_count_when_it_resumes() {
    let redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, HUNG_TIMEOUT_MS).await;
    let bound = Duration::from_millis(HUNG_TIMEOUT_MS + SLACK_MS);
    let timeouts_before = redis_errors(&app, "unavailable").await;

    redis.pause();
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let (a, t) = timed_consume(&app, user, "kb_file").await;
        assert_unavailable(&a, &format!("kb_file #{i}"));
        assert!(t < bound, "kb_file #{i} answered in {t:?}, over {bound:?}");
        slowest = slowest.max(t);
    }
    for i in 0..10 {
        let (a, t) = timed_consume(&app, user, "ai_generation").await;
        assert_degraded(&a, &format!("ai_generation #{i}"));
        assert!(
            t < bound,
            "ai_generation #{i} answered in {t:?}, over {bound:?}"
        );
        slowest = slowest.max(t);
    }
    redis.resume();
    eprintln!("slowest answer with Redis stopped: {slowest:?} (bound {bound:?})");

    // Readiness pings on the daemon's own connection: its answer comes after Redis has run
    // every script queued before it on that connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get("/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "Redis did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        redis_errors(&app, "unavailable").await - timeouts_before >= 15.0,
        "the 15 timed-out calls are counted as kind=\"unavailable\""
    );
    assert_counts_resume(&app, user, "SIGSTOP").await;
}

// Bound: with Redis killed, every call is answered within QUOTAD_REDIS_TIMEOUT_MS + 250 ms by its
// type's fail policy; restarted empty, Redis is filled again from Postgres on first use (what was
// flushed before the kill), and the outage's calls counted nothing.
#[tokio::test]
async fn with_redis_killed_calls_follow_the_fail_policy_in_time_and_counts_come_back_from_postgres()
{
    let mut redis = PrivateRedis::start();
    let (app, user) = daemon_with_a_counted_user(&redis, HUNG_TIMEOUT_MS).await;
    app.flush().await;
    let bound = Duration::from_millis(HUNG_TIMEOUT_MS + SLACK_MS);

    redis.kill();
    let mut slowest = Duration::ZERO;
    for i in 0..3 {
        let (open, t_open) = timed_consume(&app, user, "ai_generation").await;
        assert_degraded(&open, &format!("ai_generation #{i}"));
        let (closed, t_closed) = timed_consume(&app, user, "kb_file").await;
        assert_unavailable(&closed, &format!("kb_file #{i}"));
        for t in [t_open, t_closed] {
            assert!(t < bound, "answered in {t:?}, over {bound:?}");
            slowest = slowest.max(t);
        }
    }
    eprintln!("slowest answer with Redis killed: {slowest:?} (bound {bound:?})");

    redis.restart();
    assert_eq!(
        redis.call::<i64>(&["DBSIZE"]).await.unwrap(),
        0,
        "Redis came back empty"
    );
    assert_counts_resume(&app, user, "killed").await;
}

// The deadline check itself, straight at Redis with the daemon's own invocation: the same
// consume counts when its deadline is ahead, and does nothing, answering EXPIRED, when Redis'
// clock is past it.
#[tokio::test]
async fn a_consume_script_run_past_its_deadline_does_nothing() {
    use deadpool_redis::redis::{RedisResult, Value};

    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    assert_counted(
        &app.consume(user, "ai_generation").await,
        1,
        "first consume",
    );
    let store = &app.state.quota.store;
    let offset = store
        .clock_offset_ms()
        .expect("the offset to Redis' clock was measured at start");
    // Same host, same clock: the estimate is off by at most half a round trip.
    assert!(
        offset.abs() <= 50,
        "offset to a same-host Redis: {offset} ms"
    );

    let keys = app.state.quota.store.keys(user);
    let now_ms = chrono::Utc::now().timestamp_millis() + offset;
    let mut conn = app.redis().await;

    let mut late = app.consume_invocation(&keys, None);
    late.arg(now_ms - 1000);
    let answer: RedisResult<Value> = late.invoke_async(&mut conn).await;
    let err = answer.expect_err("a script past its deadline is refused");
    assert_eq!(err.code(), Some("EXPIRED"), "{err}");
    assert_eq!(app.used(user, "ai_generation").await, 1, "nothing counted");

    let mut timely = app.consume_invocation(&keys, None);
    timely.arg(now_ms + 10_000);
    let raw = timely.invoke_async(&mut conn).await.unwrap();
    let reply = quotad::store::decision_reply(raw, month_period(0)).unwrap();
    assert_eq!((reply.status, reply.used), (quotad::store::Status::Ok, 2));
}
