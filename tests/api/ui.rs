//! The usage page: signed links, and what a person sees in a real headless Chromium.

use std::path::PathBuf;
use std::process::Command;

use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{mid_month, month_start, rfc, Options, TestApp, UsageRow};

async fn with_tokens() -> TestApp {
    TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw".into()],
        admin_tokens: vec!["adm".into()],
        ..Options::default()
    })
    .await
}

async fn page(app: &TestApp, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = app.client.get(format!("{}{path}", app.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_signed_link_shows_the_page_until_it_expires_and_a_forged_one_never() {
    let app = with_tokens().await;
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let link = app
        .send(
            Method::POST,
            &format!("/v1/users/{user}/usage-link"),
            Some(json!({"ttl_seconds": 600})),
            Some("gw"),
        )
        .await;
    assert_eq!(link.status, 200, "{:?}", link.body);
    let url = link.body["url"].as_str().unwrap().to_owned();
    let expiry = mid_month() + chrono::Duration::minutes(10);
    assert_eq!(link.body["expires_at"], rfc(expiry).as_str());

    let shown = page(&app, &url, None).await;
    let forged = page(&app, &url.replace("sig=", "sig=00"), None).await;
    let other_user = page(
        &app,
        &url.replace(&user.to_string(), &other.to_string()),
        None,
    )
    .await;
    let bare = page(&app, &format!("/ui/users/{user}"), None).await;
    let gateway = page(&app, &format!("/ui/users/{user}"), Some("gw")).await;
    let admin = page(&app, &format!("/ui/users/{user}"), Some("adm")).await;
    app.set_at(expiry);
    let expired = page(&app, &url, None).await;

    assert_eq!(shown.0, 200);
    assert!(
        shown.1.contains("Plan: <strong>FREE</strong>"),
        "{}",
        shown.1
    );
    assert_eq!(forged.0, 403);
    assert_eq!(other_user.0, 403, "a link is for its own user only");
    assert_eq!(bare.0, 401);
    assert_eq!(
        gateway.0, 401,
        "the gateway scope issues links but does not see pages"
    );
    assert_eq!(admin.0, 200);
    assert_eq!(expired.0, 403);
    assert!(expired.1.contains("expired"));
}

#[tokio::test]
async fn a_link_request_with_a_bad_ttl_is_refused() {
    let app = with_tokens().await;
    let user = Uuid::new_v4();

    let short = app
        .send(
            Method::POST,
            &format!("/v1/users/{user}/usage-link"),
            Some(json!({"ttl_seconds": 5})),
            Some("gw"),
        )
        .await;
    let none = app
        .send(
            Method::POST,
            &format!("/v1/users/{user}/usage-link"),
            Some(json!({})),
            None,
        )
        .await;

    assert_eq!(
        (short.status, &short.body["code"], &short.body["field"]),
        (400, &json!("INVALID_TTL"), &json!("ttl_seconds"))
    );
    assert_eq!(none.status, 401);
}

/// Runs headless Chromium on `url`: the DOM after load, and a phone-width screenshot at `shot`.
fn chromium(url: &str, shot: &std::path::Path) -> String {
    chromium_at(url, shot, "390,844")
}

/// [`chromium`] in a window of `size` ("width,height").
fn chromium_at(url: &str, shot: &std::path::Path, size: &str) -> String {
    let profile = std::env::temp_dir().join(format!("quotad-chromium-{}", Uuid::new_v4().simple()));
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ];
    let run = |extra: &[String]| {
        let out = Command::new("chromium")
            .args(common)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={size}"))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium is installed (deploy/ensure-test-tools.sh installs it)");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let dom = run(&["--dump-dom".to_owned()]);
    run(&[format!("--screenshot={}", shot.display())]);
    let _ = std::fs::remove_dir_all(&profile);
    dom
}

/// The user's own row of type `ty`: up to the next row or the end of its section.
fn row<'a>(dom: &'a str, ty: &str) -> &'a str {
    let start = dom
        .find(&format!("data-type=\"{ty}\""))
        .unwrap_or_else(|| panic!("no row for {ty}: {dom}"));
    let rest = &dom[start..];
    let end = [rest.find("<div class=\"row\""), rest.find("</section>")]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
    &rest[..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_a_free_user_at_46_of_50_sees_a_red_bar_and_an_upgrade_link() {
    let app = TestApp::spawn().await;
    let (free, pro) = (Uuid::new_v4(), Uuid::new_v4());
    app.post(
        "/v1/track",
        json!({"user_id": free, "type": "ai_generation", "amount": 46}),
    )
    .await;
    app.post(
        "/v1/track",
        json!({"user_id": free, "type": "kb_file", "amount": 3}),
    )
    .await;
    app.set_plan(pro, "PRO").await;
    app.post(
        "/v1/track",
        json!({"user_id": pro, "type": "ai_generation", "amount": 120}),
    )
    .await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let (free_shot, pro_shot) = (dir.join("usage-free.png"), dir.join("usage-pro.png"));

    let (base, f, p) = (app.base.clone(), free_shot.clone(), pro_shot.clone());
    let (free_dom, pro_dom) = tokio::task::spawn_blocking(move || {
        (
            chromium(&format!("{base}/ui/users/{free}"), &f),
            chromium(&format!("{base}/ui/users/{pro}"), &p),
        )
    })
    .await
    .unwrap();

    let ai = row(&free_dom, "ai_generation");
    assert!(
        ai.contains("AI generations") && ai.contains("46 / 50"),
        "{ai}"
    );
    assert!(ai.contains("role=\"progressbar\""), "{ai}");
    assert!(
        ai.contains("aria-valuenow=\"46\"")
            && ai.contains("aria-valuemin=\"0\"")
            && ai.contains("aria-valuemax=\"50\""),
        "{ai}"
    );
    assert!(ai.contains("class=\"bar danger\""), "92 % is red: {ai}");
    assert!(
        free_dom.contains(".bar.danger{background:#dc2626}"),
        "the danger bar is red"
    );
    let reset = month_start(1);
    let resets = format!("resets 1 {} {}", reset.format("%B"), reset.format("%Y"));
    assert!(ai.contains(&resets), "{resets}: {ai}");
    let kb = row(&free_dom, "kb_file");
    assert!(
        kb.contains("3 / 20") && kb.contains("class=\"bar\""),
        "15 % is not red: {kb}"
    );
    assert!(free_dom.contains("<a href=\"/settings/billing\">Upgrade your plan</a>"));
    assert!(free_dom.contains("Plan: <strong>FREE</strong>"));

    let pro_ai = row(&pro_dom, "ai_generation");
    assert!(pro_ai.contains("120 / ∞"), "{pro_ai}");
    assert!(
        !pro_ai.contains("progressbar"),
        "no bar without a limit: {pro_ai}"
    );
    assert!(pro_dom.contains("Plan: <strong>PRO</strong>"));
    assert!(
        !pro_dom.contains("Upgrade your plan"),
        "nothing near a limit"
    );
    for shot in [&free_shot, &pro_shot] {
        let png = std::fs::read(shot).unwrap();
        assert!(
            png.len() > 2000 && png.starts_with(b"\x89PNG"),
            "{} is a screenshot",
            shot.display()
        );
    }
}

/// The titles (`<title>…</title>`) inside `svg`, in order.
fn titles(svg: &str) -> Vec<&str> {
    svg.split("<title")
        .skip(1)
        .map(|t| &t[t.find('>').unwrap() + 1..t.find("</title>").unwrap()])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_each_monthly_type_charts_its_past_months_with_the_limit() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let db = app.db().await;
    for (months, count) in [(-11, 8), (-4, 31), (-3, 50), (-2, 62), (-1, 44)] {
        UsageRow::month(user, "ai_generation", months, count)
            .insert(&db)
            .await;
    }
    UsageRow::month(user, "export", -1, 4).insert(&db).await;
    UsageRow::month(Uuid::new_v4(), "ai_generation", -6, 49)
        .insert(&db)
        .await;
    // This month's count is Redis' (not flushed yet): the chart shows it too.
    app.post(
        "/v1/track",
        json!({"user_id": user, "type": "ai_generation", "amount": 46}),
    )
    .await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("usage-history.png");
    let headers = app
        .client
        .get(format!("{}/ui/users/{user}", app.base))
        .send()
        .await
        .unwrap()
        .headers()
        .clone();

    let (url, s) = (format!("{}/ui/users/{user}", app.base), shot.clone());
    let dom = tokio::task::spawn_blocking(move || chromium_at(&url, &s, "420,800"))
        .await
        .unwrap();

    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("script-src"), "no script of any kind: {csp}");
    let ai = row(&dom, "ai_generation");
    let svg = &ai[ai.find("<svg").expect("a chart")..ai.find("</svg>").unwrap()];
    assert!(svg.contains("role=\"img\""), "{svg}");
    assert!(
        svg.contains("width=\"100%\"") && svg.contains("viewBox=\"0 0 320 100\""),
        "{svg}"
    );
    let day = |at: chrono::DateTime<chrono::Utc>| at.format("%-d %b %Y").to_string();
    let span = |m: i32| {
        format!(
            "{} – {}",
            day(month_start(m)),
            day(month_start(m + 1) - chrono::Duration::days(1))
        )
    };
    let bars = [(-11, 8), (-4, 31), (-3, 50), (-2, 62), (-1, 44), (0, 46)].map(|(m, used)| {
        if used > 50 {
            format!("{}: {used} used, {} past the limit", span(m), used - 50)
        } else {
            format!("{}: {used} used", span(m))
        }
    });
    let named = titles(svg);
    assert_eq!(
        named[0],
        format!(
            "AI generations, last 12 months: {}; limit 50.",
            bars.join("; ")
        ),
        "the chart's accessible name has every figure"
    );
    assert_eq!(named[1..], bars, "one bar per period, oldest first");
    assert_eq!(svg.matches("<g class=\"period\"").count(), 6);
    assert_eq!(
        svg.matches("class=\"b over\"").count(),
        1,
        "the part of 62 past the limit of 50 is red"
    );
    assert!(svg.contains("class=\"limit\"") && svg.contains(">limit 50</text>"));
    let export = row(&dom, "export");
    assert_eq!(titles(export)[1..], [format!("{}: 4 used", span(-1))]);
    assert!(
        row(&dom, "kb_file").find("<svg").is_none(),
        "a lifetime type has no history"
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 2000);
    // The PNG's width, from its header.
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 420);
}
