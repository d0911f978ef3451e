//! A month's first requests: a counter starts from Redis alone, without a Postgres read, when
//! Redis provably lost nothing (its bucket's marker predates the month and last month's counter
//! is loaded); otherwise it is loaded from Postgres as before.

use deadpool_redis::redis;
use quotad::period::Period;
use uuid::Uuid;

use crate::helpers::{month_period, month_start, Options, PrivatePostgres, PrivateRedis, TestApp};

/// The month of the tests' default clock (the current real month); the new month is the next.
fn last_month() -> Period {
    month_period(0)
}

/// Whether an answer is a fail-open one (the field is left out when false).
fn degraded(body: &serde_json::Value) -> bool {
    body["degraded"] == true
}

#[tokio::test]
async fn a_new_month_starts_without_postgres_when_redis_lost_nothing() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        ..Options::default()
    })
    .await;
    // Active this month: their counters are loaded (and the buckets' markers set on the 15th).
    let (pro, free, upgraded, overtaken, new) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    for u in [pro, free, upgraded, overtaken] {
        assert_eq!(app.consume(u, "ai_generation").await.status, 200);
    }
    app.set_plan(pro, "PRO").await;
    app.set_at(month_start(1) + chrono::Duration::minutes(5));
    // Plan changes around midnight, before the users' first requests in the new month, that left
    // the two months' hashes holding different plans. A plan change writes every month's hash
    // that exists, so this happens only when changes race the new month's first write (two
    // replicas, clocks either side of midnight); it is written here directly, as such a race
    // leaves it, so that a fresh start must pick by version (pv):
    // `upgraded`: PRO (v1) last month, ENTERPRISE (v2) already in the new month's hash;
    // `overtaken`: PRO (v1) in the new month's hash, ENTERPRISE (v2) in last month's.
    {
        let store = &app.state.quota.store;
        let mut conn = app.redis().await;
        for (user, new_month, old_month) in [
            (upgraded, ("ENTERPRISE", 2), ("PRO", 1)),
            (overtaken, ("PRO", 1), ("ENTERPRISE", 2)),
        ] {
            for (months, (plan, pv)) in [(1, new_month), (0, old_month)] {
                let _: () = redis::cmd("HSET")
                    .arg(store.keys(user).counter(month_period(months)))
                    .arg("p")
                    .arg(plan)
                    .arg("pv")
                    .arg(pv)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
    let store = &app.state.quota.store;
    let mut conn = app.redis().await;
    for (user, new_month, old_month) in [
        (upgraded, ("ENTERPRISE", 2), ("PRO", 1)),
        (overtaken, ("PRO", 1), ("ENTERPRISE", 2)),
    ] {
        for (months, expected) in [(1, new_month), (0, old_month)] {
            let (p, pv): (String, i64) = redis::cmd("HMGET")
                .arg(store.keys(user).counter(month_period(months)))
                .arg("p")
                .arg("pv")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                (p.as_str(), pv),
                expected,
                "set-up of {user}, month +{months}"
            );
        }
    }

    // Postgres goes away: only counters that need no Postgres read can count.
    pg.stop("immediate");
    let a = app.consume(pro, "ai_generation").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(!degraded(&a.body), "{:?}", a.body);
    assert_eq!(a.body["used"], 1);
    assert_eq!(a.body["plan"], "PRO", "last month's plan carries over");
    // A check starts the counter fresh too (counting nothing), and the consume then counts in it.
    let c = app
        .post(
            "/v1/check",
            serde_json::json!({"user_id": free, "type": "ai_generation"}),
        )
        .await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert!(!degraded(&c.body), "{:?}", c.body);
    assert_eq!(
        (c.body["used"].as_u64(), c.body["allowed"].as_bool()),
        (Some(0), Some(true))
    );
    let f = app.consume(free, "ai_generation").await;
    assert!(!degraded(&f.body), "{:?}", f.body);
    assert_eq!(f.body["used"], 1);
    assert_eq!(f.body["plan"], "FREE");
    let u = app.consume(upgraded, "ai_generation").await;
    assert!(!degraded(&u.body), "{:?}", u.body);
    assert_eq!(
        u.body["plan"], "ENTERPRISE",
        "the new month's newer plan (v2) is kept over last month's (v1): {:?}",
        u.body
    );
    let o = app.consume(overtaken, "ai_generation").await;
    assert!(!degraded(&o.body), "{:?}", o.body);
    assert_eq!(
        o.body["plan"], "ENTERPRISE",
        "last month's newer plan (v2) replaces the new month's older one (v1): {:?}",
        o.body
    );
    // Not active last month: Postgres might hold its plan, so it must be asked. It is down, and
    // ai_generation fails open.
    let n = app.consume(new, "ai_generation").await;
    assert_eq!(n.status, 200);
    assert!(degraded(&n.body), "{:?}", n.body);

    // Lifetime counters never start fresh.
    let k = app.consume(pro, "kb_file").await;
    assert_eq!(k.status, 503, "kb_file fails closed: {:?}", k.body);

    pg.resume();
    app.flush().await;
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT user_id, count FROM usage_tracking WHERE type = 'ai_generation' AND period_start = $1 ORDER BY user_id",
    )
    .bind(month_start(1))
    .fetch_all(&app.db().await)
    .await
    .unwrap();
    let mut expected = vec![(pro, 1), (free, 1), (upgraded, 1), (overtaken, 1)];
    expected.sort();
    assert_eq!(rows, expected);
}

#[tokio::test]
async fn a_month_that_began_before_the_marker_is_loaded_from_postgres() {
    let mut redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let user = Uuid::new_v4();
    app.consume(user, "ai_generation").await;
    app.set_at(month_start(1) + chrono::Duration::hours(24 + 9));
    for _ in 0..3 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    app.flush().await;

    // Redis restarts empty on the 3rd of the new month, losing the marker with everything else.
    // Last month's counter is put back by hand, so only the marker can tell that the new month's
    // may be lost.
    redis_server.restart();
    let restarted_at = month_start(1) + chrono::Duration::hours(48 + 9);
    app.set_at(restarted_at);
    let mut conn = app.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(app.state.quota.store.keys(user).counter(last_month()))
        .arg("v")
        .arg(1)
        .arg("ai_generation")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut answer = app.consume(user, "ai_generation").await;
    for _ in 0..100 {
        if !degraded(&answer.body) {
            break;
        }
        // The daemon's connection notices the restart on its first call.
        answer = app.consume(user, "ai_generation").await;
    }
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.body["used"], 4,
        "loaded from Postgres (3), then counted: {:?}",
        answer.body
    );
    let since: Option<i64> = redis::cmd("GET")
        .arg(app.state.quota.store.keys(user).since())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        since,
        Some(restarted_at.timestamp_millis()),
        "the load set a new marker; the month after may start fresh, this one may not"
    );
}
