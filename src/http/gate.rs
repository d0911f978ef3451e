//! `/v1/gate`: the consume a gateway makes before proxying (nginx `auth_request`, Caddy
//! `forward_auth`, Envoy `ext_authz`), with the user, type, amount and idempotency key in request
//! headers, or the type from the plans file's route table by the original method and URI.
//!
//! nginx's `auth_request` only understands 2xx, 401 and 403; with `?deny_status=403` every other
//! answer is sent as that status, carrying the real one in `Quotad-Status` and the JSON body on one
//! line in `Quotad-Body`, which the shipped nginx configuration turns back into the real answer.
//! In that form no answer has a body: nginx keeps its connection to quotad only after one without.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::quota::{check_amount, check_idempotency_key, DecisionAnswer};
use super::{parse_user_named, short, AppState};
use crate::gate::{normalize_uri, Unmatched};
use crate::http::error::ApiError;
use crate::plans::{Plans, UsageType};
use crate::quota::{known_type, Action, DecisionInput};

/// The gate's path; `/v1/gate/<path>` is served too, `<path>` being the original request's.
pub(crate) const GATE_PATH: &str = "/v1/gate";
/// The original method, in the header nginx's documentation uses and the one Caddy and Traefik send.
const ORIGINAL_METHOD: [HeaderName; 2] = [
    HeaderName::from_static("x-original-method"),
    HeaderName::from_static("x-forwarded-method"),
];
/// The original URI, likewise.
const ORIGINAL_URI: [HeaderName; 2] = [
    HeaderName::from_static("x-original-uri"),
    HeaderName::from_static("x-forwarded-uri"),
];
/// The real status of an answer sent as `deny_status`.
pub(crate) const QUOTAD_STATUS: HeaderName = HeaderName::from_static("quotad-status");
/// The JSON body of an answer sent as `deny_status`, on one line, ASCII only.
pub(crate) const QUOTAD_BODY: HeaderName = HeaderName::from_static("quotad-body");
/// The plan in force, on an allowed answer.
const QUOTAD_PLAN: HeaderName = HeaderName::from_static("quotad-plan");
/// What the user has used after this call (the level that binds, as consume's `used`), on an
/// allowed answer.
const QUOTAD_USED: HeaderName = HeaderName::from_static("quotad-used");
/// The allowed answer's period overage (units past the limit) at the level shown.
const QUOTAD_OVERAGE: HeaderName = HeaderName::from_static("quotad-overage");
/// The usage type counted, on an allowed answer.
const QUOTAD_USAGE_TYPE: HeaderName = HeaderName::from_static("quotad-usage-type");
/// `true` when Redis could not answer and the type fails open: allowed, not counted.
const QUOTAD_DEGRADED: HeaderName = HeaderName::from_static("quotad-degraded");
/// Largest error body carried in `Quotad-Body`.
const MAX_DENY_BODY: usize = 16 * 1024;

/// `/v1/gate`: consume for the request a gateway is about to proxy.
#[utoipa::path(
    method(get, post),
    path = "/v1/gate",
    tag = "quota",
    operation_id = "gate",
    description = "The consume of a gateway that asks before proxying (nginx auth_request, Caddy forward_auth, Envoy ext_authz). Any method. The user, type, amount and idempotency key come from headers (names set in the plans file's `[gate]` table); without a type header, the `[gate]` route table maps the original method and URI (`X-Original-Method`/`X-Forwarded-Method`, `X-Original-URI`/`X-Forwarded-Uri`) to a type. Also served under `/v1/gate/<original path>` (Envoy ext_authz appends the request's path to its `path_prefix`), the path after `/v1/gate` then being the original one. Same counting, idempotency and refusal cache as `POST /v1/consume`.",
    params(
        ("X-User-Id" = Option<String>, Header, description = "The user, a UUID (required when the request is metered)", format = Uuid),
        ("X-Usage-Type" = Option<String>, Header, description = "The usage type; when absent the route table decides"),
        ("X-Usage-Amount" = Option<u64>, Header, description = "How much, 1 to 1,000,000 (default 1); only with X-Usage-Type", minimum = 1, maximum = 1000000),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry count once (1 to 255 characters, no control characters)"),
        ("X-Original-Method" = Option<String>, Header, description = "The original request's method (or X-Forwarded-Method)"),
        ("X-Original-URI" = Option<String>, Header, description = "The original request's URI (or X-Forwarded-Uri)"),
        ("deny_status" = Option<u16>, Query, description = "401 or 403 (for nginx auth_request): every answer that is not 2xx is sent with this status, the real one in Quotad-Status and the JSON body in Quotad-Body; and no answer has a body (nginx keeps its connection to quotad only after an answer without one)"),
    ),
    responses(
        (status = 200, description = "Allowed and counted. No body: everything is in headers (a gateway keeps its connection to quotad only after an answer without one)", headers(("RateLimit-Limit" = u64, description = "The count past which calls are refused: the limit plus its overage cap (absent when unlimited or a soft limit)"), ("RateLimit-Remaining" = u64, description = "What is left before a refusal"), ("RateLimit-Reset" = u64, description = "Seconds until the period resets"), ("Quotad-Plan" = String, description = "The plan in force"), ("Quotad-Usage-Type" = String, description = "The type counted"), ("Quotad-Used" = u64, description = "Used after this call (absent when degraded)"), ("Quotad-Overage" = u64, description = "Units counted past the limit this period, where the plan allows overage; 0 when none (absent when degraded)"), ("Quotad-Degraded" = String, description = "`true`: Redis did not answer and the type fails open; allowed, not counted"), ("Idempotent-Replayed" = String, description = "`true`: the first answer to this idempotency key, again; nothing counted"))),
        (status = 204, description = "The route table maps the request to no type and `[gate] unmatched = \"pass\"`: allowed, nothing counted"),
        (status = 402, description = "Refused: the amount does not fit; nothing counted", body = super::quota::DecisionJson, headers(("Retry-After" = u64, description = "Seconds until the period resets"))),
        (status = 403, description = "ROUTE_NOT_METERED: no route maps the request and `[gate] unmatched = \"refuse\"`; or, with deny_status=403, any answer that is not 2xx (see Quotad-Status)", body = super::error::ErrorBody),
        (status = 409, description = "IDEMPOTENCY_KEY_REUSED or IDEMPOTENCY_KEY_REFUNDED; nothing counted", body = super::error::ErrorBody),
        (status = 400, description = "A header missing or malformed; changes nothing", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn gate(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let plans = state.quota.plans.current();
    let gate = &plans.gate;
    let (usage_type, amount) = match metered(&plans, &method, &uri, &headers)? {
        Metered::Yes(usage_type, amount) => (usage_type, amount),
        Metered::No { method, path } => {
            return Ok(match gate.unmatched {
                Unmatched::Pass => StatusCode::NO_CONTENT.into_response(),
                Unmatched::Refuse => ApiError::forbidden(
                    "ROUTE_NOT_METERED",
                    format!("{method} {} is not a metered route, and quotad's gate refuses routes that no [gate] route maps to a usage type.", short(&path)),
                )
                .into_response(),
            })
        }
    };
    let Some(user) = one(&headers, &gate.user_header)? else {
        return Err(ApiError::invalid(
            "MISSING_USER",
            gate.user_header.as_str(),
            format!(
                "This request is metered ({}) and names no user; send the user's UUID in {}.",
                usage_type.name, gate.user_header
            ),
        ));
    };
    let user = parse_user_named(user, gate.user_header.as_str())?;
    let idempotency_key = match one(&headers, &gate.idempotency_header)? {
        None => None,
        Some(key) => {
            check_idempotency_key(key, gate.idempotency_header.as_str())?;
            Some(key.to_owned())
        }
    };
    let input = DecisionInput {
        user,
        usage_type,
        amount,
        idempotency_key,
        plan: None,
        metadata: Vec::new(),
    };
    let decision = state.quota.decide(Action::Consume, &input, &plans).await?;
    let mut answer = DecisionAnswer::new(&decision, Action::Consume, amount, &plans);
    let mut headers = std::mem::take(&mut answer.headers);
    if !decision.allowed {
        // A refusal goes to the client as it is (Caddy, Envoy): with consume's JSON body.
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok((answer.status, headers, answer.body()).into_response());
    }
    // Allowed: headers only. A gateway reads nothing else, and nginx and Go's proxies (Caddy,
    // Traefik) keep their connection to quotad only after an answer whose body they read whole,
    // which they do not do for an auth answer: a body here would cost a connection per request.
    if let Some(plan) = answer.plan().and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(QUOTAD_PLAN, plan);
    }
    if let Ok(name) = HeaderValue::from_str(&usage_type.name) {
        headers.insert(QUOTAD_USAGE_TYPE, name);
    }
    if let Some(used) = answer.used {
        headers.insert(QUOTAD_USED, HeaderValue::from(used));
    }
    if let Some(overage) = answer.overage {
        headers.insert(QUOTAD_OVERAGE, HeaderValue::from(overage));
    }
    if decision.degraded {
        headers.insert(QUOTAD_DEGRADED, HeaderValue::from_static("true"));
    }
    Ok((answer.status, headers).into_response())
}

/// What a gate call costs.
enum Metered<'p> {
    /// This type, this amount.
    Yes(&'p UsageType, u64),
    /// Nothing: no route maps the original request (its method and normalized path) to a type.
    No { method: Method, path: String },
}

/// The type and amount of a gate call: from the type (and amount) header, else from the
/// `[gate]` route table by the original method and URI.
fn metered<'p>(
    plans: &'p Plans,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Metered<'p>, ApiError> {
    let gate = &plans.gate;
    if let Some(name) = one(headers, &gate.type_header)? {
        let usage_type = known_type(plans, name).map_err(|e| ApiError {
            field: Some(gate.type_header.to_string()),
            ..ApiError::from(e)
        })?;
        let amount = match one(headers, &gate.amount_header)? {
            None => 1,
            Some(raw) => parse_amount(raw, &gate.amount_header)?,
        };
        return Ok(Metered::Yes(usage_type, amount));
    }
    let Some((from, original_uri)) = original_uri(uri, headers)? else {
        return Err(ApiError::bad_request(
            "NO_USAGE_TYPE",
            format!("Send the usage type in {}, or the original request's URI in X-Original-URI (or X-Forwarded-Uri) for the [gate] route table to map.", gate.type_header),
        ));
    };
    let path = normalize_uri(original_uri).map_err(|e| {
        ApiError::invalid(
            "INVALID_ORIGINAL_URI",
            from,
            format!(
                "The original URI {} {e}.",
                short(&format!("{original_uri:?}"))
            ),
        )
    })?;
    let original = match first(headers, &ORIGINAL_METHOD)? {
        None => method.clone(),
        Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| {
            ApiError::invalid(
                "INVALID_ORIGINAL_METHOD",
                "X-Original-Method",
                format!(
                    "The original method {} is not a method name.",
                    short(&format!("{m:?}"))
                ),
            )
        })?,
    };
    let Some(route) = gate.route(&original, &path) else {
        return Ok(Metered::No {
            method: original,
            path,
        });
    };
    if headers.contains_key(&gate.amount_header) {
        return Err(ApiError::invalid(
            "AMOUNT_WITHOUT_TYPE",
            gate.amount_header.as_str(),
            format!("{} is taken only with {}; this request's type comes from the [gate] route table, whose route sets the amount.", gate.amount_header, gate.type_header),
        ));
    }
    Ok(Metered::Yes(
        known_type(plans, &route.usage_type)?,
        route.amount,
    ))
}

/// The original request's URI and where it was read: `X-Original-URI` or `X-Forwarded-Uri`, else
/// the path after `/v1/gate/` (Envoy's ext_authz appends the request's path to its path_prefix).
fn original_uri<'h>(
    uri: &'h Uri,
    headers: &'h HeaderMap,
) -> Result<Option<(&'static str, &'h str)>, ApiError> {
    for (name, shown) in ORIGINAL_URI
        .iter()
        .zip(["X-Original-URI", "X-Forwarded-Uri"])
    {
        if let Some(value) = one(headers, name)? {
            return Ok(Some((shown, value)));
        }
    }
    Ok(uri
        .path()
        .strip_prefix(GATE_PATH)
        .filter(|rest| rest.starts_with('/'))
        .map(|rest| ("path", rest)))
}

/// The one value of header `name`: absent (or empty) is `None`; two values, or one that is not
/// visible ASCII, is a 400 naming the header.
fn one<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid(
            "DUPLICATE_HEADER",
            name.as_str(),
            format!("{name} was sent more than once; send it once."),
        ));
    }
    let text = value.to_str().map_err(|_| {
        ApiError::invalid(
            "INVALID_HEADER",
            name.as_str(),
            format!("{name} holds characters other than visible ASCII; send plain text."),
        )
    })?;
    let text = text.trim();
    Ok((!text.is_empty()).then_some(text))
}

/// The first of `names` that is present.
fn first<'h>(headers: &'h HeaderMap, names: &[HeaderName]) -> Result<Option<&'h str>, ApiError> {
    for name in names {
        if let Some(value) = one(headers, name)? {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The amount header: digits only (no sign, no exponent), then consume's range.
fn parse_amount(raw: &str, header: &HeaderName) -> Result<u64, ApiError> {
    let n = raw
        .parse::<u64>()
        .ok()
        .filter(|_| raw.bytes().all(|b| b.is_ascii_digit()));
    check_amount(n, header.as_str(), &format!("{raw:?}"))
}

/// Reads `deny_status` from the gate's query; every other parameter is refused.
fn deny_status(query: Option<&str>) -> Result<Option<StatusCode>, ApiError> {
    let mut deny = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (name.as_ref(), value.as_ref()) {
            ("deny_status", "401") => deny = Some(StatusCode::UNAUTHORIZED),
            ("deny_status", "403") => deny = Some(StatusCode::FORBIDDEN),
            ("deny_status", other) => {
                return Err(ApiError::invalid(
                    "INVALID_DENY_STATUS",
                    "deny_status",
                    format!("deny_status must be 401 or 403 (what nginx's auth_request understands); got {}.", short(&format!("{other:?}"))),
                ))
            }
            (other, _) => {
                return Err(ApiError::invalid(
                    "UNKNOWN_PARAMETER",
                    other,
                    format!("The gate takes one query parameter, deny_status; {} is not one.", short(&format!("{other:?}"))),
                ))
            }
        }
    }
    Ok(deny)
}

/// Around the gate, outermost (so it also sees the token check, the readiness gate and load
/// shedding): with `?deny_status=`, an answer that is not 2xx goes out with that status and
/// `Quotad-Status` and `Quotad-Body` headers.
pub(super) async fn deny_as(request: Request, next: Next) -> Response {
    // Under /v1/gate/<path> the query is the original request's, not the gate's.
    let query = match request.uri().path() == GATE_PATH {
        true => request.uri().query(),
        false => None,
    };
    let deny = match deny_status(query) {
        Ok(deny) => deny,
        Err(e) => return e.into_response(),
    };
    let response = next.run(request).await;
    let Some(deny) = deny else {
        return response;
    };
    // No body in this form: nginx's auth_request discards it, and keeps its connection to quotad
    // alive only for an answer without one (else it opens a new connection per request).
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_TYPE);
    if !parts.status.is_success() {
        let bytes = axum::body::to_bytes(body, MAX_DENY_BODY)
            .await
            .unwrap_or_default();
        parts
            .headers
            .insert(QUOTAD_STATUS, HeaderValue::from(parts.status.as_u16()));
        if let Ok(one_line) = HeaderValue::from_str(&ascii_json(&bytes)) {
            parts.headers.insert(QUOTAD_BODY, one_line);
        }
        parts.status = deny;
    }
    Response::from_parts(parts, Body::empty())
}

/// A JSON body on one line of ASCII (non-ASCII characters as `\u` escapes), fit for a header.
fn ascii_json(bytes: &[u8]) -> String {
    let value = serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_else(|_| {
        serde_json::json!({"error": String::from_utf8_lossy(bytes), "code": "UNEXPECTED_ANSWER"})
    });
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_goes_into_a_header_as_ascii_json_that_reads_back_the_same() {
        let body = serde_json::json!({"error": "Plan «PRO» — 😀", "code": "X", "used": 50});
        let line = ascii_json(body.to_string().as_bytes());
        assert!(line.is_ascii() && !line.contains('\n'), "{line}");
        assert!(HeaderValue::from_str(&line).is_ok());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            body
        );
        let odd = ascii_json(b"not json\n");
        let back: serde_json::Value = serde_json::from_str(&odd).unwrap();
        assert_eq!(back["code"], "UNEXPECTED_ANSWER");
    }

    #[test]
    fn deny_status_takes_401_or_403_and_nothing_else() {
        assert_eq!(deny_status(None).unwrap(), None);
        assert_eq!(deny_status(Some("")).unwrap(), None);
        assert_eq!(
            deny_status(Some("deny_status=403")).unwrap(),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            deny_status(Some("deny_status=401")).unwrap(),
            Some(StatusCode::UNAUTHORIZED)
        );
        for bad in [
            "deny_status=402",
            "deny_status=",
            "x=1",
            "deny_status=403&y",
        ] {
            let e = deny_status(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
