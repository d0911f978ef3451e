//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the handlers' and types'
//! annotations, so it describes what the code does, with the plan and usage type names in force
//! filled in on each request (a plans reload changes them).

use std::sync::OnceLock;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    accounts, admin, events, export, gate, health, history, items, quota, reservations, ui,
    AppState, MAX_BODY,
};
use crate::period::PeriodKind;
use crate::plans::Plans;

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "quotad",
        description = "Meters usage and enforces monthly plan limits. Errors are `{\"error\", \"code\"}` plus `field` where one input is at fault.",
        license(name = "Apache-2.0")
    ),
    paths(
        quota::consume,
        gate::gate,
        quota::check,
        quota::track,
        quota::refund,
        quota::release,
        reservations::reserve,
        reservations::commit,
        reservations::cancel,
        quota::usage,
        history::usage_history,
        quota::plans,
        admin::put_plan,
        admin::get_plan,
        admin::reconcile,
        events::list,
        events::redeliver,
        export::usage_export,
        accounts::put_membership,
        accounts::get_membership,
        accounts::put_account_plan,
        accounts::get_account_plan,
        accounts::put_user_limits,
        accounts::get_user_limits,
        accounts::put_account_limits,
        accounts::get_account_limits,
        accounts::account_usage,
        ui::issue_link,
        ui::usage_page,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
    ),
    components(schemas(items::ItemsJson, quota::RefundItemsJson)),
    modifiers(&BearerAuth),
    tags(
        (name = "quota", description = "Decisions and counters (gateway scope)"),
        (name = "admin", description = "Plans, reconcile, usage events and the usage export (admin scope)"),
        (name = "accounts", description = "Accounts and their shared pools, memberships, limit overrides (admin scope; an account's usage: gateway scope)"),
        (name = "ui", description = "The usage page"),
        (name = "ops", description = "Health, readiness, metrics, this description"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(
                "A gateway token (QUOTAD_GATEWAY_TOKENS) or an admin token (QUOTAD_ADMIN_TOKENS)",
            )).build()),
        );
    }
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", description = "This description (OpenAPI 3.1), with the plan and usage type names in force as enums.",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    let plans = state.quota.plans.current();
    Json(document(&plans)).into_response()
}

/// The description with the plans in force: the generated document (built once), the names a
/// request may use as enums, and what every route shares (see `shared_responses`).
pub fn document(plans: &Plans) -> Value {
    static BASE: OnceLock<Value> = OnceLock::new();
    let mut doc = BASE
        .get_or_init(|| {
            let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description is JSON");
            doc["components"]["schemas"]["DecisionRequest"]["properties"]["metadata"] =
                quota::metadata_schema();
            // One handler, two described methods: each operation needs its own id.
            doc["paths"]["/v1/gate"]["post"]["operationId"] = json!("gate_post");
            with_items(&mut doc);
            shared_responses(&mut doc);
            refund_links(&mut doc);
            doc
        })
        .clone();
    let types: Vec<Value> = plans.types.keys().map(|t| json!(t)).collect();
    let lifetime: Vec<Value> = plans
        .types
        .values()
        .filter(|t| t.period == PeriodKind::Lifetime)
        .map(|t| json!(t.name))
        .collect();
    let names: Vec<Value> = plans.plan_names.iter().map(|p| json!(p)).collect();
    let schemas = &mut doc["components"]["schemas"];
    schemas["DecisionRequest"]["properties"]["type"]["enum"] = Value::Array(types.clone());
    schemas["ReserveRequest"]["properties"]["type"]["enum"] = Value::Array(types.clone());
    schemas["ItemRequest"]["properties"]["type"]["enum"] = Value::Array(types.clone());
    // `plan` may be null (the stored plan applies).
    let mut or_null = names.clone();
    or_null.push(Value::Null);
    schemas["DecisionRequest"]["properties"]["plan"]["enum"] = Value::Array(or_null);
    schemas["PlanRequest"]["properties"]["plan"]["enum"] = Value::Array(names);
    // Release takes lifetime types only; with none configured every type is refused, which an
    // empty enum cannot say in every tool, so the schema then stays a plain string.
    if !lifetime.is_empty() {
        schemas["ReleaseRequest"]["properties"]["type"]["enum"] = Value::Array(lifetime);
    }
    // A limits body: configured type names, each a limit (-1 = unlimited) or null.
    let limits = json!({
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"enum": types.clone()},
        "additionalProperties": {"type": ["integer", "null"], "minimum": -1, "maximum": 9007199254740991i64},
    });
    for path in [
        "/v1/users/{user_id}/limits",
        "/v1/accounts/{account_id}/limits",
    ] {
        doc["paths"][path]["put"]["requestBody"]["content"]["application/json"]["schema"] =
            limits.clone();
    }
    gate_parameters(&mut doc, &types);
    doc
}

/// The gate's parameters as the code checks them: the type header takes the configured type
/// names, `deny_status` 401 or 403.
fn gate_parameters(doc: &mut Value, types: &[Value]) {
    for method in ["get", "post"] {
        let Some(params) = doc["paths"]["/v1/gate"][method]["parameters"].as_array_mut() else {
            continue;
        };
        for p in params {
            match p["name"].as_str() {
                Some("X-Usage-Type") => p["schema"]["enum"] = Value::Array(types.to_vec()),
                Some("deny_status") => p["schema"] = json!({"type": "integer", "enum": [401, 403]}),
                // Every gate header is trimmed, and an empty one is as absent: the amount is a
                // whole number in consume's range, or nothing (then 1).
                Some("X-Usage-Amount") => {
                    p["schema"] = json!({"anyOf": [
                        {"type": "integer", "minimum": 1, "maximum": crate::plans::MAX_AMOUNT},
                        {"type": "string", "pattern": "^ *$"},
                    ]})
                }
                _ => {}
            }
        }
    }
}

/// What the middleware answers on every route it guards, whatever the handler, so no handler
/// lists it: 401 without a known token, 403 `LOOPBACK_ONLY` (no tokens configured and a peer off
/// loopback), 413 on a body over [`MAX_BODY`], 503 while starting, overloaded, past the request
/// deadline or with a dependency down, and `Retry-After` on a 503 (`OVERLOADED` and `TIMEOUT`
/// carry it).
fn shared_responses(doc: &mut Value) {
    let error_body =
        json!({"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}});
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        let guarded = path.starts_with("/v1/");
        let Some(ops) = ops.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            let has_body = op.get("requestBody").is_some();
            let responses = &mut op["responses"];
            if guarded {
                if responses.get("401").is_none() {
                    responses["401"] = json!({"description": "No or unknown token", "content": error_body.clone()});
                }
                if responses.get("503").is_none() {
                    responses["503"] = json!({
                        "description": "Starting, overloaded (OVERLOADED), past the request deadline (TIMEOUT), or a dependency is down",
                        "content": error_body.clone(),
                    });
                }
                let loopback = "LOOPBACK_ONLY: quotad has no tokens configured and the client is not on loopback";
                match responses.get_mut("403") {
                    Some(r) => {
                        let text = r["description"].as_str().unwrap_or_default();
                        r["description"] = json!(format!("{text}; or {loopback}"));
                    }
                    None => {
                        responses["403"] =
                            json!({"description": loopback, "content": error_body.clone()});
                    }
                }
                if has_body && responses.get("413").is_none() {
                    responses["413"] = json!({
                        "description": format!("Body over {} KiB", MAX_BODY / 1024),
                        "content": error_body.clone(),
                    });
                }
            }
            if path.starts_with("/v1/") || path.starts_with("/ui/") {
                responses["503"]["headers"]["Retry-After"] = json!({
                    "description": "Seconds to wait before retrying; sent with OVERLOADED and TIMEOUT",
                    "schema": {"type": "integer", "minimum": 0},
                });
            }
            // By status, whichever way each was declared.
            if let Some(by_status) = responses.as_object_mut() {
                by_status.sort_keys();
            }
        }
    }
}

/// Calls with items, as the code takes them: a decision body carries `type` (with `amount` and
/// `metadata`) or `items`, never both, and is answered by a decision or by the items' answer; a
/// refund answers one type or, for a call with items, every item.
fn with_items(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    // `type` (a string) or `items` (an array), never both; with `items`, no `amount` and no
    // `metadata` (null is as absent for each).
    let present = |field: &str, kind: &str| json!({"required": [field], "properties": {field: {"type": kind}}});
    schemas["DecisionRequest"]["oneOf"] = json!([
        {"allOf": [present("type", "string"), {"not": present("items", "array")}]},
        {"allOf": [present("items", "array"), {"not": {"anyOf": [
            present("type", "string"),
            present("amount", "number"),
            present("metadata", "object"),
        ]}}]},
    ]);
    // Each type at most once: identical items are duplicates (items naming one type with other
    // amounts are too, which no JSON Schema can say; the schemathesis hooks keep those out).
    schemas["DecisionRequest"]["properties"]["items"]["uniqueItems"] = json!(true);
    let either = |a: &str, b: &str| {
        json!({"oneOf": [
            {"$ref": format!("#/components/schemas/{a}")},
            {"$ref": format!("#/components/schemas/{b}")},
        ]})
    };
    for (path, status) in [
        ("/v1/consume", "200"),
        ("/v1/consume", "402"),
        ("/v1/check", "200"),
        ("/v1/track", "200"),
    ] {
        doc["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"] =
            either("DecisionJson", "ItemsJson");
    }
    doc["paths"]["/v1/refund"]["post"]["responses"]["200"]["content"]["application/json"]
        ["schema"] = either("RefundJson", "RefundItemsJson");
}

/// Links from a counted call to its refund: what a consume or track counted under an
/// `idempotency_key` is given back by a refund naming the same user and key.
fn refund_links(doc: &mut Value) {
    for path in ["/v1/consume", "/v1/track"] {
        doc["paths"][path]["post"]["responses"]["200"]["links"] = json!({
            "Refund": {
                "operationId": "refund",
                "description": "Give back what this call counted.",
                "requestBody": {
                    "user_id": "$response.body#/user_id",
                    "idempotency_key": "$request.body#/idempotency_key",
                },
            },
        });
    }
}
