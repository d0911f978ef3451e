//! Start-up with the real binary: settings out of range are refused naming the variable, the
//! default database URL works without `USER`, an evicting Redis is refused until it is fixed, and
//! logs written to a file carry no colour codes.

use std::process::Command;

use deadpool_redis::redis;
use uuid::Uuid;

use crate::helpers::{drop_database, postgres_url, Daemon, PrivateRedis};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

#[test]
fn a_numeric_setting_out_of_range_stops_the_binary_naming_the_variable() {
    for (var, value) in [
        ("QUOTAD_FLUSH_INTERVAL_MS", "18446744073709551615"),
        ("QUOTAD_FLUSH_INTERVAL_MS", "0"),
        ("QUOTAD_REDIS_TIMEOUT_MS", "99999999999999"),
        ("QUOTAD_SHUTDOWN_TIMEOUT_MS", "1"),
        ("QUOTAD_REFUSAL_CACHE_TTL_MS", "86400000000"),
        ("QUOTAD_REFUSAL_CACHE_USERS", "-1"),
        ("QUOTAD_MAX_IN_FLIGHT", "0"),
        ("QUOTAD_REQUEST_TIMEOUT_MS", "500"),
        ("QUOTAD_HEADER_TIMEOUT_MS", "abc"),
        ("QUOTAD_MAX_CONNECTIONS", "0"),
        ("QUOTAD_REDIS_WAIT_REPLICAS", "17"),
        ("QUOTAD_REDIS_WAIT_REPLICAS", "-1"),
        ("QUOTAD_REDIS_URL", " , "),
        ("QUOTAD_REDIS_URL", "redis://127.0.0.1:6379,nonsense://x"),
        (
            "QUOTAD_REDIS_URL",
            "redis://127.0.0.1:6379,redis://\u{1}bad:1",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .env("QUOTAD_LISTEN", "127.0.0.1:0")
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}

#[test]
fn the_default_shaped_database_url_works_without_a_user_in_the_environment() {
    // The default is postgres://postgres@127.0.0.1:5432/quotad; run it against a scratch
    // database of the test server, with the same shape (a user name in the URL).
    let default = quotad::config::Config::defaults().database_url;
    assert!(default.starts_with("postgres://postgres@"), "{default}");
    let name = format!("quotad_t_{}", &Uuid::new_v4().simple().to_string()[..16]);
    let url = format!("{}/{name}", postgres_url());
    assert!(
        url.starts_with("postgres://postgres@"),
        "the test server URL names its user: {url}"
    );

    let out = Command::new(BIN)
        .arg("migrate")
        .env_remove("USER")
        .env_remove("PGUSER")
        .env("QUOTAD_DATABASE_URL", &url)
        .output()
        .unwrap();
    drop_database(&postgres_url(), &name);

    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("anonymous"), "{err}");
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let daemon = Daemon::spawn(&[]);
    daemon.wait_ready();
    let _ = daemon.get("/v1/plans");
    let _ = daemon.get("/nowhere");
    daemon.wait_for("the access lines", |d| {
        d.log_text().contains("/nowhere") || d.log_text().contains("unmatched")
    });
    let log = daemon.log_text();

    assert!(log.contains("quotad starting"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

fn redis_conn(r: &PrivateRedis) -> redis::Connection {
    redis::Client::open(r.url())
        .unwrap()
        .get_connection()
        .expect("private redis")
}

#[test]
fn an_evicting_redis_is_refused_until_it_is_set_to_noeviction() {
    let redis = PrivateRedis::start();
    let mut conn = redis_conn(&redis);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query::<()>(&mut conn)
        .unwrap();
    let daemon = Daemon::spawn(&[("QUOTAD_REDIS_URL", redis.url())]);
    daemon.wait_for("the policy refused", |d| {
        d.get("/readyz").is_some_and(|(_, b)| {
            b["redis"]
                .as_str()
                .is_some_and(|r| r.contains("maxmemory-policy is allkeys-lru"))
        })
    });
    let (ready, body) = daemon.get("/readyz").unwrap();
    let (api, refused) = daemon.get("/v1/plans").unwrap();
    let metrics = metrics_text(&daemon);

    assert_eq!(ready, 503, "{body}");
    assert_eq!(
        (api, refused["code"].as_str()),
        (503, Some("NOT_READY")),
        "{refused}"
    );
    assert!(
        metrics.contains("quotad_redis_eviction_policy_refused 1"),
        "{metrics}"
    );
    assert!(
        daemon
            .log_text()
            .contains("maxmemory-policy is allkeys-lru"),
        "logged as an error:\n{}",
        daemon.log_text()
    );

    // Fixing Redis is enough: the periodic check notices.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut conn)
        .unwrap();
    daemon.wait_ready();
    let (api, _) = daemon.get("/v1/plans").unwrap();
    assert_eq!(api, 200);
    assert!(metrics_text(&daemon).contains("quotad_redis_eviction_policy_refused 0"));
}

#[test]
fn a_redis_that_does_not_allow_config_get_is_used_with_a_warning() {
    let redis = PrivateRedis::start();
    let mut conn = redis_conn(&redis);
    // As a managed Redis that renames CONFIG: the default user may not run it.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-config")
        .query::<()>(&mut conn)
        .unwrap();
    let daemon = Daemon::spawn(&[("QUOTAD_REDIS_URL", redis.url())]);
    daemon.wait_ready();
    let (api, _) = daemon.get("/v1/plans").unwrap();

    assert_eq!(api, 200);
    assert!(
        daemon.log_text().contains("cannot verify"),
        "{}",
        daemon.log_text()
    );
}

/// /metrics as text (Daemon::get parses JSON only).
fn metrics_text(d: &Daemon) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test]
async fn readyz_says_migrations_not_applied_in_a_fixed_sentence() {
    let app = crate::helpers::TestApp::spawn().await;
    let db = app.db().await;
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&db)
        .await
        .unwrap();

    let ready = app.get("/readyz").await;

    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(ready.body["postgres"], "postgres: migrations not applied");
    assert_eq!(ready.body["redis"], "ok");
}
