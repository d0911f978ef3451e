//! Hostile and odd input on paths, queries, methods and bodies: every fault is the JSON error
//! body, nothing grows without bound, and signed links are checked whoever sends them.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{Answer, TestApp};

/// A request with a raw path (no re-encoding by the client) and an optional raw body.
async fn raw(app: &TestApp, method: &str, path: &str, body: Option<&str>) -> (Answer, String) {
    let mut req = app.client.request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{}{path}", app.base),
    );
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.expect("quotad answers");
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (
        Answer {
            status,
            headers,
            body,
        },
        content_type,
    )
}

fn assert_json_error(what: &str, (a, content_type): &(Answer, String), code: &str, field: &str) {
    assert_eq!(a.status, 400, "{what}: {:?}", a.body);
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {content_type}"
    );
    assert_eq!(a.body["code"], code, "{what}: {:?}", a.body);
    assert_eq!(a.body["field"], field, "{what}: {:?}", a.body);
    let sentence = a.body["error"].as_str().expect("an error sentence");
    assert!(
        !sentence.is_empty() && sentence.len() < 400,
        "{what}: a short sentence, not the input echoed whole: {sentence}"
    );
}

#[tokio::test]
async fn bad_path_values_on_every_route_that_takes_one_get_the_json_error_body() {
    let app = TestApp::spawn().await;
    let long = "a".repeat(5_000);
    for id in [
        "not-a-uuid",
        "%FF%FE",
        "%00%01%1B",
        "%E2%80%AE",
        long.as_str(),
    ] {
        let cases = [
            ("GET", format!("/v1/users/{id}/usage"), None),
            ("GET", format!("/v1/users/{id}/plan"), None),
            (
                "PUT",
                format!("/v1/users/{id}/plan"),
                Some(r#"{"plan": "PRO"}"#),
            ),
            ("POST", format!("/v1/users/{id}/usage-link"), Some("{}")),
            ("GET", format!("/ui/users/{id}"), None),
        ];
        for (method, path, body) in cases {
            let answer = raw(&app, method, &path, body).await;
            let what = format!("{method} {}", &path[..path.len().min(60)]);
            assert_json_error(&what, &answer, "INVALID_USER_ID", "user_id");
        }
    }
}

#[tokio::test]
async fn bad_query_values_on_the_usage_page_get_the_json_error_body_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    for query in [
        "expires=abc",
        "expires=99999999999999999999999",
        "expires=1.5",
        "expires=%00",
        "expires=&sig=00",
    ] {
        let answer = raw(&app, "GET", &format!("/ui/users/{user}?{query}"), None).await;
        assert_json_error(query, &answer, "INVALID_QUERY", "expires");
    }
}

#[tokio::test]
async fn without_tokens_a_link_is_still_checked_and_loopback_callers_without_one_are_trusted() {
    let app = TestApp::spawn().await; // no tokens: loopback callers are admin
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let link = app
        .post(&format!("/v1/users/{user}/usage-link"), json!({}))
        .await;
    assert_eq!(link.status, 200, "{:?}", link.body);
    let url = link.body["url"].as_str().unwrap().to_owned();
    let (expires, sig) = {
        let q = url.split_once('?').unwrap().1;
        let get = |k: &str| {
            q.split('&')
                .find_map(|p| p.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_owned()
        };
        (get("expires"), get("sig"))
    };
    let other_link = app
        .post(&format!("/v1/users/{other}/usage-link"), json!({}))
        .await;
    let other_sig = other_link.body["url"]
        .as_str()
        .unwrap()
        .split("sig=")
        .nth(1)
        .unwrap()
        .to_owned();
    let status = |path: String| {
        let app = &app;
        async move {
            app.client
                .get(format!("{}{path}", app.base))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    let valid = status(url.clone()).await;
    let unsigned = status(format!("/ui/users/{user}?expires={expires}")).await;
    let changed_expiry = status(format!(
        "/ui/users/{user}?expires={}&sig={sig}",
        expires.parse::<i64>().unwrap() + 3600
    ))
    .await;
    let others_signature = status(format!(
        "/ui/users/{user}?expires={expires}&sig={other_sig}"
    ))
    .await;
    let sig_only = status(format!("/ui/users/{user}?sig={sig}")).await;
    let no_link = status(format!("/ui/users/{user}")).await;

    assert_eq!(valid, 200);
    assert_eq!(unsigned, 403, "a link without its signature");
    assert_eq!(changed_expiry, 403, "a link with its expiry changed");
    assert_eq!(others_signature, 403, "another user's signature");
    assert_eq!(sig_only, 403, "a signature without its expiry");
    assert_eq!(
        no_link, 200,
        "no link: a loopback caller is trusted as admin when no token is set"
    );
}

#[tokio::test]
async fn a_usage_link_needs_no_body_and_hostile_ttls_are_refused() {
    // A JSON `null` body is the defaults too (the description allows it: `oneOf [null, LinkRequest]`);
    // a whole number written `3600.0` is 3600 (JSON Schema's `integer` takes it); every other
    // wrong type or range is INVALID_TTL, as a wrong amount is INVALID_AMOUNT.
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let path = format!("/v1/users/{user}/usage-link");
    let expected_expiry = crate::helpers::rfc(app.clock_now() + chrono::Duration::hours(1));

    let no_body = app.send(Method::POST, &path, None, None).await;
    let empty = raw(&app, "POST", &path, Some("")).await.0;
    let blank = raw(&app, "POST", &path, Some(" \n")).await.0;
    let braces = app.post(&path, json!({})).await;
    let null = raw(&app, "POST", &path, Some(" null ")).await.0;
    let nulls = raw(&app, "POST", &path, Some(r#"{"ttl_seconds": null}"#))
        .await
        .0;
    let float = raw(&app, "POST", &path, Some(r#"{"ttl_seconds": 3600.0}"#))
        .await
        .0;
    for (what, a) in [
        ("no body", &no_body),
        ("empty", &empty),
        ("blank", &blank),
        ("{}", &braces),
        ("null", &null),
        ("ttl_seconds null", &nulls),
        ("3600.0", &float),
    ] {
        assert_eq!(a.status, 200, "{what}: {:?}", a.body);
        assert_eq!(
            a.body["expires_at"],
            json!(expected_expiry),
            "{what}: the default TTL"
        );
    }

    for (body, code, field) in [
        (r#"{"ttl_seconds": "3600"}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl_seconds": 1e300}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl_seconds": 3600.5}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl_seconds": 59.0}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl_seconds": true}"#, "INVALID_TTL", "ttl_seconds"),
        (
            r#"{"ttl_seconds": 9223372036854775807}"#,
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (
            r#"{"ttl_seconds": -9223372036854775808}"#,
            "INVALID_TTL",
            "ttl_seconds",
        ),
        (r#"{"ttl_seconds": 59}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl_seconds": 604801}"#, "INVALID_TTL", "ttl_seconds"),
        (r#"{"ttl\u0000": 60}"#, "UNKNOWN_FIELD", "ttl\u{0}"),
    ] {
        let (a, _) = raw(&app, "POST", &path, Some(body)).await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!(code), &json!(field)),
            "{body}: {:?}",
            a.body
        );
    }
    for body in ["[]", "3600", "\"null\""] {
        let (not_object, _) = raw(&app, "POST", &path, Some(body)).await;
        assert_eq!(not_object.body["code"], "NOT_AN_OBJECT", "{body}");
    }
}

#[tokio::test]
async fn an_amount_of_the_wrong_type_is_invalid_amount_and_other_wrong_types_invalid_field() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    for amount in [
        json!("3"),
        json!(1.5),
        json!(true),
        json!([1]),
        json!(0),
        json!(u64::MAX),
    ] {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": user, "type": "ai_generation", "amount": amount}),
            )
            .await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!("INVALID_AMOUNT"), &json!("amount")),
            "amount {amount}: {:?}",
            a.body
        );
    }
    let plan = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "plan": 5}),
        )
        .await;
    assert_eq!(
        (plan.status, &plan.body["code"], &plan.body["field"]),
        (400, &json!("INVALID_FIELD"), &json!("plan"))
    );
    assert_eq!(app.used(user, "ai_generation").await, 0, "nothing counted");
}

/// Bytes of /metrics right now.
async fn metrics_size(app: &TestApp) -> (usize, String) {
    let text = app.metrics_text().await;
    (text.len(), text)
}

#[tokio::test]
async fn made_up_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn().await;
    // Every label value once, so only new series could grow the page below.
    let _ = raw(&app, "XWARMUP", "/v1/consume", None).await;
    let _ = raw(&app, "XWARMUP", "/nowhere", None).await;
    let (before, _) = metrics_size(&app).await;

    for i in 0..300 {
        let method = format!("X{}{i}", Uuid::new_v4().simple().to_string().to_uppercase());
        let path = if i % 2 == 0 {
            "/v1/consume"
        } else {
            "/nowhere"
        };
        let (a, _) = raw(&app, &method, path, None).await;
        assert!(matches!(a.status, 404 | 405), "{method}: {}", a.status);
    }
    let (after, text) = metrics_size(&app).await;

    assert!(
        after < before + 4_096,
        "300 made-up methods grew /metrics from {before} to {after} bytes"
    );
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(
        !text.contains("method=\"X"),
        "a made-up method became a label"
    );
}

#[tokio::test]
async fn a_whole_number_written_with_a_zero_fraction_is_that_number() {
    // JSON Schema's `integer`, which the description gives amount and ttl_seconds, takes `3.0`;
    // so does quotad, as the same number. A fraction or an out-of-range value is still refused.
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();

    let (a, _) = raw(
        &app,
        "POST",
        "/v1/consume",
        Some(&format!(
            r#"{{"user_id": "{user}", "type": "kb_file", "amount": 3.0}}"#
        )),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(app.used(user, "kb_file").await, 3);
    let (a, _) = raw(
        &app,
        "POST",
        "/v1/release",
        Some(&format!(
            r#"{{"user_id": "{user}", "type": "kb_file", "amount": 2.0}}"#
        )),
    )
    .await;
    assert_eq!(
        (a.status, &a.body["released"]),
        (200, &json!(2)),
        "{:?}",
        a.body
    );
    assert_eq!(app.used(user, "kb_file").await, 1);

    for amount in ["3.5", "0.0", "-0.0", "1000001.0", "1e300", "-2.0"] {
        let (a, _) = raw(
            &app,
            "POST",
            "/v1/consume",
            Some(&format!(
                r#"{{"user_id": "{user}", "type": "kb_file", "amount": {amount}}}"#
            )),
        )
        .await;
        assert_eq!(
            (a.status, &a.body["code"]),
            (400, &json!("INVALID_AMOUNT")),
            "amount {amount}: {:?}",
            a.body
        );
    }
    assert_eq!(app.used(user, "kb_file").await, 1, "nothing more counted");
}

#[tokio::test]
async fn length_limits_count_characters_not_bytes() {
    // The description's maxLength counts characters; so does quotad. "é" is two bytes in UTF-8.
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let consume = |key: String, text: String| json!({"user_id": user, "type": "kb_file", "idempotency_key": key, "metadata": {"note": text}});

    let a = app
        .post("/v1/consume", consume("é".repeat(255), "é".repeat(1024)))
        .await;
    assert_eq!(a.status, 200, "255 and 1024 characters: {:?}", a.body);

    let a = app
        .post("/v1/consume", consume("é".repeat(256), "x".to_owned()))
        .await;
    assert_eq!(
        (a.status, &a.body["code"], &a.body["field"]),
        (
            400,
            &json!("INVALID_IDEMPOTENCY_KEY"),
            &json!("idempotency_key")
        ),
        "{:?}",
        a.body
    );
    let a = app
        .post("/v1/consume", consume("k2".to_owned(), "é".repeat(1025)))
        .await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (400, &json!("INVALID_METADATA")),
        "{:?}",
        a.body
    );
    let a = app
        .post("/v1/consume", consume("k\u{85}".to_owned(), "x".to_owned()))
        .await;
    assert_eq!(
        a.body["code"], "INVALID_IDEMPOTENCY_KEY",
        "a control character (U+0085) is still refused"
    );
    assert_eq!(app.used(user, "kb_file").await, 1);
}
