//! `/v1/gate`: the consume a gateway makes with headers only, the `[gate]` route table, the
//! `deny_status` form for nginx's `auth_request`, and every malformed header refused with
//! nothing counted.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{tempfile_path, Answer, Options, PrivateRedis, TestApp};

/// A gate call with `headers` (and `query`, e.g. `?deny_status=403`).
async fn gate(app: &TestApp, method: &str, query: &str, headers: &[(&str, &str)]) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = app
        .client
        .request(method, format!("{}/v1/gate{query}", app.base));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Answer::read(req.send().await.expect("quotad answers")).await
}

/// `Quotad-Used` of an allowed answer.
fn used_of(a: &Answer) -> u64 {
    a.header("quotad-used")
        .unwrap_or_else(|| panic!("Quotad-Used on {a:?}"))
        .parse()
        .unwrap()
}

/// A plain GET of the gate with `headers`.
async fn ask(app: &TestApp, headers: &[(&str, &str)]) -> Answer {
    gate(app, "GET", "", headers).await
}

/// The built-in plans with a `[gate]` table appended.
fn with_gate(table: &str) -> tempfile_path::TempPath {
    tempfile_path::write(&format!("{}\n{table}", quotad::plans::BUILT_IN))
}

async fn spawn_with_gate(table: &str) -> (TestApp, tempfile_path::TempPath) {
    let plans = with_gate(table);
    let app = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        ..Options::default()
    })
    .await;
    (app, plans)
}

const ROUTES: &str = r#"
[gate]
unmatched = "pass"

[[gate.routes]]
path = "/generate"
type = "ai_generation"

[[gate.routes]]
path = "/generate/batch"
methods = ["POST"]
type = "ai_generation"
amount = 5

[[gate.routes]]
path = "/export"
type = "export"
"#;

#[tokio::test]
async fn a_free_user_is_allowed_50_with_ratelimit_headers_and_the_plan_then_refused_402_with_the_consume_body(
) {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4().to_string();
    let headers = [
        ("X-User-Id", user.as_str()),
        ("X-Usage-Type", "ai_generation"),
    ];
    for i in 1..=50u64 {
        let a = ask(&app, &headers).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.header("quotad-plan"), Some("FREE"));
        assert_eq!(a.header("quotad-usage-type"), Some("ai_generation"));
        assert_eq!(a.header("ratelimit-limit"), Some("50"));
        assert_eq!(
            a.header("ratelimit-remaining"),
            Some(&*(50 - i).to_string())
        );
        assert!(a.header("ratelimit-reset").is_some());
        assert_eq!(used_of(&a), i);
        assert_eq!(
            (a.header("content-length"), &a.body),
            (Some("0"), &Value::Null),
            "an allowed answer is headers only"
        );
    }
    let refused = gate(&app, "POST", "", &headers).await;
    assert_eq!(refused.status, 402, "{:?}", refused.body);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(
        refused.header("retry-after"),
        refused.header("ratelimit-reset")
    );
    assert!(
        refused
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(refused.header("quotad-plan"), None);
    // The body is consume's: a consume now refuses with the same fields.
    let consume = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation"}),
        )
        .await;
    assert_eq!(consume.status, 402);
    assert_eq!(refused.body, consume.body);
    for (field, value) in [
        ("code", json!("USAGE_LIMIT_EXCEEDED")),
        ("upgrade_url", json!("/settings/billing")),
        ("used", json!(50)),
        ("limit", json!(50)),
        ("allowed", json!(false)),
    ] {
        assert_eq!(refused.body[field], value, "{field}");
    }
    assert_eq!(app.used(user.parse().unwrap(), "ai_generation").await, 50);
}

#[tokio::test]
async fn the_gate_takes_any_method_and_an_amount_and_shares_idempotency_with_consume() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "X-MADE-UP"] {
        let a = gate(
            &app,
            method,
            "",
            &[("X-User-Id", &u), ("X-Usage-Type", "export")],
        )
        .await;
        assert_eq!(a.status, 200, "{method}: {:?}", a.body);
    }
    assert_eq!(app.used(user, "export").await, 6);

    let with_key = [
        ("X-User-Id", u.as_str()),
        ("X-Usage-Type", "ai_generation"),
        ("X-Usage-Amount", "7"),
        ("Idempotency-Key", "order-1"),
    ];
    let first = gate(&app, "POST", "", &with_key).await;
    assert_eq!((first.status, used_of(&first)), (200, 7));
    let again = gate(&app, "POST", "", &with_key).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(used_of(&again), 7);
    // The same call through consume is the same call: replayed, not counted again.
    let consume = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "ai_generation", "amount": 7, "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!(consume.header("idempotent-replayed"), Some("true"));
    // Another amount under the same key is another call.
    let mut reused = with_key;
    reused[2] = ("X-Usage-Amount", "2");
    let conflict = gate(&app, "POST", "", &reused).await;
    assert_eq!(
        (conflict.status, &conflict.body["code"]),
        (409, &json!("IDEMPOTENCY_KEY_REUSED"))
    );
    assert_eq!(app.used(user, "ai_generation").await, 7);

    // The upstream gives the action back with the user and key it was sent.
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!((refund.status, &refund.body["refunded"]), (200, &json!(7)));
    assert_eq!(app.used(user, "ai_generation").await, 0);
}

#[tokio::test]
async fn malformed_headers_are_refused_naming_the_header_and_count_nothing() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let long_key = "k".repeat(256);
    // Headers sent, the code answered, the field named.
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("X-Usage-Type", "ai_generation")],
            "MISSING_USER",
            "x-user-id",
        ),
        (
            vec![("X-User-Id", ""), ("X-Usage-Type", "ai_generation")],
            "MISSING_USER",
            "x-user-id",
        ),
        (
            vec![("X-User-Id", "alice"), ("X-Usage-Type", "ai_generation")],
            "INVALID_USER_ID",
            "x-user-id",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
            ],
            "DUPLICATE_HEADER",
            "x-user-id",
        ),
        (
            vec![("X-User-Id", &u), ("X-Usage-Type", "video")],
            "UNKNOWN_TYPE",
            "x-usage-type",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "0"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "1000001"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "-1"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "1e3"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "+3"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("X-Usage-Amount", "99999999999999999999999"),
            ],
            "INVALID_AMOUNT",
            "x-usage-amount",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Usage-Type", "ai_generation"),
                ("Idempotency-Key", &long_key),
            ],
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency-key",
        ),
        (vec![("X-User-Id", &u)], "NO_USAGE_TYPE", ""),
        (
            vec![("X-User-Id", &u), ("X-Original-URI", "generate")],
            "INVALID_ORIGINAL_URI",
            "X-Original-URI",
        ),
        (
            vec![("X-User-Id", &u), ("X-Original-URI", "/gen%00erate")],
            "INVALID_ORIGINAL_URI",
            "X-Original-URI",
        ),
        (
            vec![("X-User-Id", &u), ("X-Original-URI", "/../../etc")],
            "INVALID_ORIGINAL_URI",
            "X-Original-URI",
        ),
        (
            vec![("X-User-Id", &u), ("X-Forwarded-Uri", "/a%zz")],
            "INVALID_ORIGINAL_URI",
            "X-Forwarded-Uri",
        ),
        (
            vec![
                ("X-User-Id", &u),
                ("X-Original-URI", "/a"),
                ("X-Original-Method", "GE T"),
            ],
            "INVALID_ORIGINAL_METHOD",
            "X-Original-Method",
        ),
    ];
    for (headers, code, field) in &cases {
        let a = ask(&app, headers).await;
        assert_eq!(a.status, 400, "{headers:?}: {:?}", a.body);
        assert_eq!(a.body["code"], json!(code), "{headers:?}: {:?}", a.body);
        if !field.is_empty() {
            assert_eq!(a.body["field"], json!(field), "{headers:?}");
        }
        let sentence = a.body["error"].as_str().unwrap();
        assert!(sentence.ends_with('.'), "{sentence}");
    }
    // A header value that is not visible ASCII (sent as raw bytes).
    let odd = reqwest::header::HeaderValue::from_bytes(b"7c9e6679-7425-40de-944b-e07fc1f90ae\xff")
        .unwrap();
    let a = Answer::read(
        app.client
            .get(format!("{}/v1/gate", app.base))
            .header("X-User-Id", odd)
            .header("X-Usage-Type", "ai_generation")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, &a.body["code"]), (400, &json!("INVALID_HEADER")));
    // A URI of 8 KiB and more.
    let huge = format!("/{}", "a".repeat(9000));
    let a = ask(&app, &[("X-User-Id", &u), ("X-Original-URI", &huge)]).await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (400, &json!("INVALID_ORIGINAL_URI"))
    );

    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    for ty in ["ai_generation", "export", "kb_file"] {
        assert_eq!(usage.body["usage"][ty]["used"], json!(0), "{ty}");
    }
}

#[tokio::test]
async fn the_route_table_maps_the_original_method_and_uri_as_the_gateway_routes_them() {
    let (app, _plans) = spawn_with_gate(ROUTES).await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let at = |uri: &'static str, method: &'static str| {
        let u = u.clone();
        let app = &app;
        async move {
            gate(
                app,
                "GET",
                "",
                &[
                    ("X-User-Id", &u),
                    ("X-Original-URI", uri),
                    ("X-Original-Method", method),
                ],
            )
            .await
        }
    };
    // Each spelling of /generate costs one generation.
    let spellings = [
        "/generate",
        "/generate/",
        "/generate?prompt=hi",
        "/%67enerate",
        "//generate",
        "/v1/../generate/x",
        "/./generate/./y",
        "https://api.example.com/generate",
    ];
    for (i, uri) in spellings.iter().enumerate() {
        let a = at(uri, "POST").await;
        assert_eq!(a.status, 200, "{uri}: {:?}", a.body);
        assert_eq!(a.header("quotad-usage-type"), Some("ai_generation"));
        assert_eq!(used_of(&a), i as u64 + 1, "{uri}");
    }
    // The longer route, with its method and amount.
    let batch = at("/generate/batch/1", "POST").await;
    assert_eq!(
        (batch.status, used_of(&batch)),
        (200, spellings.len() as u64 + 5)
    );
    let batch_get = at("/generate/batch/1", "GET").await;
    assert_eq!(used_of(&batch_get), spellings.len() as u64 + 6);
    // Caddy's and Traefik's headers.
    let caddy = ask(
        &app,
        &[
            ("X-User-Id", &u),
            ("X-Forwarded-Uri", "/export/csv?x=1"),
            ("X-Forwarded-Method", "GET"),
        ],
    )
    .await;
    assert_eq!(
        (caddy.status, caddy.header("quotad-usage-type")),
        (200, Some("export"))
    );
    // Not metered: passes, counting nothing, and needs no user.
    for uri in ["/generated", "/", "/health", "/exports"] {
        let a = ask(&app, &[("X-Original-URI", uri)]).await;
        assert_eq!(a.status, 204, "{uri}: {:?}", a.body);
    }
    // The route sets the amount; an amount header with it is a misconfigured gateway.
    let a = ask(
        &app,
        &[
            ("X-User-Id", &u),
            ("X-Original-URI", "/generate"),
            ("X-Usage-Amount", "1"),
        ],
    )
    .await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (400, &json!("AMOUNT_WITHOUT_TYPE"))
    );
    // A type header is taken ahead of the table.
    let a = ask(
        &app,
        &[
            ("X-User-Id", &u),
            ("X-Original-URI", "/generate"),
            ("X-Usage-Type", "kb_file"),
        ],
    )
    .await;
    assert_eq!(a.header("quotad-usage-type"), Some("kb_file"));
    // A metered route without a user.
    let a = ask(&app, &[("X-Original-URI", "/generate")]).await;
    assert_eq!((a.status, &a.body["code"]), (400, &json!("MISSING_USER")));

    assert_eq!(
        app.used(user, "ai_generation").await,
        spellings.len() as u64 + 6
    );
    assert_eq!(app.used(user, "export").await, 1);
    assert_eq!(app.used(user, "kb_file").await, 1);
}

#[tokio::test]
async fn unmatched_refuse_and_renamed_headers_follow_the_plans_file() {
    let (app, _plans) = spawn_with_gate(
        r#"
[gate]
unmatched = "refuse"
user_header = "X-Auth-Subject"
idempotency_header = "X-Request-Key"

[[gate.routes]]
path = "/generate"
methods = ["POST"]
type = "ai_generation"
"#,
    )
    .await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let refused = ask(
        &app,
        &[
            ("X-Auth-Subject", &u),
            ("X-Original-URI", "/generate"),
            ("X-Original-Method", "GET"),
        ],
    )
    .await;
    assert_eq!(
        (refused.status, &refused.body["code"]),
        (403, &json!("ROUTE_NOT_METERED"))
    );
    let sentence = refused.body["error"].as_str().unwrap();
    assert!(
        sentence.starts_with("GET /generate is not a metered route"),
        "{sentence}"
    );
    let ok = [
        ("X-Auth-Subject", u.as_str()),
        ("X-Original-URI", "/generate"),
        ("X-Original-Method", "POST"),
        ("X-Request-Key", "r-1"),
    ];
    assert_eq!(ask(&app, &ok).await.status, 200);
    let again = ask(&app, &ok).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // The default name is not read any more.
    let a = ask(
        &app,
        &[
            ("X-User-Id", &u),
            ("X-Original-URI", "/generate"),
            ("X-Original-Method", "POST"),
        ],
    )
    .await;
    assert_eq!(
        (a.status, &a.body["field"]),
        (400, &json!("x-auth-subject"))
    );
    assert_eq!(app.used(user, "ai_generation").await, 1);
}

/// The form nginx's auth_request understands: 403 with the real status and body in headers.
fn carried(a: &Answer) -> (u16, Value) {
    let status = a
        .header("quotad-status")
        .expect("Quotad-Status")
        .parse()
        .unwrap();
    let body = serde_json::from_str(a.header("quotad-body").expect("Quotad-Body")).unwrap();
    (status, body)
}

#[tokio::test]
async fn with_deny_status_every_answer_that_is_not_2xx_is_403_carrying_the_real_status_and_body() {
    let app = TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw-token".into()],
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4().to_string();
    let bearer = "Bearer gw-token";
    let h = [
        ("Authorization", bearer),
        ("X-User-Id", user.as_str()),
        ("X-Usage-Type", "export"),
    ];
    // No answer in this form has a body (nginx keeps its connection only after one without).
    let bodiless = |a: &Answer| {
        assert_eq!(a.header("content-length"), Some("0"), "{a:?}");
        assert_eq!(a.header("content-type"), None, "{a:?}");
    };
    for i in 1..=10 {
        let a = gate(&app, "GET", "?deny_status=403", &h).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("quotad-status"), None);
        assert_eq!(
            a.header("ratelimit-remaining"),
            Some(&*(10 - i).to_string())
        );
        bodiless(&a);
    }
    let refused = gate(&app, "GET", "?deny_status=403", &h).await;
    assert_eq!(refused.status, 403);
    bodiless(&refused);
    let (status, body) = carried(&refused);
    assert_eq!(status, 402);
    // The body the plain form answers.
    assert_eq!(body, ask(&app, &h).await.body);
    assert_eq!(body["code"], json!("USAGE_LIMIT_EXCEEDED"));
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));

    let no_user = gate(
        &app,
        "GET",
        "?deny_status=401",
        &[("Authorization", bearer), ("X-Usage-Type", "export")],
    )
    .await;
    assert_eq!(no_user.status, 401);
    assert_eq!(carried(&no_user).0, 400);
    assert_eq!(carried(&no_user).1["code"], json!("MISSING_USER"));
    // The token check is inside it too.
    let no_token = gate(&app, "GET", "?deny_status=403", &h[1..]).await;
    assert_eq!((no_token.status, carried(&no_token).0), (403, 401));
    // A bad deny_status is refused as it is (the gateway's configuration is at fault).
    for q in ["?deny_status=402", "?deny_status=abc", "?other=1"] {
        let a = gate(&app, "GET", q, &h).await;
        assert_eq!(a.status, 400, "{q}");
        assert_eq!(a.header("quotad-status"), None);
    }
    // A non-ASCII sentence still travels as one ASCII header line.
    let odd = [
        ("Authorization", bearer),
        ("X-User-Id", &user),
        ("X-Original-URI", "/%C3%A9/%zz"),
    ];
    let a = gate(&app, "GET", "?deny_status=403", &odd).await;
    assert_eq!(carried(&a).0, 400);
    assert_eq!(carried(&a).1, ask(&app, &odd).await.body);
    bodiless(&a);
}

#[tokio::test]
async fn with_redis_down_an_open_type_is_allowed_degraded_and_a_closed_one_is_503() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        redis_timeout_ms: 200,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4().to_string();
    redis.kill();
    let open = ask(
        &app,
        &[("X-User-Id", &user), ("X-Usage-Type", "ai_generation")],
    )
    .await;
    assert_eq!(open.status, 200, "{:?}", open.body);
    assert_eq!(open.header("quotad-degraded"), Some("true"));
    assert_eq!(
        open.header("quotad-used"),
        None,
        "not counted, nothing known"
    );
    let closed = gate(
        &app,
        "GET",
        "?deny_status=403",
        &[("X-User-Id", &user), ("X-Usage-Type", "kb_file")],
    )
    .await;
    assert_eq!(closed.status, 403);
    assert_eq!(carried(&closed).0, 503);
}

#[tokio::test]
async fn a_plans_file_with_a_bad_gate_table_is_refused_at_reload_and_the_old_table_stays() {
    let (app, plans) = spawn_with_gate(ROUTES).await;
    tempfile_path::rewrite(
        &plans,
        &format!(
            "{}\n[gate]\n[[gate.routes]]\npath = \"/x\"\ntype = \"video\"\n",
            quotad::plans::BUILT_IN
        ),
    );
    let err = app.state.quota.reload_plans().unwrap_err().to_string();
    assert!(
        err.contains("gate.routes[0] (path \"/x\"): type video is not declared"),
        "{err}"
    );
    let user = Uuid::new_v4().to_string();
    let a = ask(&app, &[("X-User-Id", &user), ("X-Original-URI", "/export")]).await;
    assert_eq!(a.header("quotad-usage-type"), Some("export"));
}

#[tokio::test]
async fn a_user_refused_at_the_gate_is_refused_again_from_the_refusal_cache_without_a_redis_call() {
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_on(&redis_server).await;
    app.wait_refusal_cache_live().await;
    let user = Uuid::new_v4().to_string();
    let h = [("X-User-Id", user.as_str()), ("X-Usage-Type", "export")];
    for _ in 0..10 {
        assert_eq!(ask(&app, &h).await.status, 200);
    }
    let first = ask(&app, &h).await;
    assert_eq!(first.status, 402);

    let mut conn = app.redis().await;
    let _: () = deadpool_redis::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..20 {
        let a = gate(&app, "GET", "?deny_status=403", &h).await;
        assert_eq!(carried(&a), (402, first.body.clone()));
        assert_eq!(a.header("retry-after"), first.header("retry-after"));
    }
    let stats = crate::performance::commandstats(&mut conn).await;
    assert_eq!(stats.get("evalsha"), None, "no script ran: {stats:?}");
}

#[tokio::test]
async fn under_v1_gate_slash_path_the_path_is_the_original_one_as_envoy_ext_authz_sends_it() {
    let (app, _plans) = spawn_with_gate(ROUTES).await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let call = |method: &'static str, path: &'static str| {
        let (app, u) = (&app, u.clone());
        async move {
            let req = app
                .client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    format!("{}{path}", app.base),
                )
                .header("X-User-Id", u);
            Answer::read(req.send().await.unwrap()).await
        }
    };
    // The original query is the original request's: not the gate's parameters.
    let a = call(
        "POST",
        "/v1/gate/generate/batch/3?stream=true&deny_status=xyz",
    )
    .await;
    assert_eq!(
        (a.status, a.header("quotad-usage-type")),
        (200, Some("ai_generation")),
        "{:?}",
        a.body
    );
    assert_eq!(used_of(&a), 5);
    let a = call("PUT", "/v1/gate/%67enerate").await;
    assert_eq!(used_of(&a), 6);
    let a = call("GET", "/v1/gate/export/x").await;
    assert_eq!(a.header("quotad-usage-type"), Some("export"));
    assert_eq!(call("GET", "/v1/gate/generated").await.status, 204);
    assert_eq!(call("GET", "/v1/gate/").await.status, 204);
    // Dot segments as a client sends them (an HTTP client library would resolve them first).
    let raw = |target: &'static str| {
        let (addr, u) = (app.base.trim_start_matches("http://").to_owned(), u.clone());
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET {target} HTTP/1.1\r\nHost: q\r\nX-User-Id: {u}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            let status: u16 = text[9..12].parse().unwrap();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
            (
                status,
                serde_json::from_str::<Value>(body).unwrap_or_default(),
                text,
            )
        }
    };
    let (status, body, text) = raw("/v1/gate/x/../generate").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("quotad-used: 7"),
        "{text}"
    );
    let (status, body_above, _) = raw("/v1/gate/../../generate").await;
    assert_eq!(
        (status, &body_above["code"], &body_above["field"]),
        (400, &json!("INVALID_ORIGINAL_URI"), &json!("path")),
        "{body_above:?}"
    );
    assert_eq!(body, Value::Null, "an allowed answer has no body");
    assert_eq!(app.used(user, "ai_generation").await, 7);
    assert_eq!(app.used(user, "export").await, 1);
}
