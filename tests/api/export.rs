//! The usage export for invoicing: `GET /v1/admin/usage/export` and `quotad export`, streamed from
//! Postgres in batches.

use std::collections::HashSet;
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{anniversary, month_start, period_id, rfc, Options, TestApp, UsageRow};

/// A GET of the export: status, headers and the body as text.
async fn export(app: &TestApp, query: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = app
        .client
        .get(format!("{}/v1/admin/usage/export?{query}", app.base))
        .send()
        .await
        .expect("quotad answers");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.expect("the whole body"))
}

/// Splits one CSV record (RFC 4180) into its fields.
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut field, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// The records of a CSV body: CRLF-terminated, a line break inside quotes kept in its field.
fn csv_records(body: &str) -> Vec<Vec<String>> {
    assert!(body.ends_with("\r\n"), "the last record ends with CRLF");
    let mut records = Vec::new();
    let mut pending = String::new();
    for piece in body[..body.len() - 2].split("\r\n") {
        pending.push_str(piece);
        if pending.matches('"').count().is_multiple_of(2) {
            records.push(csv_fields(&std::mem::take(&mut pending)));
        } else {
            pending.push_str("\r\n");
        }
    }
    records
}

#[tokio::test]
async fn an_export_has_every_users_periods_that_began_in_the_month_with_plan_and_metadata() {
    let app = TestApp::spawn().await;
    let mut users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    users.sort();
    let [pro, free, gone] = users;
    app.set_plan(pro, "PRO").await;
    let db = app.db().await;
    // A plan no longer in the plans file: quotad applies the default.
    sqlx::query("INSERT INTO user_plans (user_id, plan) VALUES ($1, 'GONE')")
        .bind(gone)
        .execute(&db)
        .await
        .unwrap();
    let awkward = json!({"model": "m-1, \"large\"\nv2", "prompt_tokens": 1500, "cost": 0.25});
    UsageRow {
        overage: 2,
        metadata: awkward.clone(),
        ..UsageRow::month(pro, "ai_generation", -1, 12)
    }
    .insert(&db)
    .await;
    UsageRow::month(pro, "ai_generation", -2, 40)
        .insert(&db)
        .await;
    UsageRow::month(pro, "ai_generation", 0, 1)
        .insert(&db)
        .await;
    // A month from the 15th, 09:30: it began last month, so it is last month's.
    UsageRow::from(free, "export", anniversary(-1), anniversary(0), 3)
        .insert(&db)
        .await;
    UsageRow::month(gone, "export", -1, 5).insert(&db).await;
    UsageRow {
        end: None,
        ..UsageRow::from(
            free,
            "kb_file",
            chrono::DateTime::UNIX_EPOCH,
            month_start(0),
            7,
        )
    }
    .insert(&db)
    .await;
    let month = period_id(-1);

    let (status, headers, csv) = export(&app, &format!("period={month}&format=csv")).await;
    let (jstatus, jheaders, jsonl) = export(&app, &format!("period={month}&format=jsonl")).await;
    let (_, _, default_format) = export(&app, &format!("period={month}")).await;
    let (_, _, lifetime) = export(&app, "period=lifetime&format=jsonl").await;
    let (_, _, empty) = export(&app, "period=1999-01").await;

    assert_eq!(status, 200, "{csv}");
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        headers["content-disposition"],
        format!("attachment; filename=\"usage-{month}.csv\"").as_str()
    );
    let (m0, m1) = (rfc(month_start(-1)), rfc(month_start(0)));
    let (a0, a1) = (rfc(anniversary(-1)), rfc(anniversary(0)));
    let metadata_text = serde_json::to_string(&awkward).unwrap();
    let quoted = format!("\"{}\"", metadata_text.replace('"', "\"\""));
    assert_eq!(
        csv,
        format!(
            "user_id,plan,type,used,overage,metadata,period_start,period_end\r\n\
             {pro},PRO,ai_generation,12,2,{quoted},{m0},{m1}\r\n\
             {free},FREE,export,3,0,{{}},{a0},{a1}\r\n\
             {gone},FREE,export,5,0,{{}},{m0},{m1}\r\n"
        )
    );
    let records = csv_records(&csv);
    assert_eq!(records.len(), 4);
    let metadata: Value = serde_json::from_str(&records[1][5]).unwrap();
    assert_eq!(
        metadata, awkward,
        "the quoted field reads back as the object"
    );
    assert_eq!(default_format, csv, "csv is the default");

    assert_eq!(jstatus, 200);
    assert_eq!(jheaders["content-type"], "application/x-ndjson");
    assert_eq!(
        jheaders["content-disposition"],
        format!("attachment; filename=\"usage-{month}.jsonl\"").as_str()
    );
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert!(jsonl.ends_with('\n'));
    assert_eq!(
        lines[0],
        json!({"user_id": pro, "plan": "PRO", "type": "ai_generation", "used": 12, "overage": 2,
               "metadata": awkward, "period_start": m0, "period_end": m1})
    );
    assert_eq!(
        lines
            .iter()
            .map(|l| (
                l["user_id"].as_str().unwrap().to_owned(),
                l["used"].as_i64().unwrap()
            ))
            .collect::<Vec<_>>(),
        [
            (pro.to_string(), 12),
            (free.to_string(), 3),
            (gone.to_string(), 5)
        ]
    );

    assert_eq!(
        lifetime
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect::<Vec<Value>>(),
        [
            json!({"user_id": free, "plan": "FREE", "type": "kb_file", "used": 7, "overage": 0,
                "metadata": {}, "period_start": "1970-01-01T00:00:00Z", "period_end": null})
        ]
    );
    assert_eq!(
        empty, "user_id,plan,type,used,overage,metadata,period_start,period_end\r\n",
        "a month without rows is the header alone"
    );
}

#[tokio::test]
async fn twenty_thousand_rows_are_each_exported_once_and_well_formed() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let n = 20_000;
    // Users whose ids sort in another order than they were inserted, a row of another month for
    // each of the first 1000, and one plan stored in 7.
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, overage, period_start, period_end, metadata)
         SELECT md5(i::text)::uuid, 'ai_generation', i, i % 3, $2, $3, jsonb_build_object('tokens', i * 10)
         FROM generate_series(1, $1) AS i
         UNION ALL
         SELECT md5(i::text)::uuid, 'ai_generation', 1, 0, $3, $4, '{}'
         FROM generate_series(1, 1000) AS i",
    )
    .bind(n)
    .bind(month_start(-1))
    .bind(month_start(0))
    .bind(month_start(1))
    .execute(&db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO user_plans (user_id, plan) SELECT md5(i::text)::uuid, 'PRO' FROM generate_series(7, $1, 7) AS i",
    )
    .bind(n)
    .execute(&db)
    .await
    .unwrap();
    let month = period_id(-1);

    let (status, _, csv) = export(&app, &format!("period={month}")).await;
    let (jstatus, _, jsonl) = export(&app, &format!("period={month}&format=jsonl")).await;

    assert_eq!((status, jstatus), (200, 200));
    let records = csv_records(&csv);
    assert_eq!(
        records.len(),
        n as usize + 1,
        "a header and one line per row"
    );
    let (start, end) = (rfc(month_start(-1)), rfc(month_start(0)));
    let mut seen = HashSet::new();
    let mut previous = String::new();
    for r in &records[1..] {
        assert_eq!(r.len(), 8, "{r:?}");
        let used: i64 = r[3].parse().unwrap();
        assert_eq!(r[4], (used % 3).to_string());
        assert_eq!(r[5], format!("{{\"tokens\":{}}}", used * 10));
        assert_eq!(r[1], if used % 7 == 0 { "PRO" } else { "FREE" }, "{r:?}");
        assert_eq!(
            (&r[2], &r[6], &r[7]),
            (&"ai_generation".to_owned(), &start, &end)
        );
        assert!(r[0] > previous, "by user: {} after {previous}", r[0]);
        previous = r[0].clone();
        assert!(seen.insert(used), "row {used} twice");
    }
    assert_eq!(seen, (1..=n as i64).collect::<HashSet<_>>());
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n as usize);
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n as usize);

    // Counted: every row of each format, each export completed, none running once both ended
    // (the slot goes when the server drops the body, just after its last chunk).
    let want = [
        format!("quotad_export_rows_total{{format=\"csv\"}} {n}"),
        format!("quotad_export_rows_total{{format=\"jsonl\"}} {n}"),
        "quotad_exports_total{format=\"csv\",outcome=\"completed\"} 1".to_owned(),
        "quotad_exports_total{format=\"jsonl\",outcome=\"completed\"} 1".to_owned(),
        "quotad_exports_running 0".to_owned(),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let metrics = loop {
        let text = app.metrics_text().await;
        if want.iter().all(|w| text.contains(w.as_str())) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for w in &want {
        assert!(
            metrics.contains(w.as_str()),
            "{w} not in /metrics:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn bad_export_queries_are_refused_naming_the_parameter() {
    let app = TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw".into()],
        admin_tokens: vec!["adm".into()],
        ..Options::default()
    })
    .await;
    let call = |query: String, token: Option<&'static str>| {
        let app = &app;
        async move {
            app.send(
                Method::GET,
                &format!("/v1/admin/usage/export{query}"),
                None,
                token,
            )
            .await
        }
    };
    let month = period_id(-1);

    for (query, code, field) in [
        ("".to_owned(), "INVALID_PERIOD", "period"),
        ("?format=csv".to_owned(), "INVALID_PERIOD", "period"),
        ("?period=2026-13".to_owned(), "INVALID_PERIOD", "period"),
        ("?period=2026-1".to_owned(), "INVALID_PERIOD", "period"),
        ("?period=abc".to_owned(), "INVALID_PERIOD", "period"),
        ("?period=%002026-11".to_owned(), "INVALID_PERIOD", "period"),
        (
            format!("?period={}", "9".repeat(4000)),
            "INVALID_PERIOD",
            "period",
        ),
        (
            format!("?period={month}&format=xml"),
            "INVALID_FORMAT",
            "format",
        ),
        (
            format!("?period={month}&format=CSV"),
            "INVALID_FORMAT",
            "format",
        ),
        (
            format!("?period={month}&limit=10"),
            "INVALID_QUERY",
            "limit",
        ),
        (
            format!("?period={month}&period={month}"),
            "INVALID_QUERY",
            "period",
        ),
    ] {
        let a = call(query.clone(), Some("adm")).await;
        assert_eq!(
            (a.status, &a.body["code"], &a.body["field"]),
            (400, &json!(code), &json!(field)),
            "{}: {:?}",
            &query[..query.len().min(40)],
            a.body
        );
        assert!(a.body["error"].as_str().unwrap().len() < 400);
    }
    let gateway = call(format!("?period={month}"), Some("gw")).await;
    let none = call(format!("?period={month}"), None).await;
    let admin = call(format!("?period={month}"), Some("adm")).await;
    assert_eq!(
        (gateway.status, &gateway.body["code"]),
        (403, &json!("FORBIDDEN"))
    );
    assert_eq!(none.status, 401);
    assert_eq!(admin.status, 200);
}

#[tokio::test]
async fn an_export_cut_off_by_postgres_ends_as_an_incomplete_transfer() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    sqlx::query(
        "INSERT INTO usage_tracking (user_id, type, count, period_start, period_end)
         SELECT md5(i::text)::uuid, 'ai_generation', i, $1, $2 FROM generate_series(1, 200000) AS i",
    )
    .bind(month_start(-1))
    .bind(month_start(0))
    .execute(&db)
    .await
    .unwrap();
    let mut response = app
        .client
        .get(format!(
            "{}/v1/admin/usage/export?period={}",
            app.base,
            period_id(-1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut received = response
        .chunk()
        .await
        .unwrap()
        .expect("a first chunk")
        .len();

    // The export's backend is between two FETCHes while its client reads slowly: end it.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'FETCH FORWARD%'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(ended, [true], "one export backend");
    let outcome = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };

    assert!(
        outcome.is_err(),
        "the body must not end as if complete ({received} bytes received)"
    );
    assert!(
        received < 200_000 * 100,
        "{received} bytes: not the whole export"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quotad_exports_total{format=\"csv\",outcome=\"aborted\"} 1"),
        "{metrics}"
    );
}

/// `quotad export` against the test's database.
fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_quotad"))
        .arg("export")
        .args(args)
        .env(
            "QUOTAD_DATABASE_URL",
            format!("{}/{}", app.postgres_url, app.db_name),
        )
        .env("QUOTAD_LOG", "info")
        .output()
        .expect("quotad runs")
}

#[tokio::test]
async fn the_export_command_writes_what_the_api_streams_and_exits_by_outcome() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    for i in 0..30 {
        UsageRow::month(Uuid::new_v4(), "ai_generation", -1, i)
            .insert(&db)
            .await;
    }
    let month = period_id(-1);
    let (_, _, http) = export(&app, &format!("period={month}&format=jsonl")).await;
    let file =
        std::env::temp_dir().join(format!("quotad-export-{}.jsonl", Uuid::new_v4().simple()));
    let part = format!("{}.part", file.display());

    let to_stdout = cli(&app, &["--period", &month, "--format", "jsonl"]);
    let to_file = cli(
        &app,
        &[
            "--period",
            &month,
            "--format",
            "jsonl",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    let to_device = cli(&app, &["--period", &month, "--output", "/dev/null"]);
    let bad_period = cli(&app, &["--period", "2026-13"]);
    let bad_format = cli(&app, &["--period", &month, "--format", "xml"]);
    let no_period = cli(&app, &[]);
    let unreachable = Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args([
            "export",
            "--period",
            &month,
            "--output",
            file.to_str().unwrap(),
        ])
        .env(
            "QUOTAD_DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/x",
                crate::helpers::free_port()
            ),
        )
        .output()
        .unwrap();

    assert_eq!(
        to_stdout.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&to_stdout.stderr)
    );
    assert_eq!(http.lines().count(), 30);
    assert_eq!(
        String::from_utf8(to_stdout.stdout).unwrap(),
        http,
        "stdout has the rows and nothing else"
    );
    assert_eq!(to_file.status.code(), Some(0));
    assert!(to_file.stdout.is_empty());
    assert_eq!(written, http);
    assert!(!std::path::Path::new(&part).exists());
    assert_eq!(
        to_device.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&to_device.stderr)
    );
    {
        use std::os::unix::fs::FileTypeExt;
        let null = std::fs::metadata("/dev/null").unwrap().file_type();
        assert!(null.is_char_device(), "a device is written, not replaced");
    }
    for (out, what) in [
        (&bad_period, "--period"),
        (&bad_format, "--format"),
        (&no_period, "--period"),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
    }
    assert!(String::from_utf8_lossy(&bad_period.stderr).contains("use a month such as 2026-11"));
    assert_eq!(
        unreachable.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("quotad: export:"));
    assert!(
        !file.exists() && !std::path::Path::new(&part).exists(),
        "no file is left"
    );
}
