//! The real `quotad` binary: version, refused settings, `migrate`, and plans reload on SIGHUP.

use std::process::Command;

use uuid::Uuid;

use crate::helpers::{drop_database, plans_file, postgres_url, tempfile_path, Daemon};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("quotad {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_open_listener_without_tokens_is_refused_at_start() {
    let out = Command::new(BIN)
        .arg("serve")
        .env("QUOTAD_LISTEN", "0.0.0.0:0")
        .env_remove("QUOTAD_GATEWAY_TOKENS")
        .env_remove("QUOTAD_ADMIN_TOKENS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QUOTAD_GATEWAY_TOKENS"), "{err}");
}

#[test]
fn bad_webhook_settings_are_refused_at_start_naming_the_variable() {
    for (vars, says) in [
        (
            vec![("QUOTAD_WEBHOOK_URLS", "http://127.0.0.1:9/hooks")],
            "QUOTAD_WEBHOOK_SECRET is not",
        ),
        (
            vec![
                ("QUOTAD_WEBHOOK_URLS", "https://hooks.example.com/q"),
                (
                    "QUOTAD_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
            ],
            "forwarder",
        ),
        (
            vec![
                ("QUOTAD_WEBHOOK_URLS", "http://127.0.0.1:9/hooks"),
                ("QUOTAD_WEBHOOK_SECRET", "hunter2"),
            ],
            "whsec_",
        ),
        (
            vec![("QUOTAD_WEBHOOK_MAX_ATTEMPTS", "0")],
            "QUOTAD_WEBHOOK_MAX_ATTEMPTS=0",
        ),
        (
            vec![("QUOTAD_WEBHOOK_RETRY_MS", "5")],
            "QUOTAD_WEBHOOK_RETRY_MS=5",
        ),
        (
            vec![("QUOTAD_WEBHOOK_TIMEOUT_MS", "-1")],
            "QUOTAD_WEBHOOK_TIMEOUT_MS",
        ),
        (
            vec![("QUOTAD_EVENT_RETENTION_DAYS", "10")],
            "QUOTAD_EVENT_RETENTION_DAYS=10 is out of range: use 40 to 36500",
        ),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").env("QUOTAD_LISTEN", "127.0.0.1:0");
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{vars:?}: {err}");
        assert!(
            !err.contains("MfKQ9r8"),
            "the secret is never printed: {err}"
        );
    }
}

#[test]
fn a_bad_plans_file_at_start_is_refused_naming_the_file_plan_and_type() {
    let plans = plans_file("-7");
    let out = Command::new(BIN)
        .arg("serve")
        .env("QUOTAD_PLANS", &*plans)
        .env("QUOTAD_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&plans.display().to_string()), "{err}");
    assert!(
        err.contains("plan FREE: type ai_generation: limit -7"),
        "{err}"
    );
}

#[test]
fn migrate_creates_the_database_and_applies_migrations() {
    let name = format!("quotad_t_{}", &Uuid::new_v4().simple().to_string()[..16]);
    let out = Command::new(BIN)
        .arg("migrate")
        .env("QUOTAD_DATABASE_URL", format!("{}/{name}", postgres_url()))
        .output()
        .unwrap();
    let tables = Command::new("psql")
        .arg(format!("{}/{name}", postgres_url()))
        .args(["-Atc", "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_schema = 'public'"])
        .output()
        .unwrap();
    drop_database(&postgres_url(), &name);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout).trim(),
        "_sqlx_migrations,account_members,account_plans,account_usage,event_deliveries,limit_overrides,usage_events,usage_tracking,user_plans"
    );
}

#[test]
fn sighup_reloads_the_plans_and_a_bad_file_keeps_the_last_good_one() {
    let plans = plans_file("50");
    let daemon = Daemon::spawn(&[("QUOTAD_PLANS", plans.display().to_string())]);
    daemon.wait_for("readiness", |d| {
        d.get("/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(free_limit(&daemon), Some(50));

    tempfile_path::rewrite(
        &plans,
        &quotad::plans::BUILT_IN.replace("ai_generation = 50", "ai_generation = 70"),
    );
    daemon.signal("-HUP");
    daemon.wait_for("the new limit", |d| free_limit(d) == Some(70));

    tempfile_path::rewrite(
        &plans,
        "default_plan = \"FREE\"\n[plans.FREE]\nexport = 1\n",
    );
    daemon.signal("-HUP");
    daemon.wait_for("the refusal in the log", |d| {
        d.log_text().contains("plans reload refused")
    });

    assert_eq!(
        free_limit(&daemon),
        Some(70),
        "the last good plans stay in force"
    );
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("plans reload refused"))
        .unwrap();
    assert!(
        line.contains(&plans.display().to_string()),
        "the log line names the file: {line}"
    );
}

fn free_limit(d: &Daemon) -> Option<i64> {
    d.get("/v1/plans")
        .and_then(|(_, b)| b["plans"]["FREE"]["ai_generation"].as_i64())
}

#[tokio::test]
async fn reconcile_exits_1_on_drift_and_0_once_repaired() {
    let app = crate::helpers::TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.consume(user, "ai_generation").await;
    app.flush().await;
    sqlx::query("UPDATE usage_tracking SET count = 7 WHERE user_id = $1")
        .bind(user)
        .execute(&app.db().await)
        .await
        .unwrap();
    let reconcile = |extra: &[&str]| {
        Command::new(BIN)
            .arg("reconcile")
            .args(extra)
            .env("QUOTAD_REDIS_URL", &app.redis_url)
            .env(
                "QUOTAD_DATABASE_URL",
                format!("{}/{}", app.postgres_url, app.db_name),
            )
            .env("QUOTAD_KEY_PREFIX", &app.prefix)
            .env("QUOTAD_LOG", "warn")
            .output()
            .unwrap()
    };

    let month = crate::helpers::period_id(0);
    let found = reconcile(&["--period", &month, "--json"]);
    let repaired = reconcile(&["--period", &month, "--repair"]);
    let clean = reconcile(&["--period", &month]);
    let bad = reconcile(&["--period", "Nov"]);

    assert_eq!(
        found.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(report["drift"][0]["kind"], "different");
    assert_eq!(report["drift"][0]["redis"]["count"], 1);
    assert_eq!(report["drift"][0]["postgres"]["count"], 7);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&repaired.stdout)
    );
    assert!(String::from_utf8_lossy(&repaired.stdout).contains("1 repaired"));
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    assert_eq!(bad.status.code(), Some(2));
    // The message's example month is fixed text of quotad's, not a date of this test.
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("--period \"Nov\": use a month such as 2026-11, or lifetime"));
}

/// `quotad reconcile` against a locked `usage_tracking` (a migration or a stuck transaction
/// holding it) stops within its `--timeout-ms` with exit 2 and a sentence, instead of waiting for
/// ever; once the lock is gone it runs.
#[tokio::test]
async fn reconcile_stops_on_a_locked_table_within_its_timeout() {
    let app = crate::helpers::TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.consume(user, "ai_generation").await;
    app.flush().await;
    let db = app.db().await;
    let mut lock = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_tracking IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let reconcile = || {
        let (redis, database, prefix) = (
            app.redis_url.clone(),
            format!("{}/{}", app.postgres_url, app.db_name),
            app.prefix.clone(),
        );
        let month = crate::helpers::period_id(0);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let out = Command::new(BIN)
                .args(["reconcile", "--period", &month, "--timeout-ms", "500"])
                .env("QUOTAD_REDIS_URL", redis)
                .env("QUOTAD_DATABASE_URL", database)
                .env("QUOTAD_KEY_PREFIX", prefix)
                .env("QUOTAD_LOG", "warn")
                .output()
                .unwrap();
            (out, started.elapsed())
        })
    };
    let (locked, took) = reconcile().await.unwrap();
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert_eq!(locked.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("postgres did not finish a statement within --timeout-ms 500"),
        "{stderr}"
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "stopped after {took:?}, its timeout is 500 ms"
    );
    lock.rollback().await.unwrap();
    let (free, _) = reconcile().await.unwrap();
    assert_eq!(
        free.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&free.stderr)
    );
    for hostile in [
        "0",
        "3600001",
        "-1",
        "1e3",
        "abc",
        "99999999999999999999999",
    ] {
        let bad = Command::new(BIN)
            .args(["reconcile", &format!("--timeout-ms={hostile}")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{hostile}: {stderr}");
        assert!(stderr.contains("--timeout-ms="), "{hostile}: {stderr}");
    }
}
