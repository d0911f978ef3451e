//! Write-through to Postgres: the flusher, metadata sums, version guards, hydration after Redis
//! loses data, graceful shutdown, migrations over the original table, and reconcile.

use deadpool_redis::redis;
use quotad::db::{self, Totals};
use quotad::period::Period;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{month_period, month_start, period_id, PrivateRedis, TestApp};

/// The current real month: the month of every test's default clock.
fn this_month() -> Period {
    month_period(0)
}

async fn row(app: &TestApp, user: Uuid, ty: &str) -> Option<(i64, serde_json::Value, i64)> {
    sqlx::query_as(
        "SELECT count, metadata, version FROM usage_tracking WHERE user_id = $1 AND type = $2",
    )
    .bind(user)
    .bind(ty)
    .fetch_optional(&app.db().await)
    .await
    .unwrap()
}

async fn dirty_count(app: &TestApp) -> u64 {
    let mut r = app.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:dirty", app.prefix))
        .query_async(&mut r)
        .await
        .unwrap();
    let mut n = 0;
    for k in keys {
        n += redis::cmd("ZCARD")
            .arg(k)
            .query_async::<u64>(&mut r)
            .await
            .unwrap();
    }
    n
}

#[tokio::test]
async fn the_flusher_writes_absolute_totals_and_summed_metadata_then_clears_the_dirty_mark() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for (p, c, model) in [(812, 240, "m-1"), (100, 60, "m-2")] {
        let meta =
            json!({"prompt_tokens": p, "completion_tokens": c, "model": model, "cost": 0.25});
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "metadata": meta}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    app.post(
        "/v1/track",
        json!({"user_id": user, "type": "kb_file", "amount": 3}),
    )
    .await;
    assert_eq!(
        dirty_count(&app).await,
        2,
        "one month counter and one lifetime counter"
    );

    app.flush().await;

    let (count, metadata, version) = row(&app, user, "ai_generation").await.expect("row written");
    assert_eq!(count, 2);
    assert_eq!(
        metadata,
        json!({"prompt_tokens": 912, "completion_tokens": 300, "model": "m-2", "cost": 0.5})
    );
    assert_eq!(version, 2);
    let (period_start, period_end): (chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT period_start, period_end FROM usage_tracking WHERE user_id = $1 AND type = 'ai_generation'")
            .bind(user)
            .fetch_one(&app.db().await)
            .await
            .unwrap();
    assert_eq!(period_start, month_start(0));
    assert_eq!(period_end, Some(month_start(1)));
    assert_eq!(row(&app, user, "kb_file").await.map(|r| r.0), Some(3));
    assert_eq!(dirty_count(&app).await, 0);
    let again = app.flusher.flush_once().await.unwrap();
    assert_eq!(
        (again.counters, again.rows),
        (0, 0),
        "nothing left to write"
    );
}

#[tokio::test]
async fn metadata_names_per_counter_are_bounded_and_the_refused_call_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let max = quotad::store::MAX_METADATA_NAMES;
    for batch in 0..max / 16 {
        let meta: serde_json::Map<String, serde_json::Value> = (0..16)
            .map(|i| (format!("k{}", batch * 16 + i), json!(1)))
            .collect();
        let a = app
            .post(
                "/v1/track",
                json!({"user_id": user, "type": "export", "metadata": meta}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }

    let one_more = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "export", "metadata": {"new": 1}}),
        )
        .await;
    let known = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "export", "metadata": {"k0": 5}}),
        )
        .await;

    assert_eq!(
        (one_more.status, &one_more.body["code"]),
        (400, &json!("TOO_MANY_METADATA_KEYS"))
    );
    assert_eq!(known.status, 200, "names the counter has are still taken");
    assert_eq!(app.used(user, "export").await, (max / 16) as u64 + 1);
}

#[tokio::test]
async fn an_older_total_never_overwrites_a_newer_one() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let user = Uuid::new_v4();
    let write = |count: i64, version: i64| {
        let mut t = Totals::default();
        t.push(
            user,
            "export".into(),
            count,
            this_month(),
            json!({}),
            version,
        );
        t
    };

    db::upsert_totals(&db, db::Table::Users, &write(10, 5))
        .await
        .unwrap();
    let late = db::upsert_totals(&db, db::Table::Users, &write(7, 3))
        .await
        .unwrap();
    let same = db::upsert_totals(&db, db::Table::Users, &write(9, 5))
        .await
        .unwrap();
    assert_eq!((late, same), (0, 0), "nothing written");
    assert_eq!(
        row(&app, user, "export").await.map(|r| (r.0, r.2)),
        Some((10, 5))
    );

    db::upsert_totals(&db, db::Table::Users, &write(11, 6))
        .await
        .unwrap();
    assert_eq!(
        row(&app, user, "export").await.map(|r| (r.0, r.2)),
        Some((11, 6))
    );
}

#[tokio::test]
async fn a_count_that_arrives_during_a_flush_stays_dirty_and_is_written_next_time() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.consume(user, "export").await;
    let store = quotad::store::RedisStore::new(
        &app.redis_url,
        &app.prefix,
        std::time::Duration::from_secs(2),
    )
    .unwrap();

    // One flush, by hand, with a consume between reading the counter and unmarking it.
    let scan = store
        .scan_dirty(0..quotad::store::BUCKETS, 64)
        .await
        .unwrap();
    assert_eq!(scan.members.len(), 1);
    let read = store.read_dirty(&scan.members).await.unwrap();
    let version: i64 = read[0].version.unwrap();
    let mut totals = Totals::default();
    totals.push(
        user,
        "export".into(),
        read[0].count("export"),
        this_month(),
        json!({}),
        version,
    );
    db::upsert_totals(&app.db().await, db::Table::Users, &totals)
        .await
        .unwrap();
    app.consume(user, "export").await;
    let removed = store
        .unmark(&[(&scan.members[0], Some(version))])
        .await
        .unwrap();

    assert_eq!(
        removed, 0,
        "the counter changed after it was read, so it stays dirty"
    );
    assert_eq!(row(&app, user, "export").await.map(|r| r.0), Some(1));
    app.flush().await;
    assert_eq!(row(&app, user, "export").await.map(|r| r.0), Some(2));
}

#[tokio::test]
async fn after_redis_loses_everything_a_user_at_50_of_50_is_still_refused() {
    let mut redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let user = Uuid::new_v4();
    app.set_plan(Uuid::new_v4(), "PRO").await;
    for _ in 0..50 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "kb_file", "amount": 20}),
    )
    .await;
    app.flush().await;

    let mut r = app.redis().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();
    let after_flushall = app.consume(user, "ai_generation").await;
    assert_eq!(
        (after_flushall.status, &after_flushall.body["used"]),
        (402, &json!(50))
    );

    redis_server.restart();
    let after_restart = app.consume(user, "ai_generation").await;
    let kb = app.consume(user, "kb_file").await;
    assert_eq!(
        (after_restart.status, &after_restart.body["used"]),
        (402, &json!(50))
    );
    assert_eq!((kb.status, &kb.body["used"]), (402, &json!(20)));
    assert_eq!(app.used(user, "ai_generation").await, 50);
}

#[tokio::test]
async fn a_plan_survives_redis_losing_everything() {
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let user = Uuid::new_v4();
    app.set_plan(user, "PRO").await;
    app.consume(user, "export").await;

    let mut r = app.redis().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();

    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 20}),
        )
        .await;
    assert_eq!((a.status, &a.body["plan"]), (200, &json!("PRO")));
}

#[tokio::test]
async fn stopping_the_daemon_flushes_everything_dirty() {
    let mut app = TestApp::spawn().await;
    let users: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    for (i, u) in users.iter().enumerate() {
        app.post(
            "/v1/track",
            json!({"user_id": u, "type": "export", "amount": i + 1}),
        )
        .await;
    }
    let db = app.db().await;
    let db_name = app.db_name.clone();

    app.stop().await.expect("a clean stop");

    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT user_id, count FROM usage_tracking WHERE type = 'export'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(rows.len(), 25, "in {db_name}");
    for (u, c) in rows {
        let i = users.iter().position(|x| *x == u).unwrap();
        assert_eq!(c as usize, i + 1);
    }
}

#[tokio::test]
async fn migrations_upgrade_the_original_usage_tracking_table_and_keep_its_rows() {
    let name = format!("quotad_t_{}", &Uuid::new_v4().simple().to_string()[..16]);
    let server = crate::helpers::postgres_url();
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let seed = sqlx::PgPool::connect(&format!("{server}/{name}"))
        .await
        .unwrap();
    // The original product's table (migration 20251030), with a row of its own: this month's,
    // ending (as the original product wrote it) on the month's last day.
    let (start, last_day) = (
        month_start(0).format("%Y-%m-%dT%H:%M:%SZ"),
        (month_start(1) - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ"),
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE public.usage_tracking (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid NOT NULL,
            type text NOT NULL,
            count integer NOT NULL DEFAULT 0,
            period_start timestamptz NOT NULL,
            period_end timestamptz NOT NULL,
            metadata jsonb DEFAULT '{{}}'::jsonb,
            created_at timestamptz DEFAULT now(),
            updated_at timestamptz DEFAULT now(),
            UNIQUE (user_id, type, period_start));
         INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, metadata)
         VALUES ('7c9e6679-7425-40de-944b-e07fc1f90ae7', 'ai_generation', 30,
                 '{start}', '{last_day}', NULL);",
    )))
    .execute(&seed)
    .await
    .unwrap();
    seed.close().await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
        .arg("migrate")
        .env("QUOTAD_DATABASE_URL", format!("{server}/{name}"))
        .output()
        .unwrap();
    let upgraded = sqlx::PgPool::connect(&format!("{server}/{name}"))
        .await
        .unwrap();
    let kept: (i64, i64, String) = sqlx::query_as(
        "SELECT count, version, pg_typeof(count)::text FROM usage_tracking WHERE user_id = '7c9e6679-7425-40de-944b-e07fc1f90ae7'",
    )
    .fetch_one(&upgraded)
    .await
    .unwrap();
    let unique_indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'usage_tracking'::regclass AND indisunique AND NOT indisprimary",
    )
    .fetch_one(&upgraded)
    .await
    .unwrap();
    // Its NULL metadata loads as none.
    let user: Uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
    let snap = db::snapshot(&upgraded, quotad::store::Owner::User(user), this_month()).await;
    upgraded.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kept, (30, 0, "bigint".to_owned()));
    assert_eq!(
        unique_indexes, 1,
        "the original unique constraint serves; no second index"
    );
    let snap = snap.expect("the original rows load");
    assert_eq!(
        snap.fields,
        vec![("ai_generation".to_owned(), "30".to_owned())]
    );
}

#[tokio::test]
async fn a_seeded_count_is_where_counting_continues() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, metadata)
         VALUES ($1, 'ai_generation', 30, $2, $3, '{}')",
    )
    .bind(user)
    .bind(month_start(0))
    .bind(month_start(1) - chrono::Duration::days(1))
    .execute(&app.db().await)
    .await
    .unwrap();

    let a = app.consume(user, "ai_generation").await;
    app.flush().await;

    assert_eq!(a.body["used"], 31);
    assert_eq!(
        row(&app, user, "ai_generation").await.map(|r| (r.0, r.2)),
        Some((31, 1))
    );
}

#[tokio::test]
async fn reconcile_reports_each_kind_of_drift_and_repair_makes_the_sides_agree() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let [synced, unflushed, pg_only, different, redis_only] = [(); 5].map(|_| Uuid::new_v4());
    for u in [synced, different, redis_only] {
        app.consume(u, "ai_generation").await;
    }
    app.flush().await;
    app.consume(unflushed, "ai_generation").await;
    // Postgres-only: a row for a user Redis has never loaded (not drift: loaded on first use).
    sqlx::query("INSERT INTO usage_tracking (user_id, type, count, period_start, period_end, version) VALUES ($1, 'ai_generation', 4, $2, $3, 2)")
        .bind(pg_only).bind(month_start(0)).bind(month_start(1)).execute(&db).await.unwrap();
    // Different: Postgres changed behind quotad's back (same version, another count).
    sqlx::query("UPDATE usage_tracking SET count = 9 WHERE user_id = $1")
        .bind(different)
        .execute(&db)
        .await
        .unwrap();
    // Redis-only: Postgres lost the row after it was flushed.
    sqlx::query("DELETE FROM usage_tracking WHERE user_id = $1")
        .bind(redis_only)
        .execute(&db)
        .await
        .unwrap();

    let report = app
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;

    assert_eq!(report.status, 200, "{:?}", report.body);
    let b = &report.body;
    assert_eq!(
        (
            &b["period"],
            &b["in_sync"],
            &b["unflushed"],
            &b["not_loaded"]
        ),
        (&json!(period_id(0)), &json!(1), &json!(1), &json!(1))
    );
    let kind_of = |u: Uuid| {
        b["drift"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["user_id"] == json!(u))
            .map(|d| d["kind"].clone())
    };
    assert_eq!(kind_of(pg_only), None);
    assert_eq!(kind_of(different), Some(json!("different")));
    assert_eq!(kind_of(redis_only), Some(json!("missing_in_postgres")));
    assert_eq!(b["drift"].as_array().unwrap().len(), 2);

    let repaired = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": period_id(0), "repair": true}),
        )
        .await;
    assert_eq!(
        (&repaired.body["repaired"], &repaired.body["loaded"]),
        (&json!(2), &json!(1)),
        "{:?}",
        repaired.body
    );
    app.flush().await;
    let after = app
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;
    assert_eq!(after.body["drift"], json!([]), "{:?}", after.body);
    assert_eq!(
        app.used(pg_only, "ai_generation").await,
        4,
        "loaded from Postgres on first use"
    );
    assert_eq!(
        row(&app, different, "ai_generation").await.map(|r| r.0),
        Some(1),
        "Redis' count won"
    );
    assert_eq!(
        row(&app, redis_only, "ai_generation").await.map(|r| r.0),
        Some(1)
    );
}

#[tokio::test]
async fn reconcile_refuses_a_bad_period() {
    let app = TestApp::spawn().await;

    let a = app
        .post("/v1/admin/reconcile", json!({"period": "November"}))
        .await;

    assert_eq!(
        (a.status, &a.body["code"], &a.body["field"]),
        (400, &json!("INVALID_PERIOD"), &json!("period"))
    );
}

/// Every field of a Redis hash.
async fn hash_fields(app: &TestApp, key: &str) -> std::collections::BTreeMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_counter_reloaded_after_redis_loses_everything_has_postgres_version_and_metadata() {
    let mut redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let user = Uuid::new_v4();
    app.set_plan(user, "PRO").await;
    for (i, (tokens, model)) in [(812, "m-1"), (100, "m-2"), (5, "m-2")]
        .into_iter()
        .enumerate()
    {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "idempotency_key": format!("k{i}"),
                       "metadata": {"prompt_tokens": tokens, "cost": 0.25, "model": model}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    // A refund: the version (4) is no longer the count (2), so a load that took one for the
    // other shows.
    let r = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "k2"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.post(
        "/v1/track",
        json!({"user_id": user, "type": "kb_file", "amount": 3, "metadata": {"bytes": 1.5e6, "kind": "pdf"}}),
    )
    .await;
    let store = &app.state.quota.store;
    let keys = [
        store.keys(user).counter(this_month()),
        store.keys(user).counter(Period::Lifetime),
    ];

    for loss in ["FLUSHALL", "restart"] {
        app.flush().await;
        let mut flushed = vec![];
        for k in &keys {
            flushed.push(hash_fields(&app, k).await);
        }
        let (pg_count, _, pg_version) = row(&app, user, "ai_generation").await.unwrap();
        assert_eq!(
            (pg_count.to_string(), pg_version.to_string()),
            (flushed[0]["ai_generation"].clone(), flushed[0]["v"].clone()),
            "{loss}: Postgres holds the count and version Redis had"
        );
        if loss == "FLUSHALL" {
            assert_eq!((pg_count, pg_version), (2, 4));
            // The hashes hold what the reload must bring back (so the comparison below is not
            // between two empty maps).
            let (m, life) = (&flushed[0], &flushed[1]);
            assert_eq!(m["m:ai_generation:prompt_tokens"], "917");
            assert_eq!(m["m:ai_generation:cost"], "0.75");
            assert_eq!(m["s:ai_generation:model"], "\"m-2\"");
            assert_eq!((m["p"].as_str(), life["p"].as_str()), ("PRO", "PRO"));
            assert_eq!(life["m:kb_file:bytes"], "1500000");
            assert_eq!(life["s:kb_file:kind"], "\"pdf\"");
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut app.redis().await)
                .await
                .unwrap();
        } else {
            redis_server.restart();
        }
        for k in &keys {
            assert!(hash_fields(&app, k).await.is_empty(), "{loss}: {k} is gone");
        }

        // One more count of each reloads both hashes from Postgres and counts once in them.
        let mut a = app.consume(user, "ai_generation").await;
        for _ in 0..100 {
            if a.body["degraded"] != true {
                break;
            }
            // The daemon's connection notices a restart on its first call.
            a = app.consume(user, "ai_generation").await;
        }
        let k = app.consume(user, "kb_file").await;
        assert_eq!(
            (a.status, a.body["used"].as_i64()),
            (200, Some(pg_count + 1)),
            "{loss}: {:?}",
            a.body
        );
        assert_eq!(k.status, 200, "{loss}: {:?}", k.body);

        for (key, before) in keys.iter().zip(&flushed) {
            let ty = if key.ends_with(":life") {
                "kb_file"
            } else {
                "ai_generation"
            };
            let count: u64 = before[ty].parse().unwrap();
            let version: u64 = before["v"].parse().unwrap();
            let mut expected = before.clone();
            expected.insert(ty.to_owned(), (count + 1).to_string());
            // The version goes on from Postgres' (not from 0), so the next flush is taken.
            expected.insert("v".to_owned(), (version + 1).to_string());
            // And the count marked the counter dirty (the flag that mirrors the dirty set).
            expected.insert("x:dirty".to_owned(), "1".to_owned());
            assert_eq!(
                hash_fields(&app, key).await,
                expected,
                "{loss}: {key} holds what was flushed (v, plan, m:/s:/n: fields), counted once more"
            );
        }
    }
}
