//! `/openapi.json`: valid OpenAPI 3.1, describing every route, and matching what the routes
//! really answer.

use std::collections::BTreeSet;
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::TestApp;

/// Every route quotad serves, as (method, path).
const ROUTES: [(&str, &str); 34] = [
    ("post", "/v1/consume"),
    // Any method; described as the two gateways use.
    ("get", "/v1/gate"),
    ("post", "/v1/gate"),
    ("post", "/v1/check"),
    ("post", "/v1/track"),
    ("post", "/v1/refund"),
    ("post", "/v1/release"),
    ("post", "/v1/reserve"),
    ("post", "/v1/reservations/{reservation_id}/commit"),
    ("post", "/v1/reservations/{reservation_id}/cancel"),
    ("get", "/v1/users/{user_id}/usage"),
    ("get", "/v1/users/{user_id}/usage/history"),
    ("post", "/v1/users/{user_id}/usage-link"),
    ("get", "/v1/plans"),
    ("get", "/v1/users/{user_id}/plan"),
    ("put", "/v1/users/{user_id}/plan"),
    ("post", "/v1/admin/reconcile"),
    ("get", "/v1/admin/events"),
    ("get", "/v1/admin/usage/export"),
    ("post", "/v1/admin/events/{id}/redeliver"),
    ("get", "/v1/users/{user_id}/account"),
    ("put", "/v1/users/{user_id}/account"),
    ("get", "/v1/users/{user_id}/limits"),
    ("put", "/v1/users/{user_id}/limits"),
    ("get", "/v1/accounts/{account_id}/plan"),
    ("put", "/v1/accounts/{account_id}/plan"),
    ("get", "/v1/accounts/{account_id}/limits"),
    ("put", "/v1/accounts/{account_id}/limits"),
    ("get", "/v1/accounts/{account_id}/usage"),
    ("get", "/ui/users/{user_id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[tokio::test]
async fn the_description_is_valid_openapi_3_1() {
    let app = TestApp::spawn().await;

    let spec = app.get("/openapi.json").await;
    let file =
        std::env::temp_dir().join(format!("quotad-openapi-{}.json", Uuid::new_v4().simple()));
    std::fs::write(&file, serde_json::to_vec(&spec.body).unwrap()).unwrap();
    let checked = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);

    assert_eq!(spec.status, 200);
    assert_eq!(spec.body["openapi"], "3.1.0");
    assert!(
        checked.status.success(),
        "openapi-spec-validator (deploy/ensure-test-tools.sh installs it): {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[tokio::test]
async fn every_route_is_described_and_every_described_route_exists() {
    let app = TestApp::spawn().await;
    let spec = app.get("/openapi.json").await.body;

    let described: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(described, served);

    let user = Uuid::new_v4().to_string();
    let account = Uuid::new_v4().to_string();
    for (method, path) in &described {
        let body = (method != "get").then(|| json!({}));
        let a = app
            .send(
                method.to_uppercase().parse::<Method>().unwrap(),
                &path
                    .replace("{user_id}", &user)
                    .replace("{account_id}", &account)
                    // Not an id: 400 from the route, where a made-up id would be a 404.
                    .replace("{reservation_id}", "rsv_x"),
                body,
                None,
            )
            .await;
        assert!(
            ![404, 405].contains(&a.status),
            "{method} {path} answered {}",
            a.status
        );
        for op in ["description", "responses"] {
            assert!(
                spec["paths"][path][method].get(op).is_some(),
                "{method} {path} has {op}"
            );
        }
    }
}

/// The property names a schema allows, following `$ref` and `allOf`.
pub(crate) fn properties(spec: &Value, schema: &Value) -> BTreeSet<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return properties(spec, &spec["components"]["schemas"][name]);
    }
    let mut out: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(properties(spec, part));
    }
    out
}

pub(crate) fn response_schema<'a>(
    spec: &'a Value,
    method: &str,
    path: &str,
    status: u16,
) -> &'a Value {
    &spec["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"]
}

/// The alternative named `name` of a `oneOf` schema (a decision or the items' answer, say).
pub(crate) fn one_of<'a>(schema: &'a Value, name: &str) -> &'a Value {
    let suffix = format!("/{name}");
    schema["oneOf"]
        .as_array()
        .and_then(|alts| {
            alts.iter()
                .find(|a| a["$ref"].as_str().is_some_and(|r| r.ends_with(&suffix)))
        })
        .unwrap_or_else(|| panic!("{name} is not an alternative of {schema}"))
}

#[tokio::test]
async fn real_answers_carry_exactly_the_fields_their_schemas_describe() {
    let app = TestApp::spawn().await;
    let spec = app.get("/openapi.json").await.body;
    let user = Uuid::new_v4();
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };

    let allowed = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 10, "idempotency_key": "k"}),
        )
        .await;
    let refused = app.consume(user, "export").await;
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": user, "idempotency_key": "k"}),
        )
        .await;
    let usage = app.get(&format!("/v1/users/{user}/usage")).await;
    let bad = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "type": "export", "amount": 0}),
        )
        .await;
    let plan = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/plan"),
            Some(json!({"plan": "PRO"})),
            None,
        )
        .await;

    let decision = properties(
        &spec,
        one_of(
            response_schema(&spec, "post", "/v1/consume", 200),
            "DecisionJson",
        ),
    );
    assert_eq!(
        keys(&allowed.body).difference(&decision).count(),
        0,
        "{:?} vs {decision:?}",
        allowed.body
    );
    assert_eq!(
        keys(&refused.body),
        properties(
            &spec,
            one_of(
                response_schema(&spec, "post", "/v1/consume", 402),
                "DecisionJson",
            ),
        )
        .into_iter()
        // A member of an account's levels; this user has none.
        .filter(|k| !["degraded", "user", "account"].contains(&k.as_str()))
        .collect()
    );
    let no_account = |fields: BTreeSet<String>| -> BTreeSet<String> {
        fields.into_iter().filter(|k| k != "account").collect()
    };
    assert_eq!(
        keys(&refund.body),
        no_account(properties(
            &spec,
            one_of(
                response_schema(&spec, "post", "/v1/refund", 200),
                "RefundJson"
            )
        ))
        .into_iter()
        // What reservations hold: a refund does not read it.
        .filter(|k| k != "held")
        .collect()
    );
    assert_eq!(
        keys(&usage.body),
        no_account(properties(
            &spec,
            response_schema(&spec, "get", "/v1/users/{user_id}/usage", 200)
        ))
    );
    let entry = properties(&spec, &spec["components"]["schemas"]["UsageEntry"]);
    assert_eq!(keys(&usage.body["usage"]["export"]), entry);
    assert_eq!(
        keys(&bad.body),
        properties(&spec, response_schema(&spec, "post", "/v1/consume", 400))
    );
    assert_eq!(
        keys(&plan.body),
        properties(
            &spec,
            response_schema(&spec, "put", "/v1/users/{user_id}/plan", 200)
        )
    );
    let request = properties(
        &spec,
        &spec["paths"]["/v1/consume"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"],
    );
    assert_eq!(
        request,
        [
            "amount",
            "idempotency_key",
            "items",
            "metadata",
            "plan",
            "type",
            "user_id"
        ]
        .map(String::from)
        .into()
    );

    // Calls with items: the items' answer (allowed and refused), their refund, and the request.
    let other = Uuid::new_v4();
    let items = |amount: u64| {
        json!({"user_id": other, "idempotency_key": format!("i{amount}"),
            "items": [{"type": "export", "amount": amount}, {"type": "ai_generation"}]})
    };
    let counted = app.post("/v1/consume", items(4)).await;
    let refused = app.post("/v1/consume", items(7)).await;
    assert_eq!((counted.status, refused.status), (200, 402));
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": other, "idempotency_key": "i4"}),
        )
        .await;
    let answer = |status| {
        properties(
            &spec,
            one_of(
                response_schema(&spec, "post", "/v1/consume", status),
                "ItemsJson",
            ),
        )
    };
    let skip = |fields: BTreeSet<String>, absent: &[&str]| -> BTreeSet<String> {
        fields
            .into_iter()
            .filter(|k| !absent.contains(&k.as_str()))
            .collect()
    };
    assert_eq!(
        keys(&counted.body),
        skip(
            answer(200),
            &["degraded", "refused", "code", "upgrade_url", "error"]
        )
    );
    assert_eq!(keys(&refused.body), skip(answer(402), &["degraded"]));
    for item in counted.body["items"].as_array().unwrap() {
        assert_eq!(keys(item).difference(&decision).count(), 0, "{item}");
    }
    assert_eq!(
        keys(&refund.body),
        properties(
            &spec,
            one_of(
                response_schema(&spec, "post", "/v1/refund", 200),
                "RefundItemsJson"
            )
        )
    );
    let item_request = properties(&spec, &spec["components"]["schemas"]["ItemRequest"]);
    assert_eq!(item_request, ["amount", "type"].map(String::from).into());
}

/// The names a request may use, as the description lists them.
fn names(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_description_lists_the_plans_and_types_in_force_and_follows_a_reload() {
    let file = crate::helpers::plans_file("50");
    let app = TestApp::spawn_with(crate::helpers::Options {
        plans: Some(file.0.clone()),
        ..Default::default()
    })
    .await;

    let spec = app.get("/openapi.json").await.body;
    let schemas = &spec["components"]["schemas"];
    let decision = &schemas["DecisionRequest"]["properties"];
    assert_eq!(
        names(&decision["type"]["enum"]),
        [json!("ai_generation"), json!("export"), json!("kb_file")]
    );
    assert_eq!(
        names(&decision["plan"]["enum"]),
        [
            json!("ENTERPRISE"),
            json!("FREE"),
            json!("PRO"),
            Value::Null
        ],
        "plan may also be null"
    );
    assert_eq!(
        names(&schemas["PlanRequest"]["properties"]["plan"]["enum"]),
        [json!("ENTERPRISE"), json!("FREE"), json!("PRO")]
    );
    assert_eq!(
        names(&schemas["ReleaseRequest"]["properties"]["type"]["enum"]),
        [json!("kb_file")],
        "release takes lifetime types only"
    );

    // A reloaded plans file changes the lists on the next request.
    let text = quotad::plans::BUILT_IN
        .replace(
            "kb_file       =",
            "seat = { period = \"lifetime\" }\nkb_file       =",
        )
        .replace("kb_file = 20", "kb_file = 20\nseat = 3")
        .replace("kb_file = 1000", "kb_file = 1000\nseat = 10")
        .replace("kb_file = -1", "kb_file = -1\nseat = -1\n\n[plans.TEAM]\nai_generation = -1\nexport = -1\nkb_file = -1\nseat = 50");
    crate::helpers::tempfile_path::rewrite(&file, &text);
    app.state.quota.plans.reload().expect("the new plans load");
    let spec = app.get("/openapi.json").await.body;
    let schemas = &spec["components"]["schemas"];
    assert_eq!(
        names(&schemas["PlanRequest"]["properties"]["plan"]["enum"]),
        [
            json!("ENTERPRISE"),
            json!("FREE"),
            json!("PRO"),
            json!("TEAM")
        ]
    );
    assert_eq!(
        names(&schemas["ReleaseRequest"]["properties"]["type"]["enum"]),
        [json!("kb_file"), json!("seat")]
    );
    assert!(
        names(&schemas["DecisionRequest"]["properties"]["type"]["enum"]).contains(&json!("seat"))
    );
    // The server takes what the description now lists.
    let a = app
        .post(
            "/v1/consume",
            json!({"user_id": Uuid::new_v4(), "type": "seat", "plan": "TEAM"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test]
async fn the_description_states_the_bounds_the_server_checks() {
    let app = TestApp::spawn().await;
    let spec = app.get("/openapi.json").await.body;
    let schemas = &spec["components"]["schemas"];

    let ttl = &schemas["LinkRequest"]["properties"]["ttl_seconds"];
    assert_eq!(
        (&ttl["minimum"], &ttl["maximum"]),
        (&json!(60), &json!(604800))
    );

    let key = &schemas["DecisionRequest"]["properties"]["idempotency_key"];
    assert_eq!(
        (&key["minLength"], &key["maxLength"]),
        (&json!(1), &json!(255))
    );
    assert!(
        key["pattern"].is_string(),
        "control characters are refused: {key}"
    );

    let metadata = &schemas["DecisionRequest"]["properties"]["metadata"];
    assert_eq!(metadata["maxProperties"], 16);
    assert!(
        metadata["propertyNames"]["pattern"].is_string(),
        "{metadata}"
    );
    assert_eq!(metadata["additionalProperties"]["maxLength"], 1024);

    // The period pattern and the server agree, on both sides of the line.
    let pattern = schemas["ReconcileRequest"]["properties"]["period"]["pattern"]
        .as_str()
        .expect("period has a pattern")
        .to_owned();
    assert_eq!(pattern, "^(lifetime|[0-9]{4}-(0[1-9]|1[0-2]))$");
    let month = crate::helpers::period_id(0);
    for (period, status) in [
        (month.as_str(), 200),
        ("lifetime", 200),
        ("+202-11", 400),
        ("2026-+1", 400),
        ("-026-11", 400),
        ("2026-13", 400),
        ("life", 400),
        ("२०२६-११", 400),
    ] {
        let a = app
            .post("/v1/admin/reconcile", json!({"period": period}))
            .await;
        assert_eq!(a.status, status, "{period}: {:?}", a.body);
        if status == 400 {
            assert_eq!(
                (&a.body["code"], &a.body["field"]),
                (&json!("INVALID_PERIOD"), &json!("period"))
            );
        }
    }
}

#[tokio::test]
async fn what_the_middleware_answers_is_described_on_every_route_it_guards() {
    let app = TestApp::spawn().await;
    let spec = app.get("/openapi.json").await.body;

    for (method, path) in ROUTES {
        let op = &spec["paths"][path][method];
        let responses = &op["responses"];
        if path.starts_with("/v1/") {
            let forbidden = responses["403"]["description"].as_str().unwrap_or_default();
            assert!(
                forbidden.contains("LOOPBACK_ONLY"),
                "{method} {path}: 403 LOOPBACK_ONLY is described: {forbidden:?}"
            );
            if op.get("requestBody").is_some() {
                assert_eq!(
                    responses["413"]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path}: 413 is described"
                );
            }
        }
        if path.starts_with("/v1/") || path.starts_with("/ui/") {
            assert!(
                responses["503"]["headers"]["Retry-After"].is_object(),
                "{method} {path}: the 503's Retry-After is described"
            );
        }
    }

    // No handler lists 401 or 503: they are added once for every guarded operation, as the JSON
    // error body (every operation of the description, not only those this test names).
    let paths = spec["paths"].as_object().expect("paths");
    let guarded: Vec<_> = paths
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/"))
        .collect();
    assert!(guarded.len() >= 10, "{}", guarded.len());
    for (path, ops) in guarded {
        for (method, op) in ops.as_object().expect("operations") {
            for status in ["401", "503"] {
                let r = &op["responses"][status];
                assert!(
                    r["description"].as_str().is_some_and(|d| !d.is_empty())
                        && r["content"]["application/json"]["schema"]["$ref"]
                            == "#/components/schemas/ErrorBody",
                    "{method} {path}: {status} is described with the error body: {r}"
                );
            }
            let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            let mut sorted = statuses.clone();
            sorted.sort();
            assert_eq!(statuses, sorted, "{method} {path}: responses by status");
        }
    }

    // The refund a consume or track can be given back by is linked from its answer.
    for path in ["/v1/consume", "/v1/track"] {
        let link = &spec["paths"][path]["post"]["responses"]["200"]["links"]["Refund"];
        assert_eq!(link["operationId"], "refund", "{path}: {link}");
        assert_eq!(spec["paths"]["/v1/refund"]["post"]["operationId"], "refund");
    }

    // And the answers are what is described: a body over 16 KiB on a call that takes one.
    let user = Uuid::new_v4();
    let big = json!({"ttl_seconds": 3600, "pad": "x".repeat(20_000)});
    let a = app.post(&format!("/v1/users/{user}/usage-link"), big).await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (413, &json!("PAYLOAD_TOO_LARGE"))
    );
}

#[tokio::test]
async fn the_usage_pages_own_503_is_html_and_described_so() {
    let redis = crate::helpers::PrivateRedis::start();
    let app = TestApp::spawn_with(crate::helpers::Options {
        redis_url: redis.url(),
        redis_timeout_ms: 200,
        ..Default::default()
    })
    .await;
    let spec = app.get("/openapi.json").await.body;
    let described = &spec["paths"]["/ui/users/{user_id}"]["get"]["responses"]["503"]["content"];
    assert!(described["text/html"].is_object(), "{described}");
    assert!(
        described["application/json"].is_object(),
        "the middleware's 503: {described}"
    );

    redis.pause();
    let page = app
        .client
        .get(format!("{}/ui/users/{}", app.base, Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    let status = page.status().as_u16();
    let content_type = page.headers()["content-type"].to_str().unwrap().to_owned();
    redis.resume();
    assert_eq!(status, 503);
    assert!(content_type.starts_with("text/html"), "{content_type}");
}
