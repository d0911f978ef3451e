//! Month boundaries, crossed by setting the injected clock, and the expiries Redis keeps by its own
//! clock (a month's hashes, lifetime hashes, idempotency records).

use serde_json::json;
use uuid::Uuid;

use chrono::{Datelike, Duration, TimeZone, Utc};
use quotad::period::Period;

use crate::helpers::{month_period, month_start, rfc, Options, TestApp};

/// Months from the current real month to the next December (0 in December): a year-end test runs
/// in a December whose hashes Redis has not yet expired.
fn months_to_december() -> i32 {
    12 - month_start(0).month() as i32
}

/// The first leap year after the current real year.
fn next_leap_year() -> i32 {
    let leap = |y: i32| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    (month_start(0).year() + 1..).find(|y| leap(*y)).unwrap()
}

#[tokio::test]
async fn fifty_used_at_the_last_second_of_a_month_and_a_fresh_month_at_midnight_utc() {
    let app = TestApp::spawn_with(Options {
        now: month_start(1) - Duration::seconds(1),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    for _ in 0..50 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    let refused = app.consume(user, "ai_generation").await;
    assert_eq!(refused.status, 402);
    assert_eq!(
        refused.header("retry-after"),
        Some("1"),
        "one second to the reset"
    );

    app.set_at(month_start(1));
    let next = app.consume(user, "ai_generation").await;

    assert_eq!(next.status, 200, "{:?}", next.body);
    assert_eq!(next.body["used"], 1);
    assert_eq!(next.body["period_start"], rfc(month_start(1)).as_str());
    assert_eq!(next.body["resets_at"], rfc(month_start(2)).as_str());
}

#[tokio::test]
async fn december_rolls_into_january_of_the_next_year() {
    let december = months_to_december();
    let new_year = month_start(december + 1);
    assert_eq!((new_year.month(), new_year.day()), (1, 1));
    assert_eq!(new_year.year(), month_start(december).year() + 1);
    let app = TestApp::spawn_with(Options {
        now: new_year - Duration::milliseconds(1),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "export", "amount": 10}),
    )
    .await;
    assert_eq!(app.consume(user, "export").await.status, 402);

    app.set_at(new_year);
    let january = app.consume(user, "export").await;

    assert_eq!((january.status, &january.body["used"]), (200, &json!(1)));
    assert_eq!(
        january.body["period_start"],
        format!("{}-01-01T00:00:00Z", new_year.year())
    );
}

#[tokio::test]
async fn lifetime_counters_do_not_reset_with_the_month() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "kb_file", "amount": 4}),
    )
    .await;

    // Four months on, a day into the month.
    app.set_at(month_start(4) + Duration::days(1));

    assert_eq!(app.used(user, "kb_file").await, 4);
    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    assert_eq!(
        usage.body["usage"]["ai_generation"]["period_start"],
        rfc(month_start(4)).as_str()
    );
}

#[tokio::test]
async fn leap_day_belongs_to_february() {
    let year = next_leap_year();
    let app = TestApp::spawn_with(Options {
        now: Utc.with_ymd_and_hms(year, 2, 29, 23, 59, 59).unwrap(),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();

    let a = app.consume(user, "ai_generation").await;

    assert_eq!(a.body["period_start"], format!("{year}-02-01T00:00:00Z"));
    assert_eq!(a.body["period_end"], format!("{year}-03-01T00:00:00Z"));
    assert_eq!(a.header("ratelimit-reset"), Some("1"));
}

/// Redis' own expiry of `key`, as unix seconds (`EXPIRETIME`): -1 none, -2 no such key.
async fn expire_time(app: &TestApp, key: &str) -> i64 {
    deadpool_redis::redis::cmd("EXPIRETIME")
        .arg(key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_keeps_a_months_hashes_35_days_past_its_end_lifetime_ones_always_and_answers_24_hours(
) {
    let app = TestApp::spawn().await;
    let store = &app.state.quota.store;
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    // The expected instants come from the calendar here: the month's end plus 35 whole days.
    let this_month_until = (month_start(1) + Duration::days(35)).timestamp();
    let next_month_until = (month_start(2) + Duration::days(35)).timestamp();

    // Loaded from Postgres on the first consume (hydrate), with an idempotency record.
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let k = app.consume(user, "kb_file").await;
    assert_eq!(k.status, 200, "{:?}", k.body);

    let month_hash = store.keys(user).counter(month_period(0));
    let life_hash = store.keys(user).counter(Period::Lifetime);
    assert_eq!(expire_time(&app, &month_hash).await, this_month_until);
    assert_eq!(
        expire_time(&app, &life_hash).await,
        -1,
        "a lifetime hash exists and never expires"
    );
    let record_ttl: i64 = deadpool_redis::redis::cmd("TTL")
        .arg(store.keys(user).idempotency("k1"))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert!(
        (24 * 3600 - 5..=24 * 3600).contains(&record_ttl),
        "an idempotency record lives 24 h: TTL {record_ttl}"
    );

    // The next month: a hash started in Redis alone (start_fresh) and one made by a plan change
    // (set_plan) follow the same rule from their own month's end.
    app.set_at(month_start(1) + Duration::minutes(5));
    let fresh = app.consume(user, "ai_generation").await;
    assert_eq!(
        (fresh.status, &fresh.body["used"]),
        (200, &json!(1)),
        "{:?}",
        fresh.body
    );
    app.set_plan(other, "PRO").await;
    assert_eq!(
        expire_time(&app, &store.keys(user).counter(month_period(1))).await,
        next_month_until
    );
    assert_eq!(
        expire_time(&app, &store.keys(other).counter(month_period(1))).await,
        next_month_until
    );
    assert_eq!(
        expire_time(&app, &store.keys(other).counter(Period::Lifetime)).await,
        -1
    );
    assert_eq!(
        expire_time(&app, &month_hash).await,
        this_month_until,
        "last month's hash keeps its own expiry"
    );
}
