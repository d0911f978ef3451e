//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the handlers' and types'
//! annotations, so it describes what the code does.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, health, quota, ui};

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
        quota::check,
        quota::track,
        quota::refund,
        quota::release,
        quota::usage,
        quota::plans,
        quota::put_plan,
        quota::get_plan,
        admin::reconcile,
        ui::issue_link,
        ui::usage_page,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "quota", description = "Decisions and counters (gateway scope)"),
        (name = "admin", description = "Plans and reconcile (admin scope)"),
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
#[utoipa::path(get, path = "/openapi.json", tag = "ops", description = "This description (OpenAPI 3.1).",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
