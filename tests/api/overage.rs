//! Overage and soft limits: a plan's type may allow use past its limit up to a cap
//! (`{ limit = 50, overage = 100 }`: 150 in all) or without one (`{ limit = 10, soft = true }`).
//! Units counted past the limit are overage: in every answer, in the counter hash, in Postgres'
//! `overage` column, loaded back after Redis loses everything, given back first by a refund.

use deadpool_redis::redis;
use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{tempfile_path, Answer, Options, PrivatePostgres, PrivateRedis, TestApp};

/// FREE: ai_generation 50 with 100 of overage, export a soft limit of 10, kb_file (lifetime) 20
/// with 5 of overage, report a hard limit of 5.
const PLANS: &str = r#"upgrade_url = "/settings/billing"
default_plan = "FREE"

[types]
ai_generation = { period = "month" }
export        = { period = "month" }
kb_file       = { period = "lifetime", fail = "closed" }
report        = { period = "month" }

[plans.FREE]
ai_generation = { limit = 50, overage = 100 }
export        = { limit = 10, soft = true }
kb_file       = { limit = 20, overage = 5 }
report        = 5

[plans.PRO]
ai_generation = -1
export        = { limit = 1000, overage = 10 }
kb_file       = 1000
report        = -1
"#;

async fn spawn_with(plans: &str, opts: Options) -> (TestApp, tempfile_path::TempPath) {
    TestApp::spawn_with_plans(plans, opts).await
}

async fn spawn() -> (TestApp, tempfile_path::TempPath) {
    spawn_with(PLANS, Options::default()).await
}

/// `action` (consume, check, track) of `amount` of `ty` for `user`, with `key` if given.
async fn call(
    app: &TestApp,
    action: &str,
    user: Uuid,
    ty: &str,
    amount: u64,
    key: Option<&str>,
) -> Answer {
    let mut body = json!({"user_id": user, "type": ty, "amount": amount});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    app.post(&format!("/v1/{action}"), body).await
}

async fn consume(app: &TestApp, user: Uuid, ty: &str, amount: u64) -> Answer {
    call(app, "consume", user, ty, amount, None).await
}

/// The user's usage read of `ty`.
async fn usage_of(app: &TestApp, user: Uuid, ty: &str) -> Value {
    let a = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["usage"][ty].clone()
}

/// Postgres' (count, overage) of the user's `ty` row (the latest period's).
async fn pg_row(app: &TestApp, table: &str, owner: Uuid, ty: &str) -> Option<(i64, i64)> {
    let column = if table == "account_usage" {
        "account_id"
    } else {
        "user_id"
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count, overage FROM {table} WHERE {column} = $1 AND type = $2 ORDER BY period_start DESC LIMIT 1"
    )))
    .bind(owner)
    .bind(ty)
    .fetch_optional(&app.db().await)
    .await
    .unwrap()
}

#[tokio::test]
async fn limit_50_with_overage_100_lets_150_through_and_refuses_the_151st_with_402() {
    let (app, _plans) = spawn().await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();

    for n in 1..=150u64 {
        let a = app.consume(user, "ai_generation").await;
        assert_eq!(a.status, 200, "consume {n}: {:?}", a.body);
        let b = &a.body;
        assert_eq!(b["used"], n);
        assert_eq!(b["limit"], 50);
        assert_eq!(b["remaining"], 50u64.saturating_sub(n), "before the limit");
        assert_eq!(b["overage_cap"], 100);
        assert_eq!(b["overage"], n.saturating_sub(50), "consume {n}");
        assert_eq!(b["overage_added"], u64::from(n > 50), "consume {n}");
        assert_eq!(b["over_limit"], n > 50, "consume {n}");
        // The RateLimit headers say when a consume is refused: past limit + cap.
        assert_eq!(a.header("ratelimit-limit"), Some("150"));
        assert_eq!(
            a.header("ratelimit-remaining"),
            Some((150 - n).to_string().as_str())
        );
    }
    let refused = app.consume(user, "ai_generation").await;
    let again = app.consume(user, "ai_generation").await;

    assert_eq!(refused.status, 402, "{:?}", refused.body);
    let b = &refused.body;
    assert_eq!(b["allowed"], false);
    assert_eq!(b["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(
        (&b["used"], &b["overage"], &b["remaining"]),
        (&json!(150), &json!(100), &json!(0))
    );
    assert_eq!(
        (&b["over_limit"], &b["overage_added"]),
        (&json!(false), &json!(0))
    );
    assert_eq!(
        b["error"],
        "Usage limit exceeded for ai_generation. Your FREE plan allows 50 per month, and 100 more as overage. You've used 150."
    );
    assert_eq!(refused.header("ratelimit-limit"), Some("150"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert!(refused.header("retry-after").is_some());
    // The second refusal comes from the refusal cache, with the same figures.
    assert_eq!(app.state.quota.refusals.users(), 1);
    assert_eq!((again.status, &again.body), (402, &refused.body));
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["overage"]),
        (&json!(150), &json!(100)),
        "a refused consume counts nothing"
    );
}

#[tokio::test]
async fn only_the_units_past_the_limit_are_overage_and_an_amount_past_the_cap_is_refused_whole() {
    let (app, _plans) = spawn().await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();

    let first = consume(&app, user, "ai_generation", 48).await;
    let straddling = consume(&app, user, "ai_generation", 5).await;
    let too_much = consume(&app, user, "ai_generation", 98).await;
    // Remembered as refused at 53: a smaller amount that fits must still go to Redis.
    let fits = consume(&app, user, "ai_generation", 97).await;
    let one_more = consume(&app, user, "ai_generation", 1).await;

    assert_eq!(
        (&first.body["overage"], &first.body["over_limit"]),
        (&json!(0), &json!(false))
    );
    assert_eq!(straddling.status, 200);
    assert_eq!(
        (
            &straddling.body["used"],
            &straddling.body["overage_added"],
            &straddling.body["overage"],
            &straddling.body["over_limit"]
        ),
        (&json!(53), &json!(3), &json!(3), &json!(true)),
        "used 48 of 50, 5 more: 3 past the limit"
    );
    assert_eq!(too_much.status, 402);
    assert_eq!(too_much.body["used"], 53, "refused whole: nothing counted");
    assert!(
        too_much.body["error"]
            .as_str()
            .unwrap()
            .ends_with("This request needs 98, and 97 remain."),
        "{:?}",
        too_much.body
    );
    assert_eq!(fits.status, 200, "{:?}", fits.body);
    assert_eq!(
        (
            &fits.body["used"],
            &fits.body["overage_added"],
            &fits.body["overage"]
        ),
        (&json!(150), &json!(97), &json!(100))
    );
    assert_eq!(one_more.status, 402);
}

#[tokio::test]
async fn a_soft_limit_never_refuses_and_flags_every_unit_past_it() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();

    for n in 1..=25u64 {
        let a = app.consume(user, "export").await;
        assert_eq!(a.status, 200, "consume {n}: {:?}", a.body);
        assert_eq!(a.body["overage"], n.saturating_sub(10));
        assert_eq!(a.body["over_limit"], n > 10);
        assert_eq!(a.body["overage_cap"], Value::Null, "no cap");
        assert_eq!(a.body["limit"], 10);
        // Nothing refuses: no limit to announce, as for an unlimited type.
        assert!(a.header("ratelimit-limit").is_none(), "{:?}", a.headers);
        assert!(a.header("ratelimit-remaining").is_none());
        assert!(a.header("ratelimit-reset").is_some());
    }
    let most = consume(&app, user, "export", 1_000_000).await;
    let check = call(&app, "check", user, "export", 7, None).await;

    assert_eq!(most.status, 200, "{:?}", most.body);
    assert_eq!(
        (
            &most.body["used"],
            &most.body["overage"],
            &most.body["overage_added"]
        ),
        (&json!(1_000_025), &json!(1_000_015), &json!(1_000_000))
    );
    assert_eq!(
        (
            &check.body["allowed"],
            &check.body["over_limit"],
            &check.body["overage_added"],
            &check.body["used"]
        ),
        (&json!(true), &json!(true), &json!(7), &json!(1_000_025))
    );
    assert_eq!(usage_of(&app, user, "export").await["overage"], 1_000_015);
}

#[tokio::test]
async fn check_says_what_a_consume_would_add_and_counts_nothing() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 40).await;

    let within = call(&app, "check", user, "ai_generation", 10, None).await;
    let past = call(&app, "check", user, "ai_generation", 25, None).await;
    let beyond = call(&app, "check", user, "ai_generation", 111, None).await;

    assert_eq!(
        (
            &within.body["allowed"],
            &within.body["over_limit"],
            &within.body["overage_added"]
        ),
        (&json!(true), &json!(false), &json!(0))
    );
    assert_eq!(
        (
            &past.body["allowed"],
            &past.body["over_limit"],
            &past.body["overage_added"]
        ),
        (&json!(true), &json!(true), &json!(15))
    );
    assert_eq!(past.header("ratelimit-remaining"), Some("110"));
    assert_eq!(beyond.status, 200, "check is 200 either way");
    assert_eq!(
        (
            &beyond.body["allowed"],
            &beyond.body["over_limit"],
            &beyond.body["overage_added"]
        ),
        (&json!(false), &json!(false), &json!(0))
    );
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!((&usage["used"], &usage["overage"]), (&json!(40), &json!(0)));
}

#[tokio::test]
async fn postgres_keeps_the_overage_per_counter_after_a_flush() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 60).await;
    consume(&app, user, "export", 12).await;
    consume(&app, user, "kb_file", 22).await;
    consume(&app, user, "report", 5).await;
    // Track counts past a hard limit, but the plan sells no overage there.
    let tracked = call(&app, "track", user, "report", 3, None).await;
    assert_eq!(
        (
            &tracked.body["used"],
            &tracked.body["overage"],
            &tracked.body["over_limit"]
        ),
        (&json!(8), &json!(0), &json!(true))
    );

    app.flush().await;

    assert_eq!(
        pg_row(&app, "usage_tracking", user, "ai_generation").await,
        Some((60, 10))
    );
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "export").await,
        Some((12, 2))
    );
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "kb_file").await,
        Some((22, 2))
    );
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "report").await,
        Some((8, 0))
    );

    // Later totals overwrite the earlier, overage with them.
    consume(&app, user, "ai_generation", 5).await;
    app.flush().await;
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "ai_generation").await,
        Some((65, 15))
    );
}

#[tokio::test]
async fn track_counts_past_the_cap_and_its_units_past_the_limit_are_overage() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();

    let tracked = call(&app, "track", user, "ai_generation", 200, None).await;
    let refused = app.consume(user, "ai_generation").await;

    assert_eq!(tracked.status, 200, "{:?}", tracked.body);
    assert_eq!(
        (
            &tracked.body["used"],
            &tracked.body["overage"],
            &tracked.body["overage_added"],
            &tracked.body["over_limit"]
        ),
        (&json!(200), &json!(150), &json!(150), &json!(true))
    );
    assert_eq!(refused.status, 402);
    assert_eq!(
        (&refused.body["used"], &refused.body["overage"]),
        (&json!(200), &json!(150))
    );
}

#[tokio::test]
async fn a_redis_that_lost_everything_loads_the_overage_back() {
    let mut redis_server = PrivateRedis::start();
    let (app, _plans) = spawn_with(
        PLANS,
        Options {
            redis_url: redis_server.url(),
            ..Options::default()
        },
    )
    .await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 60).await;
    consume(&app, user, "export", 15).await;
    consume(&app, user, "kb_file", 24).await;
    app.flush().await;

    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let after_flushall = app.get(&format!("/v1/users/{user}/usage")).await;
    let next = app.consume(user, "ai_generation").await;
    app.flush().await;
    redis_server.restart();
    let after_restart = consume(&app, user, "ai_generation", 89).await;
    let past_cap = app.consume(user, "ai_generation").await;
    let kb = app.consume(user, "kb_file").await;
    let kb_past_cap = app.consume(user, "kb_file").await;

    let u = &after_flushall.body["usage"];
    assert_eq!(
        (
            &u["ai_generation"]["overage"],
            &u["export"]["overage"],
            &u["kb_file"]["overage"]
        ),
        (&json!(10), &json!(5), &json!(4))
    );
    assert_eq!(
        (&next.body["used"], &next.body["overage"]),
        (&json!(61), &json!(11))
    );
    assert_eq!(after_restart.status, 200, "{:?}", after_restart.body);
    assert_eq!(
        (&after_restart.body["used"], &after_restart.body["overage"]),
        (&json!(150), &json!(100)),
        "loaded again after the restart: 61 and 11, then 89 more"
    );
    assert_eq!(past_cap.status, 402);
    assert_eq!((kb.status, &kb.body["overage"]), (200, &json!(5)));
    assert_eq!(kb_past_cap.status, 402);
}

#[tokio::test]
async fn a_refund_gives_back_overage_first() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let refund = |key: &'static str| {
        let app = &app;
        async move {
            app.post(
                "/v1/refund",
                json!({"user_id": user, "idempotency_key": key}),
            )
            .await
        }
    };
    call(&app, "consume", user, "ai_generation", 45, Some("a")).await;
    let b = call(&app, "consume", user, "ai_generation", 10, Some("b")).await;
    assert_eq!(
        (&b.body["used"], &b.body["overage"]),
        (&json!(55), &json!(5))
    );

    let back_b = refund("b").await;
    call(&app, "consume", user, "ai_generation", 10, Some("c")).await;
    // Refunding the call inside the limit still takes the overage off first: 10 units were used
    // in all afterwards, none of them past the limit.
    let back_a = refund("a").await;

    assert_eq!(back_b.status, 200, "{:?}", back_b.body);
    assert_eq!(
        (
            &back_b.body["refunded"],
            &back_b.body["used"],
            &back_b.body["overage"]
        ),
        (&json!(10), &json!(45), &json!(0))
    );
    assert_eq!(
        (
            &back_a.body["refunded"],
            &back_a.body["used"],
            &back_a.body["overage"]
        ),
        (&json!(45), &json!(10), &json!(0))
    );
    app.flush().await;
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "ai_generation").await,
        Some((10, 0))
    );

    // A release of a lifetime type lowers the overage first too.
    consume(&app, user, "kb_file", 24).await;
    let released = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 3}),
        )
        .await;
    assert_eq!(
        (&released.body["used"], &released.body["overage"]),
        (&json!(21), &json!(1)),
        "{:?}",
        released.body
    );
}

#[tokio::test]
async fn a_replay_answers_the_first_overage_figures_and_counts_nothing() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 48).await;

    let first = call(&app, "consume", user, "ai_generation", 5, Some("k")).await;
    consume(&app, user, "ai_generation", 10).await;
    let replay = call(&app, "consume", user, "ai_generation", 5, Some("k")).await;

    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body, "the first answer again");
    assert_eq!(
        (&first.body["overage_added"], &first.body["overage"]),
        (&json!(3), &json!(3))
    );
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["overage"]),
        (&json!(63), &json!(13))
    );
}

#[tokio::test]
async fn two_hundred_concurrent_consumes_never_pass_the_cap_and_the_overage_is_what_passed_the_limit(
) {
    let (app, _plans) = spawn().await;
    let (ones, mixed) = (Uuid::new_v4(), Uuid::new_v4());

    let answers = join_all((0..200).map(|_| app.consume(ones, "ai_generation"))).await;
    // Amounts 1 to 3: some straddle the limit, some would pass the cap.
    let amounts: Vec<u64> = (0..200).map(|i| i % 3 + 1).collect();
    let mixed_answers = join_all(
        amounts
            .iter()
            .map(|n| consume(&app, mixed, "ai_generation", *n)),
    )
    .await;

    let allowed: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(allowed.len(), 150);
    assert!(answers.iter().all(|a| matches!(a.status, 200 | 402)));
    let added: u64 = allowed
        .iter()
        .map(|a| a.body["overage_added"].as_u64().unwrap())
        .sum();
    assert_eq!(added, 100);
    let usage = usage_of(&app, ones, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["overage"]),
        (&json!(150), &json!(100))
    );

    let mut used = 0;
    let mut added = 0;
    for (a, amount) in mixed_answers.iter().zip(&amounts) {
        assert!(matches!(a.status, 200 | 402), "{:?}", a.body);
        if a.status == 200 {
            used += amount;
            let after = a.body["used"].as_u64().unwrap();
            let this = a.body["overage_added"].as_u64().unwrap();
            assert_eq!(
                this,
                (after.saturating_sub(50)).min(*amount),
                "{:?}",
                a.body
            );
            added += this;
        }
    }
    let usage = usage_of(&app, mixed, "ai_generation").await;
    assert!(
        (148..=150).contains(&used),
        "used {used}: a refusal leaves less than 3"
    );
    assert_eq!(usage["used"], used);
    assert_eq!(
        (usage["overage"].as_u64(), added),
        (Some(used - 50), used - 50)
    );
    app.flush().await;
    assert_eq!(
        pg_row(&app, "usage_tracking", ones, "ai_generation").await,
        Some((150, 100))
    );
    assert_eq!(
        pg_row(&app, "usage_tracking", mixed, "ai_generation").await,
        Some((used as i64, used as i64 - 50))
    );
}

#[tokio::test]
async fn an_accounts_pool_goes_into_overage_and_postgres_keeps_it() {
    let (app, _plans) = spawn().await;
    let account = Uuid::new_v4(); // no plan stored: FREE pools 50 + 100 generations
    let members: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for m in &members {
        let a = app
            .send(
                Method::PUT,
                &format!("/v1/users/{m}/account"),
                Some(json!({"account_id": account})),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }

    let answers = join_all((0..160).map(|i| app.consume(members[i % 3], "ai_generation"))).await;

    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), 150);
    let refused = answers.iter().find(|a| a.status == 402).unwrap();
    assert_eq!(refused.body["limited_by"], "account");
    assert_eq!(refused.body["account"]["overage"], 100);
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(pool.status, 200, "{:?}", pool.body);
    let u = &pool.body["usage"]["ai_generation"];
    assert_eq!(
        (&u["used"], &u["overage"], &u["overage_cap"]),
        (&json!(150), &json!(100), &json!(100))
    );
    // A member without a plan of their own is limited by the pool only: no overage of their own.
    assert_eq!(
        usage_of(&app, members[0], "ai_generation").await["overage"],
        0
    );
    app.flush().await;
    assert_eq!(
        pg_row(&app, "account_usage", account, "ai_generation").await,
        Some((150, 100))
    );
}

#[tokio::test]
async fn a_plans_overage_applies_on_top_of_an_override_and_overrides_take_no_overage() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    let limits = format!("/v1/users/{user}/limits");
    let set = app
        .send(
            Method::PUT,
            &limits,
            Some(json!({"ai_generation": 60})),
            None,
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);

    let within = consume(&app, user, "ai_generation", 160).await;
    let past = app.consume(user, "ai_generation").await;
    let mut hostile = Vec::new();
    for body in [
        json!({"ai_generation": {"limit": 5, "overage": 3}}),
        json!({"ai_generation": "60+100"}),
        json!({"ai_generation": 60, "overage": 100}),
    ] {
        hostile.push(app.send(Method::PUT, &limits, Some(body), None).await);
    }
    let stored = app.get(&limits).await;

    assert_eq!(within.status, 200, "{:?}", within.body);
    assert_eq!(
        (
            &within.body["limit"],
            &within.body["limit_source"],
            &within.body["overage"]
        ),
        (&json!(60), &json!("override"), &json!(100))
    );
    assert_eq!(past.status, 402);
    assert_eq!(
        past.body["error"],
        "Usage limit exceeded for ai_generation. Your limit is 60 per month, and 100 more as overage. You've used 160."
    );
    let codes: Vec<(u16, &Value)> = hostile
        .iter()
        .map(|h| (h.status, &h.body["code"]))
        .collect();
    assert_eq!(
        codes,
        [
            (400, &json!("INVALID_LIMIT")),
            (400, &json!("INVALID_LIMIT")),
            (400, &json!("UNKNOWN_TYPE"))
        ],
        "{hostile:?}"
    );
    assert_eq!(
        stored.body["overrides"],
        json!({"ai_generation": 60}),
        "nothing changed"
    );
}

#[tokio::test]
async fn get_plans_shows_each_plans_overage() {
    let (app, _plans) = spawn().await;

    let plans = app.get("/v1/plans").await;

    assert_eq!(plans.status, 200);
    assert_eq!(
        plans.body["overage"],
        json!({"FREE": {"ai_generation": 100, "export": null, "kb_file": 5}, "PRO": {"export": 10}})
    );
    assert_eq!(plans.body["plans"]["FREE"]["ai_generation"], 50);
    assert_eq!(plans.body["plans"]["FREE"]["report"], 5);
    // The built-in plans sell no overage.
    let plain = TestApp::spawn().await;
    assert_eq!(plain.get("/v1/plans").await.body["overage"], json!({}));
}

#[tokio::test]
async fn the_usage_read_and_the_usage_page_show_the_overage() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 62).await;
    consume(&app, user, "export", 13).await;

    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    let page = app
        .client
        .get(format!("{}/ui/users/{user}", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let u = &usage.body["usage"];
    assert_eq!(
        (
            &u["ai_generation"]["overage"],
            &u["ai_generation"]["overage_cap"],
            &u["ai_generation"]["remaining"]
        ),
        (&json!(12), &json!(100), &json!(0))
    );
    assert_eq!(
        (&u["export"]["overage"], &u["export"]["overage_cap"]),
        (&json!(3), &Value::Null)
    );
    assert_eq!(
        (&u["report"]["overage"], &u["report"]["overage_cap"]),
        (&json!(0), &json!(0))
    );
    assert!(
        page.contains(
            "data-overage=\"12\">Overage this month: 12 past the limit, of up to 100 allowed."
        ),
        "{page}"
    );
    assert!(page.contains("data-overage=\"3\">Overage this month: 3 past the limit (a soft limit"));
    assert_eq!(
        page.matches("class=\"overage\"").count(),
        3,
        "ai_generation, export, kb_file"
    );
}

#[tokio::test]
async fn the_gate_answers_quotad_overage() {
    let (app, _plans) = spawn().await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 50).await;
    let ask = || async {
        let r = app
            .client
            .get(format!("{}/v1/gate", app.base))
            .header("X-User-Id", user.to_string())
            .header("X-Usage-Type", "ai_generation")
            .header("X-Usage-Amount", "2")
            .send()
            .await
            .unwrap();
        Answer::read(r).await
    };

    let first = ask().await;
    let second = ask().await;

    assert_eq!(first.status, 200);
    assert_eq!(
        (first.header("quotad-used"), first.header("quotad-overage")),
        (Some("52"), Some("2"))
    );
    assert_eq!(second.header("quotad-overage"), Some("4"));
    assert_eq!(second.header("ratelimit-limit"), Some("150"));
    assert_eq!(second.header("ratelimit-remaining"), Some("96"));
}

#[tokio::test]
async fn bad_plans_files_are_refused_with_clear_messages_and_the_good_one_stays() {
    let (app, file) = spawn().await;
    for (value, fault) in [
        ("{ limit = 50, overage = -1 }", "overage -1 is out of range"),
        (
            "{ limit = -1, overage = 100 }",
            "an unlimited limit (-1) takes no overage or soft",
        ),
        (
            "{ limit = 50, overage = 100, soft = true }",
            "gives both overage and soft",
        ),
        (
            "{ limit = 50, overage = 100, burst = 3 }",
            "unknown key \"burst\"",
        ),
        ("{ overage = 100 }", "the table gives no limit"),
        (
            "{ limit = 50, soft = \"yes\" }",
            "soft must be true or false",
        ),
    ] {
        tempfile_path::rewrite(
            &file,
            &PLANS.replace(
                "ai_generation = { limit = 50, overage = 100 }",
                &format!("ai_generation = {value}"),
            ),
        );
        let err = app.state.quota.reload_plans().unwrap_err().to_string();
        assert!(
            err.contains("plan FREE: type ai_generation: ") && err.contains(fault),
            "{value}: {err}"
        );
        assert!(quotad::plans::PlanBook::open(Some(file.to_path_buf())).is_err());
    }

    let plans = app.get("/v1/plans").await;
    let user = Uuid::new_v4();
    let a = consume(&app, user, "ai_generation", 150).await;
    assert_eq!(
        plans.body["overage"]["FREE"]["ai_generation"], 100,
        "the last good file stays"
    );
    assert_eq!((a.status, &a.body["overage"]), (200, &json!(100)));
}

#[tokio::test]
async fn with_redis_paused_an_overage_type_fails_open_with_its_overage_unknown() {
    let redis_server = PrivateRedis::start();
    let (app, _plans) = spawn_with(
        PLANS,
        Options {
            redis_url: redis_server.url(),
            redis_timeout_ms: 200,
            ..Options::default()
        },
    )
    .await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 60).await;

    redis_server.pause();
    let degraded = app.consume(user, "ai_generation").await;
    redis_server.resume();
    let after = app.consume(user, "ai_generation").await;

    assert_eq!(degraded.status, 200, "{:?}", degraded.body);
    assert_eq!(degraded.body["degraded"], true);
    assert_eq!(
        (
            &degraded.body["overage"],
            &degraded.body["overage_cap"],
            &degraded.body["over_limit"],
            &degraded.body["overage_added"]
        ),
        (&Value::Null, &Value::Null, &json!(false), &json!(0))
    );
    assert_eq!(
        (&after.body["used"], &after.body["overage"]),
        (&json!(61), &json!(11)),
        "the degraded call counted nothing, then or later"
    );
}

#[tokio::test]
async fn with_postgres_down_overage_keeps_counting_and_reaches_postgres_when_it_is_back() {
    let pg = PrivatePostgres::start();
    let (app, _plans) = spawn_with(
        PLANS,
        Options {
            postgres_url: pg.url(),
            ..Options::default()
        },
    )
    .await;
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 55).await;

    pg.stop("fast");
    let while_down = consume(&app, user, "ai_generation", 10).await;
    let flushed = app.flusher.flush_once().await;
    pg.resume();
    app.flush().await;

    assert_eq!(while_down.status, 200, "{:?}", while_down.body);
    assert_eq!(while_down.body["overage"], 15);
    assert!(flushed.is_err(), "nothing written while Postgres is down");
    assert_eq!(
        pg_row(&app, "usage_tracking", user, "ai_generation").await,
        Some((65, 15))
    );
}

/// The value of `metric`'s series whose labels include every one of `labels`.
fn series(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn overage_is_counted_in_the_metrics_once_per_unit() {
    // A plan of this test's own, so parallel tests cannot add to its series.
    let plan = format!("M{}", &Uuid::new_v4().simple().to_string()[..8]);
    let plans = format!(
        "{PLANS}\n[plans.{plan}]\nai_generation = {{ limit = 2, overage = 3 }}\nexport = 1\nkb_file = 1\nreport = 1\n"
    );
    let (app, _plans) = spawn_with(&plans, Options::default()).await;
    let user = Uuid::new_v4();
    app.set_plan(user, &plan).await;

    for _ in 0..4 {
        consume(&app, user, "ai_generation", 1).await;
    }
    call(&app, "consume", user, "ai_generation", 1, Some("k")).await;
    call(&app, "consume", user, "ai_generation", 1, Some("k")).await; // a replay adds none
    call(&app, "check", user, "ai_generation", 1, None).await; // a check adds none
    let refused = consume(&app, user, "ai_generation", 1).await;
    assert_eq!(refused.status, 402);

    let text = app.metrics_text().await;
    let plan_label = format!("plan=\"{plan}\"");
    let labels = [plan_label.as_str(), "type=\"ai_generation\""];
    assert_eq!(
        series(
            &text,
            "quotad_overage_units_total",
            &[labels[0], labels[1], "level=\"user\""]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "quotad_overage_decisions_total", &labels),
        Some(3.0)
    );
    assert!(text.contains("# HELP quotad_overage_units_total"));
}

#[tokio::test]
async fn reconcile_compares_the_overage_and_repair_makes_both_sides_agree() {
    let (app, _plans) = spawn().await;
    let db = app.db().await;
    let (tie, postgres_newer) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [tie, postgres_newer] {
        consume(&app, u, "ai_generation", 60).await;
    }
    app.flush().await;
    // Behind quotad's back: the same version with another overage; a newer version without any.
    sqlx::query("UPDATE usage_tracking SET overage = 7 WHERE user_id = $1")
        .bind(tie)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE usage_tracking SET overage = 0, count = 40, version = version + 10 WHERE user_id = $1")
        .bind(postgres_newer)
        .execute(&db)
        .await
        .unwrap();
    let period = crate::helpers::period_id(0);

    let report = app
        .post("/v1/admin/reconcile", json!({"period": period}))
        .await;
    let repaired = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": period, "repair": true}),
        )
        .await;
    app.flush().await;
    let after = app
        .post("/v1/admin/reconcile", json!({"period": period}))
        .await;

    assert_eq!(report.status, 200, "{:?}", report.body);
    let drift = report.body["drift"].as_array().unwrap();
    let of = |u: Uuid| {
        drift
            .iter()
            .find(|d| d["user_id"] == json!(u))
            .cloned()
            .unwrap()
    };
    assert_eq!(
        (
            &of(tie)["kind"],
            &of(tie)["redis"]["overage"],
            &of(tie)["postgres"]["overage"]
        ),
        (&json!("different"), &json!(10), &json!(7))
    );
    assert_eq!(of(postgres_newer)["postgres"]["overage"], 0);
    assert_eq!(repaired.body["repaired"], 2, "{:?}", repaired.body);
    assert_eq!(after.body["drift"], json!([]), "{:?}", after.body);
    assert_eq!(
        pg_row(&app, "usage_tracking", tie, "ai_generation").await,
        Some((60, 10)),
        "Redis won the tie"
    );
    let newer = usage_of(&app, postgres_newer, "ai_generation").await;
    assert_eq!(
        (&newer["used"], &newer["overage"]),
        (&json!(40), &json!(0)),
        "Postgres' newer row won"
    );
}

#[tokio::test]
async fn envoys_rate_limit_service_counts_the_limit_and_cap_and_a_soft_limit_has_none() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

    let (app, _plans) = spawn_with(
        PLANS,
        Options {
            tune: |c| c.grpc_listen = Some("127.0.0.1:0".parse().unwrap()),
            ..Options::default()
        },
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rls = RateLimitServiceClient::new(channel);
    let user = Uuid::new_v4();
    consume(&app, user, "ai_generation", 60).await;
    let ask = |ty: &str| RateLimitRequest {
        domain: "quotad".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: [("user_id", user.to_string()), ("usage_type", ty.to_owned())]
                .into_iter()
                .map(|(key, value)| Entry {
                    key: key.into(),
                    value,
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    };

    let capped = rls
        .should_rate_limit(ask("ai_generation"))
        .await
        .unwrap()
        .into_inner();
    let soft = rls
        .should_rate_limit(ask("export"))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(capped.overall_code, Code::Ok as i32);
    let status = &capped.statuses[0];
    assert_eq!(
        (
            status.current_limit.as_ref().map(|l| l.requests_per_unit),
            status.limit_remaining
        ),
        (Some(150), 89),
        "61 used of 50 + 100"
    );
    assert_eq!(soft.overall_code, Code::Ok as i32);
    assert!(
        soft.statuses[0].current_limit.is_none(),
        "a soft limit refuses nothing"
    );
    assert_eq!(soft.statuses[0].limit_remaining, u32::MAX);
}
