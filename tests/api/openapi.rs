//! `/openapi.json`: valid OpenAPI 3.1, describing every route, and matching what the routes
//! really answer.

use std::collections::BTreeSet;
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::TestApp;

/// Every route quotad serves, as (method, path).
const ROUTES: [(&str, &str); 16] = [
    ("post", "/v1/consume"),
    ("post", "/v1/check"),
    ("post", "/v1/track"),
    ("post", "/v1/refund"),
    ("post", "/v1/release"),
    ("get", "/v1/users/{user_id}/usage"),
    ("post", "/v1/users/{user_id}/usage-link"),
    ("get", "/v1/plans"),
    ("get", "/v1/users/{user_id}/plan"),
    ("put", "/v1/users/{user_id}/plan"),
    ("post", "/v1/admin/reconcile"),
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
    for (method, path) in &described {
        let body = (method != "get").then(|| json!({}));
        let a = app
            .send(
                method.to_uppercase().parse::<Method>().unwrap(),
                &path.replace("{user_id}", &user),
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
fn properties(spec: &Value, schema: &Value) -> BTreeSet<String> {
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

fn response_schema<'a>(spec: &'a Value, method: &str, path: &str, status: u16) -> &'a Value {
    &spec["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"]
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

    let decision = properties(&spec, response_schema(&spec, "post", "/v1/consume", 200));
    assert_eq!(
        keys(&allowed.body).difference(&decision).count(),
        0,
        "{:?} vs {decision:?}",
        allowed.body
    );
    assert_eq!(
        keys(&refused.body),
        properties(&spec, response_schema(&spec, "post", "/v1/consume", 402))
            .into_iter()
            .filter(|k| k != "degraded")
            .collect()
    );
    assert_eq!(
        keys(&refund.body),
        properties(&spec, response_schema(&spec, "post", "/v1/refund", 200))
    );
    assert_eq!(
        keys(&usage.body),
        properties(
            &spec,
            response_schema(&spec, "get", "/v1/users/{user_id}/usage", 200)
        )
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
            "metadata",
            "plan",
            "type",
            "user_id"
        ]
        .map(String::from)
        .into()
    );
}
