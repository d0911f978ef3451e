//! The counting scripts' contracts at their edges: a refused call writes nothing (metadata sums
//! that would overflow, corrupt data), a refunded key stays refunded, check honours idempotency
//! keys, a release or refund that lowers nothing changes nothing, a month hash lost on its own is
//! loaded again rather than restarted at 0, reads leave no hash that never expires, and a plan
//! change just before midnight reaches the next month's hash.

use deadpool_redis::redis;
use quotad::period::{Period, PeriodKind};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{month_start, period_id, Options, PrivateRedis, TestApp};
use crate::performance::commandstats;

fn month(n: i32) -> Period {
    Period::current(PeriodKind::Month, month_start(n))
}

pub(crate) async fn hget(app: &TestApp, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

pub(crate) async fn hset(app: &TestApp, key: &str, field: &str, value: &str) {
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
}

/// Whether `user`'s counter in `period` is on its bucket's dirty set.
async fn is_dirty(app: &TestApp, user: Uuid, period: Period) -> bool {
    let store = &app.state.quota.store;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(store.keys(user).dirty())
        .arg(quotad::store::keys::member(
            quotad::store::Owner::User(user),
            period,
        ))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    score.is_some()
}

pub(crate) async fn exists(app: &TestApp, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut app.redis().await)
        .await
        .unwrap()
        == 1
}

async fn ttl(app: &TestApp, key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

async fn pg_row(app: &TestApp, user: Uuid, ty: &str) -> Option<(i64, Value, i64)> {
    sqlx::query_as(
        "SELECT count, metadata, version FROM usage_tracking WHERE user_id = $1 AND type = $2 ORDER BY period_start DESC LIMIT 1",
    )
    .bind(user)
    .bind(ty)
    .fetch_optional(&app.db().await)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_metadata_sum_beyond_a_float_is_refused_with_400_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let key = app.state.quota.store.keys(user).counter(month(0));
    let first = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "metadata": {"prompt_tokens": 1e308, "model": "m-1"}}),
        )
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    app.flush().await;
    let version = hget(&app, &key, "v").await;

    let second = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "huge",
                   "metadata": {"prompt_tokens": 1e308, "model": "m-2"}}),
        )
        .await;

    assert_eq!(second.status, 400, "{:?}", second.body);
    assert_eq!(second.body["code"], "INVALID_METADATA");
    assert_eq!(second.body["field"], "metadata");
    let text = second.body["error"].as_str().unwrap();
    assert!(
        text.contains("prompt_tokens") && text.contains("exceed"),
        "names the field and why: {text}"
    );
    assert_eq!(app.used(user, "ai_generation").await, 1, "counts nothing");
    assert_eq!(hget(&app, &key, "v").await, version, "no version bump");
    assert_eq!(
        hget(&app, &key, "s:ai_generation:model").await.as_deref(),
        Some("\"m-1\""),
        "no metadata written"
    );
    assert!(!is_dirty(&app, user, month(0)).await, "no dirty mark");
    let record = app.state.quota.store.keys(user).idempotency("huge");
    assert!(!exists(&app, &record).await, "no idempotency record");
    // The sum Postgres holds is the one finite value, kept at full precision.
    let (count, metadata, _) = pg_row(&app, user, "ai_generation").await.unwrap();
    assert_eq!(count, 1);
    assert_eq!(metadata["prompt_tokens"].as_f64(), Some(1e308));
    // A negative sum past the range is refused the same way.
    let negative = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "metadata": {"cost": -1.7e308}}),
        )
        .await;
    assert_eq!(negative.status, 200, "{:?}", negative.body);
    let below = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "metadata": {"cost": -1.7e308}}),
        )
        .await;
    assert_eq!(
        (below.status, &below.body["code"]),
        (400, &json!("INVALID_METADATA"))
    );
    assert_eq!(app.used(user, "ai_generation").await, 2);
}

#[tokio::test]
async fn metadata_sums_keep_full_precision() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for v in [0.1, 0.2, 812.0] {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "metadata": {"cost": v}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let key = app.state.quota.store.keys(user).counter(month(0));
    let stored: f64 = hget(&app, &key, "m:ai_generation:cost")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        stored,
        0.1 + 0.2 + 812.0,
        "the exact double, not a rounded one"
    );
}

#[tokio::test]
async fn a_stored_sum_that_is_not_a_number_starts_again_and_the_call_counts_whole() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let key = app.state.quota.store.keys(user).counter(month(0));
    app.consume(user, "ai_generation").await;
    app.flush().await;
    hset(&app, &key, "m:ai_generation:prompt_tokens", "not-a-number").await;

    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k",
                   "metadata": {"prompt_tokens": 5}}),
        )
        .await;

    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["used"], 2);
    assert_eq!(
        hget(&app, &key, "m:ai_generation:prompt_tokens")
            .await
            .as_deref(),
        Some("5")
    );
    assert!(is_dirty(&app, user, month(0)).await, "marked dirty");
    let record = app.state.quota.store.keys(user).idempotency("k");
    assert!(
        exists(&app, &record).await,
        "the idempotency record is kept"
    );
    app.flush().await;
    let (count, metadata, _) = pg_row(&app, user, "ai_generation").await.unwrap();
    assert_eq!((count, &metadata["prompt_tokens"]), (2, &json!(5)));
}

#[tokio::test]
async fn a_corrupt_version_stops_the_call_before_it_counts() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let key = app.state.quota.store.keys(user).counter(month(0));
    app.consume(user, "ai_generation").await;
    app.flush().await;
    hset(&app, &key, "v", "garbage").await;

    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k"}),
        )
        .await;

    assert!(a.status >= 500, "{:?}", a.body);
    assert_eq!(
        hget(&app, &key, "ai_generation").await.as_deref(),
        Some("1"),
        "nothing counted"
    );
    assert!(!is_dirty(&app, user, month(0)).await);
    let record = app.state.quota.store.keys(user).idempotency("k");
    assert!(!exists(&app, &record).await);
}

#[tokio::test]
async fn a_refunded_key_sent_again_is_409_and_counts_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for (endpoint, ty, key) in [
        ("/v1/consume", "export", "c-1"),
        ("/v1/track", "ai_generation", "t-1"),
    ] {
        let body = json!({"user_id": user, "type": ty, "idempotency_key": key});
        assert_eq!(app.post(endpoint, body.clone()).await.status, 200);
        let refund = app
            .post(
                "/v1/refund",
                json!({"user_id": user, "idempotency_key": key}),
            )
            .await;
        assert_eq!(refund.status, 200, "{:?}", refund.body);

        let again = app.post(endpoint, body).await;

        assert_eq!(again.status, 409, "{endpoint}: {:?}", again.body);
        assert_eq!(again.body["code"], "IDEMPOTENCY_KEY_REFUNDED");
        assert!(
            again.body["error"].as_str().unwrap().contains("new key"),
            "{:?}",
            again.body
        );
        assert!(again.header("idempotent-replayed").is_none());
        assert_eq!(app.used(user, ty).await, 0, "{endpoint}: nothing counted");
    }
}

#[tokio::test]
async fn check_with_a_key_of_an_earlier_consume_is_409_and_a_new_key_is_decided_normally() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "export", "idempotency_key": "used"}),
    )
    .await;

    let reused = app
        .post(
            "/v1/check",
            json!({"user_id": user, "type": "export", "idempotency_key": "used"}),
        )
        .await;
    let fresh = app
        .post(
            "/v1/check",
            json!({"user_id": user, "type": "export", "idempotency_key": "fresh"}),
        )
        .await;
    let other_user = app
        .post(
            "/v1/check",
            json!({"user_id": Uuid::new_v4(), "type": "export", "idempotency_key": "used"}),
        )
        .await;

    assert_eq!(
        (reused.status, &reused.body["code"]),
        (409, &json!("IDEMPOTENCY_KEY_REUSED")),
        "{:?}",
        reused.body
    );
    assert_eq!(fresh.status, 200, "{:?}", fresh.body);
    assert_eq!(
        (&fresh.body["allowed"], &fresh.body["used"]),
        (&json!(true), &json!(1))
    );
    assert_eq!(other_user.status, 200, "keys belong to their user");
    // check recorded nothing under "fresh": a consume with it counts, it does not replay.
    let consume = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "idempotency_key": "fresh"}),
        )
        .await;
    assert_eq!((consume.status, &consume.body["used"]), (200, &json!(2)));
    assert!(consume.header("idempotent-replayed").is_none());
    assert_eq!(app.used(user, "export").await, 2);
}

#[tokio::test]
async fn a_release_or_refund_that_lowers_nothing_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let key = app.state.quota.store.keys(user).counter(Period::Lifetime);
    let counted = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "kb_file", "amount": 3, "idempotency_key": "three"}),
        )
        .await;
    assert_eq!(counted.status, 200, "{:?}", counted.body);

    // Release more than is left: lowered to 0, reports what was given back.
    let release = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 2}),
        )
        .await;
    assert_eq!(release.status, 200, "{:?}", release.body);
    assert_eq!(
        (&release.body["used"], &release.body["released"]),
        (&json!(1), &json!(2))
    );
    // A refund of the 3 finds only 1 left: gives back 1.
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "three"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(
        (&refund.body["used"], &refund.body["refunded"]),
        (&json!(0), &json!(1))
    );
    app.flush().await;
    let version = hget(&app, &key, "v").await;
    assert!(version.is_some());

    // The counter is at 0: a release changes nothing.
    let nothing = app
        .post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": 5}),
        )
        .await;
    assert_eq!(nothing.status, 200, "{:?}", nothing.body);
    assert_eq!(
        (&nothing.body["used"], &nothing.body["released"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(hget(&app, &key, "v").await, version, "no version bump");
    assert!(
        !is_dirty(&app, user, Period::Lifetime).await,
        "no dirty mark"
    );

    // Nor does a refund of a call whose count a release already took back; it is still refunded once.
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "kb_file", "idempotency_key": "one"}),
    )
    .await;
    app.post(
        "/v1/release",
        json!({"user_id": user, "type": "kb_file", "amount": 1}),
    )
    .await;
    app.flush().await;
    let version = hget(&app, &key, "v").await;
    let zero = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "one"}),
        )
        .await;
    assert_eq!(zero.status, 200, "{:?}", zero.body);
    assert_eq!(
        (&zero.body["used"], &zero.body["refunded"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(hget(&app, &key, "v").await, version, "no version bump");
    assert!(
        !is_dirty(&app, user, Period::Lifetime).await,
        "no dirty mark"
    );
    let again = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "one"}),
        )
        .await;
    assert_eq!(again.body["code"], "ALREADY_REFUNDED");
}

#[tokio::test]
async fn a_release_that_lowers_nothing_announces_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    app.post("/v1/consume", json!({"user_id": user, "type": "kb_file"}))
        .await;
    let client = redis::Client::open(app.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(app.state.quota.store.changes_channel())
        .await
        .unwrap();
    let release = |n: u64| {
        app.post(
            "/v1/release",
            json!({"user_id": user, "type": "kb_file", "amount": n}),
        )
    };
    assert_eq!(release(1).await.body["released"], 1);
    assert_eq!(release(1).await.body["released"], 0);
    assert_eq!(release(1).await.body["released"], 0);
    // A marker after them: every announcement sent before it has arrived when it does.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(app.state.quota.store.changes_channel())
        .arg("end")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();

    use futures_util::StreamExt;
    let mut stream = pubsub.on_message();
    let mut heard = Vec::new();
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("the announcements arrive")
            .unwrap();
        let text: String = msg.get_payload().unwrap();
        if text == "end" {
            break;
        }
        heard.push(text);
    }
    assert_eq!(
        heard,
        vec![user.to_string()],
        "only the release that lowered announced"
    );
}

#[tokio::test]
async fn a_month_hash_lost_on_its_own_continues_from_postgres_not_zero() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    // Month M: loaded from Postgres (sets the bucket's marker), counted, flushed.
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.flush().await;
    // M+1: starts fresh (no Postgres read), counts 2, flushed.
    app.set_at(month_start(1) + chrono::Duration::minutes(5));
    for n in 1..=2 {
        let a = app.consume(user, "ai_generation").await;
        assert_eq!((a.status, &a.body["used"]), (200, &json!(n)));
    }
    app.flush().await;
    let next = app.state.quota.store.keys(user).counter(month(1));
    let (count, _, version) = pg_row(&app, user, "ai_generation").await.unwrap();
    assert_eq!(count, 2);

    // The M+1 hash alone is lost; the marker and M's hash survive.
    let _: i64 = redis::cmd("DEL")
        .arg(&next)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert!(exists(&app, &app.state.quota.store.keys(user).since()).await);
    assert!(exists(&app, &app.state.quota.store.keys(user).counter(month(0))).await);

    let a = app.consume(user, "ai_generation").await;

    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["used"], 3,
        "continues from Postgres' 2: {:?}",
        a.body
    );
    assert_eq!(
        hget(&app, &next, "v")
            .await
            .map(|v| v.parse::<i64>().unwrap()),
        Some(version + 1),
        "the version continues from Postgres' too"
    );
    app.flush().await;
    let (count, _, newer) = pg_row(&app, user, "ai_generation").await.unwrap();
    assert_eq!((count, newer), (3, version + 1), "Postgres takes the flush");
}

#[tokio::test]
async fn a_month_loaded_again_after_it_ended_still_keeps_its_successor_from_starting_fresh() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let store = &app.state.quota.store;
    app.post(
        "/v1/consume",
        json!({"user_id": user, "type": "ai_generation", "idempotency_key": "k"}),
    )
    .await;
    app.consume(user, "ai_generation").await;
    app.flush().await;
    app.set_at(month_start(1) + chrono::Duration::minutes(5));
    for _ in 0..2 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    app.flush().await;
    // Month M is lost alone, then loaded again by a refund of one of its calls.
    let _: i64 = redis::cmd("DEL")
        .arg(store.keys(user).counter(month(0)))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "k"}),
        )
        .await;
    assert_eq!((refund.status, &refund.body["used"]), (200, &json!(1)));
    app.flush().await;
    // Then M+1 is lost alone: it must be loaded, not restarted at 0.
    let _: i64 = redis::cmd("DEL")
        .arg(store.keys(user).counter(month(1)))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();

    let a = app.consume(user, "ai_generation").await;

    assert_eq!(
        a.body["used"], 3,
        "continues from Postgres' 2: {:?}",
        a.body
    );
    app.flush().await;
    let (count, _, _) = pg_row(&app, user, "ai_generation").await.unwrap();
    assert_eq!(count, 3, "Postgres takes the flush");
}

#[tokio::test]
async fn reads_of_unknown_users_leave_no_hash_that_never_expires() {
    let app = TestApp::spawn().await;
    let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(app.get(&format!("/v1/users/{u}/usage")).await.status, 200);
    }
    let checked = Uuid::new_v4();
    let c = app
        .post("/v1/check", json!({"user_id": checked, "type": "kb_file"}))
        .await;
    assert_eq!(c.status, 200, "{:?}", c.body);

    let life: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:c:*:life", app.prefix))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(life.len(), 101, "one lifetime hash per user read");
    for key in &life {
        let t = ttl(&app, key).await;
        assert!(
            (1..=quotad::store::EMPTY_LIFETIME_TTL_SECS as i64).contains(&t),
            "{key}: TTL {t}"
        );
    }

    // The first count makes it last, inside the same script.
    let a = app.consume(users[0], "kb_file").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let key = app
        .state
        .quota
        .store
        .keys(users[0])
        .counter(Period::Lifetime);
    assert_eq!(
        ttl(&app, &key).await,
        -1,
        "a counted lifetime hash has no expiry"
    );

    // A user Postgres knows is loaded with no expiry, too.
    app.flush().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(app.used(users[0], "kb_file").await, 1);
    assert_eq!(ttl(&app, &key).await, -1);
}

#[tokio::test]
async fn a_plan_change_just_before_midnight_reaches_the_next_months_hash() {
    let after = TestApp::spawn_with(Options {
        now: month_start(1) + chrono::Duration::seconds(1),
        ..Options::default()
    })
    .await;
    let before = after.replica().await;
    before.set_at(month_start(1) - chrono::Duration::seconds(1));
    let user = Uuid::new_v4();
    // One replica is already in M+1: the user's M+1 hash exists, on the default plan.
    let first = after.consume(user, "ai_generation").await;
    assert_eq!(first.body["plan"], "FREE", "{:?}", first.body);

    // The other, a moment behind, changes the plan while its clock still reads month M.
    before.set_plan(user, "PRO").await;

    let next = after.state.quota.store.keys(user).counter(month(1));
    assert_eq!(hget(&after, &next, "p").await.as_deref(), Some("PRO"));
    let a = after.consume(user, "ai_generation").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        (&a.body["plan"], &a.body["unlimited"]),
        (&json!("PRO"), &json!(true)),
        "decided under the new plan: {:?}",
        a.body
    );
    // An adjacent month whose hash does not exist is not created by a plan change.
    let previous = after.state.quota.store.keys(user).counter(month(-1));
    assert!(!exists(&after, &previous).await);
}

/// How many times Redis ran `command` (scripts' calls included).
async fn calls(app: &TestApp, command: &str) -> u64 {
    commandstats(&mut app.redis().await)
        .await
        .get(command)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_counter_is_marked_dirty_on_its_first_change_after_a_flush_and_the_flush_clears_the_mark()
{
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    let user = Uuid::new_v4();
    let period = month(0);
    let key = app.state.quota.store.keys(user).counter(period);

    for _ in 0..5 {
        assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    }
    assert!(is_dirty(&app, user, period).await);
    assert_eq!(hget(&app, &key, "x:dirty").await.as_deref(), Some("1"));
    assert_eq!(calls(&app, "zadd").await, 1, "five counts, one mark");

    app.flush().await;
    assert!(!is_dirty(&app, user, period).await);
    assert_eq!(hget(&app, &key, "x:dirty").await, None);
    assert_eq!(
        pg_row(&app, user, "ai_generation").await.map(|r| r.0),
        Some(5)
    );

    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    assert!(is_dirty(&app, user, period).await);
    assert_eq!(hget(&app, &key, "x:dirty").await.as_deref(), Some("1"));
    assert_eq!(calls(&app, "zadd").await, 2);
    app.flush().await;
    assert_eq!(
        pg_row(&app, user, "ai_generation").await.map(|r| r.0),
        Some(6)
    );
}

/// The mark lives in two places (the dirty set and the hash's flag), kept together by the
/// scripts. A dirty set deleted by hand leaves flags behind, so later counts are not flushed:
/// reconcile must see that, and its repair must make them flush again.
#[tokio::test]
async fn counts_left_unflushed_by_a_dirty_set_deleted_by_hand_are_found_and_repaired_by_reconcile()
{
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let keys = app.state.quota.store.keys(user);
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.flush().await;
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    let _: i64 = redis::cmd("DEL")
        .arg(keys.dirty())
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.flush().await;
    assert_eq!(
        pg_row(&app, user, "ai_generation").await.map(|r| r.0),
        Some(1),
        "the flag without its member keeps the counter off the flusher's list"
    );

    let report = app
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(
        report.body["drift"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["user_id"].clone(), d["kind"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!(user), json!("different"))],
        "{:?}",
        report.body
    );
    let repaired = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": period_id(0), "repair": true}),
        )
        .await;
    assert_eq!(repaired.status, 200, "{:?}", repaired.body);
    app.flush().await;
    assert_eq!(
        pg_row(&app, user, "ai_generation").await.map(|r| r.0),
        Some(3)
    );
    assert_eq!(app.consume(user, "ai_generation").await.status, 200);
    app.flush().await;
    assert_eq!(
        pg_row(&app, user, "ai_generation").await.map(|r| r.0),
        Some(4),
        "counts after the repair flush as usual"
    );
}

/// Counts are whole numbers below 2^53 (where a script's numbers stop being exact), written in
/// full digits: a count that would reach 2^53, or a stored one already there (corrupt data), stops
/// the call before it writes anything.
#[tokio::test]
async fn counts_near_2_pow_53_are_written_exactly_and_one_that_would_reach_it_is_refused() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let key = app.state.quota.store.keys(user).counter(month(0));
    let track = |amount: u64| {
        app.post(
            "/v1/track",
            json!({"user_id": user, "type": "ai_generation", "amount": amount}),
        )
    };
    assert_eq!(track(1).await.status, 200);
    app.flush().await;

    hset(&app, &key, "ai_generation", "9007199254740000").await;
    let near = track(5).await;
    assert_eq!(near.status, 200, "{:?}", near.body);
    assert_eq!(
        hget(&app, &key, "ai_generation").await.as_deref(),
        Some("9007199254740005"),
        "full digits, no exponent form"
    );

    for stored in ["9007199254740991", "9007199254740992"] {
        hset(&app, &key, "ai_generation", stored).await;
        let version = hget(&app, &key, "v").await;
        let a = track(1).await;
        assert!(a.status >= 500, "{stored}: {:?}", a.body);
        assert_eq!(
            (
                hget(&app, &key, "ai_generation").await.as_deref(),
                hget(&app, &key, "v").await
            ),
            (Some(stored), version),
            "{stored}: nothing written"
        );
    }
}
