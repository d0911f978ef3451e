//! The usage page (`GET /ui/users/{id}`): server-rendered HTML, no external assets, readable at
//! phone width. Shown to an admin token, or to anyone holding a signed link that
//! `POST /v1/users/{id}/usage-link` issues (HMAC-SHA256 over the user and an expiry), so an app
//! can show its user their own page without giving out a token.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use super::{short, whole_number, ApiQuery, AppState, Bearer, OptionalJson, UserIdPath};
use crate::history::{History, PeriodUsage, TypeHistory};
use crate::http::error::{ApiError, ErrorBody};
use crate::plans::Overage;
use crate::quota::{TypeUsage, Usage};
use crate::store::LimitSource;

/// Default and longest life of a signed link.
const DEFAULT_TTL_SECS: i64 = 3600;
const MAX_TTL_SECS: i64 = 7 * 24 * 3600;
/// How many months back the page charts each type.
const CHART_MONTHS: u32 = 12;
/// What the page may load and do: nothing from anywhere (no script, image, font or frame), its
/// own inline styles only, and it may not be framed.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

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
    description = "The usage page: HTML, one bar per type, and for each monthly type a bar chart of its last 12 months (from Postgres; the current period from Redis). Needs an admin token or a signed link (expires and sig). Served with a Content-Security-Policy that allows no script and nothing from elsewhere.",
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
            // The charts are an extra: without Postgres the page still shows the live counters.
            let history = match state.quota.history(user, CHART_MONTHS).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error.message = %e, "usage page without its history");
                    None
                }
            };
            let plans = state.quota.plans.current();
            let page = render(&usage, history.as_ref(), &plans.upgrade_url, |ty| {
                plans.usage_type(ty).map(|t| t.label.clone())
            });
            with_csp(Html(page).into_response())
        }
        Err(e) => page_error(
            ApiError::from(e).status,
            "Usage cannot be shown right now; try again in a moment.",
        ),
    }
}

/// `response` with the page's Content-Security-Policy.
fn with_csp(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
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
    with_csp((status, Html(body)).into_response())
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
.hist{margin:.6rem 0 0}
.hist figcaption{font-size:.8rem;color:#6b7280;margin:0 0 .15rem}
.hist svg{display:block;width:100%;height:auto}
.hist .b{fill:#2563eb}
.hist .b.over{fill:#dc2626}
.hist .axis{stroke:#d1d5db;stroke-width:1}
.hist .limit{stroke:#374151;stroke-width:1;stroke-dasharray:4 3}
.hist text{font-size:9px;fill:#4b5563}
";

/// One section of rows, a counter per type; `level` (`u` or `a`) keeps element ids apart.
/// Returns the rows and whether any is at 80 % of its limit or more.
fn rows(
    counters: &std::collections::BTreeMap<String, TypeUsage>,
    level: &str,
    label: &impl Fn(&str) -> Option<String>,
    history: Option<&History>,
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
        let chart = history
            .and_then(|h| Some((h, h.types.get(ty)?)))
            .map(|(h, past)| chart(&id, &name, t, past, h))
            .unwrap_or_default();
        let _ = write!(
            rows,
            "<div class=\"row\" data-level=\"{level}\" data-type=\"{ty}\"><div class=\"head\"><span id=\"{id}\">{name}</span><span class=\"count\">{count}</span></div>{bar}<p class=\"note\">{note}</p>{overage}{chart}</div>"
        );
    }
    (rows, near_limit)
}

/// Width and heights of a chart, in its own units (it scales to the page's width).
const CHART_WIDTH: f64 = 320.0;
const CHART_TOP: f64 = 12.0;
const CHART_BASE: f64 = 84.0;
const CHART_HEIGHT: f64 = 100.0;

/// A period as a person reads it: "1 Nov 2026 – 30 Nov 2026" (its last day is the day of the
/// instant before its exclusive end).
fn span(p: &PeriodUsage) -> String {
    let last = p.end - chrono::Duration::seconds(1);
    format!(
        "{} – {}",
        p.start.format("%-d %b %Y"),
        last.format("%-d %b %Y")
    )
}

/// One type's past periods as an inline SVG bar chart: a bar per period, placed and sized by its
/// own bounds on a time axis from `history.since` (so a month without use is a gap), the part of
/// a bar past the limit in red, the limit as a dashed line. The current period shows the live
/// count `t` has. A screen reader reads the chart's title (every figure); each bar's title names
/// its period and count.
fn chart(id: &str, name: &str, t: &TypeUsage, past: &TypeHistory, history: &History) -> String {
    let mut periods = past.periods.clone();
    let live = t.counter.used.unwrap_or(0);
    let now = history.until;
    match periods.iter_mut().find(|p| p.start <= now && now < p.end) {
        Some(current) => current.used = live,
        None => {
            if let (true, Some(end)) = (live > 0, t.counter.period.end()) {
                periods.push(PeriodUsage {
                    start: t.counter.period.start(),
                    end,
                    used: live,
                    overage: t.counter.overage.unwrap_or(0),
                });
            }
        }
    }
    let caption = format!("Last {CHART_MONTHS} months");
    if periods.is_empty() {
        return format!(
            "<figure class=\"hist\"><figcaption>{caption}: no use recorded.</figcaption></figure>"
        );
    }
    let limit = t.counter.limit;
    let top = periods.iter().map(|p| p.used).max().unwrap_or(0);
    let scale = (CHART_BASE - CHART_TOP) / top.max(limit.unwrap_or(0)).max(1) as f64;
    let from = history.since;
    let to = periods.iter().map(|p| p.end).max().unwrap_or(now).max(now);
    let seconds = (to - from).num_seconds().max(1) as f64;
    let x = |at: DateTime<Utc>| {
        ((at - from).num_seconds() as f64 / seconds * CHART_WIDTH).clamp(0.0, CHART_WIDTH)
    };
    let every = periods.len().div_ceil(12);
    let mut bars = String::new();
    let mut summary = Vec::with_capacity(periods.len());
    for (i, p) in periods.iter().enumerate() {
        let (left, right) = (x(p.start), x(p.end.min(to)));
        let width = (right - left - 2.0).max(1.5);
        let over = limit.filter(|l| p.used > *l);
        let what = match over {
            Some(l) => format!(
                "{}: {} used, {} past the limit",
                span(p),
                p.used,
                p.used - l
            ),
            None => format!("{}: {} used", span(p), p.used),
        };
        let mut rects = String::new();
        let mut rect = |class: &str, low: u64, high: u64| {
            let height = ((high - low) as f64 * scale).max(if high > 0 { 1.0 } else { 0.0 });
            let y = CHART_BASE - low as f64 * scale - height;
            let _ = write!(rects, "<rect class=\"{class}\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{height:.1}\"/>", left + 1.0);
        };
        match over {
            Some(l) => {
                rect("b", 0, l);
                rect("b over", l, p.used);
            }
            None => rect("b", 0, p.used),
        }
        let _ = write!(
            bars,
            "<g class=\"period\" data-used=\"{}\"><title>{what}</title>{rects}</g>",
            p.used
        );
        if i % every == 0 {
            let _ = write!(
                bars,
                "<text x=\"{:.1}\" y=\"96\" text-anchor=\"middle\" aria-hidden=\"true\">{}</text>",
                (left + right) / 2.0,
                p.start.format("%b")
            );
        }
        summary.push(what);
    }
    let mut line = String::new();
    if let Some(l) = limit {
        let y = CHART_BASE - l as f64 * scale;
        let _ = write!(line, "<line class=\"limit\" x1=\"0\" x2=\"{CHART_WIDTH}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/><text x=\"{CHART_WIDTH}\" y=\"{:.1}\" text-anchor=\"end\" aria-hidden=\"true\">limit {l}</text>", y - 3.0);
        summary.push(format!("limit {l}"));
    }
    format!(
        "<figure class=\"hist\"><figcaption>{caption}</figcaption><svg role=\"img\" aria-labelledby=\"{id}-hist\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" width=\"100%\" preserveAspectRatio=\"xMidYMid meet\"><title id=\"{id}-hist\">{name}, {}: {}.</title><line class=\"axis\" x1=\"0\" x2=\"{CHART_WIDTH}\" y1=\"{CHART_BASE}\" y2=\"{CHART_BASE}\"/>{bars}{line}</svg></figure>",
        caption.to_lowercase(),
        summary.join("; ")
    )
}

/// The page for `usage`; `label` names a type. A member of an account sees their own counters
/// and, below, their team's shared pool.
fn render(
    usage: &Usage,
    history: Option<&History>,
    upgrade_url: &str,
    label: impl Fn(&str) -> Option<String>,
) -> String {
    let (mine, mut near_limit) = rows(&usage.counters, "u", &label, history);
    let pool = match &usage.account {
        Some(pool) => {
            let (rows, near) = rows(&pool.counters, "a", &label, None);
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
