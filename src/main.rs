//! The `quotad` binary: parse the command line, set up logging, run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use quotad::config::{Cli, Command};
use quotad::{app, clock::SystemClock, db, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Serve(config) | Command::Migrate(config)) = &cli.command;
    if let Err(e) = telemetry::init(&config.log, config.log_format) {
        eprintln!("quotad: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(config) => serve(config).await,
        Command::Migrate(config) => migrate(&config.database_url).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("quotad: {e}");
            ExitCode::FAILURE
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
    let pool = db::lazy_pool(url).map_err(|e| format!("QUOTAD_DATABASE_URL: {e}"))?;
    db::prepare(url, &pool)
        .await
        .map_err(|e| format!("migrating {url}: {e}"))?;
    tracing::info!("migrations applied");
    Ok(())
}
