//! Consume, check and track with `items`: several usage types in one call, all or nothing (see
//! [`crate::items`]). The body is the decision body with `items` in place of `type` and `amount`;
//! the answer is each item's decision, as a call for that type alone answers it, under the call's
//! own `allowed`.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::quota::{json_response, parse_amount, DecisionAnswer, DecisionJson};
use crate::http::error::ApiError;
use crate::items::{ItemInput, ItemsDecision, MAX_ITEMS};
use crate::plans::Plans;
use crate::quota::{known_type, Action};

/// One item of a call with items.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"type": "ai_generation", "amount": 5}))]
pub struct ItemRequest {
    /// A configured usage type (see `GET /v1/plans`), at most once per call.
    #[serde(rename = "type")]
    usage_type: String,
    /// How much, 1 to 1,000,000; default 1. A whole number; `3.0` is the same as `3`.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000000)]
    amount: Option<Value>,
}

/// The items of a body, validated under `plans`: 1 to [`MAX_ITEMS`], each a configured type at
/// most once, each amount a whole number from 1 to 1,000,000.
pub(crate) fn parse_items(
    items: Vec<ItemRequest>,
    plans: &Plans,
) -> Result<Vec<ItemInput<'_>>, ApiError> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(ApiError::invalid(
            "INVALID_ITEMS",
            "items",
            format!(
                "items must hold 1 to {MAX_ITEMS} entries, one per usage type; got {}.",
                items.len()
            ),
        ));
    }
    let mut parsed: Vec<ItemInput<'_>> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let usage_type = known_type(plans, &item.usage_type).map_err(|e| {
            let mut e = ApiError::from(e);
            e.field = Some(format!("items[{i}].type"));
            e
        })?;
        let amount = parse_amount(item.amount.as_ref(), &format!("items[{i}].amount"))?;
        if parsed.iter().any(|p| p.usage_type.name == usage_type.name) {
            return Err(ApiError::invalid(
                "INVALID_ITEMS",
                &format!("items[{i}].type"),
                format!(
                    "{} appears more than once in items; send each type once, with the sum of its amounts.",
                    usage_type.name
                ),
            ));
        }
        parsed.push(ItemInput { usage_type, amount });
    }
    Ok(parsed)
}

/// The answer to a call with items.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"allowed": false, "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "refused": ["export"], "code": "USAGE_LIMIT_EXCEEDED", "upgrade_url": "https://example.com/upgrade",
    "error": "Nothing was counted: export does not fit. Usage limit exceeded for export. Your FREE plan allows 3 per month. You've used 3.",
    "items": [
        {"allowed": false, "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "export", "plan": "FREE", "used": 3, "limit": 3, "remaining": 0, "unlimited": false, "overage": 0, "overage_cap": 0, "limit_source": "plan", "limited_by": "user", "over_limit": false, "overage_added": 0, "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z", "resets_at": "2026-12-01T00:00:00Z", "code": "USAGE_LIMIT_EXCEEDED", "upgrade_url": "https://example.com/upgrade", "error": "Usage limit exceeded for export. Your FREE plan allows 3 per month. You've used 3."},
        {"allowed": true, "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "type": "ai_generation", "plan": "FREE", "used": 12, "limit": 50, "remaining": 38, "unlimited": false, "overage": 0, "overage_cap": 0, "limit_source": "plan", "over_limit": false, "overage_added": 0, "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z", "resets_at": "2026-12-01T00:00:00Z"}
    ]}))]
pub(crate) struct ItemsJson<'a> {
    /// Every item fits: for consume, every item was counted (a refused consume counts none);
    /// for check, every item would fit; track is always allowed.
    allowed: bool,
    user_id: Uuid,
    /// Each item's decision, in the order sent, as a call for that type alone answers it;
    /// `allowed` says whether the item fits. On a refused consume the items that fit were not
    /// counted either: they show their counts as they stand, as check answers.
    items: Vec<DecisionJson<'a>>,
    /// The types that did not fit, in the order sent (absent when every item fits).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused: Vec<&'a str>,
    /// Present and true when Redis could not answer and every item's type fails open: allowed,
    /// nothing counted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    degraded: bool,
    /// `USAGE_LIMIT_EXCEEDED` on a refused consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    /// Where to upgrade, on a refused consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_url: Option<&'a str>,
    /// On a refused consume: which items did not fit, and each one's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The response to a call with items: 200, or 402 for a refused consume (with `Retry-After`
/// when every refused item resets), `Idempotent-Replayed` on a replay. No `RateLimit-*` headers:
/// each item's figures are in its own answer.
pub(crate) fn items_response(
    d: &ItemsDecision,
    action: Action,
    amounts: &[u64],
    plans: &Plans,
) -> Response {
    let refused = action == Action::Consume && !d.allowed;
    let mut errors = Vec::new();
    let mut resets = Vec::new();
    let items: Vec<DecisionJson<'_>> = d
        .items
        .iter()
        .zip(amounts)
        .map(|(item, amount)| {
            // An item that fits in a refused consume was not counted: it answers as check would.
            let as_action = if refused && item.allowed {
                Action::Check
            } else {
                action
            };
            let answer = DecisionAnswer::new(item, as_action, *amount, plans);
            if refused && !item.allowed {
                errors.extend(answer.error().map(str::to_owned));
                resets.push(answer.reset_seconds);
            }
            answer.into_json()
        })
        .collect();
    let names: Vec<&str> = d.refused().map(|i| i.usage_type.as_str()).collect();
    let error = refused.then(|| {
        let list = match names.as_slice() {
            [one] => format!("{one} does not fit"),
            [rest @ .., last] => format!("{} and {last} do not fit", rest.join(", ")),
            [] => "an item does not fit".to_owned(),
        };
        format!("Nothing was counted: {list}. {}", errors.join(" "))
    });
    let mut headers = HeaderMap::new();
    if refused {
        // When every refused item has started again, the call may fit.
        if let Some(wait) = resets.iter().copied().collect::<Option<Vec<u64>>>() {
            if let Some(max) = wait.into_iter().max() {
                headers.insert(
                    HeaderName::from_static("retry-after"),
                    HeaderValue::from(max),
                );
            }
        }
    }
    if d.replayed {
        headers.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    let body = ItemsJson {
        allowed: d.allowed,
        user_id: d.user,
        items,
        refused: if action == Action::Track {
            Vec::new()
        } else {
            names
        },
        degraded: d.degraded,
        code: refused.then_some("USAGE_LIMIT_EXCEEDED"),
        upgrade_url: refused.then_some(plans.upgrade_url.as_str()),
        error,
    };
    let status = if refused {
        StatusCode::PAYMENT_REQUIRED
    } else {
        StatusCode::OK
    };
    json_response(
        status,
        headers,
        serde_json::to_vec(&body).expect("a decision serializes"),
    )
}
