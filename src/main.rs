//! The `quotad` binary: parse the command line, set up logging, run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

/// mimalloc: quotad allocates many small, short-lived buffers per request (JSON, keys, script
/// arguments); mimalloc serves those faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use quotad::config::{Cli, Command};
use quotad::{app, clock::SystemClock, db, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.command.config();
    let _log_guard = match telemetry::init(&config.log, config.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("quotad: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(config) => serve(config).await,
        Command::Migrate(config) => migrate(&config.database_url).await,
        Command::Bench(args) => quotad::bench::run(&args).await.map(|_| ()),
        Command::Reconcile(args) => match reconcile(args).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("quotad: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve(config: quotad::config::Config) -> Result<(), String> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (QUOTAD_LISTEN): {e}", config.listen))?;
    app::run(
        config,
        Arc::new(SystemClock),
        listener,
        app::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())
}

async fn migrate(url: &str) -> Result<(), String> {
    let pool = db::lazy_pool(url, None).map_err(|e| format!("QUOTAD_DATABASE_URL: {e}"))?;
    db::prepare(url, &pool)
        .await
        .map_err(|e| format!("migrating {url}: {e}"))?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Runs one reconcile and prints its report; `Ok(true)` when no drift remains.
async fn reconcile(args: quotad::config::ReconcileArgs) -> Result<bool, String> {
    use quotad::clock::Clock;
    // The same ranges as `serve` (the Redis deadline is used here too).
    args.config.validate()?;
    let now = SystemClock.now();
    let period = match &args.period {
        Some(p) => quotad::reconcile::parse_period(p)
            .ok_or_else(|| format!("--period {p:?}: use a month such as 2026-11, or lifetime"))?,
        None => quotad::period::Period::current(quotad::period::PeriodKind::Month, now),
    };
    let config = &args.config;
    let store = quotad::store::RedisStore::new(
        &config.redis_url,
        &config.key_prefix,
        config.redis_timeout(),
    )?;
    let pool = db::lazy_pool(&config.database_url, None)
        .map_err(|e| format!("QUOTAD_DATABASE_URL: {e}"))?;
    let report = quotad::reconcile::reconcile(&store, &pool, period, args.repair, now)
        .await
        .map_err(|e| format!("reconcile: {e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.drift.is_empty() || (args.repair && report.repaired as usize == report.drift.len()))
}
