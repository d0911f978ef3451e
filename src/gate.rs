//! The gate's route table: which usage type (and amount) a gateway's original request costs.
//!
//! Gateways that ask quotad before proxying (nginx `auth_request`, Caddy `forward_auth`, Envoy
//! `ext_authz`) send the original method and URI in headers. The plans file's `[gate]` table maps
//! them to a usage type; the header names the gate reads are set there too. The path is compared
//! the way a gateway routes it: percent-decoded, `.` and `..` resolved, repeated slashes merged,
//! query and fragment dropped, so `/%67enerate`, `//generate` and `/x/../generate` are all
//! `/generate` and cannot pass a metered route uncounted.

use axum::http::{HeaderName, Method};
use serde::Deserialize;

/// Longest original URI the gate reads.
pub const MAX_URI: usize = 8 * 1024;

/// What the gate answers for a request that no route maps to a usage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Allow it, counting nothing (204).
    #[default]
    Pass,
    /// Refuse it (403 `ROUTE_NOT_METERED`).
    Refuse,
}

/// One route: requests at `path` or under it (and, when `methods` is set, with one of them) cost
/// `amount` of `usage_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Normalized, without a trailing slash (except `/` itself).
    pub path: String,
    /// Upper-case method names; empty = any method.
    pub methods: Vec<Method>,
    /// A configured usage type.
    pub usage_type: String,
    /// Units per request.
    pub amount: u64,
}

/// The gate's settings from the plans file.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The header carrying the user id.
    pub user_header: HeaderName,
    /// The header carrying the usage type (ahead of the route table).
    pub type_header: HeaderName,
    /// The header carrying the amount (with the type header only).
    pub amount_header: HeaderName,
    /// The header carrying the idempotency key.
    pub idempotency_header: HeaderName,
    /// Routes, longest path first (then those naming methods before those that do not).
    pub routes: Vec<Route>,
    /// What to do when no route matches.
    pub unmatched: Unmatched,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            user_header: HeaderName::from_static("x-user-id"),
            type_header: HeaderName::from_static("x-usage-type"),
            amount_header: HeaderName::from_static("x-usage-amount"),
            idempotency_header: HeaderName::from_static("idempotency-key"),
            routes: Vec::new(),
            unmatched: Unmatched::Pass,
        }
    }
}

/// `[gate]` as written in the plans file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GateFile {
    #[serde(default)]
    user_header: Option<String>,
    #[serde(default)]
    type_header: Option<String>,
    #[serde(default)]
    amount_header: Option<String>,
    #[serde(default)]
    idempotency_header: Option<String>,
    #[serde(default)]
    unmatched: Unmatched,
    #[serde(default)]
    routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    path: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(rename = "type")]
    usage_type: String,
    #[serde(default)]
    amount: Option<i64>,
}

impl GateFile {
    /// Validates the table; `known_type` says whether a type is declared. The error names the
    /// setting or route at fault.
    pub(crate) fn build(
        self,
        known_type: impl Fn(&str) -> bool,
        max_amount: u64,
    ) -> Result<Gate, String> {
        let defaults = Gate::default();
        let header = |name: &str, value: Option<String>, default: HeaderName| match value {
            None => Ok(default),
            Some(v) => HeaderName::from_bytes(v.as_bytes()).map_err(|_| {
                format!(
                    "gate.{name}: {v:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
                )
            }),
        };
        let mut gate = Gate {
            user_header: header("user_header", self.user_header, defaults.user_header)?,
            type_header: header("type_header", self.type_header, defaults.type_header)?,
            amount_header: header("amount_header", self.amount_header, defaults.amount_header)?,
            idempotency_header: header(
                "idempotency_header",
                self.idempotency_header,
                defaults.idempotency_header,
            )?,
            routes: Vec::with_capacity(self.routes.len()),
            unmatched: self.unmatched,
        };
        let names = [
            &gate.user_header,
            &gate.type_header,
            &gate.amount_header,
            &gate.idempotency_header,
        ];
        for (i, a) in names.iter().enumerate() {
            if names[i + 1..].contains(a) {
                return Err(format!(
                    "gate: header {a} is named for two settings; give each its own header"
                ));
            }
        }
        for (i, r) in self.routes.into_iter().enumerate() {
            let at = format!("gate.routes[{i}] (path {:?})", r.path);
            if !r.path.starts_with('/') || r.path.contains(['?', '#']) {
                return Err(format!(
                    "{at}: a route path starts with '/' and has no query or fragment"
                ));
            }
            let path = normalize_path(&r.path).map_err(|e| format!("{at}: {e}"))?;
            if !known_type(&r.usage_type) {
                return Err(format!(
                    "{at}: type {} is not declared in [types]",
                    r.usage_type
                ));
            }
            let amount = match r.amount {
                None => 1,
                Some(n) if n >= 1 && n as u64 <= max_amount => n as u64,
                Some(n) => {
                    return Err(format!(
                        "{at}: amount {n} is out of range; use 1 to {max_amount}"
                    ))
                }
            };
            let mut methods = Vec::with_capacity(r.methods.len());
            for m in &r.methods {
                let valid =
                    !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase());
                let method = Method::from_bytes(m.as_bytes()).ok().filter(|_| valid);
                let Some(method) = method else {
                    return Err(format!(
                        "{at}: method {m:?} is not an upper-case method name such as \"POST\""
                    ));
                };
                if !methods.contains(&method) {
                    methods.push(method);
                }
            }
            // In one order, so that two routes naming the same methods are seen as the same.
            methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            let route = Route {
                path,
                methods,
                usage_type: r.usage_type,
                amount,
            };
            if gate
                .routes
                .iter()
                .any(|o| o.path == route.path && o.methods == route.methods)
            {
                return Err(format!(
                    "{at}: another route has the same path and methods; keep one"
                ));
            }
            gate.routes.push(route);
        }
        // Longest path first; at equal paths a route naming methods before one that does not.
        // The sort is stable, so the file's order breaks any remaining tie.
        gate.routes.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then_with(|| a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        Ok(gate)
    }
}

impl Gate {
    /// The route a request with `method` at (normalized) `path` takes, if any.
    pub fn route(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| under(path, &r.path) && (r.methods.is_empty() || r.methods.contains(method)))
    }
}

/// Whether `path` is `prefix` or below it (`/generate/x`, never `/generated`).
fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Why an original URI was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Over [`MAX_URI`] bytes.
    #[error("is longer than {MAX_URI} bytes")]
    TooLong,
    /// Neither an absolute path nor an absolute URL.
    #[error("is not a path starting with '/'")]
    NotAPath,
    /// A `%` not followed by two hex digits.
    #[error("has a '%' not followed by two hex digits")]
    BadEscape,
    /// Decoded, not UTF-8.
    #[error("does not decode to UTF-8")]
    NotUtf8,
    /// Decoded, a control character (NUL, CR, LF…).
    #[error("contains a control character")]
    Control,
    /// `..` above the root.
    #[error("climbs above the root with '..'")]
    AboveRoot,
}

/// The path of an original request URI as a gateway routes it: the query and fragment dropped,
/// an absolute URL's scheme and authority dropped, percent-escapes decoded, repeated slashes
/// merged, `.` and `..` resolved. No trailing slash except for `/` itself.
pub fn normalize_uri(uri: &str) -> Result<String, PathError> {
    if uri.len() > MAX_URI {
        return Err(PathError::TooLong);
    }
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    let mut path = &uri[..end];
    for scheme in ["http://", "https://"] {
        if path.len() >= scheme.len() && path[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &path[scheme.len()..];
            path = rest.find('/').map_or("/", |at| &rest[at..]);
        }
    }
    normalize_path(path)
}

fn normalize_path(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAPath);
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits, nothing else (`from_str_radix` alone would take "+f").
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).expect("hex digits are ASCII");
            decoded.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(text: &str) -> Result<Gate, String> {
        let file: GateFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.build(|t| ["ai_generation", "export"].contains(&t), 1_000_000)
    }

    #[test]
    fn uris_are_normalized_as_a_gateway_routes_them() {
        for (raw, path) in [
            ("/generate", "/generate"),
            ("/generate/", "/generate"),
            ("/generate?x=1#y", "/generate"),
            ("/%67enerate", "/generate"),
            ("/%2Fgenerate", "/generate"),
            ("//generate///x", "/generate/x"),
            ("/a/./b/../../generate", "/generate"),
            ("/", "/"),
            ("https://api.example.com/generate/x?y", "/generate/x"),
            ("HTTP://api.example.com", "/"),
            ("/caf%C3%A9", "/café"),
        ] {
            assert_eq!(normalize_uri(raw).as_deref(), Ok(path), "{raw}");
        }
        assert_eq!(normalize_uri("generate"), Err(PathError::NotAPath));
        assert_eq!(normalize_uri(""), Err(PathError::NotAPath));
        assert_eq!(normalize_uri("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_uri("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize_uri("/a%+f"), Err(PathError::BadEscape));
        assert_eq!(normalize_uri("/a%-1"), Err(PathError::BadEscape));
        assert_eq!(normalize_uri("/a%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize_uri("/a%00b"), Err(PathError::Control));
        assert_eq!(normalize_uri("/a%0d%0ab"), Err(PathError::Control));
        assert_eq!(normalize_uri("/../generate"), Err(PathError::AboveRoot));
        assert_eq!(normalize_uri("/..%2F..%2F"), Err(PathError::AboveRoot));
        assert_eq!(
            normalize_uri(&format!("/{}", "a".repeat(MAX_URI))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn the_longest_route_wins_and_a_method_route_beats_an_any_method_one() {
        let g = gate(
            r#"
            unmatched = "refuse"
            [[routes]]
            path = "/generate"
            type = "ai_generation"
            [[routes]]
            path = "/generate/batch"
            type = "ai_generation"
            amount = 10
            [[routes]]
            path = "/export"
            methods = ["POST"]
            type = "export"
            [[routes]]
            path = "/export"
            type = "ai_generation"
            amount = 2
            "#,
        )
        .unwrap();
        assert_eq!(g.unmatched, Unmatched::Refuse);
        let at = |m: &str, p: &str| {
            g.route(&Method::from_bytes(m.as_bytes()).unwrap(), p)
                .map(|r| (r.usage_type.as_str(), r.amount))
        };
        assert_eq!(at("POST", "/generate"), Some(("ai_generation", 1)));
        assert_eq!(at("GET", "/generate/x"), Some(("ai_generation", 1)));
        assert_eq!(at("POST", "/generate/batch/7"), Some(("ai_generation", 10)));
        assert_eq!(at("POST", "/generated"), None);
        assert_eq!(at("POST", "/export/csv"), Some(("export", 1)));
        assert_eq!(at("GET", "/export/csv"), Some(("ai_generation", 2)));
        assert_eq!(at("GET", "/"), None);
    }

    #[test]
    fn a_root_route_matches_everything() {
        let g = gate("[[routes]]\npath = \"/\"\ntype = \"export\"").unwrap();
        assert!(g.route(&Method::GET, "/anything/at/all").is_some());
        assert!(g.route(&Method::GET, "/").is_some());
    }

    #[test]
    fn bad_routes_and_headers_are_refused_naming_what_is_wrong() {
        for (text, says) in [
            ("[[routes]]\npath = \"generate\"\ntype = \"export\"", "gate.routes[0] (path \"generate\"): a route path starts with '/'"),
            ("[[routes]]\npath = \"/g?x\"\ntype = \"export\"", "no query or fragment"),
            ("[[routes]]\npath = \"/../g\"\ntype = \"export\"", "climbs above the root"),
            ("[[routes]]\npath = \"/g\"\ntype = \"video\"", "type video is not declared"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\namount = 0", "amount 0 is out of range"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\namount = 1000001", "amount 1000001 is out of range"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\nmethods = [\"post\"]", "method \"post\" is not an upper-case method"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\nmethods = [\"\"]", "method \"\" is not"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\n[[routes]]\npath = \"/g/\"\ntype = \"ai_generation\"", "gate.routes[1] (path \"/g/\"): another route has the same path and methods"),
            ("[[routes]]\npath = \"/g\"\ntype = \"export\"\nmethods = [\"GET\", \"POST\"]\n[[routes]]\npath = \"/g\"\ntype = \"export\"\nmethods = [\"POST\", \"GET\", \"GET\"]", "gate.routes[1] (path \"/g\"): another route has the same path and methods"),
            ("user_header = \"X User\"", "gate.user_header: \"X User\" is not a header name"),
            ("type_header = \"a\\nb\"", "gate.type_header"),
            ("user_header = \"X-Who\"\nidempotency_header = \"x-who\"", "header x-who is named for two settings"),
            ("unmatched = \"maybe\"", "maybe"),
            ("colour = 1", "colour"),
        ] {
            let err = gate(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn header_names_default_and_can_be_set() {
        let g = gate("").unwrap();
        assert_eq!(g.user_header, "x-user-id");
        assert_eq!(g.type_header, "x-usage-type");
        assert_eq!(g.amount_header, "x-usage-amount");
        assert_eq!(g.idempotency_header, "idempotency-key");
        assert_eq!(g.unmatched, Unmatched::Pass);
        let g = gate("user_header = \"X-Auth-Subject\"").unwrap();
        assert_eq!(g.user_header, "x-auth-subject");
    }
}
