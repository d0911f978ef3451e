//! A real Prometheus scraping a running quotad, and the Grafana dashboard checked against what quotad exports.
//!
//! The first test starts Debian's `/usr/bin/prometheus` (deploy/ensure-services.sh installs it) on a
//! free port, scraping a test quotad every 200 ms with the shipped alert rules loaded, and asks
//! it over its HTTP API about the decisions just made. The second exercises a quotad until every
//! metric the dashboard and the alert rules use has appeared, then checks that every metric name
//! in `deploy/grafana/quotad-dashboard.json` and `deploy/prometheus/alerts.yml` is in its `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{free_port, Options, PrivateRedis, TestApp};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/quotad-dashboard.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");

/// A Prometheus server of the test's own, in a temporary folder; killed and removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) as job `quotad` every 200 ms, with the shipped alert rules.
    fn start(target: &str) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: run deploy/ensure-services.sh (it installs Debian's \
             prometheus package, which provides prometheus and promtool)"
        );
        let dir =
            std::env::temp_dir().join(format!("quotad-prometheus-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n  evaluation_interval: 200ms\n\
             rule_files:\n  - {ALERTS}\n\
             scrape_configs:\n  - job_name: quotad\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        Prometheus { child, dir, port }
    }

    /// The end of its log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET `/api/v1/<path>` and its `data`, or why not.
    async fn api(
        &self,
        client: &reqwest::Client,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, String> {
        let resp = client
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(query)
            .send()
            .await
            .map_err(|e| format!("GET /api/v1/{path}: {e}"))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("GET /api/v1/{path}: {status}, not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("GET /api/v1/{path} {query:?}: {status} {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query's vector: one (labels, value) per series.
    async fn query(
        &self,
        client: &reqwest::Client,
        promql: &str,
    ) -> Result<Vec<(Value, f64)>, String> {
        let data = self.api(client, "query", &[("query", promql)]).await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let v = s["value"][1].as_str().and_then(|v| v.parse().ok());
                (s["metric"].clone(), v.unwrap_or(f64::NAN))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the test Prometheus knows at one moment.
#[derive(Debug, Default)]
struct Seen {
    up: Option<f64>,
    decisions: BTreeMap<String, f64>,
    /// Alert rule name → health (`ok` once evaluated without error) and last error.
    rules: BTreeMap<String, (String, String)>,
}

async fn look(prom: &Prometheus, client: &reqwest::Client) -> Result<Seen, String> {
    let up = prom.query(client, r#"up{job="quotad"}"#).await?;
    let decisions = prom
        .query(client, "sum by (outcome) (quotad_decisions_total)")
        .await?;
    let rules = prom.api(client, "rules", &[]).await?;
    Ok(Seen {
        up: up.first().map(|(_, v)| *v),
        decisions: decisions
            .into_iter()
            .map(|(m, v)| (m["outcome"].as_str().unwrap_or("").to_owned(), v))
            .collect(),
        rules: rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                (text("name"), (text("health"), text("lastError")))
            })
            .collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_quotad_and_answers_a_query_about_its_decisions() {
    let app = TestApp::spawn().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (mut allowed, mut denied) = (0.0, 0.0);
    for _ in 0..3 {
        let r = app.consume(a, "ai_generation").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        allowed += 1.0;
    }
    let check = app
        .post("/v1/check", json!({"user_id": a, "type": "ai_generation"}))
        .await;
    assert_eq!(check.body["allowed"], true, "{:?}", check.body);
    allowed += 1.0;
    // FREE allows 10 exports a month: the 11th is refused.
    for i in 1..=11 {
        let r = app.consume(b, "export").await;
        match (i, r.status) {
            (1..=10, 200) => allowed += 1.0,
            (11, 402) => denied += 1.0,
            _ => panic!("export #{i}: {} {:?}", r.status, r.body),
        }
    }
    // Reading usage is not a decision.
    assert_eq!(app.used(b, "export").await, 10);
    assert_eq!((allowed, denied), (14.0, 1.0));

    // The metrics recorder is one per process. nextest runs each test in a process of its own, so
    // the counts are exactly ours; `cargo test` runs tests side by side, which can only add.
    let exact = std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test");
    let counts_fit = |got: Option<&f64>, want: f64| match got {
        Some(&g) if exact => g == want,
        Some(&g) => g >= want,
        None => false,
    };
    let alert_count = alert_exprs(&std::fs::read_to_string(ALERTS).unwrap()).len();
    assert!(alert_count > 0, "no alert rules found in {ALERTS}");

    let prom = Prometheus::start(app.base.trim_start_matches("http://"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let last = match look(&prom, &client).await {
            Ok(seen)
                if seen.up == Some(1.0)
                    && counts_fit(seen.decisions.get("allowed"), allowed)
                    && counts_fit(seen.decisions.get("denied"), denied)
                    && seen.rules.len() == alert_count
                    && seen.rules.values().all(|(health, _)| health == "ok") =>
            {
                break seen;
            }
            Ok(seen) => format!("{seen:?}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "within 30 s Prometheus did not report up{{job=\"quotad\"}} = 1, {allowed} allowed and \
             {denied} denied decisions, and all {alert_count} alert rules evaluated; last seen: \
             {last}\nprometheus log:\n{}",
            prom.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(seen.up, Some(1.0));
    if exact {
        assert_eq!(seen.decisions.get("allowed"), Some(&allowed), "{seen:?}");
        assert_eq!(seen.decisions.get("denied"), Some(&denied), "{seen:?}");
    }
    for (rule, (health, error)) in &seen.rules {
        assert_eq!(health, "ok", "alert rule {rule}: {error}");
    }

    // Every dashboard query is valid PromQL to this Prometheus (Grafana's variables filled in),
    // and the `label_values(<selector>, <label>)` of a query variable finds this quotad.
    for (panel, expr) in dashboard_exprs(&dashboard()) {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "quotad");
        let variable = promql
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|args| args.rsplit_once(','))
            .map(|(selector, label)| (selector.trim().to_owned(), label.trim().to_owned()));
        let promql = match &variable {
            Some((selector, label)) => format!("count by ({label}) ({selector})"),
            None => promql,
        };
        let result = match prom.query(&client, &promql).await {
            Ok(result) => result,
            Err(e) => panic!("dashboard {panel:?}: Prometheus refuses {promql}: {e}"),
        };
        if let Some((_, label)) = &variable {
            assert!(
                result.iter().any(|(m, _)| m[label.as_str()] == "quotad"),
                "dashboard variable {panel}: {promql} does not find job quotad: {result:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_name_only_metrics_quotad_exports() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    // The first call hydrates the user's counter; FREE allows 10 exports, so the 8th to 10th are
    // near the limit (80 %) and the 11th is refused.
    for i in 1..=11 {
        let r = app.consume(user, "export").await;
        assert_eq!(r.status, if i <= 10 { 200 } else { 402 }, "{:?}", r.body);
    }
    let r = app
        .post(
            "/v1/track",
            json!({"user_id": user, "type": "ai_generation"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.flush().await;
    let r = app
        .post(
            "/v1/admin/reconcile",
            json!({"period": crate::helpers::period_id(0)}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // A reservation, a call with items, and overage (a plan that sells it).
    let r = app
        .post(
            "/v1/reserve",
            json!({"user_id": user, "type": "ai_generation", "amount": 1, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = app
        .post(
            "/v1/consume",
            json!({"user_id": user, "items": [{"type": "ai_generation"}, {"type": "kb_file"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let selling = quotad::plans::BUILT_IN.replace(
        "[plans.FREE]\nai_generation = 50\n",
        "[plans.FREE]\nai_generation = { limit = 50, overage = 100 }\n",
    );
    assert_ne!(selling, quotad::plans::BUILT_IN);
    let (overage, _plans) = TestApp::spawn_with_plans(&selling, Options::default()).await;
    let r = overage
        .post(
            "/v1/track",
            json!({"user_id": Uuid::new_v4(), "type": "ai_generation", "amount": 60}),
        )
        .await;
    assert_eq!(r.body["overage_added"], 10, "{:?}", r.body);

    // Redis errors, a degraded answer and a failed flusher pass: a second daemon whose Redis is
    // killed. The metrics recorder is one per process, so they show in the first one's /metrics.
    let mut redis = PrivateRedis::start();
    let broken = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let other = Uuid::new_v4();
    assert_eq!(broken.consume(other, "ai_generation").await.status, 200);
    redis.kill();
    let r = broken.consume(other, "ai_generation").await;
    assert_eq!((r.status, &r.body["degraded"]), (200, &json!(true)));
    assert!(
        broken.flusher.flush_once().await.is_err(),
        "a flusher pass without Redis fails"
    );

    // Usage events: a delivery answered 500, tried once and given up; counted by the
    // dispatcher's gauges.
    let receiver = crate::notifications::Receiver::start().await;
    receiver
        .answer
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let plans = crate::notifications::notify_plans();
    let notifying = TestApp::spawn_with(Options {
        plans: Some(plans.to_path_buf()),
        webhook_urls: vec![receiver.url()],
        tune: |c| {
            c.webhook_secret = Some(crate::notifications::SECRET.into());
            c.webhook_max_attempts = 1;
        },
        ..Options::default()
    })
    .await;
    let crossing = Uuid::new_v4();
    let r = notifying
        .post(
            "/v1/track",
            json!({"user_id": crossing, "type": "ai_generation", "amount": 50}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    notifying.flush().await;
    receiver
        .wait_for(2, std::time::Duration::from_secs(20))
        .await;

    // The gauges are counted every 5 s: wait for them (and for every series) to show.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exported = loop {
        let resp = app
            .client
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let exposition = resp.text().await.unwrap();
        let exported = exposition_names(&exposition);
        if exported.contains("quotad_webhook_failed_deliveries")
            && exposition.contains("quotad_webhook_failed_deliveries 2")
            || std::time::Instant::now() > deadline
        {
            break exported;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };

    let dashboard = dashboard();
    let alerts_text = std::fs::read_to_string(ALERTS).unwrap();
    let alerts = alert_exprs(&alerts_text);
    let dash_exprs = dashboard_exprs(&dashboard);
    assert!(
        alerts.len() >= 6,
        "too few alert rules in {ALERTS}: {alerts:?}"
    );

    let mut unknown = vec![];
    for (source, items) in [("dashboard", &dash_exprs), ("alerts.yml", &alerts)] {
        for (name, expr) in items {
            let names = metric_names(expr);
            if source == "dashboard" {
                assert!(
                    !names.is_empty(),
                    "{name:?} queries no quotad metric: {expr}"
                );
            }
            for n in names.difference(&exported) {
                unknown.push(format!("{source} {name:?}: {n}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names that quotad does not export:\n  {}\nquotad exports: {exported:?}",
        unknown.join("\n  ")
    );

    // The alert rules as the issue asks: each has for, a severity, a summary and a description.
    for block in alerts_text.split("- alert:").skip(1) {
        let name = block.lines().next().unwrap_or("").trim();
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(key), "alert {name} has no {key}");
        }
    }
    let alert_text: String = alerts.iter().map(|(_, e)| e.as_str()).collect();
    for metric in [
        "quotad_flush_oldest_dirty_age_seconds",
        "quotad_flush_backlog_counters",
        "quotad_flush_errors_total",
        "quotad_redis_errors_total",
        "quotad_decisions_total",
    ] {
        assert!(alert_text.contains(metric), "no alert uses {metric}");
    }
    assert!(alert_text.contains(r#"outcome="degraded""#));
    assert!(alert_text.contains(r#"outcome="denied""#));

    // The dashboard: a Prometheus datasource variable, every query on it, the panels asked for.
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "DS_PROMETHEUS"),
        "no DS_PROMETHEUS datasource variable"
    );
    let panels = all_panels(&dashboard);
    let graphs: Vec<&Value> = panels.into_iter().filter(|p| p["type"] != "row").collect();
    assert!(
        graphs.len() >= 5,
        "only {} panels in {DASHBOARD}",
        graphs.len()
    );
    for p in &graphs {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "{} has no query", p["title"]);
    }
    let titled = |words: &[&str]| {
        graphs.iter().find(|p| {
            let t = p["title"].as_str().unwrap_or("").to_lowercase();
            words.iter().all(|w| t.contains(w))
        })
    };
    for words in [
        &["decisions", "outcome"][..],
        &["latency", "p50", "p99"],
        &["backlog"],
        &["lag"],
        &["hydration"],
        &["reconcile", "drift"],
        &["events", "webhook"],
        &["reservations"],
        &["overage"],
        &["items"],
    ] {
        assert!(titled(words).is_some(), "no panel titled with {words:?}");
    }
    let latency = serde_json::to_string(titled(&["latency", "p50", "p99"]).unwrap()).unwrap();
    for q in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
        assert!(
            latency.contains(q) && latency.contains("quotad_http_request_duration_seconds_bucket"),
            "the latency panel has no {q} over quotad_http_request_duration_seconds_bucket"
        );
    }
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, including those inside collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = vec![];
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (panel title or variable name, PromQL) of every dashboard query: panel targets and query
/// variables.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    for p in all_panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {} has a target without expr", p["title"]));
            out.push((
                p["title"].as_str().unwrap_or("").to_owned(),
                expr.to_owned(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            let q = q.unwrap_or_else(|| panic!("variable {} has no query", v["name"]));
            out.push((
                format!("${}", v["name"].as_str().unwrap_or("")),
                q.to_owned(),
            ));
        }
    }
    out
}

/// (alert name, expression) of every rule in a Prometheus rules file, read as text (no YAML
/// parser here): `expr: <one line>`, or a `|`/`>` block of the lines indented below it.
fn alert_exprs(text: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut alert = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rest = rest.trim();
            let expr = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = vec![];
                while let Some(next) = lines.peek() {
                    let t = next.trim_start();
                    if !t.is_empty() && next.len() - t.len() <= indent {
                        break;
                    }
                    block.push(t);
                    lines.next();
                }
                block.join(" ")
            } else {
                rest.trim_matches(|c| c == '"' || c == '\'').to_owned()
            };
            out.push((alert.clone(), expr.trim().to_owned()));
        }
    }
    out
}

/// Every `quotad_[a-z0-9_]+` identifier in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    for (i, _) in expr.match_indices("quotad_") {
        if expr[..i].chars().next_back().is_some_and(ident) {
            continue;
        }
        let name: String = expr[i..]
            .chars()
            .take_while(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            .collect();
        out.insert(name);
    }
    out
}

/// Every metric name with a sample in a Prometheus text exposition (histograms as `_bucket`,
/// `_sum` and `_count`: their bare name has no series, so a query on it would find nothing).
fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}
