//! The hot path's cost in Redis commands: one round trip per allowed consume.

use std::collections::BTreeMap;

use deadpool_redis::redis;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{PrivateRedis, TestApp};

pub async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test]
async fn an_allowed_consume_is_exactly_one_redis_round_trip() {
    // A Redis of this test's own, so no other test's commands are counted.
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let users: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(
            app.consume(*u, "ai_generation").await.status,
            200,
            "first use loads the counter"
        );
    }
    let mut conn = app.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();

    let calls: u64 = 100;
    let started = std::time::Instant::now();
    for i in 0..calls as usize {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": users[i % users.len()], "type": "ai_generation"}),
            )
            .await;
        assert_eq!(a.status, 200);
    }
    let mut stats = commandstats(&mut conn).await;
    let elapsed = started.elapsed();

    // This test's own commands.
    stats.remove("info");
    stats.remove("config|resetstat");
    // The refusal cache's subscription connection pings every 5 s (and subscribes again after
    // a reconnect); it is not on the consume path. Bounded by the time the consumes took, so a
    // PING inside the script (one per call) would not pass.
    let pings = stats.remove("ping").unwrap_or(0);
    assert!(
        pings <= elapsed.as_secs() / 5 + 1,
        "{pings} pings in {elapsed:?}: more than the subscription's"
    );
    assert!(stats.remove("subscribe").unwrap_or(0) <= 1);
    // Every command run, inside the script too, per consume of a loaded monthly counter that is
    // dirty already (its first use marked it): the EVALSHA; TIME for the call's deadline; GET of
    // the user's route key (is the user still where the call was sent, without an account?);
    // one HMGET of `v`, the count, the dirty flag, the plan and the override; one HSET of the
    // count and `v`. No ZADD: a counter is marked on its first change after a flush only. One
    // round trip; anything more is a regression in the script.
    let per_call = [
        ("evalsha", 1),
        ("get", 1),
        ("hmget", 1),
        ("hset", 1),
        ("time", 1),
    ];
    assert_eq!(
        stats,
        per_call
            .iter()
            .map(|(name, n)| (name.to_string(), n * calls))
            .collect::<BTreeMap<_, _>>(),
        "every command run for {calls} consumes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotad_bench_measures_quotad_raw_redis_and_the_seed_design() {
    let app = TestApp::spawn().await;
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_quotad"));
    bench
        .args([
            "bench",
            "--url",
            &app.base,
            "--users",
            "20",
            "--connections",
            "2",
            "--duration",
            "0.5",
        ])
        .args([
            "--runs",
            "2",
            "--seed",
            "--refused",
            "--redis-url",
            &app.redis_url,
        ])
        .args([
            "--database-url",
            &format!("{}/{}", app.postgres_url, app.db_name),
        ]);
    // The daemon runs on this test's runtime: wait for the bench off it.
    let out = tokio::task::spawn_blocking(move || bench.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);

    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "median: quotad HTTP consume",
        "median: raw Redis EVALSHA",
        "median: seed design",
        "median: quotad HTTP consume, refused (402)",
        "median ratio quotad / raw Redis",
        "median ratio refused / allowed",
    ] {
        let found = text
            .lines()
            .find(|l| l.starts_with(line) || l.trim_start().starts_with(line));
        assert!(found.is_some(), "no line {line:?} in:\n{text}");
    }
    let quotad = text
        .lines()
        .find(|l| l.starts_with("median: quotad HTTP consume"))
        .unwrap();
    assert!(quotad.ends_with("errors 0"), "{quotad}");
    let refused = text
        .lines()
        .find(|l| l.starts_with("median: quotad HTTP consume, refused"))
        .unwrap();
    assert!(refused.ends_with("errors 0"), "{refused}");
    let raw_redis = text
        .lines()
        .find(|l| l.starts_with("median: raw Redis EVALSHA"))
        .unwrap();
    assert!(raw_redis.ends_with("errors 0"), "{raw_redis}");
    // Under each figure, its cost per decision: quotad's CPU (the daemon listens in this
    // process), Redis' CPU and commands, and the commands by kind (the consume script is one
    // EVALSHA, whose own commands Redis counts too).
    let under = |head: &str| -> Vec<&str> {
        text.lines()
            .skip_while(|l| !l.starts_with(head))
            .skip(1)
            .take(2)
            .collect()
    };
    let http = under("median: quotad HTTP consume ");
    assert!(
        http[0].contains("per decision: quotad ") && http[0].contains("redis cmds"),
        "{http:?}"
    );
    let raw = under("median: raw Redis EVALSHA");
    assert!(
        raw[0].contains(" µs") && raw[0].contains("redis cmds"),
        "{raw:?}"
    );
    assert!(
        raw[1].starts_with("    redis commands per decision: ") && raw[1].contains("evalsha "),
        "{raw:?}"
    );
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'quotad_bench_seed_%'",
    )
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(schemas, 0, "the seed design's scratch schema is dropped");
}

#[tokio::test]
async fn quotad_bench_measures_redis_memory_per_active_user_month() {
    let redis_server = PrivateRedis::start();
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args(["bench", "--memory", "--users", "500"])
        .args(["--redis-url", &redis_server.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let bytes = |label: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} figure in:\n{text}"))
    };
    let flushed = bytes("bytes per active (user, month), after a flush:");
    let dirty = bytes("bytes per active (user, month), not yet flushed:");
    // Three counts, a version and a key cannot take less than 50 bytes; the dirty-set entry adds.
    assert!(flushed > 50.0, "{text}");
    assert!(dirty > flushed, "{text}");
    // Everything it wrote is removed.
    let mut conn = deadpool_redis::redis::Client::open(redis_server.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(keys, 0);
}

#[test]
fn quotad_bench_passes_its_arguments_through_and_says_how_to_build_a_missing_load_generator() {
    // Its arguments, --help included, are the load generator's.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("quotad-bench") && text.contains("--connections"),
        "{text}{}",
        String::from_utf8_lossy(&help.stderr)
    );

    // A quotad without quotad-bench beside it: exit 2, naming the path and how to build it.
    let dir = std::env::temp_dir().join(format!("quotad-alone-{}", Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).unwrap();
    let alone = dir.join("quotad");
    std::fs::copy(env!("CARGO_BIN_EXE_quotad"), &alone).unwrap();
    let out = std::process::Command::new(&alone)
        .args(["bench", "--users", "1"])
        .env("QUOTAD_LOG", "off")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot run {}",
            dir.join("quotad-bench").display()
        )) && err.contains("cargo build -p quotad-bench"),
        "{err}"
    );
}
