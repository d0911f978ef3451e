//! Accounts: shared pools checked and counted with their members in one atomic step, limit
//! overrides, membership changes under load, and accounts' durability.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{month_period, period_id, Answer, PrivateRedis, TestApp};

async fn put(app: &TestApp, path: &str, body: Value) -> Answer {
    app.send(Method::PUT, path, Some(body), None).await
}

/// Makes `user` a member of `account` (or of none).
async fn join(app: &TestApp, user: Uuid, account: Option<Uuid>) {
    let a = put(
        app,
        &format!("/v1/users/{user}/account"),
        json!({ "account_id": account }),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["account_id"], json!(account));
}

async fn refund_key(app: &TestApp, user: Uuid, key: &str) -> Answer {
    app.post(
        "/v1/refund",
        json!({"user_id": user, "idempotency_key": key}),
    )
    .await
}

async fn consume_n(app: &TestApp, user: Uuid, amount: u64, key: Option<&str>) -> Answer {
    let mut body = json!({"user_id": user, "type": "ai_generation", "amount": amount});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    app.post("/v1/consume", body).await
}

/// The pool of `account`: used per type, as the account usage read answers it.
async fn pool(app: &TestApp, account: Uuid) -> Value {
    let a = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body
}

async fn pool_used(app: &TestApp, account: Uuid, usage_type: &str) -> u64 {
    pool(app, account).await["usage"][usage_type]["used"]
        .as_u64()
        .expect("used")
}

/// What Postgres holds for `account`'s `usage_type` this month (after the flusher wrote it).
async fn postgres_pool(app: &TestApp, account: Uuid, usage_type: &str) -> i64 {
    let db = app.db().await;
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(count), 0)::bigint FROM account_usage
         WHERE account_id = $1 AND type = $2 AND period_start = $3",
    )
    .bind(account)
    .bind(usage_type)
    .bind(month_period(0).start())
    .fetch_one(&db)
    .await
    .unwrap()
}

/// What Postgres holds for `users`' `usage_type` this month, summed.
async fn postgres_users(app: &TestApp, users: &[Uuid], usage_type: &str) -> i64 {
    let db = app.db().await;
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(count), 0)::bigint FROM usage_tracking
         WHERE user_id = ANY($1) AND type = $2 AND period_start = $3",
    )
    .bind(users)
    .bind(usage_type)
    .bind(month_period(0).start())
    .fetch_one(&db)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_hundred_consumes_from_ten_members_of_a_pool_of_fifty_allow_exactly_fifty() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4(); // no plan stored: the default, FREE, pools 50 generations
    let members: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for m in &members {
        join(&app, *m, Some(account)).await;
    }

    let answers = join_all(
        members
            .iter()
            .cycle()
            .take(200)
            .map(|m| app.consume(*m, "ai_generation")),
    )
    .await;

    let allowed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(allowed, 50);
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 402, "{:?}", a.body);
        assert_eq!(a.body["limited_by"], "account", "{:?}", a.body);
        assert_eq!(a.body["used"], 50);
        assert_eq!(a.body["limit"], 50);
        assert_eq!(a.body["account"]["account_id"], json!(account));
    }
    let usage = pool(&app, account).await;
    assert_eq!(usage["usage"]["ai_generation"]["used"], 50);
    assert_eq!(usage["member_count"], 10);
    let listed: Vec<u64> = usage["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["used"]["ai_generation"].as_u64().unwrap())
        .collect();
    assert_eq!(listed.iter().sum::<u64>(), 50, "{usage:?}");
    assert!(
        listed.windows(2).all(|w| w[0] >= w[1]),
        "most first: {listed:?}"
    );

    app.flush().await;
    assert_eq!(postgres_pool(&app, account, "ai_generation").await, 50);
    assert_eq!(postgres_users(&app, &members, "ai_generation").await, 50);
}

#[tokio::test]
async fn a_member_capped_at_ten_stops_there_while_the_others_go_on() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let (capped, other) = (Uuid::new_v4(), Uuid::new_v4());
    join(&app, capped, Some(account)).await;
    join(&app, other, Some(account)).await;
    let set = put(
        &app,
        &format!("/v1/users/{capped}/limits"),
        json!({"ai_generation": 10}),
    )
    .await;
    assert_eq!(set.status, 200, "{:?}", set.body);

    let mut allowed = 0;
    for _ in 0..15 {
        let a = app.consume(capped, "ai_generation").await;
        if a.status == 200 {
            allowed += 1;
        } else {
            assert_eq!(a.status, 402);
            assert_eq!(a.body["limited_by"], "user", "{:?}", a.body);
            assert_eq!(a.body["limit"], 10);
            assert_eq!(a.body["limit_source"], "override");
            assert_eq!(
                a.body["account"]["used"], 10,
                "the pool counted only the allowed"
            );
        }
    }
    assert_eq!(allowed, 10);
    for i in 0..40 {
        let a = app.consume(other, "ai_generation").await;
        assert_eq!(a.status, 200, "call {i}: {:?}", a.body);
        assert_eq!(a.body["user"]["limit_source"], "account");
    }
    let last = app.consume(other, "ai_generation").await;
    assert_eq!(last.status, 402);
    assert_eq!(last.body["limited_by"], "account");
    assert_eq!(pool_used(&app, account, "ai_generation").await, 50);
    assert_eq!(app.used(capped, "ai_generation").await, 10);
    assert_eq!(app.used(other, "ai_generation").await, 40);
}

#[tokio::test]
async fn a_refusal_at_either_level_counts_nothing_at_either() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let (capped, other) = (Uuid::new_v4(), Uuid::new_v4());
    join(&app, capped, Some(account)).await;
    join(&app, other, Some(account)).await;
    put(
        &app,
        &format!("/v1/users/{capped}/limits"),
        json!({"ai_generation": 10}),
    )
    .await;
    assert_eq!(consume_n(&app, capped, 8, None).await.status, 200);

    // The user's level refuses 3 (8 + 3 > 10): neither level counts.
    let a = consume_n(&app, capped, 3, None).await;
    assert_eq!((a.status, &a.body["limited_by"]), (402, &json!("user")));
    assert_eq!(app.used(capped, "ai_generation").await, 8);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 8);

    // The pool refuses 43 (8 + 43 > 50) for a member with room of their own: neither counts.
    let a = consume_n(&app, other, 43, None).await;
    assert_eq!((a.status, &a.body["limited_by"]), (402, &json!("account")));
    assert_eq!(a.body["remaining"], 42);
    assert_eq!(app.used(other, "ai_generation").await, 0);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 8);

    // check decides the same without counting, at both levels.
    let check = app
        .post(
            "/v1/check",
            json!({"user_id": other, "type": "ai_generation", "amount": 43}),
        )
        .await;
    assert_eq!(check.status, 200);
    assert_eq!(check.body["allowed"], false);
    assert_eq!(check.body["account"]["used"], 8);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 8);
}

#[tokio::test]
async fn an_idempotent_retry_counts_once_and_a_refund_gives_back_at_every_level() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let member = Uuid::new_v4();
    join(&app, member, Some(account)).await;

    let first = consume_n(&app, member, 3, Some("req-1")).await;
    let retry = consume_n(&app, member, 3, Some("req-1")).await;
    assert_eq!(first.status, 200);
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body["account"]["used"], 3, "{:?}", retry.body);
    assert_eq!(app.used(member, "ai_generation").await, 3);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 3);

    let refund = refund_key(&app, member, "req-1").await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(refund.body["refunded"], 3);
    assert_eq!(refund.body["account"]["account_id"], json!(account));
    assert_eq!(refund.body["account"]["changed_by"], 3);
    assert_eq!(refund.body["account"]["used"], 0);
    assert_eq!(app.used(member, "ai_generation").await, 0);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 0);
    let again = refund_key(&app, member, "req-1").await;
    assert_eq!(again.status, 409);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 0);

    // track counts at both levels past the limit; release lowers a lifetime pool with its member.
    let track = app
        .post(
            "/v1/track",
            json!({"user_id": member, "type": "kb_file", "amount": 25}),
        )
        .await;
    assert_eq!(track.status, 200, "{:?}", track.body);
    assert_eq!(track.body["account"]["used"], 25);
    let release = app
        .post(
            "/v1/release",
            json!({"user_id": member, "type": "kb_file", "amount": 5}),
        )
        .await;
    assert_eq!(release.status, 200, "{:?}", release.body);
    assert_eq!(release.body["used"], 20);
    assert_eq!(release.body["account"]["used"], 20);
    assert_eq!(pool_used(&app, account, "kb_file").await, 20);
}

#[tokio::test]
async fn moving_a_member_carries_their_counts_and_each_pool_keeps_what_it_counted() {
    let app = TestApp::spawn().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let user = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 5, None).await.status, 200);

    join(&app, user, Some(a)).await;
    assert_eq!(
        app.used(user, "ai_generation").await,
        5,
        "the user's counts move with them"
    );
    assert_eq!(
        pool_used(&app, a, "ai_generation").await,
        0,
        "nothing of the past joins a pool"
    );
    assert_eq!(consume_n(&app, user, 3, None).await.status, 200);
    assert_eq!(app.used(user, "ai_generation").await, 8);
    assert_eq!(pool_used(&app, a, "ai_generation").await, 3);

    // A keyed call in A; its retry after the move to B is answered as first (the record moved
    // with the user), and its refund gives back at the user's level only: A's pool is in
    // another slot.
    assert_eq!(
        consume_n(&app, user, 4, Some("before-move")).await.status,
        200
    );
    join(&app, user, Some(b)).await;
    let retry = consume_n(&app, user, 4, Some("before-move")).await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        app.used(user, "ai_generation").await,
        12,
        "the retry counted nothing"
    );
    let refund = refund_key(&app, user, "before-move").await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(refund.body["refunded"], 4);
    assert!(refund.body.get("account").is_none(), "{:?}", refund.body);
    assert_eq!(
        pool_used(&app, a, "ai_generation").await,
        7,
        "A keeps what it counted"
    );
    assert_eq!(consume_n(&app, user, 2, None).await.status, 200);
    assert_eq!(app.used(user, "ai_generation").await, 10);
    assert_eq!(
        pool_used(&app, a, "ai_generation").await,
        7,
        "a pool keeps what it counted"
    );
    assert_eq!(pool_used(&app, b, "ai_generation").await, 2);

    join(&app, user, None).await;
    let alone = consume_n(&app, user, 1, None).await;
    assert_eq!(alone.status, 200);
    assert!(alone.body.get("account").is_none(), "{:?}", alone.body);
    assert_eq!(app.used(user, "ai_generation").await, 11);
    let membership = app.get(&format!("/v1/users/{user}/account")).await;
    assert_eq!(membership.body["account_id"], Value::Null);

    app.flush().await;
    assert_eq!(postgres_users(&app, &[user], "ai_generation").await, 11);
    assert_eq!(postgres_pool(&app, a, "ai_generation").await, 7);
    assert_eq!(postgres_pool(&app, b, "ai_generation").await, 2);
}

#[tokio::test]
async fn moves_between_accounts_under_load_on_two_replicas_lose_and_double_nothing() {
    let first = TestApp::spawn().await;
    let second = first.replica().await;
    let accounts = [Uuid::new_v4(), Uuid::new_v4()];
    let users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let stop = Instant::now() + Duration::from_secs(3);

    // Counted by the answers: per user, and per pool (the account each answer counted in).
    // Every other call carries an idempotency key and is sent twice: the retry, which may
    // cross a move, must replay the first answer and count nothing.
    let load = |app: &TestApp, user: Uuid| {
        let app_base = app.base.clone();
        let client = app.client.clone();
        async move {
            let mut mine = 0u64;
            let mut replays = 0u64;
            let mut pools: HashMap<Uuid, u64> = HashMap::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                n += 1;
                let mut body = json!({"user_id": user, "type": "ai_generation"});
                let keyed = n.is_multiple_of(2);
                if keyed {
                    body["idempotency_key"] = json!(format!("k-{n}-{}", Uuid::new_v4()));
                }
                let mut counted_first = false;
                for attempt in 0..if keyed { 2 } else { 1 } {
                    let a = client
                        .post(format!("{app_base}/v1/track"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    let status = a.status().as_u16();
                    let replayed = a.headers().get("idempotent-replayed").is_some();
                    let answer: Value = a.json().await.unwrap();
                    if status != 200 || answer.get("degraded").is_some() {
                        continue;
                    }
                    if attempt == 1 && counted_first {
                        assert!(replayed, "a retry counted again: {answer:?}");
                        replays += 1;
                        continue;
                    }
                    if replayed {
                        continue;
                    }
                    counted_first = true;
                    mine += 1;
                    if let Some(acc) = answer["account"]["account_id"].as_str() {
                        *pools.entry(acc.parse().unwrap()).or_default() += 1;
                    }
                }
            }
            (user, mine, pools, replays)
        }
    };
    let movers = {
        let users = users.clone();
        let first = &first;
        async move {
            let mut moves = 0;
            let mut i = 0usize;
            while Instant::now() < stop {
                let user = users[i % users.len()];
                let target = match i % 3 {
                    0 => Some(accounts[0]),
                    1 => Some(accounts[1]),
                    _ => None,
                };
                join(first, user, target).await;
                moves += 1;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            moves
        }
    };
    let loads = users
        .iter()
        .flat_map(|u| [load(&first, *u), load(&second, *u)]);
    let (counted, moves) = tokio::join!(join_all(loads), movers);
    assert!(moves >= 20, "only {moves} moves");

    let mut per_user: BTreeMap<Uuid, u64> = BTreeMap::new();
    let mut per_pool: HashMap<Uuid, u64> = HashMap::new();
    let mut replays = 0;
    for (user, mine, pools, replayed) in counted {
        replays += replayed;
        *per_user.entry(user).or_default() += mine;
        for (acc, n) in pools {
            *per_pool.entry(acc).or_default() += n;
        }
    }
    for (user, n) in &per_user {
        assert!(*n > 0);
        assert_eq!(second.used(*user, "ai_generation").await, *n, "user {user}");
    }
    for acc in accounts {
        let n = per_pool.get(&acc).copied().unwrap_or(0);
        assert_eq!(
            pool_used(&first, acc, "ai_generation").await,
            n,
            "pool {acc}"
        );
    }
    first.flush().await;
    let total: u64 = per_user.values().sum();
    assert_eq!(
        postgres_users(&first, &users, "ai_generation").await as u64,
        total
    );
    for acc in accounts {
        assert_eq!(
            postgres_pool(&first, acc, "ai_generation").await as u64,
            per_pool.get(&acc).copied().unwrap_or(0)
        );
    }
    assert!(replays > 0);
    eprintln!(
        "{moves} moves under load; {total} calls counted, {replays} retries replayed, pools {per_pool:?}"
    );
}

#[tokio::test]
async fn overrides_are_in_force_on_every_replica_and_null_goes_back_to_the_plan() {
    let first = TestApp::spawn().await;
    let second = first.replica().await;
    let user = Uuid::new_v4();
    assert_eq!(second.consume(user, "ai_generation").await.status, 200);

    let set = put(
        &first,
        &format!("/v1/users/{user}/limits"),
        json!({"ai_generation": 2, "export": -1}),
    )
    .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(
        set.body["overrides"],
        json!({"ai_generation": 2, "export": -1})
    );
    assert_eq!(second.consume(user, "ai_generation").await.status, 200);
    let refused = second.consume(user, "ai_generation").await;
    assert_eq!(refused.status, 402);
    assert_eq!(refused.body["limit"], 2);
    assert_eq!(refused.body["limit_source"], "override");
    let usage = second.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(
        usage.body["usage"]["ai_generation"]["limit_source"],
        "override"
    );
    assert_eq!(usage.body["usage"]["export"]["unlimited"], true);
    assert_eq!(usage.body["usage"]["kb_file"]["limit_source"], "plan");

    let back = put(
        &first,
        &format!("/v1/users/{user}/limits"),
        json!({"ai_generation": null}),
    )
    .await;
    assert_eq!(back.body["overrides"], json!({"export": -1}));
    let again = second.consume(user, "ai_generation").await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["limit"], 50);
    assert_eq!(again.body["limit_source"], "plan");
    // A whole number written as a float is the same limit, up to 2^53 - 1.
    let float = put(
        &first,
        &format!("/v1/users/{user}/limits"),
        json!({"kb_file": 9007199254740990.0}),
    )
    .await;
    assert_eq!(float.status, 200, "{:?}", float.body);
    assert_eq!(float.body["overrides"]["kb_file"], 9007199254740990i64);
    put(
        &first,
        &format!("/v1/users/{user}/limits"),
        json!({"kb_file": null}),
    )
    .await;
    let read = first.get(&format!("/v1/users/{user}/limits")).await;
    assert_eq!(read.body["overrides"], json!({"export": -1}));
    assert!(read.body["version"].as_i64().unwrap() >= 2);

    // An account's override and plan set its pool.
    let account = Uuid::new_v4();
    join(&first, user, Some(account)).await;
    put(
        &first,
        &format!("/v1/accounts/{account}/limits"),
        json!({"ai_generation": 1}),
    )
    .await;
    assert_eq!(second.consume(user, "ai_generation").await.status, 200);
    let pool_refused = second.consume(user, "ai_generation").await;
    assert_eq!(pool_refused.status, 402);
    assert_eq!(pool_refused.body["limited_by"], "account");
    assert_eq!(pool_refused.body["limit_source"], "override");
    put(
        &first,
        &format!("/v1/accounts/{account}/limits"),
        json!({"ai_generation": null}),
    )
    .await;
    let plan = put(
        &first,
        &format!("/v1/accounts/{account}/plan"),
        json!({"plan": "ENTERPRISE"}),
    )
    .await;
    assert_eq!(plan.status, 200, "{:?}", plan.body);
    let got = first.get(&format!("/v1/accounts/{account}/plan")).await;
    assert_eq!(got.body["plan"], "ENTERPRISE");
    let unlimited = second.consume(user, "ai_generation").await;
    assert_eq!(unlimited.status, 200, "{:?}", unlimited.body);
    assert_eq!(unlimited.body["account"]["plan"], "ENTERPRISE");
    assert_eq!(unlimited.body["account"]["unlimited"], true);
}

#[tokio::test]
async fn a_redis_that_lost_everything_reloads_routes_pools_and_overrides_from_postgres() {
    let redis = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis).await;
    let account = Uuid::new_v4();
    let member = Uuid::new_v4();
    join(&app, member, Some(account)).await;
    put(
        &app,
        &format!("/v1/accounts/{account}/limits"),
        json!({"ai_generation": 6}),
    )
    .await;
    assert_eq!(consume_n(&app, member, 5, None).await.status, 200);
    app.flush().await;

    let _: String = redis.call(&["FLUSHALL"]).await.unwrap();
    // A replica that never saw the member: it believes they have no account, and Redis has no
    // route to say otherwise; Postgres does.
    let fresh = app.replica().await;
    let a = fresh.consume(member, "ai_generation").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["account"]["account_id"],
        json!(account),
        "{:?}",
        a.body
    );
    assert_eq!(a.body["account"]["used"], 6);
    assert_eq!(a.body["account"]["limit"], 6, "the override came back");
    let b = fresh.consume(member, "ai_generation").await;
    assert_eq!(b.status, 402);
    assert_eq!(b.body["limited_by"], "account");
    assert_eq!(fresh.used(member, "ai_generation").await, 6);
}

#[tokio::test]
async fn reconcile_reports_and_repairs_an_account_pool() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let member = Uuid::new_v4();
    join(&app, member, Some(account)).await;
    assert_eq!(consume_n(&app, member, 4, None).await.status, 200);
    app.flush().await;
    let db = app.db().await;
    sqlx::query("UPDATE account_usage SET count = 1 WHERE account_id = $1")
        .bind(account)
        .execute(&db)
        .await
        .unwrap();

    let report = app
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    let drift = report.body["drift"].as_array().unwrap();
    let ours: Vec<&Value> = drift
        .iter()
        .filter(|d| d["account_id"] == json!(account))
        .collect();
    assert_eq!(ours.len(), 1, "{drift:?}");
    assert_eq!(ours[0]["redis"]["count"], 4);
    assert_eq!(ours[0]["postgres"]["count"], 1);

    let repaired = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": period_id(0), "repair": true}),
        )
        .await;
    assert_eq!(repaired.status, 200, "{:?}", repaired.body);
    assert_eq!(postgres_pool(&app, account, "ai_generation").await, 4);
}

#[tokio::test]
async fn bad_input_to_the_account_calls_is_refused_clearly_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let account = Uuid::new_v4();
    let cases: Vec<(&str, String, Value, &str)> = vec![
        (
            "PUT",
            format!("/v1/users/{user}/account"),
            json!({"account_id": "nope"}),
            "INVALID_ACCOUNT_ID",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/account"),
            json!({"account_id": 7}),
            "INVALID_ACCOUNT_ID",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/account"),
            json!({"account_id": "a\u{0}b"}),
            "INVALID_ACCOUNT_ID",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/account"),
            json!({}),
            "MISSING_FIELD",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/account"),
            json!({"account_id": null, "x": 1}),
            "UNKNOWN_FIELD",
        ),
        (
            "PUT",
            "/v1/accounts/not-a-uuid/plan".into(),
            json!({"plan": "PRO"}),
            "INVALID_ACCOUNT_ID",
        ),
        (
            "PUT",
            format!("/v1/accounts/{account}/plan"),
            json!({"plan": "GOLD"}),
            "UNKNOWN_PLAN",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({}),
            "INVALID_LIMITS",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({"nope": 1}),
            "UNKNOWN_TYPE",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({"ai_generation": -2}),
            "INVALID_LIMIT",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({"ai_generation": 1.5}),
            "INVALID_LIMIT",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({"ai_generation": "10"}),
            "INVALID_LIMIT",
        ),
        (
            "PUT",
            format!("/v1/users/{user}/limits"),
            json!({"ai_generation": 1e300}),
            "INVALID_LIMIT",
        ),
        (
            "PUT",
            format!("/v1/accounts/{account}/limits"),
            json!({"ai_generation": 9007199254740993u64}),
            "INVALID_LIMIT",
        ),
        (
            "PUT",
            format!("/v1/accounts/{account}/limits"),
            json!([1]),
            "NOT_AN_OBJECT",
        ),
        (
            "GET",
            format!("/v1/accounts/{account}/usage?limit=5000"),
            Value::Null,
            "INVALID_QUERY",
        ),
        (
            "GET",
            format!("/v1/accounts/{account}/usage?limit=abc"),
            Value::Null,
            "INVALID_QUERY",
        ),
        (
            "GET",
            format!("/v1/accounts/{account}/usage?limit=-1"),
            Value::Null,
            "INVALID_QUERY",
        ),
        (
            "GET",
            format!("/v1/accounts/{account}/usage?limit=99999999999999999999999"),
            Value::Null,
            "INVALID_QUERY",
        ),
        (
            "GET",
            "/v1/accounts/%00/usage".to_owned(),
            Value::Null,
            "INVALID_ACCOUNT_ID",
        ),
        (
            "GET",
            format!("/v1/accounts/{account}/usage?top=3"),
            Value::Null,
            "INVALID_QUERY",
        ),
    ];
    for (method, path, body, code) in cases {
        let method: Method = method.parse().unwrap();
        let body = (!body.is_null()).then_some(body);
        let a = app.send(method, &path, body.clone(), None).await;
        assert_eq!(a.status, 400, "{path} {body:?}: {:?}", a.body);
        assert_eq!(a.body["code"], code, "{path} {body:?}: {:?}", a.body);
        assert!(
            a.body["error"].as_str().is_some_and(|e| e.len() > 20),
            "{:?}",
            a.body
        );
    }
    let made_up = app
        .send(
            Method::DELETE,
            &format!("/v1/users/{user}/account"),
            None,
            None,
        )
        .await;
    assert_eq!(made_up.status, 405);
    // Nothing changed.
    let membership = app.get(&format!("/v1/users/{user}/account")).await;
    assert_eq!(membership.body["account_id"], Value::Null);
    assert_eq!(membership.body["updated_at"], Value::Null);
    let limits = app.get(&format!("/v1/users/{user}/limits")).await;
    assert_eq!(limits.body["version"], 0);
    let plan = app.get(&format!("/v1/accounts/{account}/plan")).await;
    assert_eq!(plan.body["is_default"], true);
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
}

#[tokio::test]
async fn the_usage_page_shows_a_member_both_levels() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let member = Uuid::new_v4();
    join(&app, member, Some(account)).await;
    assert_eq!(consume_n(&app, member, 45, None).await.status, 200);
    let html = app
        .client
        .get(format!("{}/ui/users/{member}", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("Your team&#39;s shared pool") || html.contains("Your team's shared pool"),
        "{html}"
    );
    assert!(
        html.contains("data-level=\"a\" data-type=\"ai_generation\""),
        "{html}"
    );
    assert!(html.contains("45 / 50"), "the pool's bar: {html}");
    assert!(html.contains("counts toward your team"), "{html}");
    assert!(
        html.contains("Upgrade your plan"),
        "90 % of the pool: {html}"
    );
}

#[tokio::test]
async fn a_pool_refusal_is_remembered_until_another_member_gets_quota_back_on_another_replica() {
    let first = TestApp::spawn().await;
    let second = first.replica().await;
    first.wait_refusal_cache_live().await;
    second.wait_refusal_cache_live().await;
    let account = Uuid::new_v4();
    let (refused, spender) = (Uuid::new_v4(), Uuid::new_v4());
    join(&first, refused, Some(account)).await;
    join(&first, spender, Some(account)).await;
    assert_eq!(
        consume_n(&second, spender, 50, Some("big")).await.status,
        200
    );
    // Refused until remembered: an answer that raced with an announcement (the loads of both
    // members' counters and of the pool announce them) is not remembered, as it must not be.
    let deadline = Instant::now() + Duration::from_secs(2);
    while first.state.quota.refusals.users() == 0 {
        assert!(
            Instant::now() < deadline,
            "the pool's refusal was never remembered"
        );
        let a = first.consume(refused, "ai_generation").await;
        assert_eq!((a.status, &a.body["limited_by"]), (402, &json!("account")));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from_memory = first.consume(refused, "ai_generation").await;
    assert_eq!(from_memory.status, 402);
    assert_eq!(
        from_memory.body["account"]["used"], 50,
        "{:?}",
        from_memory.body
    );
    assert_eq!(from_memory.body["user"]["limit_source"], "account");

    // Another member's refund on the other replica gives the pool 50 back: the first replica
    // hears the account's announcement and forgets every refusal remembered under it.
    let refund = refund_key(&second, spender, "big").await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let a = first.consume(refused, "ai_generation").await;
        if a.status == 200 {
            assert_eq!(a.body["account"]["used"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {:?}", a.body);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_account_may_share_its_id_with_a_member() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let other = Uuid::new_v4();
    join(&app, user, Some(user)).await;
    join(&app, other, Some(user)).await;
    assert_eq!(consume_n(&app, user, 2, None).await.status, 200);
    assert_eq!(consume_n(&app, other, 3, None).await.status, 200);
    assert_eq!(pool_used(&app, user, "ai_generation").await, 5);
    assert_eq!(app.used(user, "ai_generation").await, 2);
}

#[tokio::test]
async fn a_move_a_crash_interrupted_fails_the_users_calls_by_their_policy_until_repeated() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let account = Uuid::new_v4();
    assert_eq!(consume_n(&app, user, 4, None).await.status, 200);
    let track = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "kb_file", "amount": 2}),
        )
        .await;
    assert_eq!(track.status, 200);
    // What a daemon killed after the move's first step leaves: the user's own bucket says their
    // counters are on their way out (and Postgres still says no account).
    let route = app.state.quota.store.keys(user).route();
    let mut redis = app.redis().await;
    let _: () = deadpool_redis::redis::AsyncCommands::set(&mut redis, &route, ">moving")
        .await
        .unwrap();

    let started = Instant::now();
    let open = app.consume(user, "ai_generation").await;
    let waited = started.elapsed();
    assert_eq!(open.status, 200, "{:?}", open.body);
    assert_eq!(
        open.body["degraded"], true,
        "fail open, not counted: {:?}",
        open.body
    );
    assert!(
        waited >= Duration::from_millis(400),
        "it waited for the move: {waited:?}"
    );
    let closed = app
        .post("/v1/consume", json!({"user_id": user, "type": "kb_file"}))
        .await;
    assert_eq!(closed.status, 503, "fail closed: {:?}", closed.body);

    // Repeating the membership change finishes the move, counts intact.
    join(&app, user, Some(account)).await;
    assert_eq!(app.used(user, "ai_generation").await, 4);
    assert_eq!(app.used(user, "kb_file").await, 2);
    let after = consume_n(&app, user, 1, None).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.body["user"]["used"], 5);
    assert_eq!(after.body["account"]["used"], 1);
}

#[tokio::test]
async fn one_flush_pass_drains_a_large_accounts_bucket_without_scanning_every_bucket_again() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let members: Vec<Uuid> = (0..600).map(|_| Uuid::new_v4()).collect();
    // Members as `PUT …/account` leaves users who never counted: their first calls follow their
    // routes from their own buckets to the account's (Postgres says where).
    let db = app.db().await;
    sqlx::query(
        "INSERT INTO account_members (user_id, account_id, version) SELECT u, $2, 1 FROM UNNEST($1::uuid[]) AS u",
    )
    .bind(&members)
    .bind(account)
    .execute(&db)
    .await
    .unwrap();
    let answers = join_all(
        members
            .iter()
            .map(|m| app.post("/v1/track", json!({"user_id": m, "type": "ai_generation"}))),
    )
    .await;
    assert!(answers
        .iter()
        .all(|a| a.status == 200 && a.body["account"]["account_id"] == json!(account)));

    // 601 dirty counters (the members' and the pool) in one bucket: one pass takes them all,
    // 128 a round, over that bucket alone after the first round.
    let out = app.flusher.flush_once().await.unwrap();
    assert_eq!(out.counters, 601, "{out:?}");
    assert!(!out.more, "{out:?}");
    assert_eq!(postgres_pool(&app, account, "ai_generation").await, 600);
    assert_eq!(postgres_users(&app, &members, "ai_generation").await, 600);
    assert_eq!(pool_used(&app, account, "ai_generation").await, 600);
}
