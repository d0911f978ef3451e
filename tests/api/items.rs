//! Calls with items: one consume (check, track) for several usage types, all or nothing. An
//! export that also costs 5 AI generations is counted only if both fit, in one atomic step; a
//! refused call counts nothing anywhere and its 402 names every item that did not fit.

use futures::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{tempfile_path, Answer, Options, PrivateRedis, TestApp};

/// FREE: ai_generation 50 (notify at 80 and 100 %), export 10, report 3 with 2 of overage,
/// kb_file (lifetime, fail closed) 20.
const PLANS: &str = r#"upgrade_url = "/settings/billing"
default_plan = "FREE"

[types]
ai_generation = { period = "month", notify = [80, 100] }
export        = { period = "month" }
report        = { period = "month" }
kb_file       = { period = "lifetime", fail = "closed" }

[plans.FREE]
ai_generation = 50
export        = 10
report        = { limit = 3, overage = 2 }
kb_file       = 20

[plans.PRO]
ai_generation = -1
export        = 1000
report        = -1
kb_file       = 1000
"#;

async fn spawn_with(opts: Options) -> (TestApp, tempfile_path::TempPath) {
    TestApp::spawn_with_plans(PLANS, opts).await
}

async fn spawn() -> (TestApp, tempfile_path::TempPath) {
    spawn_with(Options::default()).await
}

/// `action` with `items` (type, amount) for `user`, with `key` if given.
async fn call(
    app: &TestApp,
    action: &str,
    user: Uuid,
    items: &[(&str, u64)],
    key: Option<&str>,
) -> Answer {
    let items: Vec<Value> = items
        .iter()
        .map(|(t, a)| json!({"type": t, "amount": a}))
        .collect();
    let mut body = json!({"user_id": user, "items": items});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    app.post(&format!("/v1/{action}"), body).await
}

async fn consume(app: &TestApp, user: Uuid, items: &[(&str, u64)]) -> Answer {
    call(app, "consume", user, items, None).await
}

/// What the user has used of each type, from the usage read.
async fn used(app: &TestApp, user: Uuid) -> Vec<(String, u64)> {
    let a = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut out: Vec<(String, u64)> = a.body["usage"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, c)| (t.clone(), c["used"].as_u64().unwrap()))
        .collect();
    out.sort();
    out
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = ["ai_generation", "export", "kb_file", "report"]
        .iter()
        .map(|t| {
            let n = pairs.iter().find(|(p, _)| p == t).map_or(0, |(_, n)| *n);
            (t.to_string(), n)
        })
        .collect();
    all.sort();
    all
}

/// Postgres' count of each of the user's types, by type.
async fn pg_counts(app: &TestApp, user: Uuid) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT type, count FROM usage_tracking WHERE user_id = $1 ORDER BY type")
        .bind(user)
        .fetch_all(&app.db().await)
        .await
        .unwrap()
}

/// A single-type consume of `amount`.
async fn consume_one(app: &TestApp, user: Uuid, ty: &str, amount: u64) -> Answer {
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": ty, "amount": amount}),
    )
    .await
}

#[tokio::test]
async fn every_item_that_fits_is_counted_in_one_call_and_answered_in_the_order_sent() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let a = consume(
        &app,
        user,
        &[("export", 1), ("ai_generation", 5), ("kb_file", 2)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["allowed"], true);
    assert_eq!(a.body["user_id"], user.to_string());
    assert!(a.body.get("refused").is_none(), "{:?}", a.body);
    let items = a.body["items"].as_array().unwrap();
    let shown: Vec<(&str, u64, u64)> = items
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap(),
                i["used"].as_u64().unwrap(),
                i["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("export", 1, 9),
            ("ai_generation", 5, 45),
            ("kb_file", 2, 18)
        ]
    );
    assert!(items.iter().all(|i| i["allowed"] == true));
    // The monthly items carry their month; the lifetime one none.
    assert!(items[0]["period_start"].is_string());
    assert!(items[2]["period_start"].is_null());
    // No RateLimit headers: each item carries its own figures.
    assert_eq!(a.header("ratelimit-limit"), None);

    let b = consume(&app, user, &[("ai_generation", 1), ("export", 2)]).await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    assert_eq!(
        used(&app, user).await,
        counts(&[("ai_generation", 6), ("export", 3), ("kb_file", 2)])
    );

    // Durable like any count: the flusher writes every item's counter to Postgres.
    app.flush().await;
    let rows = pg_counts(&app, user).await;
    assert_eq!(
        rows,
        [
            ("ai_generation".to_owned(), 6),
            ("export".to_owned(), 3),
            ("kb_file".to_owned(), 2)
        ]
    );
}

#[tokio::test]
async fn one_item_that_does_not_fit_refuses_the_call_and_nothing_is_counted_anywhere() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    assert_eq!(consume_one(&app, user, "export", 9).await.status, 200);
    assert_eq!(consume_one(&app, user, "kb_file", 20).await.status, 200);
    let before = used(&app, user).await;

    // export has 1 left: 2 do not fit; the 5 generations would.
    let a = consume(&app, user, &[("ai_generation", 5), ("export", 2)]).await;
    assert_eq!(a.status, 402, "{:?}", a.body);
    assert_eq!(a.body["allowed"], false);
    assert_eq!(a.body["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(a.body["upgrade_url"], "/settings/billing");
    assert_eq!(a.body["refused"], json!(["export"]));
    let error = a.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("Nothing was counted: export does not fit."),
        "{error}"
    );
    assert!(
        error.contains("This request needs 2, and 1 remain."),
        "{error}"
    );
    let items = a.body["items"].as_array().unwrap();
    assert_eq!(items[0]["type"], "ai_generation");
    assert_eq!(items[0]["allowed"], true, "it fits: {:?}", items[0]);
    assert_eq!(items[0]["used"], 0, "and was not counted");
    assert!(items[0].get("code").is_none());
    assert_eq!(items[1]["type"], "export");
    assert_eq!(items[1]["allowed"], false);
    assert_eq!(items[1]["limited_by"], "user");
    assert_eq!(items[1]["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(items[1]["used"], 9);
    // The month resets both: Retry-After is the wait until then.
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 0 && wait <= 31 * 86_400, "{wait}");
    assert_eq!(used(&app, user).await, before);

    // Every item that does not fit is named; a lifetime item gives no Retry-After.
    let b = consume(
        &app,
        user,
        &[("export", 5), ("ai_generation", 1), ("kb_file", 1)],
    )
    .await;
    assert_eq!(b.status, 402, "{:?}", b.body);
    assert_eq!(b.body["refused"], json!(["export", "kb_file"]));
    let error = b.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("Nothing was counted: export and kb_file do not fit."),
        "{error}"
    );
    assert!(
        error.contains("Usage limit exceeded for kb_file."),
        "{error}"
    );
    assert_eq!(b.header("retry-after"), None);
    assert_eq!(used(&app, user).await, before);

    // What fits is still counted, on its own or together.
    let c = consume(&app, user, &[("export", 1), ("ai_generation", 1)]).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(
        used(&app, user).await,
        counts(&[("ai_generation", 1), ("export", 10), ("kb_file", 20)])
    );
}

#[tokio::test]
async fn check_with_items_decides_without_counting_and_track_counts_past_every_limit() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    assert_eq!(consume_one(&app, user, "export", 10).await.status, 200);

    let fits = call(&app, "check", user, &[("ai_generation", 50)], None).await;
    assert_eq!(fits.status, 200, "{:?}", fits.body);
    assert_eq!(fits.body["allowed"], true);
    assert_eq!(fits.body["items"][0]["over_limit"], false);
    let refused = call(
        &app,
        "check",
        user,
        &[("ai_generation", 1), ("export", 1)],
        None,
    )
    .await;
    assert_eq!(
        refused.status, 200,
        "check answers 200 either way: {:?}",
        refused.body
    );
    assert_eq!(refused.body["allowed"], false);
    assert_eq!(refused.body["refused"], json!(["export"]));
    assert!(refused.body.get("code").is_none());
    assert_eq!(
        used(&app, user).await,
        counts(&[("export", 10)]),
        "check counts nothing"
    );

    let tracked = call(&app, "track", user, &[("export", 4), ("report", 7)], None).await;
    assert_eq!(tracked.status, 200, "{:?}", tracked.body);
    assert_eq!(tracked.body["allowed"], true);
    assert_eq!(tracked.body["items"][0]["used"], 14);
    assert_eq!(tracked.body["items"][0]["over_limit"], true);
    // report allows 2 of overage: track's units past the limit are overage (past the cap too).
    assert_eq!(tracked.body["items"][1]["used"], 7);
    assert_eq!(tracked.body["items"][1]["overage"], 4);
    assert_eq!(tracked.body["items"][1]["overage_added"], 4);
    assert_eq!(
        used(&app, user).await,
        counts(&[("export", 14), ("report", 7)])
    );
}

#[tokio::test]
async fn an_item_past_its_limit_within_the_overage_cap_is_counted_as_overage() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let a = consume(&app, user, &[("report", 4), ("export", 1)]).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let report = &a.body["items"][0];
    assert_eq!(report["used"], 4);
    assert_eq!(report["overage"], 1);
    assert_eq!(report["overage_added"], 1);
    assert_eq!(report["over_limit"], true);
    // 3 + 2 = 5 in all: 2 more do not fit.
    let b = consume(&app, user, &[("report", 2), ("export", 1)]).await;
    assert_eq!(b.status, 402, "{:?}", b.body);
    assert_eq!(b.body["refused"], json!(["report"]));
    app.flush().await;
    let row: (i64, i64) = sqlx::query_as(
        "SELECT count, overage FROM usage_tracking WHERE user_id = $1 AND type = 'report'",
    )
    .bind(user)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(row, (4, 1));
}

#[tokio::test]
async fn one_key_covers_the_whole_call_and_its_refund_gives_every_item_back_once() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let items = [("ai_generation", 5), ("kb_file", 2)];
    let first = call(&app, "consume", user, &items, Some("export-7")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);

    // The same items in another order are the same call: its first answer, nothing counted.
    let again = call(
        &app,
        "consume",
        user,
        &[("kb_file", 2), ("ai_generation", 5)],
        Some("export-7"),
    )
    .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["items"][0]["type"], "kb_file");
    assert_eq!(again.body["items"][0]["used"], 2);
    assert_eq!(again.body["items"][1]["used"], 5);
    assert_eq!(
        used(&app, user).await,
        counts(&[("ai_generation", 5), ("kb_file", 2)])
    );

    // The key belongs to that call: other items, another mode, one type alone are refused.
    for (path, body) in [
        (
            "/v1/consume",
            json!({"user_id": user, "idempotency_key": "export-7", "items": [{"type": "ai_generation", "amount": 6}, {"type": "kb_file", "amount": 2}]}),
        ),
        (
            "/v1/consume",
            json!({"user_id": user, "idempotency_key": "export-7", "items": [{"type": "ai_generation", "amount": 5}]}),
        ),
        (
            "/v1/track",
            json!({"user_id": user, "idempotency_key": "export-7", "items": [{"type": "ai_generation", "amount": 5}, {"type": "kb_file", "amount": 2}]}),
        ),
        (
            "/v1/check",
            json!({"user_id": user, "idempotency_key": "export-7", "items": [{"type": "ai_generation", "amount": 5}, {"type": "kb_file", "amount": 2}]}),
        ),
        (
            "/v1/consume",
            json!({"user_id": user, "idempotency_key": "export-7", "type": "ai_generation", "amount": 5}),
        ),
    ] {
        let a = app.post(path, body.clone()).await;
        assert_eq!(a.status, 409, "{path} {body}: {:?}", a.body);
        assert_eq!(a.body["code"], "IDEMPOTENCY_KEY_REUSED", "{body}");
    }
    // And a key of a one-type call is not a call with items.
    let single = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "idempotency_key": "one"}),
        )
        .await;
    assert_eq!(single.status, 200);
    let a = call(&app, "consume", user, &[("export", 1)], Some("one")).await;
    assert_eq!(a.status, 409, "{:?}", a.body);
    assert_eq!(
        used(&app, user).await,
        counts(&[("ai_generation", 5), ("export", 1), ("kb_file", 2)])
    );

    // The refund gives back every item, the monthly and the lifetime one, once.
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "export-7"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(refund.body["user_id"], user.to_string());
    let given: Vec<(&str, u64, u64)> = refund.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap(),
                i["refunded"].as_u64().unwrap(),
                i["used"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(given, [("ai_generation", 5, 0), ("kb_file", 2, 0)]);
    assert_eq!(used(&app, user).await, counts(&[("export", 1)]));
    let twice = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "export-7"}),
        )
        .await;
    assert_eq!(twice.status, 409, "{:?}", twice.body);
    assert_eq!(twice.body["code"], "ALREADY_REFUNDED");
    // A retry of the refunded call does not count again under its old answer.
    let retried = call(&app, "consume", user, &items, Some("export-7")).await;
    assert_eq!(retried.status, 409, "{:?}", retried.body);
    assert_eq!(retried.body["code"], "IDEMPOTENCY_KEY_REFUNDED");
    assert_eq!(used(&app, user).await, counts(&[("export", 1)]));

    // A refused call is not remembered under its key: nothing to refund, and a retry that fits
    // later counts.
    assert_eq!(consume_one(&app, user, "export", 9).await.status, 200);
    let refused = call(&app, "consume", user, &[("export", 1)], Some("late")).await;
    assert_eq!(refused.status, 402);
    let nothing = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "late"}),
        )
        .await;
    assert_eq!(nothing.status, 404, "{:?}", nothing.body);

    // Postgres holds what Redis holds after the refund.
    app.flush().await;
    let rows = pg_counts(&app, user).await;
    assert_eq!(
        rows,
        [
            ("ai_generation".to_owned(), 0),
            ("export".to_owned(), 10),
            ("kb_file".to_owned(), 0)
        ]
    );
}

async fn put(app: &TestApp, path: &str, body: Value) -> Answer {
    app.send(reqwest::Method::PUT, path, Some(body), None).await
}

#[tokio::test]
async fn a_member_s_items_are_checked_against_the_account_s_pool_and_given_back_to_it() {
    let (app, _plans) = spawn().await;
    let account = Uuid::new_v4();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for user in [alice, bob] {
        let a = put(
            &app,
            &format!("/v1/users/{user}/account"),
            json!({"account_id": account}),
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let a = call(
        &app,
        "consume",
        alice,
        &[("export", 6), ("ai_generation", 1)],
        Some("a-1"),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["items"][0]["account"]["used"], 6);
    // The pool of 10 exports has 4 left: Bob's 5 do not fit, at the account's level.
    let b = consume(&app, bob, &[("export", 5), ("ai_generation", 1)]).await;
    assert_eq!(b.status, 402, "{:?}", b.body);
    assert_eq!(b.body["refused"], json!(["export"]));
    assert_eq!(b.body["items"][0]["limited_by"], "account");
    let error = b.body["error"].as_str().unwrap();
    assert!(error.contains("for all its members"), "{error}");
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(pool.status, 200, "{:?}", pool.body);
    assert_eq!(pool.body["usage"]["export"]["used"], 6);
    assert_eq!(pool.body["usage"]["ai_generation"]["used"], 1);

    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": alice, "idempotency_key": "a-1"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    let export = &refund.body["items"][1];
    assert_eq!(export["type"], "export");
    assert_eq!(export["account"]["used"], 0);
    assert_eq!(export["account"]["changed_by"], 6);
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(pool.body["usage"]["export"]["used"], 0);
    assert_eq!(pool.body["usage"]["ai_generation"]["used"], 0);
    // Now Bob's fit.
    let b = consume(&app, bob, &[("export", 5), ("ai_generation", 1)]).await;
    assert_eq!(b.status, 200, "{:?}", b.body);
}

#[tokio::test]
async fn bad_items_get_a_clear_error_naming_the_field_and_change_nothing() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let many: Vec<Value> = (0..33)
        .map(|_| json!({"type": "export", "amount": 1}))
        .collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"user_id": user}), "MISSING_FIELD", "type"),
        (
            json!({"user_id": user, "type": "export", "items": [{"type": "export"}]}),
            "INVALID_ITEMS",
            "type",
        ),
        (
            json!({"user_id": user, "amount": 2, "items": [{"type": "export"}]}),
            "INVALID_ITEMS",
            "amount",
        ),
        (
            json!({"user_id": user, "metadata": {"model": "m"}, "items": [{"type": "export"}]}),
            "INVALID_ITEMS",
            "metadata",
        ),
        (
            json!({"user_id": user, "items": []}),
            "INVALID_ITEMS",
            "items",
        ),
        (
            json!({"user_id": user, "items": many}),
            "INVALID_ITEMS",
            "items",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export"}, {"type": "ai_generation"}, {"type": "export", "amount": 2}]}),
            "INVALID_ITEMS",
            "items[2].type",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export"}, {"type": "gpu_hours"}]}),
            "UNKNOWN_TYPE",
            "items[1].type",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export\u{0000}"}]}),
            "UNKNOWN_TYPE",
            "items[0].type",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "amount": 0}]}),
            "INVALID_AMOUNT",
            "items[0].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "amount": -1}]}),
            "INVALID_AMOUNT",
            "items[0].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export"}, {"type": "ai_generation", "amount": 1.5}]}),
            "INVALID_AMOUNT",
            "items[1].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "amount": "5"}]}),
            "INVALID_AMOUNT",
            "items[0].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "amount": 1e300}]}),
            "INVALID_AMOUNT",
            "items[0].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "amount": 1000001}]}),
            "INVALID_AMOUNT",
            "items[0].amount",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export", "metadata": {}}]}),
            "UNKNOWN_FIELD",
            "items[0].metadata",
        ),
        (
            json!({"user_id": user, "items": {"type": "export"}}),
            "INVALID_FIELD",
            "items",
        ),
        (
            json!({"user_id": user, "items": [{"amount": 1}]}),
            "MISSING_FIELD",
            "type",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export"}], "plan": "GOLD"}),
            "UNKNOWN_PLAN",
            "plan",
        ),
        (
            json!({"user_id": user, "items": [{"type": "export"}], "idempotency_key": "a\u{0007}b"}),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
    ];
    for action in ["consume", "check", "track"] {
        for (body, code, field) in &cases {
            let a = app.post(&format!("/v1/{action}"), body.clone()).await;
            assert_eq!(a.status, 400, "{action} {body}: {:?}", a.body);
            assert_eq!(a.body["code"], *code, "{action} {body}: {:?}", a.body);
            assert_eq!(a.body["field"], *field, "{action} {body}: {:?}", a.body);
            let error = a.body["error"].as_str().unwrap();
            assert!(error.ends_with('.') && error.len() > 20, "{error}");
        }
    }
    let dup = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "items": [{"type": "export"}, {"type": "export", "amount": 2}]}),
        )
        .await;
    assert_eq!(
        dup.body["error"],
        "export appears more than once in items; send each type once, with the sum of its amounts."
    );
    assert_eq!(used(&app, user).await, counts(&[]), "nothing counted");
    // Half-sent and broken bodies change nothing either.
    let broken = app
        .post_raw(
            "/v1/consume",
            format!(r#"{{"user_id": "{user}", "items": [{{"type": "export""#),
        )
        .await;
    assert_eq!(broken.status, 400);
    assert_eq!(broken.body["code"], "MALFORMED_JSON");
    assert_eq!(used(&app, user).await, counts(&[]));
}

#[tokio::test]
async fn two_hundred_concurrent_calls_on_two_replicas_never_count_part_of_a_call_or_pass_a_limit() {
    let (app, plans) = spawn().await;
    let replica = TestApp::spawn_with(Options {
        replica_of: Some((app.prefix.clone(), app.db_name.clone())),
        plans: Some(plans.to_path_buf()),
        now: app.clock_now(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    // Loaded on both replicas before the race (the first call of each loads the counters).
    for target in [&app, &replica] {
        let a = consume(target, user, &[("export", 1), ("ai_generation", 2)]).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    // 100 calls with items (an export and 2 generations) and 100 single generations, mixed, on
    // both replicas: exports allow 10 (8 left), generations 50 (46 left).
    let calls = (0..200).map(|n| {
        let target = if n % 2 == 0 { &app } else { &replica };
        async move {
            if n % 4 < 2 {
                let a = consume(target, user, &[("export", 1), ("ai_generation", 2)]).await;
                (true, a)
            } else {
                (false, consume_one(target, user, "ai_generation", 1).await)
            }
        }
    });
    let answers = join_all(calls).await;
    let mut with_items = (2u64, 0u64);
    let mut singles = (0u64, 0u64);
    for (items, a) in &answers {
        let tally = if *items {
            &mut with_items
        } else {
            &mut singles
        };
        match a.status {
            200 => tally.0 += 1,
            402 => tally.1 += 1,
            other => panic!("unexpected {other}: {:?}", a.body),
        }
        if *items && a.status == 402 {
            assert!(
                a.body["refused"].as_array().is_some_and(|r| !r.is_empty()),
                "{:?}",
                a.body
            );
        }
    }
    let counted = used(&app, user).await;
    let export = counted.iter().find(|(t, _)| t == "export").unwrap().1;
    let ai = counted
        .iter()
        .find(|(t, _)| t == "ai_generation")
        .unwrap()
        .1;
    eprintln!(
        "calls with items: {} allowed, {} refused; single generations: {} allowed, {} refused; counted: export {export}, ai_generation {ai}",
        with_items.0, with_items.1, singles.0, singles.1
    );
    // Every allowed call with items counted both items; nothing else counted anything.
    assert_eq!(export, with_items.0);
    assert_eq!(ai, 2 * with_items.0 + singles.0);
    assert!(export <= 10 && ai <= 50, "export {export}, ai {ai}");
    assert_eq!(with_items.0 + with_items.1, 102);
    // Demand passes both limits: a call with items was refused only when one of its items no
    // longer fit, a single generation only when the generations ran out.
    assert!(export == 10 || ai >= 49, "export {export}, ai {ai}");
    assert!(singles.1 == 0 || ai == 50, "ai {ai}, singles {singles:?}");
    assert!(
        with_items.1 > 0 && singles.1 > 0,
        "{with_items:?} {singles:?}"
    );
    app.flush().await;
    let rows = pg_counts(&app, user).await;
    assert_eq!(
        rows,
        [
            ("ai_generation".to_owned(), ai as i64),
            ("export".to_owned(), export as i64)
        ]
    );
}

#[tokio::test]
async fn an_item_that_crosses_a_notify_threshold_records_its_event_once() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    // 40 of 50 generations is 80 %.
    let a = consume(&app, user, &[("export", 1), ("ai_generation", 40)]).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let b = consume(&app, user, &[("export", 1), ("ai_generation", 1)]).await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    // A refused call records nothing: 10 do not fit after 41.
    let c = consume(&app, user, &[("ai_generation", 10)]).await;
    assert_eq!(c.status, 402, "{:?}", c.body);
    app.flush().await;
    let events: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        r#"SELECT usage_type, threshold, used, "limit" FROM usage_events WHERE user_id = $1 ORDER BY threshold"#,
    )
    .bind(user)
    .fetch_all(&app.db().await)
    .await
    .unwrap();
    assert_eq!(events, [("ai_generation".to_owned(), 80, 40, 50)]);
    let d = consume(&app, user, &[("ai_generation", 9), ("export", 1)]).await;
    assert_eq!(d.status, 200, "{:?}", d.body);
    app.flush().await;
    let thresholds: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT threshold, used FROM usage_events WHERE user_id = $1 ORDER BY threshold",
    )
    .bind(user)
    .fetch_all(&app.db().await)
    .await
    .unwrap();
    assert_eq!(thresholds, [(80, 40), (100, 50)]);
}

#[tokio::test]
async fn with_redis_down_items_that_all_fail_open_are_degraded_and_any_fail_closed_item_is_503() {
    let mut redis = PrivateRedis::start();
    let (app, _plans) = spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    assert_eq!(
        consume(&app, user, &[("export", 1), ("ai_generation", 1)])
            .await
            .status,
        200
    );
    app.flush().await;

    redis.kill();
    let open = consume(&app, user, &[("export", 1), ("ai_generation", 1)]).await;
    assert_eq!(open.status, 200, "{:?}", open.body);
    assert_eq!(open.body["allowed"], true);
    assert_eq!(open.body["degraded"], true);
    for item in open.body["items"].as_array().unwrap() {
        assert_eq!(item["degraded"], true, "{item}");
        assert_eq!(item["used"], Value::Null, "{item}");
    }
    let closed = consume(&app, user, &[("export", 1), ("kb_file", 1)]).await;
    assert_eq!(closed.status, 503, "{:?}", closed.body);
    assert_eq!(closed.body["code"], "REDIS_UNAVAILABLE");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"quotad_item_calls_total{action="consume",outcome="degraded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"quotad_item_calls_total{action="consume",outcome="error"} 1"#),
        "{metrics}"
    );

    // Redis comes back empty: both periods' counters load from Postgres (the flusher wrote
    // them before) and counting goes on from there.
    redis.restart();
    let back = consume(&app, user, &[("kb_file", 1), ("export", 1)]).await;
    assert_eq!(back.status, 200, "{:?}", back.body);
    assert_eq!(back.body["degraded"], Value::Null);
    assert_eq!(back.body["items"][0]["used"], 1);
    assert_eq!(
        back.body["items"][1]["used"], 2,
        "loaded from Postgres: {:?}",
        back.body
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"quotad_item_calls_total{action="consume",outcome="allowed"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn corrupt_data_in_one_item_s_counter_stops_the_call_and_its_refund_before_either_writes() {
    use crate::script_contracts::{exists, hget, hset};
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let keys = app.state.quota.store.keys(user);
    let (month, life) = (
        keys.counter(crate::helpers::month_period(0)),
        keys.counter(quotad::period::Period::Lifetime),
    );
    let counted = call(
        &app,
        "consume",
        user,
        &[("ai_generation", 5), ("kb_file", 2)],
        Some("r"),
    )
    .await;
    assert_eq!(counted.status, 200, "{:?}", counted.body);

    // The lifetime counter's kb_file is not a number: a call with both items counts neither
    // (ai_generation is read and checked first, and would fit).
    hset(&app, &life, "kb_file", "x").await;
    let a = call(
        &app,
        "consume",
        user,
        &[("ai_generation", 1), ("kb_file", 1)],
        Some("s"),
    )
    .await;
    assert!(a.status >= 500, "{:?}", a.body);
    assert_eq!(
        hget(&app, &month, "ai_generation").await.as_deref(),
        Some("5")
    );
    assert!(
        !exists(&app, &keys.idempotency("s")).await,
        "nothing remembered"
    );

    // Its refund stops as well: ai_generation is not given back, the record stays unrefunded.
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "r"}),
        )
        .await;
    assert!(refund.status >= 500, "{:?}", refund.body);
    assert_eq!(
        hget(&app, &month, "ai_generation").await.as_deref(),
        Some("5")
    );
    assert_eq!(
        hget(&app, &keys.idempotency("r"), "r").await.as_deref(),
        Some("0")
    );

    // Mended by hand, the same refund gives back both.
    hset(&app, &life, "kb_file", "2").await;
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "r"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(used(&app, user).await, counts(&[]));
}
