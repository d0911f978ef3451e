//! The usage page (`GET /ui/users/{id}`): server-rendered HTML, no external assets, readable at
//! phone width. Shown to an admin token, or to anyone holding a signed link that
//! `POST /v1/users/{id}/usage-link` issues (HMAC-SHA256 over the user and an expiry), so an app
//! can show its user their own page without giving out a token.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use super::{short, whole_number, ApiQuery, AppState, Bearer, OptionalJson, UserIdPath};
use crate::http::error::{ApiError, ErrorBody};
use crate::plans::Overage;
use crate::quota::{TypeUsage, Usage};
use crate::store::LimitSource;

/// Default and longest life of a signed link.
const DEFAULT_TTL_SECS: i64 = 3600;
const MAX_TTL_SECS: i64 = 7 * 24 * 3600;

/// Signs and checks usage-page links.
pub struct LinkSigner {
    key: Vec<u8>,
}

impl LinkSigner {
    /// A signer over `secret`.
    pub fn new(secret: &[u8]) -> LinkSigner {
        LinkSigner {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, user: &Uuid, expires: i64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(format!("{user}:{expires}").as_bytes());
        mac
    }

    /// The signature of a link to `user`'s page valid until `expires` (unix seconds).
    pub fn sign(&self, user: &Uuid, expires: i64) -> String {
        hex(&self.mac(user, expires).finalize().into_bytes())
    }

    /// Whether `sig` is the signature of (`user`, `expires`); compared in constant time.
    pub fn verify(&self, user: &Uuid, expires: i64, sig: &str) -> bool {
        unhex(sig).is_some_and(|bytes| self.mac(user, expires).verify_slice(&bytes).is_ok())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Body of `POST /v1/users/{id}/usage-link`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ttl_seconds": 3600}))]
pub struct LinkRequest {
    /// How long the link works, in seconds (60 to 604800; default 3600). A whole number; `3600.0`
    /// is the same as `3600`.
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 60, maximum = 604800)]
    ttl_seconds: Option<Value>,
}

/// A signed link to a usage page.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct LinkJson {
    /// Path of the page, with its expiry and signature.
    url: String,
    /// When the link stops working.
    expires_at: DateTime<Utc>,
}

/// `POST /v1/users/{user_id}/usage-link`: a signed link to the user's usage page.
#[utoipa::path(
    post,
    path = "/v1/users/{user_id}/usage-link",
    tag = "ui",
    description = "A signed link (HMAC, with an expiry) to the user's usage page, for an app to show its own user.",
    params(("user_id" = String, Path, description = "The user, a UUID", format = Uuid)),
    request_body(content = Option<LinkRequest>, description = "Optional: no body is the default TTL"),
    responses(
        (status = 200, description = "The link", body = LinkJson),
        (status = 400, description = "Bad input", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn issue_link(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    OptionalJson(body): OptionalJson<LinkRequest>,
) -> Result<Response, ApiError> {
    let ttl = match &body.ttl_seconds {
        None => DEFAULT_TTL_SECS,
        Some(raw) => whole_number(raw)
            .filter(|t| (60..=MAX_TTL_SECS as u64).contains(t))
            .map(|t| t as i64)
            .ok_or_else(|| {
                ApiError::invalid(
                    "INVALID_TTL",
                    "ttl_seconds",
                    format!("ttl_seconds must be a whole number from 60 to {MAX_TTL_SECS} (7 days); got {}.", short(&raw.to_string())),
                )
            })?,
    };
    let expires = state.quota.clock.now().timestamp() + ttl;
    let sig = state.links.sign(&user, expires);
    let json = LinkJson {
        url: format!("/ui/users/{user}?expires={expires}&sig={sig}"),
        expires_at: DateTime::from_timestamp(expires, 0).unwrap_or_default(),
    };
    Ok(Json(json).into_response())
}

/// Query of a signed link.
#[derive(Debug, Deserialize)]
pub struct LinkQuery {
    expires: Option<i64>,
    sig: Option<String>,
}

/// `GET /ui/users/{user_id}`: the usage page.
#[utoipa::path(
    get,
    path = "/ui/users/{user_id}",
    tag = "ui",
    description = "The usage page: HTML, one bar per type. Needs an admin token or a signed link (expires and sig).",
    params(
        ("user_id" = String, Path, description = "The user, a UUID", format = Uuid),
        ("expires" = Option<i64>, Query, description = "Unix time the link expires (from usage-link)"),
        ("sig" = Option<String>, Query, description = "The link's signature (from usage-link)"),
    ),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 400, description = "The user id or a query parameter is not valid", body = ErrorBody),
        (status = 401, description = "Neither a link nor an admin token", content_type = "text/html", body = String),
        (status = 403, description = "A forged or expired link; or, with no token configured, a client off loopback", content_type = "text/html", body = String),
        (status = 503, description = "Starting, overloaded (OVERLOADED) or past the request deadline (TIMEOUT): the JSON error body; a dependency down while the page is read: an HTML page saying so", content((ErrorBody = "application/json"), (String = "text/html"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn usage_page(
    State(state): State<AppState>,
    UserIdPath(user): UserIdPath,
    ApiQuery(link): ApiQuery<LinkQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err((status, why)) = admit(&state, &peer, &user, &link, &headers) {
        return page_error(status, why);
    }
    match state.quota.usage(user).await {
        Ok(usage) => {
            let plans = state.quota.plans.current();
            Html(render(&usage, &plans.upgrade_url, |ty| {
                plans.usage_type(ty).map(|t| t.label.clone())
            }))
            .into_response()
        }
        Err(e) => page_error(
            ApiError::from(e).status,
            "Usage cannot be shown right now; try again in a moment.",
        ),
    }
}

/// Who may see a page. A link (`expires` or `sig` in the query) is always checked, whoever
/// sends it: a bad, expired or incomplete one is 403. Without a link: anyone on loopback when
/// quotad has no tokens (loopback callers are then trusted as admin, as on the API), else an admin
/// token.
fn admit(
    state: &AppState,
    peer: &SocketAddr,
    user: &Uuid,
    link: &LinkQuery,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, &'static str)> {
    let tokens = &state.tokens;
    // The same rule as the API's: without tokens, loopback peers only.
    if tokens.open() && !peer.ip().is_loopback() {
        return Err((
            StatusCode::FORBIDDEN,
            "quotad serves loopback clients only.",
        ));
    }
    match (link.expires, link.sig.as_deref()) {
        (Some(expires), Some(sig)) if state.links.verify(user, expires, sig) => {
            return if expires > state.quota.clock.now().timestamp() {
                Ok(())
            } else {
                Err((
                    StatusCode::FORBIDDEN,
                    "This link has expired; ask the app for a new one.",
                ))
            };
        }
        (None, None) => {}
        _ => return Err((StatusCode::FORBIDDEN, "This link is not valid.")),
    }
    if tokens.open() || tokens.identify(headers) == Bearer::Admin {
        return Ok(());
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "This page needs a signed link or an admin token.",
    ))
}

fn page_error(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Usage</title></head><body><main><h1>Usage</h1><p role=\"alert\">{}</p></main></body></html>",
        escape(message)
    );
    (status, Html(body)).into_response()
}

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#111827;background:#f9fafb}
main{max-width:36rem;margin:0 auto;padding:1.25rem}
h1{font-size:1.4rem;margin:0 0 .25rem}
h2{font-size:1.1rem;margin:1.5rem 0 .25rem}
.plan{margin:0 0 1.25rem;color:#374151}
.row{background:#fff;border:1px solid #e5e7eb;border-radius:.6rem;padding:.85rem 1rem;margin-bottom:.75rem}
.head{display:flex;justify-content:space-between;gap:1rem;font-weight:600}
.count{font-variant-numeric:tabular-nums;white-space:nowrap}
.track{height:.6rem;background:#e5e7eb;border-radius:.3rem;margin:.55rem 0 .35rem;overflow:hidden}
.bar{height:100%;background:#2563eb;border-radius:.3rem}
.bar.danger{background:#dc2626}
.note{margin:0;font-size:.85rem;color:#6b7280}
.overage{margin:.2rem 0 0;font-size:.85rem;color:#92400e}
.upgrade{margin-top:1.25rem;padding:.85rem 1rem;border-radius:.6rem;background:#eff6ff}
.upgrade a{color:#1d4ed8;font-weight:600}
";

/// One section of rows, a counter per type; `level` (`u` or `a`) keeps element ids apart.
/// Returns the rows and whether any is at 80 % of its limit or more.
fn rows(
    counters: &std::collections::BTreeMap<String, TypeUsage>,
    level: &str,
    label: &impl Fn(&str) -> Option<String>,
) -> (String, bool) {
    let mut rows = String::new();
    let mut near_limit = false;
    for (ty, t) in counters {
        let c = &t.counter;
        let used = c.used.unwrap_or(0);
        let name = escape(&label(ty).unwrap_or_else(|| ty.clone()));
        let id = format!("{level}-{ty}");
        let mut note = match c.period.end() {
            Some(end) => format!("resets {}", end.format("%-d %B %Y")),
            None => "in total; does not reset".to_owned(),
        };
        if t.source == LimitSource::Override {
            note.push_str(" · a limit set for you");
        }
        // Units held by open reservations count as taken until their work ends.
        let held = c.held.unwrap_or(0);
        if held > 0 {
            let _ = write!(note, " · {held} more held for work in progress");
        }
        let (count, bar) = match c.limit {
            Some(limit) => {
                let pct = used
                    .saturating_mul(100)
                    .checked_div(limit)
                    .map_or(100, |p| p.min(100));
                near_limit |= limit == 0 || used * 5 >= limit * 4;
                let class = if limit == 0 || used * 10 >= limit * 9 {
                    "bar danger"
                } else {
                    "bar"
                };
                (
                    format!("{used} / {limit}"),
                    format!(
                        "<div class=\"track\"><div class=\"{class}\" role=\"progressbar\" aria-labelledby=\"{id}\" aria-valuemin=\"0\" aria-valuemax=\"{limit}\" aria-valuenow=\"{}\" aria-valuetext=\"{used} of {limit} used\" style=\"width:{pct}%\"></div></div>",
                        used.min(limit)
                    ),
                )
            }
            None if t.source == LimitSource::Account => {
                note.push_str(" · counts toward your team's shared pool");
                (format!("{used}"), String::new())
            }
            None => (format!("{used} / ∞"), String::new()),
        };
        // Use past the limit, where the plan allows it: what is billed as overage, and how much
        // more is allowed.
        let overage = c.overage.unwrap_or(0);
        let per = if c.period.end().is_some() {
            " this month"
        } else {
            ""
        };
        let overage = match (c.limit.is_some(), c.overage_cap) {
            (true, Overage::Cap(cap)) => format!(
                "<p class=\"overage\" data-overage=\"{overage}\">Overage{per}: {overage} past the limit, of up to {cap} allowed.</p>"
            ),
            (true, Overage::Soft) => format!(
                "<p class=\"overage\" data-overage=\"{overage}\">Overage{per}: {overage} past the limit (a soft limit: use past it is never refused).</p>"
            ),
            _ if overage > 0 => format!(
                "<p class=\"overage\" data-overage=\"{overage}\">Overage{per}: {overage} past the limit.</p>"
            ),
            _ => String::new(),
        };
        let _ = write!(
            rows,
            "<div class=\"row\" data-level=\"{level}\" data-type=\"{ty}\"><div class=\"head\"><span id=\"{id}\">{name}</span><span class=\"count\">{count}</span></div>{bar}<p class=\"note\">{note}</p>{overage}</div>"
        );
    }
    (rows, near_limit)
}

/// The page for `usage`; `label` names a type. A member of an account sees their own counters
/// and, below, their team's shared pool.
fn render(usage: &Usage, upgrade_url: &str, label: impl Fn(&str) -> Option<String>) -> String {
    let (mine, mut near_limit) = rows(&usage.counters, "u", &label);
    let pool = match &usage.account {
        Some(pool) => {
            let (rows, near) = rows(&pool.counters, "a", &label);
            near_limit |= near;
            format!(
                "<h2>Your team's shared pool</h2><p class=\"plan\">Team plan: <strong>{}</strong></p><section aria-label=\"Team usage\">{rows}</section>",
                escape(&pool.plan)
            )
        }
        None => String::new(),
    };
    let upgrade = if near_limit {
        format!(
            "<p class=\"upgrade\">You are close to a limit of your plan. <a href=\"{}\">Upgrade your plan</a></p>",
            escape(upgrade_url)
        )
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Your usage</title><style>{STYLE}</style></head><body><main><h1>Your usage</h1><p class=\"plan\">Plan: <strong>{}</strong></p><section aria-label=\"Usage\">{mine}</section>{pool}{upgrade}</main></body></html>",
        escape(&usage.plan)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_verifies_for_its_user_and_expiry_only() {
        let s = LinkSigner::new(b"secret");
        let user = Uuid::nil();
        let sig = s.sign(&user, 1_800_000_000);
        assert!(s.verify(&user, 1_800_000_000, &sig));
        assert!(!s.verify(&user, 1_800_000_001, &sig), "another expiry");
        assert!(!s.verify(&Uuid::max(), 1_800_000_000, &sig), "another user");
        assert!(
            !LinkSigner::new(b"other").verify(&user, 1_800_000_000, &sig),
            "another key"
        );
        assert!(!s.verify(&user, 1_800_000_000, "zz"));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
