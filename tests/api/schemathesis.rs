//! schemathesis (PyPI; `deploy/ensure-test-tools.sh` installs it) against `/openapi.json`, with
//! tokens: it generates valid and invalid requests for every operation from the description and
//! checks the answers. Failing are: a 5xx, an answer the description does not allow (status,
//! content type, headers, body schema), a valid request refused or an invalid one accepted, a call
//! that works without its token, and a 4xx that is not the JSON error body (the `json_error_body`
//! check of tests/api/schemathesis_hooks.py).
//!
//! `QUOTAD_SCHEMATHESIS_SEED` replays a run (the seed is printed); `QUOTAD_SCHEMATHESIS_EXAMPLES`
//! sets the examples per operation (default 50: 1,200 to 1,500 cases, 15 to 25 s).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::helpers::{Options, TestApp};

const DEFAULT_EXAMPLES: u32 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_in_the_described_api() {
    let version = Command::new("schemathesis").arg("--version").output();
    let version = match version {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        other => panic!(
            "schemathesis is not installed ({other:?}); run deploy/ensure-test-tools.sh \
             (pip install 'schemathesis>=4,<5')"
        ),
    };
    assert!(
        version.contains("version 4."),
        "schemathesis 4.x is needed, found {version:?}; run deploy/ensure-test-tools.sh"
    );

    let (admin, gateway) = (
        format!("admin-{}", uuid::Uuid::new_v4().simple()),
        format!("gateway-{}", uuid::Uuid::new_v4().simple()),
    );
    let app = TestApp::spawn_with(Options {
        admin_tokens: vec![admin.clone()],
        gateway_tokens: vec![gateway.clone()],
        // Any 5xx fails the run: deadlines generous enough that a busy CI machine does not turn a
        // slow Postgres or Redis answer into a 503 (a membership change makes three Redis calls
        // inside a Postgres transaction).
        tune: |c| {
            c.database_timeout_ms = 5_000;
            c.redis_timeout_ms = 2_000;
            c.request_timeout_ms = 30_000;
        },
        ..Options::default()
    })
    .await;

    let seed: u64 = std::env::var("QUOTAD_SCHEMATHESIS_SEED")
        .ok()
        .map(|s| {
            s.parse()
                .expect("QUOTAD_SCHEMATHESIS_SEED is a whole number")
        })
        .unwrap_or_else(rand_seed);
    let examples: u32 = std::env::var("QUOTAD_SCHEMATHESIS_EXAMPLES")
        .ok()
        .map(|s| {
            s.parse()
                .expect("QUOTAD_SCHEMATHESIS_EXAMPLES is a whole number")
        })
        .unwrap_or(DEFAULT_EXAMPLES);
    println!("schemathesis seed {seed} (replay with QUOTAD_SCHEMATHESIS_SEED={seed}), {examples} examples per operation");

    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api");
    // A directory of its own: Hypothesis writes `.hypothesis` into the working directory.
    let work = std::env::temp_dir().join(format!("quotad-schemathesis-{}", app.prefix));
    std::fs::create_dir_all(&work).unwrap();
    let started = Instant::now();
    let base = app.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        let out = Command::new("schemathesis")
            .current_dir(&work)
            .env("SCHEMATHESIS_HOOKS", here.join("schemathesis_hooks.py"))
            .env("QUOTAD_ST_ADMIN_TOKEN", &admin)
            .env("QUOTAD_ST_GATEWAY_TOKEN", &gateway)
            .env("HYPOTHESIS_STORAGE_DIRECTORY", work.join(".hypothesis"))
            .arg("--no-color")
            .arg("--config-file")
            .arg(here.join("schemathesis.toml"))
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--checks", "all,json_error_body"])
            .args(["--seed", &seed.to_string()])
            .args(["--max-examples", &examples.to_string()])
            .args(["--workers", "1", "--continue-on-failure"])
            .output();
        let _ = std::fs::remove_dir_all(&work);
        out
    })
    .await
    .unwrap()
    .expect("schemathesis runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" generated"))
        .unwrap_or("(no summary)")
        .trim()
        .to_owned();
    println!(
        "schemathesis: {summary}, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "schemathesis found failures (seed {seed}; replay with QUOTAD_SCHEMATHESIS_SEED={seed}):\n{text}"
    );
    assert!(
        summary.contains("passed"),
        "schemathesis ran no case (seed {seed}):\n{text}"
    );
}

/// A new seed per run unless one is given, so CI keeps exploring; it is printed for replay.
fn rand_seed() -> u64 {
    u64::from(uuid::Uuid::new_v4().as_u128() as u32)
}
