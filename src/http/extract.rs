//! Extractors and parsers that turn every malformed request into a clear 4xx in the JSON error
//! body: JSON bodies, path user ids, query strings, whole numbers.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::MAX_BODY;
use crate::http::error::ApiError;

/// A JSON body whose every fault is an [`ApiError`]: 413 over the size limit, 400 for malformed
/// JSON, unknown fields, missing fields and wrong types, naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], for a body whose every field has a default: no body, an empty one, or JSON
/// `null` is the default.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        if bytes.trim_ascii().is_empty() || bytes.trim_ascii() == b"null" {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(MAX_BODY)
        } else {
            ApiError::bad_request(
                "UNREADABLE_BODY",
                format!("The request body could not be read: {rejection}."),
            )
        }
    })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from an array too; a request body is an object.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::invalid(
            "NOT_AN_OBJECT",
            "body",
            "The body must be a JSON object, e.g. {\"user_id\": \"…\", \"type\": \"…\"}.",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| {
        ApiError::bad_request(
            "MALFORMED_JSON",
            format!("The body is not valid JSON: {e}."),
        )
    })?;
    Ok(value)
}

/// The `{user_id}` of a route's path, as a UUID; a value that is not one (percent-encoded bytes
/// that are not UTF-8 included) is 400 `INVALID_USER_ID` in the JSON error body.
pub struct UserIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for UserIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => parse_user_id(&raw).map(UserIdPath),
            Err(_) => Err(ApiError::invalid(
                "INVALID_USER_ID",
                "user_id",
                "The user id in the path is not a UUID (it is not even text once decoded); send one like \"7c9e6679-7425-40de-944b-e07fc1f90ae7\".",
            )),
        }
    }
}

/// The `{account_id}` of a route's path, as a UUID; a value that is not one is 400
/// `INVALID_ACCOUNT_ID` in the JSON error body.
pub struct AccountIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for AccountIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(raw)| raw)
            .unwrap_or_default();
        parse_account_id(&raw, "account_id").map(AccountIdPath)
    }
}

/// Parses an account id (`field` names where it came from, for the error).
pub fn parse_account_id(raw: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw.trim()).map_err(|_| {
        ApiError::invalid(
            "INVALID_ACCOUNT_ID",
            field,
            format!(
                "{field} {} is not a UUID; send one like \"0a6c2e2e-6f1c-4b8e-9d55-2f1f0b7c3a10\".",
                short(&format!("{raw:?}"))
            ),
        )
    })
}

/// A query string whose faults are 400 `INVALID_QUERY` in the JSON error body, naming the
/// parameter where it can.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let field = e.path().to_string();
                let inner = short(&e.into_inner().to_string());
                // A parameter sent twice: named, rather than the query as a whole.
                if let Some(name) = inner
                    .strip_prefix("duplicate field `")
                    .and_then(|r| r.split('`').next())
                {
                    return ApiError::invalid(
                        "INVALID_QUERY",
                        name,
                        format!("The query parameter {name} is sent more than once; send it once."),
                    );
                }
                let field = if field == "." {
                    "query".to_owned()
                } else {
                    field
                };
                ApiError::invalid(
                    "INVALID_QUERY",
                    &field,
                    format!("The query parameter {field} is not valid: {inner}."),
                )
            })
    }
}

/// A JSON number that is a whole number from 0 up, as JSON Schema's `integer` reads it: `3` and
/// `3.0` alike (a float only while it is exact, up to 2^53). `None` for anything else.
pub(crate) fn whole_number(value: &serde_json::Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    (f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&f)).then_some(f as u64)
}

/// At most 120 characters of `text`, for echoing client input back in an error.
pub(crate) fn short(text: &str) -> String {
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::bad_request(
            "MALFORMED_JSON",
            format!("The body is not valid JSON: {inner}."),
        );
    }
    let text = inner.to_string();
    let quoted = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|r| r.split('`').next())
            .map(str::to_owned)
    };
    if let Some(field) = quoted("unknown field `") {
        // The path already ends with the unknown field's name.
        let location = if path == "." { field.clone() } else { path };
        return ApiError::invalid("UNKNOWN_FIELD", &location, format!("Unknown field {field:?}; remove it (see /openapi.json for the fields each call takes)."));
    }
    if let Some(field) = quoted("missing field `") {
        return ApiError::invalid(
            "MISSING_FIELD",
            &field,
            format!("The field {field:?} is required."),
        );
    }
    let field = if path == "." { "body".to_owned() } else { path };
    ApiError::invalid(
        "INVALID_FIELD",
        &field,
        format!("{field} is not valid: {inner}."),
    )
}

/// Parses a user id, in any of the usual UUID spellings, and records it on the request's span.
pub fn parse_user_id(raw: &str) -> Result<Uuid, ApiError> {
    parse_user_named(raw, "user_id")
}

/// [`parse_user_id`] for a user id sent in `field` (a body field or a header).
pub(crate) fn parse_user_named(raw: &str, field: &str) -> Result<Uuid, ApiError> {
    let parsed = Uuid::parse_str(raw.trim());
    if let Ok(user) = &parsed {
        tracing::Span::current().record("user", tracing::field::display(user));
    }
    parsed.map_err(|_| {
        ApiError::invalid(
            "INVALID_USER_ID",
            field,
            format!(
                "{field} {} is not a UUID; send one like \"7c9e6679-7425-40de-944b-e07fc1f90ae7\".",
                short(&format!("{raw:?}"))
            ),
        )
    })
}
