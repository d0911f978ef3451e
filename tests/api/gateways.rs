//! The shipped gateway configurations, `deploy/nginx/quotad.conf.template` and
//! `deploy/caddy/Caddyfile`, run by the real nginx and Caddy (Debian's packages;
//! `deploy/ensure-test-tools.sh` installs them) on a loopback port in front of an in-process
//! quotad and a small upstream app of the test's own that records every request it gets. Each
//! scenario runs once per gateway (`gateways::nginx::…`, `gateways::caddy::…`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    free_port, is_root, tempfile_path, Answer, Daemon, Options, PrivateRedis, TestApp,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Nginx,
    Caddy,
}

/// What the gateway does when quotad cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fail {
    Closed,
    Open,
}

/// One request the upstream app got.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
}

impl Hit {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The app behind the gateway: answers 200 `{"upstream": true, "path": …}` to everything and
/// records each request. `…/fail` plays an action that failed after it was counted: the app
/// gives the unit back (`POST /v1/refund` with the `X-User-Id` and `Idempotency-Key` the gateway
/// forwarded) and answers 502 with quotad's answer to the refund.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct UpstreamState {
    hits: Arc<Mutex<Vec<Hit>>>,
    quotad: String,
    client: reqwest::Client,
}

async fn upstream_handler(
    State(state): State<UpstreamState>,
    uri: Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    let path = uri.path().to_owned();
    state.hits.lock().unwrap().push(Hit {
        path: path.clone(),
        headers: headers.clone(),
    });
    if path.ends_with("/fail") {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let refund = state
            .client
            .post(format!("{}/v1/refund", state.quotad))
            .json(&json!({
                "user_id": get("x-user-id"),
                "idempotency_key": get("idempotency-key"),
            }))
            .send()
            .await
            .expect("quotad answers the refund");
        let status = refund.status().as_u16();
        let body: Value = refund.json().await.unwrap_or(Value::Null);
        let answer = json!({"upstream": true, "refund_status": status, "refund": body});
        return (StatusCode::BAD_GATEWAY, axum::Json(answer)).into_response();
    }
    axum::Json(json!({"upstream": true, "path": path})).into_response()
}

impl Upstream {
    async fn start(quotad: &str) -> Upstream {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let state = UpstreamState {
            hits: hits.clone(),
            quotad: quotad.to_owned(),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        let router = axum::Router::new()
            .fallback(upstream_handler)
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Upstream { addr, hits, task }
    }

    /// The requests it got whose path is `path`.
    fn hits_on(&self, path: &str) -> Vec<Hit> {
        let hits = self.hits.lock().unwrap();
        hits.iter().filter(|h| h.path == path).cloned().collect()
    }

    fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// nginx or Caddy running a shipped configuration, in a folder of its own (logs, pid, temp
/// paths, Caddy's HOME). Stopped on drop.
struct Gateway {
    kind: Kind,
    child: Child,
    dir: PathBuf,
    port: u16,
    client: reqwest::Client,
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn nginx_binary() -> PathBuf {
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nginx")
    }
}

/// The nginx template rendered as its header says: envsubst with the three variables named.
fn render_nginx_template(quotad: &str, upstream: SocketAddr, listen: &str) -> String {
    let template = std::fs::File::open(repo_file("deploy/nginx/quotad.conf.template"))
        .expect("deploy/nginx/quotad.conf.template");
    let out = Command::new("envsubst")
        .arg("${QUOTAD_ADDR} ${UPSTREAM_ADDR} ${LISTEN_PORT}")
        .env("QUOTAD_ADDR", quotad)
        .env("UPSTREAM_ADDR", upstream.to_string())
        .env("LISTEN_PORT", listen)
        .stdin(template)
        .output()
        .expect("envsubst runs (gettext-base; deploy/ensure-test-tools.sh installs it)");
    assert!(
        out.status.success(),
        "envsubst: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Gateway {
    /// `token`: the configuration edited as its comment says for quotad's gateway token.
    async fn start(
        kind: Kind,
        quotad: &str,
        upstream: SocketAddr,
        fail: Fail,
        token: Option<&str>,
    ) -> Gateway {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("quotad-gw-{kind:?}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let output = std::fs::File::create(dir.join("output.log")).unwrap();
        let mut cmd = match kind {
            Kind::Nginx => {
                let mut conf =
                    render_nginx_template(quotad, upstream, &format!("127.0.0.1:{port}"));
                // The documented switch between the variants: one word.
                if fail == Fail::Open {
                    let closed = "set $quotad_fail closed;";
                    assert_eq!(
                        conf.matches(closed).count(),
                        1,
                        "the template's fail switch"
                    );
                    conf = conf.replace(closed, "set $quotad_fail open;");
                }
                if let Some(token) = token {
                    conf = edited(
                        &conf,
                        "proxy_set_header Authorization \"\";",
                        &format!("proxy_set_header Authorization \"Bearer {token}\";"),
                    );
                }
                std::fs::write(dir.join("quotad.conf"), conf).unwrap();
                let d = dir.display();
                let user = if is_root() { "user root;\n" } else { "" };
                let main = format!(
                    "{user}worker_processes 1;\n\
                     error_log {d}/error.log info;\n\
                     pid {d}/nginx.pid;\n\
                     events {{ worker_connections 256; }}\n\
                     http {{\n\
                     \x20   access_log {d}/access.log;\n\
                     \x20   client_body_temp_path {d}/client_body;\n\
                     \x20   proxy_temp_path {d}/proxy;\n\
                     \x20   fastcgi_temp_path {d}/fastcgi;\n\
                     \x20   uwsgi_temp_path {d}/uwsgi;\n\
                     \x20   scgi_temp_path {d}/scgi;\n\
                     \x20   include {d}/quotad.conf;\n\
                     }}\n"
                );
                std::fs::write(dir.join("nginx.conf"), main).unwrap();
                let mut cmd = Command::new(nginx_binary());
                cmd.arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .args(["-g", "daemon off;"]);
                cmd
            }
            Kind::Caddy => {
                let mut config = repo_file("deploy/caddy/Caddyfile");
                if let Some(token) = token {
                    let text = std::fs::read_to_string(&config).unwrap();
                    let text = edited(
                        &text,
                        "header_up -Authorization",
                        &format!("header_up Authorization \"Bearer {token}\""),
                    );
                    config = dir.join("Caddyfile");
                    std::fs::write(&config, text).unwrap();
                }
                let mut cmd = Command::new("caddy");
                cmd.args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(config)
                    .env("QUOTAD_ADDR", quotad)
                    .env("UPSTREAM_ADDR", upstream.to_string())
                    .env("LISTEN_PORT", port.to_string())
                    .env(
                        "QUOTAD_FAIL",
                        match fail {
                            Fail::Closed => "closed",
                            Fail::Open => "open",
                        },
                    )
                    // No admin endpoint: parallel tests would all want localhost:2019.
                    .env("CADDY_ADMIN", "off")
                    .env("HOME", &dir)
                    .env("XDG_DATA_HOME", dir.join("data"))
                    .env("XDG_CONFIG_HOME", dir.join("config"));
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{kind:?} does not start ({e}); run deploy/ensure-test-tools.sh")
            });
        let mut gateway = Gateway {
            kind,
            child,
            dir,
            port,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        gateway.wait_listening().await;
        gateway
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{:?} exited ({status}):\n{}", self.kind, self.logs());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} is not listening on 127.0.0.1:{} after 15 s:\n{}",
                self.kind,
                self.port,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The gateway's own output and error log.
    fn logs(&self) -> String {
        ["output.log", "error.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sends a request through the gateway.
    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = self
            .client
            .request(method, format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{:?} answers: {e}\n{}", self.kind, self.logs()));
        Answer::read(resp).await
    }

    /// A POST as user `user` (any string: the header is sent as given).
    async fn post_as(&self, path: &str, user: &str) -> Answer {
        self.send(Method::POST, path, &[("x-user-id", user)]).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers on it (SIGKILL would leave them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// quotad, the upstream app and a gateway between them.
struct Stack {
    quotad: TestApp,
    upstream: Upstream,
    gateway: Gateway,
}

impl Stack {
    async fn start(kind: Kind, fail: Fail) -> Stack {
        Stack::start_with(kind, fail, TestApp::spawn().await).await
    }

    async fn start_with(kind: Kind, fail: Fail, quotad: TestApp) -> Stack {
        Stack::start_token(kind, fail, quotad, None).await
    }

    async fn start_token(kind: Kind, fail: Fail, quotad: TestApp, token: Option<&str>) -> Stack {
        let upstream = Upstream::start(&quotad.base).await;
        let addr = quotad.base.trim_start_matches("http://").to_owned();
        let gateway = Gateway::start(kind, &addr, upstream.addr, fail, token).await;
        Stack {
            quotad,
            upstream,
            gateway,
        }
    }
}

/// `text` with its one `line` replaced by `with`.
fn edited(text: &str, line: &str, with: &str) -> String {
    assert_eq!(
        text.matches(line).count(),
        1,
        "the configuration has one {line}"
    );
    text.replace(line, with)
}

fn assert_json_error(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {a:?}");
    assert_eq!(a.body["code"], code, "{what}: {a:?}");
    assert!(
        a.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: a sentence in `error`: {a:?}"
    );
    assert!(
        a.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{what}: JSON content type: {a:?}"
    );
}

fn header_number(a: &Answer, name: &str) -> u64 {
    a.header(name)
        .unwrap_or_else(|| panic!("{name} on {a:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a whole number: {a:?}"))
}

/// A FREE user gets 50 answers from the app, each with RateLimit-* counting down, then 402 with
/// quotad's body and Retry-After; the app saw exactly 50 requests.
async fn free_user_gets_fifty_then_402(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    for i in 1..=50u64 {
        let a = s.gateway.post_as("/generate", &id).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert_eq!(
            a.body["upstream"], true,
            "request {i}: the app answered: {a:?}"
        );
        assert_eq!(header_number(&a, "ratelimit-limit"), 50, "request {i}");
        assert_eq!(
            header_number(&a, "ratelimit-remaining"),
            50 - i,
            "request {i}"
        );
        assert!(header_number(&a, "ratelimit-reset") > 0, "request {i}");
    }
    let refused = s.gateway.post_as("/generate", &id).await;
    assert_eq!(refused.status, 402, "{refused:?}");
    assert_eq!(refused.body["allowed"], false, "{refused:?}");
    assert_eq!(refused.body["code"], "USAGE_LIMIT_EXCEEDED", "{refused:?}");
    assert_eq!(
        refused.body["upgrade_url"], "/settings/billing",
        "{refused:?}"
    );
    assert_eq!(refused.body["used"], 50, "{refused:?}");
    assert_eq!(refused.body["limit"], 50, "{refused:?}");
    assert!(refused.body["error"].as_str().is_some(), "{refused:?}");
    assert!(header_number(&refused, "retry-after") > 0, "{refused:?}");
    assert_eq!(header_number(&refused, "ratelimit-limit"), 50);
    assert_eq!(header_number(&refused, "ratelimit-remaining"), 0);
    assert!(refused
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json")));

    let hits = s.upstream.hits_on("/generate");
    assert_eq!(hits.len(), 50, "the app saw exactly the allowed requests");
    for h in &hits {
        assert_eq!(h.header("x-user-id"), Some(id.as_str()));
        assert_eq!(h.header("quotad-plan"), Some("FREE"));
        assert_eq!(h.header("quotad-degraded"), None);
    }
    assert_eq!(s.quotad.used(user, "ai_generation").await, 50);
}

/// /generate/… and /export… are metered as their types; /generated, /exports and anything else
/// pass to the app uncounted and without RateLimit-*; an unlimited plan's answer carries
/// RateLimit-Reset but no limit.
async fn routes_decide_the_type(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    for path in ["/generate/image", "/GENERATE", "/export", "/export/pdf"] {
        let a = s.gateway.post_as(path, &id).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert!(a.header("ratelimit-remaining").is_some(), "{path}: {a:?}");
    }
    for path in ["/generated", "/exports", "/", "/settings/billing"] {
        let a = s.gateway.post_as(path, &id).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(a.body["upstream"], true, "{path}: {a:?}");
        assert_eq!(a.header("ratelimit-limit"), None, "{path}: {a:?}");
        assert_eq!(a.header("ratelimit-remaining"), None, "{path}: {a:?}");
        let hit = s.upstream.hits_on(path).pop().expect("the app got it");
        assert_eq!(hit.header("quotad-plan"), None, "{path}: not asked");
    }
    assert_eq!(s.quotad.used(user, "ai_generation").await, 2);
    assert_eq!(s.quotad.used(user, "export").await, 2);

    let pro = Uuid::new_v4();
    s.quotad.set_plan(pro, "PRO").await;
    let a = s.gateway.post_as("/generate", &pro.to_string()).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("ratelimit-limit"), None, "unlimited: {a:?}");
    assert_eq!(a.header("ratelimit-remaining"), None, "unlimited: {a:?}");
    assert!(header_number(&a, "ratelimit-reset") > 0, "{a:?}");
    let hit = s.upstream.hits_on("/generate").pop().unwrap();
    assert_eq!(hit.header("quotad-plan"), Some("PRO"));
}

/// A client cannot choose its own type or amount, nor tell the app its plan.
async fn client_usage_headers_are_ignored(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    let a = s
        .gateway
        .send(
            Method::POST,
            "/generate",
            &[
                ("x-user-id", &id),
                ("x-usage-type", "export"),
                ("x-usage-amount", "40"),
                ("quotad-plan", "ENTERPRISE"),
                ("quotad-degraded", "unreachable"),
            ],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(header_number(&a, "ratelimit-remaining"), 49, "{a:?}");
    assert_eq!(s.quotad.used(user, "ai_generation").await, 1);
    assert_eq!(s.quotad.used(user, "export").await, 0);
    let hit = s.upstream.hits_on("/generate").pop().unwrap();
    assert_eq!(hit.header("x-usage-type"), None);
    assert_eq!(hit.header("x-usage-amount"), None);
    assert_eq!(hit.header("quotad-plan"), Some("FREE"));
    assert_eq!(hit.header("quotad-degraded"), None);
}

/// A retry with the same Idempotency-Key reaches the app again and counts once; another key
/// counts again; the first key on another type is 409. The app gets the key.
async fn idempotent_retry_counts_once(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    let key = format!("req-{}", Uuid::new_v4());
    let headers = [
        ("x-user-id", id.as_str()),
        ("idempotency-key", key.as_str()),
    ];
    let first = s.gateway.send(Method::POST, "/generate", &headers).await;
    let retry = s.gateway.send(Method::POST, "/generate", &headers).await;
    for a in [&first, &retry] {
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(header_number(a, "ratelimit-remaining"), 49, "{a:?}");
    }
    assert_eq!(s.quotad.used(user, "ai_generation").await, 1);
    let hits = s.upstream.hits_on("/generate");
    assert_eq!(hits.len(), 2);
    assert!(hits
        .iter()
        .all(|h| h.header("idempotency-key") == Some(key.as_str())));

    let other = s
        .gateway
        .send(
            Method::POST,
            "/generate",
            &[("x-user-id", &id), ("idempotency-key", "req-other")],
        )
        .await;
    assert_eq!(
        header_number(&other, "ratelimit-remaining"),
        48,
        "{other:?}"
    );
    assert_eq!(s.quotad.used(user, "ai_generation").await, 2);

    // The first key on another type is a conflict: quotad's 409, the app not called.
    let reused = s.gateway.send(Method::POST, "/export", &headers).await;
    assert_json_error(
        &reused,
        409,
        "IDEMPOTENCY_KEY_REUSED",
        "a key reused for export",
    );
    assert_eq!(s.upstream.hits_on("/export").len(), 0);
    assert_eq!(s.quotad.used(user, "export").await, 0);
}

/// No user, or one that is not a UUID: 400 with quotad's JSON error, the app never called.
async fn request_without_a_valid_user_is_refused(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let none = s.gateway.send(Method::POST, "/generate", &[]).await;
    assert_json_error(&none, 400, "MISSING_USER", "no X-User-Id");
    let bad = s.gateway.post_as("/export/x", "not-a-uuid").await;
    assert_json_error(&bad, 400, "INVALID_USER_ID", "a malformed X-User-Id");
    assert_eq!(s.upstream.count(), 0, "the app was not called");
}

/// The app refunds an action that failed after it was counted, with the X-User-Id and
/// Idempotency-Key the gateway forwarded: the unit comes back.
async fn upstream_refunds_a_failed_action(kind: Kind) {
    let s = Stack::start(kind, Fail::Closed).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    let ok = s.gateway.post_as("/generate", &id).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let failed = s
        .gateway
        .send(
            Method::POST,
            "/generate/fail",
            &[("x-user-id", &id), ("idempotency-key", "req-fails")],
        )
        .await;
    assert_eq!(failed.status, 502, "the app's own answer: {failed:?}");
    assert_eq!(failed.body["refund_status"], 200, "{failed:?}");
    assert_eq!(failed.body["refund"]["refunded"], 1, "{failed:?}");
    assert_eq!(failed.body["refund"]["used"], 1, "{failed:?}");
    assert_eq!(s.quotad.used(user, "ai_generation").await, 1);
    // A client that sent no key: the gateway made one, counted under it and passed it on.
    let keyless = s.gateway.post_as("/generate/fail", &id).await;
    assert_eq!(keyless.status, 502, "the app's own answer: {keyless:?}");
    assert_eq!(keyless.body["refund_status"], 200, "{keyless:?}");
    assert_eq!(keyless.body["refund"]["refunded"], 1, "{keyless:?}");
    assert_eq!(s.quotad.used(user, "ai_generation").await, 1);
    let keys: Vec<String> = s
        .upstream
        .hits_on("/generate/fail")
        .iter()
        .map(|h| h.header("idempotency-key").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys[0], "req-fails");
    assert!(keys[1].len() >= 32, "a key the gateway made: {keys:?}");
    // Two keyless requests are two actions: each gets a key of its own.
    assert_eq!(s.gateway.post_as("/generate", &id).await.status, 200);
    assert_eq!(s.gateway.post_as("/generate", &id).await.status, 200);
    assert_eq!(s.quotad.used(user, "ai_generation").await, 3);
}

/// quotad stopped: the fail-closed variant answers 503 JSON without calling the app (for
/// metered paths only); the fail-open variant calls the app, marked.
async fn quotad_stopped(kind: Kind, fail: Fail) {
    let mut s = Stack::start(kind, fail).await;
    let id = Uuid::new_v4().to_string();
    let before = s.gateway.post_as("/generate", &id).await;
    assert_eq!(before.status, 200, "{before:?}");
    s.quotad.stop().await.expect("quotad stops cleanly");

    let a = s.gateway.post_as("/generate", &id).await;
    match fail {
        Fail::Closed => {
            assert_json_error(&a, 503, "QUOTA_SERVICE_UNAVAILABLE", "quotad stopped");
            assert_eq!(s.upstream.hits_on("/generate").len(), 1, "not called");
        }
        Fail::Open => {
            assert_eq!(a.status, 200, "{a:?}");
            assert_eq!(a.body["upstream"], true, "{a:?}");
            let hits = s.upstream.hits_on("/generate");
            assert_eq!(hits.len(), 2);
            assert_eq!(hits[1].header("quotad-degraded"), Some("unreachable"));
            assert_eq!(hits[1].header("quotad-plan"), None);
            assert_eq!(hits[1].header("x-user-id"), Some(id.as_str()));
        }
    }
    let unmetered = s.gateway.post_as("/about", &id).await;
    assert_eq!(
        unmetered.status, 200,
        "unmetered paths need no quotad: {unmetered:?}"
    );
}

/// Redis down under quotad (the gateway failing open, so nothing below is the gateway's doing):
/// a type that fails open reaches the app marked `Quotad-Degraded: true`; one that fails closed
/// is quotad's 503 `REDIS_UNAVAILABLE`, passed to the client as it is.
async fn redis_down_answers_keep_the_type_policy(kind: Kind) {
    let plans = tempfile_path::write(&quotad::plans::BUILT_IN.replace(
        r#"export        = { period = "month", label = "Exports" }"#,
        r#"export        = { period = "month", fail = "closed", label = "Exports" }"#,
    ));
    let mut redis = PrivateRedis::start();
    let quotad = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        plans: Some(plans.to_path_buf()),
        ..Options::default()
    })
    .await;
    let s = Stack::start_with(kind, Fail::Open, quotad).await;
    let id = Uuid::new_v4().to_string();
    assert_eq!(s.gateway.post_as("/export", &id).await.status, 200);
    redis.kill();

    let open = s.gateway.post_as("/generate", &id).await;
    assert_eq!(open.status, 200, "{open:?}");
    let hit = s
        .upstream
        .hits_on("/generate")
        .pop()
        .expect("the app got it");
    assert_eq!(hit.header("quotad-degraded"), Some("true"));
    let closed = s.gateway.post_as("/export", &id).await;
    assert_json_error(
        &closed,
        503,
        "REDIS_UNAVAILABLE",
        "a type that fails closed",
    );
    assert_eq!(
        s.upstream.hits_on("/export").len(),
        1,
        "the app was not called"
    );
}

async fn quotad_stopped_fail_closed(kind: Kind) {
    quotad_stopped(kind, Fail::Closed).await
}

async fn quotad_stopped_fail_open(kind: Kind) {
    quotad_stopped(kind, Fail::Open).await
}

/// Every scenario above, once per gateway.
macro_rules! for_each_gateway {
    ($($scenario:ident),* $(,)?) => {
        mod nginx {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Kind::Nginx).await
                }
            )*
        }
        mod caddy {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Kind::Caddy).await
                }
            )*
        }
    };
}

/// quotad with gateway tokens: the configuration as shipped (no token) gets quotad's 401 passed
/// to the client, the app not called; edited as its comment says, metered requests go through.
async fn gateway_token_is_sent_when_configured(kind: Kind) {
    let tokens = || Options {
        gateway_tokens: vec!["gw-secret-1".into()],
        ..Options::default()
    };
    let id = Uuid::new_v4().to_string();
    let stock = Stack::start_with(kind, Fail::Closed, TestApp::spawn_with(tokens()).await).await;
    let a = stock.gateway.post_as("/generate", &id).await;
    assert_json_error(&a, 401, "UNAUTHORIZED", "no token sent to quotad");
    assert_eq!(stock.upstream.count(), 0, "the app was not called");

    let quotad = TestApp::spawn_with(tokens()).await;
    let with = Stack::start_token(kind, Fail::Closed, quotad, Some("gw-secret-1")).await;
    let a = with.gateway.post_as("/generate", &id).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(header_number(&a, "ratelimit-remaining"), 49);
    let hit = with.upstream.hits_on("/generate").pop().unwrap();
    assert_eq!(
        hit.header("authorization"),
        None,
        "the token stays between gateway and quotad"
    );
}

/// quotad hangs (it accepts connections and never answers, as a stopped process or a dead
/// network path does): the gateway gives up after its read timeout and answers as when quotad
/// is unreachable, closed or open; the client is not held longer than that.
async fn quotad_hangs(kind: Kind) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = listener.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let upstream = Upstream::start("http://127.0.0.1:9").await;
    let id = Uuid::new_v4().to_string();
    for fail in [Fail::Closed, Fail::Open] {
        let gateway = Gateway::start(kind, &hung, upstream.addr, fail, None).await;
        let started = Instant::now();
        let a = gateway.post_as("/generate", &id).await;
        let took = started.elapsed();
        match fail {
            Fail::Closed => {
                assert_json_error(&a, 503, "QUOTA_SERVICE_UNAVAILABLE", "quotad hangs");
                assert_eq!(upstream.count(), 0, "not called");
            }
            Fail::Open => {
                assert_eq!(
                    (a.status, &a.body["upstream"]),
                    (200, &json!(true)),
                    "{a:?}"
                );
                let hit = upstream
                    .hits_on("/generate")
                    .pop()
                    .expect("the app was called");
                assert_eq!(hit.header("quotad-degraded"), Some("unreachable"));
            }
        }
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
            "{fail:?}: answered after the gateway's read timeout (2 s), took {took:?}"
        );
    }
    held.abort();
}

/// quotad SIGKILLed behind the gateway, then started again on the same port (its Redis and
/// Postgres as they were): meanwhile the fail-closed gateway answers 503; afterwards the next
/// metered request is counted on top of the earlier ones (the gateway's pooled connections to the
/// dead process are not reused), and nothing counted was lost.
async fn quotad_restarted(kind: Kind) {
    let mut first = Daemon::spawn(&[]);
    first.wait_ready();
    let upstream = Upstream::start(&first.base()).await;
    let addr = format!("127.0.0.1:{}", first.port);
    let gateway = Gateway::start(kind, &addr, upstream.addr, Fail::Closed, None).await;
    let id = Uuid::new_v4().to_string();
    for i in 1..=3u64 {
        let a = gateway.post_as("/generate", &id).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(header_number(&a, "ratelimit-remaining"), 50 - i);
    }
    first.signal("-KILL");
    assert_eq!(
        first.wait_exit(Duration::from_secs(5)),
        None,
        "killed, no exit code"
    );
    let down = gateway.post_as("/generate", &id).await;
    assert_json_error(&down, 503, "QUOTA_SERVICE_UNAVAILABLE", "quotad killed");

    let mut again = Daemon::spawn(&[
        ("QUOTAD_LISTEN", addr.clone()),
        ("QUOTAD_KEY_PREFIX", first.prefix.clone()),
        ("QUOTAD_DATABASE_URL", first.database_url()),
        ("QUOTAD_TEST_POSTGRES", first.postgres_url.clone()),
    ]);
    again.port = first.port;
    again.wait_ready();
    for i in 4..=6u64 {
        let a = gateway.post_as("/generate", &id).await;
        assert_eq!(a.status, 200, "{a:?}\n{}", gateway.logs());
        assert_eq!(header_number(&a, "ratelimit-remaining"), 50 - i, "{a:?}");
    }
    assert_eq!(upstream.hits_on("/generate").len(), 6);
}

for_each_gateway!(
    quotad_restarted,
    quotad_hangs,
    gateway_token_is_sent_when_configured,
    free_user_gets_fifty_then_402,
    routes_decide_the_type,
    client_usage_headers_are_ignored,
    idempotent_retry_counts_once,
    request_without_a_valid_user_is_refused,
    upstream_refunds_a_failed_action,
    quotad_stopped_fail_closed,
    quotad_stopped_fail_open,
    redis_down_answers_keep_the_type_policy,
);
