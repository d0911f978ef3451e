//! Reservations: an amount held against the limit until the work's cost is known, then committed
//! (counted, the rest freed), cancelled (all freed) or expired (freed by the sweeper, whether or
//! not the user calls again). Holds and consumes together never pass the limit; commit and
//! cancel answer the same when repeated; a committed amount reaches Postgres like any count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use futures::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{month_period, Answer, Options, PrivatePostgres, PrivateRedis, TestApp};
use quotad::store::keys::bucket;

async fn reserve(app: &TestApp, user: Uuid, ty: &str, amount: u64, ttl: u64) -> Answer {
    app.post(
        "/v1/reserve",
        json!({"user_id": user, "type": ty, "amount": amount, "ttl_seconds": ttl}),
    )
    .await
}

/// Reserves and returns the reservation id, asserting it was held.
async fn held(app: &TestApp, user: Uuid, ty: &str, amount: u64, ttl: u64) -> String {
    let a = reserve(app, user, ty, amount, ttl).await;
    assert_eq!(a.status, 200, "reserve {amount}: {:?}", a.body);
    a.body["reservation_id"].as_str().unwrap().to_owned()
}

async fn commit(app: &TestApp, id: &str, amount: Value) -> Answer {
    app.post(
        &format!("/v1/reservations/{id}/commit"),
        json!({ "amount": amount }),
    )
    .await
}

async fn cancel(app: &TestApp, id: &str) -> Answer {
    app.send(
        reqwest::Method::POST,
        &format!("/v1/reservations/{id}/cancel"),
        None,
        None,
    )
    .await
}

/// One type's entry of the user's usage read.
async fn usage_of(app: &TestApp, user: Uuid, ty: &str) -> Value {
    let a = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["usage"][ty].clone()
}

/// The user's count and hold of `ai_generation` this month, read straight from Redis.
async fn in_redis(app: &TestApp, user: Uuid) -> (i64, i64) {
    let key = app.state.quota.store.keys(user).counter(month_period(0));
    let (used, held): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("ai_generation")
        .arg("h:ai_generation")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    (used.unwrap_or(0), held.unwrap_or(0))
}

#[tokio::test]
async fn a_hold_counts_as_taken_until_its_commit_counts_what_was_used_and_frees_the_rest() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let r = reserve(&app, user, "ai_generation", 30, 300).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with(&format!("rsv_{}_", user.simple())), "{id}");
    assert_eq!(r.body["allowed"], true);
    assert_eq!(r.body["amount"], 30);
    assert_eq!((&r.body["used"], &r.body["held"]), (&json!(0), &json!(30)));
    assert_eq!(r.body["remaining"], 20);
    assert_eq!(r.header("ratelimit-remaining"), Some("20"));
    let expires: chrono::DateTime<chrono::Utc> =
        r.body["expires_at"].as_str().unwrap().parse().unwrap();
    let ahead = expires - chrono::Utc::now();
    assert!(
        (290..=301).contains(&ahead.num_seconds()),
        "expires in {ahead} (Redis' clock)"
    );

    // The hold is taken: 20 left for consumes, and nothing for another reservation.
    for _ in 0..20 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    let refused = app.consume(user, "ai_generation").await;
    assert_eq!(refused.status, 402, "{:?}", refused.body);
    assert_eq!(
        (
            &refused.body["used"],
            &refused.body["held"],
            &refused.body["remaining"]
        ),
        (&json!(20), &json!(30), &json!(0))
    );
    assert_eq!(
        refused.body["error"],
        "Usage limit exceeded for ai_generation. Your FREE plan allows 50 per month. You've used 20. Open reservations hold 30 more."
    );
    let check = app
        .post(
            "/v1/check",
            json!({"user_id": user, "type": "ai_generation"}),
        )
        .await;
    assert_eq!(check.body["allowed"], false, "check counts the hold too");
    assert_eq!(
        reserve(&app, user, "ai_generation", 1, 300).await.status,
        402
    );
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["held"], &usage["remaining"]),
        (&json!(20), &json!(30), &json!(0))
    );

    let c = commit(&app, &id, json!(25)).await;

    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(c.body["reservation_id"], id.as_str());
    assert_eq!(c.body["state"], "committed");
    assert_eq!(
        (&c.body["amount"], &c.body["committed"], &c.body["released"]),
        (&json!(30), &json!(25), &json!(5))
    );
    assert_eq!(c.body["late"], false);
    assert_eq!((&c.body["used"], &c.body["held"]), (&json!(45), &json!(0)));
    assert_eq!(c.body["type"], "ai_generation");
    assert!(c.header("idempotent-replayed").is_none());
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["held"], &usage["remaining"]),
        (&json!(45), &json!(0), &json!(5))
    );
    for _ in 0..5 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    assert_eq!(app.consume(user, "ai_generation").await.status, 402);
}

#[tokio::test]
async fn a_cancel_frees_the_whole_hold_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 50, 300).await;
    assert_eq!(app.consume(user, "ai_generation").await.status, 402);

    let c = cancel(&app, &id).await;

    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(c.body["state"], "cancelled");
    assert_eq!(
        (
            &c.body["committed"],
            &c.body["released"],
            &c.body["used"],
            &c.body["held"]
        ),
        (&json!(0), &json!(50), &json!(0), &json!(0))
    );
    assert_eq!(in_redis(&app, user).await, (0, 0));
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    // An empty object is a body cancel takes too (the reservation is closed: the same answer).
    let again = app
        .post(&format!("/v1/reservations/{id}/cancel"), json!({}))
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn a_hold_that_does_not_fit_is_refused_with_402_and_holds_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let over = reserve(&app, user, "ai_generation", 51, 300).await;
    assert_eq!(over.status, 402, "{:?}", over.body);
    assert_eq!(over.body["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(over.body["upgrade_url"], "/settings/billing");
    assert!(over.body.get("reservation_id").is_none(), "{:?}", over.body);
    assert!(over.header("retry-after").is_some());
    assert_eq!(in_redis(&app, user).await, (0, 0));

    held(&app, user, "ai_generation", 45, 300).await;
    let six = reserve(&app, user, "ai_generation", 6, 300).await;
    assert_eq!(six.status, 402);
    assert_eq!(
        (&six.body["held"], &six.body["remaining"]),
        (&json!(45), &json!(5))
    );
    assert!(
        six.body["error"]
            .as_str()
            .unwrap()
            .ends_with("This request needs 6, and 5 remain."),
        "{:?}",
        six.body["error"]
    );
    held(&app, user, "ai_generation", 5, 300).await;
    assert_eq!(in_redis(&app, user).await, (0, 50));

    // An unlimited plan is never refused; its holds are still shown.
    let pro = Uuid::new_v4();
    app.set_plan(pro, "PRO").await;
    let big = reserve(&app, pro, "ai_generation", 1_000_000, 300).await;
    assert_eq!(big.status, 200, "{:?}", big.body);
    assert_eq!(
        (&big.body["held"], &big.body["unlimited"]),
        (&json!(1_000_000), &json!(true))
    );
}

#[tokio::test]
async fn a_commit_over_the_hold_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 10, 300).await;

    let over = commit(&app, &id, json!(11)).await;

    assert_eq!(over.status, 409, "{:?}", over.body);
    assert_eq!(over.body["code"], "COMMIT_EXCEEDS_HOLD");
    assert_eq!(over.body["field"], "amount");
    assert_eq!(
        over.body["error"],
        "amount 11 is more than the 10 this reservation holds; commit at most 10, and count the rest with /v1/track."
    );
    assert_eq!(
        in_redis(&app, user).await,
        (0, 10),
        "still held, nothing counted"
    );
    let exact = commit(&app, &id, json!(10)).await;
    assert_eq!(exact.status, 200, "{:?}", exact.body);
    assert_eq!(
        (&exact.body["released"], &exact.body["used"]),
        (&json!(0), &json!(10))
    );

    // A commit of 0 (the work cost nothing) closes it, counts nothing, frees all.
    let zero = held(&app, user, "ai_generation", 7, 300).await;
    let c = commit(&app, &zero, json!(0)).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(
        (&c.body["committed"], &c.body["released"], &c.body["used"]),
        (&json!(0), &json!(7), &json!(10))
    );
    assert_eq!(in_redis(&app, user).await, (10, 0));
}

#[tokio::test]
async fn commit_and_cancel_are_idempotent_and_a_conflicting_second_close_is_409() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 20, 300).await;

    let first = commit(&app, &id, json!(12)).await;
    let consumed = app.consume(user, "ai_generation").await;
    let again = commit(&app, &id, json!(12)).await;
    let other = commit(&app, &id, json!(11)).await;
    let cancel_after = cancel(&app, &id).await;

    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(consumed.body["used"], 13);
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body, first.body, "the first answer again");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        (other.status, &other.body["code"]),
        (409, &json!("RESERVATION_COMMITTED"))
    );
    assert!(other.body["error"].as_str().unwrap().contains("amount 12"));
    assert_eq!(
        (cancel_after.status, &cancel_after.body["code"]),
        (409, &json!("RESERVATION_COMMITTED"))
    );
    assert_eq!(in_redis(&app, user).await, (13, 0), "counted once");

    let gone = held(&app, user, "ai_generation", 5, 300).await;
    let c1 = cancel(&app, &gone).await;
    let c2 = cancel(&app, &gone).await;
    let late_commit = commit(&app, &gone, json!(1)).await;
    assert_eq!(c1.status, 200);
    assert_eq!(c2.body, c1.body);
    assert_eq!(c2.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        (late_commit.status, &late_commit.body["code"]),
        (409, &json!("RESERVATION_CANCELLED"))
    );
    assert_eq!(in_redis(&app, user).await, (13, 0));
}

#[tokio::test]
async fn an_expired_hold_is_freed_by_the_sweeper_while_the_user_makes_no_call() {
    // The sweeper runs at the flusher's interval.
    let app = TestApp::spawn_with(Options {
        flush_interval_ms: 100,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 40, 1).await;
    assert_eq!(in_redis(&app, user).await, (0, 40));

    // Watched in Redis only: no call of the user's.
    let started = Instant::now();
    while in_redis(&app, user).await.1 != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the hold was not freed within 10 s of its 1 s expiry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let freed_after = started.elapsed();
    assert!(
        freed_after >= Duration::from_millis(800),
        "freed after {freed_after:?}, before its expiry"
    );
    let key = app.state.quota.store.keys(user).reservation(&id[37..]);
    let state: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("s")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(state.as_deref(), Some("expired"));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quotad_reservations_total{type=\"ai_generation\",outcome=\"expired\"}"),
        "{metrics}"
    );

    // The work was done after all: a late commit counts it, without holding anything.
    let late = commit(&app, &id, json!(30)).await;
    assert_eq!(late.status, 200, "{:?}", late.body);
    assert_eq!(
        (
            &late.body["late"],
            &late.body["committed"],
            &late.body["released"]
        ),
        (&json!(true), &json!(30), &json!(0))
    );
    assert_eq!(in_redis(&app, user).await, (30, 0));
    assert_eq!(commit(&app, &id, json!(30)).await.body, late.body);
}

#[tokio::test]
async fn a_due_reservation_is_expired_by_whichever_comes_first_the_sweeper_or_its_close() {
    // No background sweeper (the default test interval is an hour): passes by hand.
    let app = TestApp::spawn().await;
    let sweeper = quotad::reservations::Sweeper::new(&app.state.quota.store, Default::default());
    let user = Uuid::new_v4();
    let not_yet = held(&app, user, "ai_generation", 5, 300).await;
    let soon = held(&app, user, "ai_generation", 7, 1).await;
    let cancelled_late = held(&app, user, "ai_generation", 3, 1).await;
    assert_eq!(sweeper.sweep_once().await.unwrap().expired, 0, "none due");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Due but not swept: a commit finds it due, expires it and counts late in one step.
    let late = commit(&app, &soon, json!(2)).await;
    assert_eq!(late.status, 200, "{:?}", late.body);
    assert_eq!(
        (&late.body["late"], &late.body["held"]),
        (&json!(true), &json!(8))
    );
    let swept = sweeper.sweep_once().await.unwrap();
    assert_eq!(
        (swept.expired, swept.freed),
        (1, 3),
        "only the third was left to expire"
    );
    assert_eq!(
        sweeper.sweep_once().await.unwrap(),
        Default::default(),
        "nothing twice"
    );
    // A cancel after the expiry closes it, freeing nothing more.
    let c = cancel(&app, &cancelled_late).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(
        (&c.body["state"], &c.body["released"]),
        (&json!("cancelled"), &json!(0))
    );
    assert_eq!(in_redis(&app, user).await, (2, 5));
    assert_eq!(cancel(&app, &not_yet).await.body["released"], 5);
    assert_eq!(in_redis(&app, user).await, (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_reserves_consumes_commits_and_cancels_never_pass_the_limit() {
    let app = Arc::new(TestApp::spawn().await);
    let user = Uuid::new_v4();
    // A limit of 100 against about 300 units asked: many calls fit, many do not, and what the
    // closes free is taken again by calls still coming.
    let limits = app
        .send(
            reqwest::Method::PUT,
            &format!("/v1/users/{user}/limits"),
            Some(json!({"ai_generation": 100})),
            None,
        )
        .await;
    assert_eq!(limits.status, 200, "{:?}", limits.body);
    let committed = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let (held_ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Watches Redis throughout, on a connection of its own: used + held never passes 100.
    let watcher = {
        let (done, key) = (
            done.clone(),
            app.state.quota.store.keys(user).counter(month_period(0)),
        );
        let mut conn = app.redis().await;
        tokio::spawn(async move {
            let (mut looks, mut most) = (0u64, 0i64);
            while !done.load(Ordering::SeqCst) {
                let (used, held): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("ai_generation")
                    .arg("h:ai_generation")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let (used, held) = (used.unwrap_or(0), held.unwrap_or(0));
                assert!(used + held <= 100, "used {used} + held {held} passed 100");
                most = most.max(used + held);
                looks += 1;
            }
            (looks, most)
        })
    };
    let calls = (0..200u64).map(|i| {
        let app = app.clone();
        let (committed, consumed) = (committed.clone(), consumed.clone());
        let (held_ok, refused) = (held_ok.clone(), refused.clone());
        async move {
            if i % 2 == 0 {
                let amount = 1 + i % 3;
                let a = app
                    .post(
                        "/v1/consume",
                        json!({"user_id": user, "type": "ai_generation", "amount": amount}),
                    )
                    .await;
                match a.status {
                    200 => consumed.fetch_add(amount, Ordering::SeqCst),
                    402 => refused.fetch_add(1, Ordering::SeqCst),
                    s => panic!("consume answered {s}: {:?}", a.body),
                };
                return;
            }
            let amount = 1 + i % 5;
            let r = reserve(&app, user, "ai_generation", amount, 300).await;
            if r.status == 402 {
                refused.fetch_add(1, Ordering::SeqCst);
                return;
            }
            assert_eq!(r.status, 200, "{:?}", r.body);
            held_ok.fetch_add(1, Ordering::SeqCst);
            let id = r.body["reservation_id"].as_str().unwrap().to_owned();
            // The work runs a while, holding, as other calls come.
            tokio::time::sleep(Duration::from_millis(i % 13)).await;
            if i % 3 == 0 {
                assert_eq!(cancel(&app, &id).await.status, 200);
            } else {
                let used = amount - (i / 3) % 2;
                let c = commit(&app, &id, json!(used)).await;
                assert_eq!(c.status, 200, "{:?}", c.body);
                committed.fetch_add(used, Ordering::SeqCst);
            }
        }
    });
    join_all(calls).await;
    done.store(true, Ordering::SeqCst);
    let (looks, most) = watcher.await.expect("used + held stayed within the limit");

    let (used, held) = in_redis(&app, user).await;
    let (committed, consumed) = (
        committed.load(Ordering::SeqCst),
        consumed.load(Ordering::SeqCst),
    );
    let (held_ok, refused) = (
        held_ok.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
    );
    println!(
        "{held_ok} held, {refused} refused, {committed} committed, {consumed} consumed; \
         watched {looks} times, at most {most} used and held"
    );
    assert_eq!(held, 0, "every reservation closed");
    assert_eq!(used as u64, committed + consumed);
    assert!(used <= 100);
    assert!(refused > 0, "the limit was reached");
    assert!(held_ok > 0 && consumed > 0 && committed > 0);
    assert!(looks > 0, "watched {looks} times");
}

#[tokio::test]
async fn a_committed_amount_reaches_postgres_with_the_next_flush() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let a = held(&app, user, "ai_generation", 20, 300).await;
    let b = held(&app, user, "ai_generation", 10, 300).await;
    assert_eq!(commit(&app, &a, json!(17)).await.status, 200);
    assert_eq!(cancel(&app, &b).await.status, 200);
    app.consume(user, "ai_generation").await;

    app.flush().await;

    let count: i64 = sqlx::query_scalar(
        "SELECT count FROM usage_tracking WHERE user_id = $1 AND type = 'ai_generation'",
    )
    .bind(user)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(
        count, 18,
        "17 committed and 1 consumed; the holds are not counts"
    );
}

#[tokio::test]
async fn a_members_hold_holds_in_the_pool_too() {
    let app = TestApp::spawn().await;
    let account = Uuid::new_v4();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for m in [alice, bob] {
        let a = app
            .send(
                reqwest::Method::PUT,
                &format!("/v1/users/{m}/account"),
                Some(json!({ "account_id": account })),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    // The pool (FREE: 50) alone limits the members.
    let r = reserve(&app, alice, "ai_generation", 45, 300).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["account"]["held"], 45);
    assert_eq!(r.body["account"]["remaining"], 5);

    let bob_six = app
        .post(
            "/v1/consume",
            json!({"user_id": bob, "type": "ai_generation", "amount": 6}),
        )
        .await;
    assert_eq!(bob_six.status, 402, "{:?}", bob_six.body);
    assert_eq!(bob_six.body["limited_by"], "account");
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(
        pool.body["usage"]["ai_generation"]["held"], 45,
        "{:?}",
        pool.body
    );

    let id = r.body["reservation_id"].as_str().unwrap();
    let c = commit(&app, id, json!(40)).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(
        c.body["account"],
        json!({"account_id": account, "used": 40, "held": 0})
    );
    let bob_ten = app
        .post(
            "/v1/consume",
            json!({"user_id": bob, "type": "ai_generation", "amount": 10}),
        )
        .await;
    assert_eq!(bob_ten.status, 200, "{:?}", bob_ten.body);
    assert_eq!(bob_ten.body["account"]["used"], 50);
}

#[tokio::test]
async fn a_reservation_left_behind_by_a_membership_change_is_freed_at_its_expiry() {
    let app = TestApp::spawn().await;
    let sweeper = quotad::reservations::Sweeper::new(&app.state.quota.store, Default::default());
    let user = Uuid::new_v4();
    // An account in another bucket than the user's own, so leaving it moves the counters.
    let account = std::iter::repeat_with(Uuid::new_v4)
        .find(|a| bucket(a) != bucket(&user))
        .unwrap();
    let join = |to: Value| {
        let app = &app;
        async move {
            let a = app
                .send(
                    reqwest::Method::PUT,
                    &format!("/v1/users/{user}/account"),
                    Some(json!({ "account_id": to })),
                    None,
                )
                .await;
            assert_eq!(a.status, 200, "{:?}", a.body);
        }
    };
    join(json!(account)).await;
    let id = held(&app, user, "ai_generation", 30, 1).await;

    join(Value::Null).await;

    // The user's counters moved home without the hold; the pool keeps it until it expires.
    let mine = usage_of(&app, user, "ai_generation").await;
    assert_eq!((&mine["held"], &mine["remaining"]), (&json!(0), &json!(50)));
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(pool.body["usage"]["ai_generation"]["held"], 30);
    let c = commit(&app, &id, json!(10)).await;
    assert_eq!(
        (c.status, &c.body["code"]),
        (404, &json!("UNKNOWN_RESERVATION"))
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sweeper.sweep_once().await.unwrap().expired, 1);
    let pool = app.get(&format!("/v1/accounts/{account}/usage")).await;
    assert_eq!(pool.body["usage"]["ai_generation"]["held"], 0);
    assert_eq!(usage_of(&app, user, "ai_generation").await["used"], 0);
}

#[tokio::test]
async fn freeing_a_hold_makes_every_replica_forget_the_refusal_it_caused() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    app.wait_refusal_cache_live().await;
    replica.wait_refusal_cache_live().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 50, 300).await;
    // Both replicas remember the refusal.
    assert_eq!(app.consume(user, "ai_generation").await.status, 402);
    assert_eq!(replica.consume(user, "ai_generation").await.status, 402);

    assert_eq!(commit(&app, &id, json!(20)).await.status, 200);

    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    let started = Instant::now();
    loop {
        let a = replica.consume(user, "ai_generation").await;
        if a.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the replica still refused 2 s after the hold was freed: {:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bad_reserves_get_a_clear_400_and_hold_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let base = json!({"user_id": user, "type": "ai_generation", "amount": 5, "ttl_seconds": 60});
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b
    };
    let without = |field: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(field);
        b
    };
    let cases = [
        (with("ttl_seconds", json!(0)), "INVALID_TTL", "ttl_seconds"),
        (
            with("ttl_seconds", json!(86_401)),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (
            with("ttl_seconds", json!(u64::MAX)),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (
            with("ttl_seconds", json!(1e300)),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (with("ttl_seconds", json!(-5)), "INVALID_TTL", "ttl_seconds"),
        (
            with("ttl_seconds", json!(1.5)),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (
            with("ttl_seconds", json!("60")),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (
            with("ttl_seconds", Value::Null),
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (without("ttl_seconds"), "MISSING_FIELD", "ttl_seconds"),
        (with("amount", json!(0)), "INVALID_AMOUNT", "amount"),
        (with("amount", json!(-1)), "INVALID_AMOUNT", "amount"),
        (with("amount", json!(1_000_001)), "INVALID_AMOUNT", "amount"),
        (with("amount", json!(2.5)), "INVALID_AMOUNT", "amount"),
        (with("amount", json!("3")), "INVALID_AMOUNT", "amount"),
        (with("amount", json!([1])), "INVALID_AMOUNT", "amount"),
        (
            with("type", json!("ai_generations")),
            "UNKNOWN_TYPE",
            "type",
        ),
        (with("type", json!(7)), "INVALID_FIELD", "type"),
        (
            with("user_id", json!("not-a-uuid")),
            "INVALID_USER_ID",
            "user_id",
        ),
        (
            with("user_id", json!("7c9e6679\u{0}")),
            "INVALID_USER_ID",
            "user_id",
        ),
        (without("user_id"), "MISSING_FIELD", "user_id"),
        (
            with("idempotency_key", json!("")),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        (
            with("idempotency_key", json!("x".repeat(256))),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        (
            with("idempotency_key", json!(5)),
            "INVALID_FIELD",
            "idempotency_key",
        ),
        (with("plan", json!("PRO")), "UNKNOWN_FIELD", "plan"),
    ];
    for (body, code, field) in cases {
        let a = app.post("/v1/reserve", body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {:?}", a.body);
        assert_eq!(
            (a.body["code"].as_str(), a.body["field"].as_str()),
            (Some(code), Some(field)),
            "{body}"
        );
        assert!(a.body["error"].as_str().unwrap().len() > 20, "{:?}", a.body);
    }
    let ttl = app.post("/v1/reserve", with("ttl_seconds", json!(0))).await;
    assert_eq!(
        ttl.body["error"],
        "ttl_seconds must be a whole number from 1 to 86400 (a day); got 0."
    );
    for raw in ["", "[]", "{\"user_id\":", "null"] {
        let a = app.post_raw("/v1/reserve", raw.to_owned()).await;
        assert_eq!(a.status, 400, "{raw:?}: {:?}", a.body);
    }
    // A whole number written with a fraction is that number.
    let ok = app
        .post("/v1/reserve", with("ttl_seconds", json!(60.0)))
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(
        in_redis(&app, user).await,
        (0, 5),
        "only the good one holds"
    );
}

#[tokio::test]
async fn bad_commits_and_cancels_get_a_clear_error_and_change_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "ai_generation", 10, 300).await;
    let other_user = id.replacen(
        &user.simple().to_string(),
        &Uuid::new_v4().simple().to_string(),
        1,
    );
    let made_up = format!("rsv_{}_{}", user.simple(), Uuid::new_v4().simple());

    for unknown in [&made_up, &other_user] {
        for a in [
            commit(&app, unknown, json!(1)).await,
            cancel(&app, unknown).await,
        ] {
            assert_eq!(
                (a.status, &a.body["code"]),
                (404, &json!("UNKNOWN_RESERVATION")),
                "{unknown}"
            );
        }
    }
    let malformed = [
        "x".to_owned(),
        id.to_uppercase(),
        format!("{id}0"),
        id[..id.len() - 1].to_owned(),
        id.replace("rsv_", "res_"),
        format!("rsv_{user}_{}", &id[37..]),
        "rsv_%00".to_owned(),
        "rsv_%0A".to_owned(),
        "%FF%FE".to_owned(),
        format!("{id}%20"),
    ];
    for bad in &malformed {
        for a in [commit(&app, bad, json!(1)).await, cancel(&app, bad).await] {
            assert_eq!(a.status, 400, "{bad}: {:?}", a.body);
            assert_eq!(a.body["code"], "INVALID_RESERVATION_ID", "{bad}");
            assert_eq!(a.body["field"], "reservation_id");
        }
    }
    for amount in [
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(1_000_001),
        json!(null),
        json!({}),
    ] {
        let a = commit(&app, &id, amount.clone()).await;
        assert_eq!(
            (a.status, &a.body["code"]),
            (400, &json!("INVALID_AMOUNT")),
            "{amount}"
        );
    }
    let missing = app
        .post(&format!("/v1/reservations/{id}/commit"), json!({}))
        .await;
    assert_eq!(
        (missing.status, &missing.body["code"]),
        (400, &json!("MISSING_FIELD"))
    );
    let extra = app
        .post(
            &format!("/v1/reservations/{id}/commit"),
            json!({"amount": 1, "user_id": user}),
        )
        .await;
    assert_eq!(
        (extra.status, &extra.body["code"]),
        (400, &json!("UNKNOWN_FIELD"))
    );
    let extra = app
        .post(
            &format!("/v1/reservations/{id}/cancel"),
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(
        (extra.status, &extra.body["code"]),
        (400, &json!("UNKNOWN_FIELD"))
    );
    let get = app.get(&format!("/v1/reservations/{id}/commit")).await;
    assert_eq!(get.status, 405);

    assert_eq!(in_redis(&app, user).await, (0, 10), "still open and held");
    assert_eq!(commit(&app, &id, json!(4)).await.status, 200);
}

#[tokio::test]
async fn with_redis_paused_a_reserve_is_503_whatever_the_fail_policy_and_holds_nothing_after() {
    let redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        redis_timeout_ms: 300,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let open = held(&app, user, "ai_generation", 5, 300).await;

    redis.pause();
    let r = reserve(&app, user, "ai_generation", 5, 300).await;
    let c = commit(&app, &open, json!(5)).await;
    redis.resume();

    assert_eq!(
        (r.status, &r.body["code"]),
        (503, &json!("REDIS_UNAVAILABLE")),
        "{:?}",
        r.body
    );
    assert_eq!(
        (c.status, &c.body["code"]),
        (503, &json!("REDIS_UNAVAILABLE")),
        "{:?}",
        c.body
    );
    // The scripts queued while Redis was stopped ran past their deadlines: they did nothing.
    assert_eq!(in_redis(&app, user).await, (0, 5));
    let again = commit(&app, &open, json!(5)).await;
    assert_eq!(
        (again.status, &again.body["late"]),
        (200, &json!(false)),
        "{:?}",
        again.body
    );
    assert_eq!(in_redis(&app, user).await, (5, 0));
}

#[tokio::test]
async fn a_redis_restart_loses_open_holds_with_it_and_keeps_flushed_commits() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis).await;
    let user = Uuid::new_v4();
    let done = held(&app, user, "ai_generation", 10, 300).await;
    let open = held(&app, user, "ai_generation", 30, 300).await;
    assert_eq!(commit(&app, &done, json!(8)).await.status, 200);
    app.flush().await;

    redis.restart();

    // The counter comes back from Postgres with its count and no hold; the open reservation
    // is gone with Redis' data.
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["held"], &usage["remaining"]),
        (&json!(8), &json!(0), &json!(42))
    );
    let c = commit(&app, &open, json!(30)).await;
    assert_eq!(
        (c.status, &c.body["code"]),
        (404, &json!("UNKNOWN_RESERVATION"))
    );
    assert!(c.body["error"].as_str().unwrap().contains("/v1/track"));
    // A new hold is made as before.
    let r = reserve(&app, user, "ai_generation", 42, 300).await;
    assert_eq!(
        (r.status, &r.body["held"]),
        (200, &json!(42)),
        "{:?}",
        r.body
    );
}

#[tokio::test]
async fn with_postgres_down_holds_and_commits_go_on_and_the_commit_reaches_postgres_once_back() {
    let pg = PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        postgres_url: pg.url(),
        ..Options::default()
    })
    .await;
    let (user, stranger) = (Uuid::new_v4(), Uuid::new_v4());
    let first = held(&app, user, "ai_generation", 10, 300).await;

    pg.stop("fast");
    // The user's counter is in Redis: nothing needs Postgres.
    let second = reserve(&app, user, "ai_generation", 5, 300).await;
    let committed = commit(&app, &first, json!(8)).await;
    let cancelled = cancel(&app, second.body["reservation_id"].as_str().unwrap_or("-")).await;
    // A user Redis does not hold must be loaded from Postgres first: refused, nothing held.
    let unloaded = reserve(&app, stranger, "ai_generation", 5, 300).await;
    pg.resume();

    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(committed.status, 200, "{:?}", committed.body);
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(
        (unloaded.status, &unloaded.body["code"]),
        (503, &json!("DATABASE_UNAVAILABLE")),
        "{:?}",
        unloaded.body
    );
    app.flush().await;
    let count: i64 = sqlx::query_scalar(
        "SELECT count FROM usage_tracking WHERE user_id = $1 AND type = 'ai_generation'",
    )
    .bind(user)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(count, 8);
    assert_eq!(
        reserve(&app, stranger, "ai_generation", 5, 300)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_lifetime_hold_works_like_a_monthly_one_and_the_usage_page_shows_it() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let id = held(&app, user, "kb_file", 4, 300).await;
    let usage = usage_of(&app, user, "kb_file").await;
    assert_eq!(
        (&usage["used"], &usage["held"], &usage["remaining"]),
        (&json!(0), &json!(4), &json!(16))
    );
    let page = app
        .client
        .get(format!("{}/ui/users/{user}", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("4 more held for work in progress"), "{page}");

    let c = commit(&app, &id, json!(3)).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(
        (&c.body["period_start"], &c.body["period_end"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(usage_of(&app, user, "kb_file").await["used"], 3);
    app.flush().await;
    let count: i64 = sqlx::query_scalar(
        "SELECT count FROM usage_tracking WHERE user_id = $1 AND type = 'kb_file'",
    )
    .bind(user)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(count, 3);
}

#[tokio::test]
async fn reservations_are_counted_in_the_metrics() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let units = |text: &str, outcome: &str| -> u64 {
        let series =
            format!("quotad_reservation_units_total{{type=\"export\",outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let before = app.metrics_text().await;
    let a = held(&app, user, "export", 6, 300).await;
    let b = held(&app, user, "export", 3, 300).await;
    assert_eq!(reserve(&app, user, "export", 9, 300).await.status, 402);
    commit(&app, &a, json!(4)).await;
    commit(&app, &a, json!(4)).await; // a replay counts nothing more
    cancel(&app, &b).await;
    let after = app.metrics_text().await;

    // Other tests in this process count under the same names: compare differences.
    assert!(units(&after, "held") - units(&before, "held") >= 9);
    assert!(units(&after, "committed") - units(&before, "committed") >= 4);
    assert!(units(&after, "released") - units(&before, "released") >= 5);
    for outcome in ["opened", "refused", "committed", "cancelled"] {
        assert!(
            after.contains(&format!(
                "quotad_reservations_total{{type=\"export\",outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing"
        );
    }
}

#[tokio::test]
async fn the_description_states_what_reservations_take_and_answer() {
    use crate::openapi::{properties, response_schema};
    use std::collections::BTreeSet;
    let app = TestApp::spawn().await;
    let spec = app.get("/openapi.json").await.body;
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    let user = Uuid::new_v4();

    let ok = reserve(&app, user, "export", 4, 60).await;
    let refused = reserve(&app, user, "export", 7, 60).await;
    let id = ok.body["reservation_id"].as_str().unwrap().to_owned();
    let committed = commit(&app, &id, json!(3)).await;
    let other = held(&app, user, "export", 1, 60).await;
    let cancelled = cancel(&app, &other).await;
    let conflict = commit(&app, &other, json!(1)).await;
    let unknown = cancel(
        &app,
        &format!("rsv_{}_{}", user.simple(), Uuid::new_v4().simple()),
    )
    .await;

    let described = properties(&spec, response_schema(&spec, "post", "/v1/reserve", 200));
    assert_eq!(
        keys(&ok.body).difference(&described).count(),
        0,
        "{:?} vs {described:?}",
        ok.body
    );
    for field in [
        "reservation_id",
        "amount",
        "expires_at",
        "held",
        "used",
        "remaining",
    ] {
        assert!(
            described.contains(field) && ok.body.get(field).is_some(),
            "{field}"
        );
    }
    assert_eq!(
        keys(&refused.body),
        properties(&spec, response_schema(&spec, "post", "/v1/reserve", 402))
            .into_iter()
            .filter(|k| !["degraded", "user", "account"].contains(&k.as_str()))
            .collect()
    );
    let closed = |path: &str| {
        properties(&spec, response_schema(&spec, "post", path, 200))
            .into_iter()
            .filter(|k| k != "account")
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        keys(&committed.body),
        closed("/v1/reservations/{reservation_id}/commit")
    );
    assert_eq!(
        keys(&cancelled.body),
        closed("/v1/reservations/{reservation_id}/cancel")
    );
    let error = properties(&spec, &spec["components"]["schemas"]["ErrorBody"]);
    for (a, path, status) in [
        (&conflict, "/v1/reservations/{reservation_id}/commit", 409),
        (&unknown, "/v1/reservations/{reservation_id}/cancel", 404),
    ] {
        assert_eq!(a.status, status, "{:?}", a.body);
        assert!(keys(&a.body).is_subset(&error), "{:?}", a.body);
        assert!(
            response_schema(&spec, "post", path, status).is_object(),
            "{path} {status}"
        );
    }

    // The bounds and names the server checks.
    let schemas = &spec["components"]["schemas"];
    let request = &schemas["ReserveRequest"];
    let ttl = &request["properties"]["ttl_seconds"];
    assert_eq!(
        (&ttl["minimum"], &ttl["maximum"]),
        (&json!(1), &json!(86400))
    );
    let amount = &request["properties"]["amount"];
    assert_eq!(
        (&amount["minimum"], &amount["maximum"]),
        (&json!(1), &json!(1000000))
    );
    assert_eq!(
        request["properties"]["type"]["enum"],
        json!(["ai_generation", "export", "kb_file"])
    );
    let required: BTreeSet<&str> = request["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["user_id", "type", "ttl_seconds"]));
    let commit_amount = &schemas["CommitRequest"]["properties"]["amount"];
    assert_eq!(
        (&commit_amount["minimum"], &commit_amount["maximum"]),
        (&json!(0), &json!(1000000))
    );
    for path in [
        "/v1/reservations/{reservation_id}/commit",
        "/v1/reservations/{reservation_id}/cancel",
    ] {
        let param = &spec["paths"][path]["post"]["parameters"][0];
        assert_eq!(param["name"], "reservation_id");
        assert_eq!(
            param["schema"]["pattern"],
            "^rsv_[0-9a-f]{32}_[0-9a-f]{32}$"
        );
    }
    assert!(quotad::reservations::ReservationId::parse(&id).is_some());
}

#[tokio::test]
async fn a_commit_records_the_threshold_events_its_count_causes_as_a_track_would() {
    let plans = crate::notifications::notify_plans();
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.0.clone()),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    // Holds reach 80 % of the limit, counts do not: nothing fires on a hold.
    let id = held(&app, user, "ai_generation", 45, 300).await;
    app.flush().await;
    let events = |db: sqlx::PgPool| async move {
        sqlx::query_as::<_, (i32, i64, i64)>(
            r#"SELECT threshold, used, "limit" FROM usage_events WHERE user_id = $1 ORDER BY threshold"#,
        )
        .bind(user)
        .fetch_all(&db)
        .await
        .unwrap()
    };
    assert_eq!(events(app.db().await).await, []);

    assert_eq!(commit(&app, &id, json!(42)).await.status, 200);
    app.flush().await;

    assert_eq!(events(app.db().await).await, [(80, 42, 50)]);
}

#[tokio::test]
async fn a_hold_may_reach_into_the_overage_cap_and_its_commit_counts_overage_as_a_track_would() {
    // ai_generation: 50 a month and 100 of overage; export: a soft limit of 10.
    let text = quotad::plans::BUILT_IN
        .replace(
            "ai_generation = 50",
            "ai_generation = { limit = 50, overage = 100 }",
        )
        .replace("export = 10", "export = { limit = 10, soft = true }");
    assert!(text.contains("overage = 100") && text.contains("soft = true"));
    let file = crate::helpers::tempfile_path::write(&text);
    let app = TestApp::spawn_with(Options {
        plans: Some(file.to_path_buf()),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    for _ in 0..40 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }

    // 40 used: 110 more fit in 50 + 100, 111 do not.
    let over = reserve(&app, user, "ai_generation", 111, 300).await;
    assert_eq!(over.status, 402, "{:?}", over.body);
    let r = reserve(&app, user, "ai_generation", 110, 300).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (
            &r.body["held"],
            &r.body["remaining"],
            &r.body["overage"],
            &r.body["overage_added"]
        ),
        (&json!(110), &json!(0), &json!(0), &json!(0))
    );
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let refused = app.consume(user, "ai_generation").await;
    assert_eq!(refused.status, 402, "the cap is held: {:?}", refused.body);

    let id = r.body["reservation_id"].as_str().unwrap();
    let c = commit(&app, id, json!(30)).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!(
        (&usage["used"], &usage["overage"], &usage["held"]),
        (&json!(70), &json!(20), &json!(0)),
        "units 51 to 70 are overage"
    );
    app.flush().await;
    let (count, overage): (i64, i64) = sqlx::query_as(
        "SELECT count, overage FROM usage_tracking WHERE user_id = $1 AND type = 'ai_generation'",
    )
    .bind(user)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!((count, overage), (70, 20));

    // A soft limit never refuses a hold either.
    let soft = reserve(&app, user, "export", 500, 300).await;
    assert_eq!(
        (soft.status, &soft.body["held"]),
        (200, &json!(500)),
        "{:?}",
        soft.body
    );
}

#[tokio::test]
async fn between_full_passes_the_sweeper_looks_only_at_the_buckets_its_daemon_s_reserves_noted() {
    // No background sweeper ticks here (the default test interval is an hour): passes by hand.
    let app = TestApp::spawn().await;
    let noted =
        quotad::reservations::Sweeper::new(&app.state.quota.store, app.state.quota.holds.clone());
    let blind = quotad::reservations::Sweeper::new(&app.state.quota.store, Default::default());
    let user = Uuid::new_v4();
    assert!(app.state.quota.holds.is_empty());
    held(&app, user, "ai_generation", 7, 1).await;
    assert_eq!(
        app.state.quota.holds.len(),
        1,
        "the reserve noted its bucket"
    );
    assert_eq!(noted.sweep_known().await.unwrap().expired, 0, "not due yet");
    assert_eq!(app.state.quota.holds.len(), 1, "still noted");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A sweeper that knows of no reservation does not look at all between full passes.
    assert_eq!(blind.sweep_known().await.unwrap(), Default::default());
    let swept = noted.sweep_known().await.unwrap();
    assert_eq!((swept.expired, swept.freed), (1, 7));
    assert!(app.state.quota.holds.is_empty(), "nothing left to look at");
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 0);

    // A full pass finds what another daemon made (here: what no registry noted), and learns
    // the earliest expiry not due yet of every bucket it saw.
    held(&app, user, "ai_generation", 3, 1).await;
    held(&app, user, "ai_generation", 4, 300).await;
    assert_eq!(blind.sweep_once().await.unwrap().expired, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let swept = blind.sweep_known().await.unwrap();
    assert_eq!(
        (swept.expired, swept.freed),
        (1, 3),
        "learned in the full pass"
    );
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 4);
}

#[tokio::test]
async fn a_reserve_retried_with_its_idempotency_key_holds_once_and_answers_the_same_reservation() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    let user = Uuid::new_v4();
    let keyed = |amount: u64, key: &str| {
        json!({"user_id": user, "type": "ai_generation", "amount": amount, "ttl_seconds": 300,
            "idempotency_key": key})
    };
    let first = app.post("/v1/reserve", keyed(20, "gen-1")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let id = first.body["reservation_id"].as_str().unwrap().to_owned();
    // The retry, on another replica (the first answer was lost): the same reservation, held once.
    let again = replica.post("/v1/reserve", keyed(20, "gen-1")).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["reservation_id"], id.as_str());
    assert_eq!(again.body["expires_at"], first.body["expires_at"]);
    assert_eq!(again.body["held"], 20);
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 20);

    // The key belongs to that reservation: another amount or type is refused, nothing held.
    let other = app.post("/v1/reserve", keyed(5, "gen-1")).await;
    assert_eq!(other.status, 409, "{:?}", other.body);
    assert_eq!(other.body["code"], "IDEMPOTENCY_KEY_REUSED");
    let mut export = keyed(20, "gen-1");
    export["type"] = json!("export");
    assert_eq!(app.post("/v1/reserve", export).await.status, 409);
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 20);

    // Committed, a retry still finds it: no new hold.
    assert_eq!(commit(&app, &id, json!(12)).await.status, 200);
    let late = app.post("/v1/reserve", keyed(20, "gen-1")).await;
    assert_eq!(late.status, 200, "{:?}", late.body);
    assert_eq!(late.body["reservation_id"], id.as_str());
    let usage = usage_of(&app, user, "ai_generation").await;
    assert_eq!((&usage["used"], &usage["held"]), (&json!(12), &json!(0)));

    // Another key, or the same key of another user, is another reservation.
    let second = app.post("/v1/reserve", keyed(3, "gen-2")).await;
    assert_eq!(second.status, 200);
    assert_ne!(second.body["reservation_id"], id.as_str());
    let stranger = Uuid::new_v4();
    let theirs = app
        .post(
            "/v1/reserve",
            json!({"user_id": stranger, "type": "ai_generation", "amount": 20, "ttl_seconds": 300,
                "idempotency_key": "gen-1"}),
        )
        .await;
    assert_eq!(theirs.status, 200);
    assert_ne!(theirs.body["reservation_id"], id.as_str());
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 3);

    // A key with a control character is refused, nothing held.
    let bad = app.post("/v1/reserve", keyed(1, "a\u{0007}b")).await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert_eq!(
        (&bad.body["code"], &bad.body["field"]),
        (&json!("INVALID_IDEMPOTENCY_KEY"), &json!("idempotency_key"))
    );
    assert_eq!(usage_of(&app, user, "ai_generation").await["held"], 3);
}

#[tokio::test]
async fn a_sweep_that_redis_does_not_answer_keeps_its_buckets_to_look_at_again() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis).await;
    let sweeper =
        quotad::reservations::Sweeper::new(&app.state.quota.store, app.state.quota.holds.clone());
    let user = Uuid::new_v4();
    held(&app, user, "ai_generation", 7, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    redis.kill();
    assert!(sweeper.sweep_known().await.is_err());
    assert_eq!(
        app.state.quota.holds.len(),
        1,
        "the due bucket is looked at again at the next tick"
    );
    redis.restart();
    // A Redis that lost its data lost the hold with it: the next look finds nothing to free and
    // leaves nothing noted.
    let swept = sweeper.sweep_known().await.unwrap();
    assert_eq!(swept.expired, 0);
    assert!(app.state.quota.holds.is_empty());
}
