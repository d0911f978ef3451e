//! `GET /v1/users/{user_id}/usage/history`: a user's use per past period, from Postgres, as the
//! rows bound their periods.

use chrono::Months;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{anniversary, month_start, rfc, Options, TestApp, UsageRow};

/// The history's entries of one type as (period_start, period_end, used) triples.
fn periods(body: &Value, usage_type: &str) -> Vec<(String, String, u64)> {
    body["history"][usage_type]
        .as_array()
        .unwrap_or_else(|| panic!("no {usage_type} in {body}"))
        .iter()
        .map(|p| {
            (
                p["period_start"].as_str().unwrap().to_owned(),
                p["period_end"].as_str().unwrap().to_owned(),
                p["used"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn month(months: i32, used: u64) -> (String, String, u64) {
    (rfc(month_start(months)), rfc(month_start(months + 1)), used)
}

#[tokio::test]
async fn the_history_lists_each_period_of_the_last_months_oldest_first_as_its_row_bounds_it() {
    let app = TestApp::spawn().await;
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let db = app.db().await;
    for (months, count) in [(-12, 99), (-11, 7), (-5, 20), (-1, 48)] {
        UsageRow::month(user, "ai_generation", months, count)
            .insert(&db)
            .await;
    }
    // Periods that run from the 15th, 09:30: two past ones, the current one (it began this
    // morning), and one that begins next month.
    for (months, count) in [(-2, 3), (-1, 4), (0, 6), (1, 1)] {
        UsageRow::from(
            user,
            "export",
            anniversary(months),
            anniversary(months + 1),
            count,
        )
        .insert(&db)
        .await;
    }
    UsageRow {
        end: None,
        ..UsageRow::from(
            user,
            "kb_file",
            chrono::DateTime::UNIX_EPOCH,
            month_start(0),
            3,
        )
    }
    .insert(&db)
    .await;
    UsageRow::month(other, "ai_generation", -1, 30)
        .insert(&db)
        .await;
    let path = format!("/v1/users/{user}/usage/history");

    // This month's use reaches the history when it is flushed.
    let tracked = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "ai_generation", "amount": 5}),
        )
        .await;
    let before_flush = app.get(&path).await;
    app.flush().await;
    let history = app.get(&path).await;
    let thirteen = app.get(&format!("{path}?months=13")).await;
    let one = app.get(&format!("{path}?months=1")).await;

    assert_eq!(tracked.status, 200, "{:?}", tracked.body);
    assert_eq!(before_flush.status, 200, "{:?}", before_flush.body);
    assert_eq!(
        periods(&before_flush.body, "ai_generation"),
        [month(-11, 7), month(-5, 20), month(-1, 48)],
        "Postgres has no row of this month before the flush"
    );
    assert_eq!(history.status, 200, "{:?}", history.body);
    let now = app.clock_now();
    assert_eq!(history.body["user_id"], user.to_string());
    assert_eq!(history.body["plan"], "FREE");
    assert_eq!(history.body["months"], 12);
    assert_eq!(history.body["until"], rfc(now));
    assert_eq!(
        history.body["since"],
        rfc(now.checked_sub_months(Months::new(12)).unwrap())
    );
    assert_eq!(
        periods(&history.body, "ai_generation"),
        [month(-11, 7), month(-5, 20), month(-1, 48), month(0, 5)],
        "the period that began 12 months ago, before `since`, is not listed"
    );
    let anniversary_period = |m: i32, used| (rfc(anniversary(m)), rfc(anniversary(m + 1)), used);
    assert_eq!(
        periods(&history.body, "export"),
        [
            anniversary_period(-2, 3),
            anniversary_period(-1, 4),
            anniversary_period(0, 6)
        ],
        "a period that begins after now is not listed"
    );
    let types: Vec<&String> = history.body["history"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(types, ["ai_generation", "export"], "no lifetime type");
    assert!(
        history.body["history"]["ai_generation"][0]
            .get("overage")
            .is_none(),
        "FREE has no overage"
    );

    assert_eq!(periods(&thirteen.body, "ai_generation")[0], month(-12, 99));
    assert_eq!(periods(&one.body, "ai_generation"), [month(0, 5)]);
    assert_eq!(periods(&one.body, "export"), [anniversary_period(0, 6)]);
}

#[tokio::test]
async fn overage_is_reported_only_for_the_types_the_plan_lets_go_past_their_limit() {
    let plans = quotad::plans::BUILT_IN.replace(
        "[plans.FREE]\nai_generation = 50",
        "[plans.FREE]\nai_generation = { limit = 50, overage = 100 }",
    );
    let (app, _file) = TestApp::spawn_with_plans(&plans, Options::default()).await;
    let (free, pro) = (Uuid::new_v4(), Uuid::new_v4());
    app.set_plan(pro, "PRO").await;
    let db = app.db().await;
    for user in [free, pro] {
        UsageRow {
            overage: 12,
            ..UsageRow::month(user, "ai_generation", -1, 62)
        }
        .insert(&db)
        .await;
        UsageRow::month(user, "export", -1, 4).insert(&db).await;
    }

    let free_history = app.get(&format!("/v1/users/{free}/usage/history")).await;
    let pro_history = app.get(&format!("/v1/users/{pro}/usage/history")).await;

    assert_eq!(free_history.status, 200, "{:?}", free_history.body);
    let ai = &free_history.body["history"]["ai_generation"][0];
    assert_eq!((&ai["used"], &ai["overage"]), (&json!(62), &json!(12)));
    let export = &free_history.body["history"]["export"][0];
    assert_eq!(export["used"], 4);
    assert!(export.get("overage").is_none(), "{export}");
    assert_eq!(pro_history.body["plan"], "PRO");
    let pro_ai = &pro_history.body["history"]["ai_generation"][0];
    assert_eq!(pro_ai["used"], 62);
    assert!(
        pro_ai.get("overage").is_none(),
        "PRO is unlimited: {pro_ai}"
    );
}

#[tokio::test]
async fn a_user_with_no_recorded_use_has_an_empty_history() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let a = app.get(&format!("/v1/users/{user}/usage/history")).await;

    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["history"],
        json!({"ai_generation": [], "export": []})
    );
    assert_eq!(a.body["plan"], "FREE");
}

#[tokio::test]
async fn bad_months_and_unknown_parameters_are_refused_naming_them() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    UsageRow::month(user, "ai_generation", -1, 9)
        .insert(&app.db().await)
        .await;
    let path = format!("/v1/users/{user}/usage/history");
    let huge = "9".repeat(5000);

    for months in [
        "0",
        "37",
        "abc",
        "1e3",
        "",
        "-1",
        "+5",
        "3.0",
        "%00",
        "%E2%80%8B1",
        &huge,
    ] {
        let a = app.get(&format!("{path}?months={months}")).await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!("INVALID_MONTHS"), &json!("months")),
            "months={}: {:?}",
            &months[..months.len().min(20)],
            a.body
        );
        let error = a.body["error"].as_str().unwrap();
        assert!(
            error.starts_with("months must be a whole number from 1 to 36"),
            "{error}"
        );
        assert!(error.len() < 300, "the value is echoed short: {error}");
    }
    for (query, field) in [("foo=1", "foo"), ("months=3&months=4", "months")] {
        let a = app.get(&format!("{path}?{query}")).await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!("INVALID_QUERY"), &json!(field)),
            "{query}: {:?}",
            a.body
        );
    }
    let not_a_user = app.get("/v1/users/not-a-uuid/usage/history").await;
    assert_eq!(
        (not_a_user.status, &not_a_user.body["code"]),
        (400, &json!("INVALID_USER_ID"))
    );
    let posted = app.post(&path, json!({})).await;
    assert_eq!(posted.status, 405);
    let edge = app.get(&format!("{path}?months=36")).await;
    assert_eq!((edge.status, &edge.body["months"]), (200, &json!(36)));
    // Refusals changed nothing.
    let a = app.get(&path).await;
    assert_eq!(periods(&a.body, "ai_generation"), [month(-1, 9)]);
}

#[tokio::test]
async fn the_history_takes_a_gateway_or_an_admin_token() {
    let app = TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw".into()],
        admin_tokens: vec!["adm".into()],
        ..Options::default()
    })
    .await;
    let path = format!("/v1/users/{}/usage/history", Uuid::new_v4());

    let none = app.send(Method::GET, &path, None, None).await;
    let unknown = app.send(Method::GET, &path, None, Some("nope")).await;
    let gateway = app.send(Method::GET, &path, None, Some("gw")).await;
    let admin = app.send(Method::GET, &path, None, Some("adm")).await;

    assert_eq!(
        (none.status, &none.body["code"]),
        (401, &json!("UNAUTHORIZED"))
    );
    assert_eq!(
        (unknown.status, &unknown.body["code"]),
        (401, &json!("INVALID_TOKEN"))
    );
    assert_eq!(gateway.status, 200, "{:?}", gateway.body);
    assert_eq!(admin.status, 200, "{:?}", admin.body);
}
