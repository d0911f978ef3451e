//! The `quotad` binary: parse the command line, set up logging, run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

/// mimalloc: quotad allocates many small, short-lived buffers per request (JSON, keys, script
/// arguments); mimalloc serves those faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use quotad::config::{Cli, Command, ExportArgs};
use quotad::reconcile::ReconcileError;
use quotad::{app, clock::SystemClock, db, telemetry};

/// Why a command failed. Each message names the setting or the step at fault.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A setting that cannot work (the message names it).
    #[error("{0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (QUOTAD_LISTEN): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The daemon stopped with an error.
    #[error(transparent)]
    Run(#[from] app::RunError),
    /// `QUOTAD_DATABASE_URL` cannot be used.
    #[error("QUOTAD_DATABASE_URL: {0}")]
    DatabaseUrl(sqlx::Error),
    /// Creating or migrating the database failed.
    #[error("migrating {url}: {source}")]
    Migrate { url: String, source: sqlx::Error },
    /// Reconcile failed.
    #[error("reconcile: {0}")]
    Reconcile(#[from] ReconcileError),
    /// A reconcile statement passed `--timeout-ms`.
    #[error("reconcile: postgres did not finish a statement within --timeout-ms {0} (a lock held on usage_tracking, or a database overloaded); repairs made before it stay made. Run it again later, or with a longer --timeout-ms")]
    ReconcileTimeout(u64),
    /// An export's Postgres read failed (exit 1).
    #[error("export: {0}")]
    Export(sqlx::Error),
    /// An export could not be written (exit 1).
    #[error("export: writing {what}: {source}")]
    Output {
        what: String,
        source: std::io::Error,
    },
    /// The load generator could not be started.
    #[error("bench: cannot run {path}: {source}. Build it beside this quotad: `cargo build -p quotad-bench` (with `--release` for a release quotad); deploy/test.sh and deploy/bench.sh do")]
    Bench {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.command.config();
    // An export's rows go to stdout; its log lines must not.
    let sink = match cli.command {
        Command::Export(_) => telemetry::Sink::Stderr,
        _ => telemetry::Sink::Stdout,
    };
    let _log_guard = match telemetry::init_to(&config.log, config.log_format, sink) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("quotad: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(config) => serve(config).await,
        Command::Migrate(config) => migrate(&config.database_url).await,
        Command::Bench { args } => Err(bench(&args)),
        Command::Export(args) => export(args).await,
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
            // A failed run (Postgres, or the output) is 1; a setting that cannot work is 2.
            match e {
                Failure::Export(_) | Failure::Output { .. } => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

/// `quotad bench`: becomes `quotad-bench` (a crate of its own), found beside this binary, with the
/// same arguments; returns only if it cannot be started.
fn bench(args: &[String]) -> Failure {
    let path = std::env::current_exe()
        .map(|exe| exe.with_file_name("quotad-bench"))
        .unwrap_or_else(|_| "quotad-bench".into());
    let mut command = std::process::Command::new(&path);
    command.args(args);
    #[cfg(unix)]
    let source = {
        use std::os::unix::process::CommandExt;
        command.exec()
    };
    #[cfg(not(unix))]
    let source = match command.status() {
        Ok(status) => std::process::exit(status.code().unwrap_or(2)),
        Err(e) => e,
    };
    Failure::Bench { path, source }
}

/// Validates the configuration (once, in `App::new`), then binds and serves.
async fn serve(config: quotad::config::Config) -> Result<(), Failure> {
    let addr = config.listen;
    let mut daemon = app::App::new(config, Arc::new(SystemClock))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Failure::Listen { addr, source })?;
    daemon.bind_grpc().await?;
    daemon.run(listener, app::shutdown_signal()).await?;
    Ok(())
}

async fn migrate(url: &str) -> Result<(), Failure> {
    let pool = db::lazy_pool(url, None).map_err(Failure::DatabaseUrl)?;
    db::prepare(url, &pool)
        .await
        .map_err(|source| Failure::Migrate {
            url: url.to_owned(),
            source,
        })?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Runs one reconcile and prints its report; `Ok(true)` when no drift remains.
async fn reconcile(args: quotad::config::ReconcileArgs) -> Result<bool, Failure> {
    use quotad::clock::Clock;
    // The same ranges as `serve` (the Redis deadline is used here too).
    args.config.validate().map_err(Failure::Config)?;
    let now = SystemClock.now();
    let period = match &args.period {
        Some(p) => quotad::reconcile::parse_period(p).ok_or_else(|| {
            Failure::Config(format!(
                "--period {p:?}: use a month such as 2026-11, or lifetime"
            ))
        })?,
        None => quotad::period::Period::current(quotad::period::PeriodKind::Month, now),
    };
    let config = &args.config;
    let store = quotad::store::RedisStore::new(
        &config.redis_url,
        &config.key_prefix,
        config.redis_timeout(),
    )
    .map_err(Failure::Config)?;
    // Every statement (and every lock it waits for) has its deadline: a hung or locked database
    // stops the run with an error instead of holding it forever.
    let deadline = std::time::Duration::from_millis(args.timeout_ms);
    let pool = db::lazy_pool(&config.database_url, Some(deadline)).map_err(Failure::DatabaseUrl)?;
    let report = quotad::reconcile::reconcile(&store, &pool, period, args.repair, now)
        .await
        .map_err(|e| match &e {
            // statement_timeout, lock_timeout, or no connection within the deadline.
            ReconcileError::Db(db_error)
                if matches!(db_error, sqlx::Error::PoolTimedOut)
                    || db::sqlstate(db_error).is_some_and(|c| c == "57014" || c == "55P03") =>
            {
                Failure::ReconcileTimeout(args.timeout_ms)
            }
            _ => Failure::Reconcile(e),
        })?;
    if args.json {
        let json = serde_json::to_string_pretty(&report).expect("a report serializes");
        println!("{json}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.drift.is_empty() || (args.repair && report.repaired as usize == report.drift.len()))
}

/// `quotad export`: the period's rows, streamed from Postgres to stdout or to `--output` (a file
/// is written to `<FILE>.part` and renamed once complete, so a failed run leaves no file that
/// looks whole; a device or a pipe is written directly).
async fn export(args: ExportArgs) -> Result<(), Failure> {
    use futures_util::StreamExt;
    use std::io::Write;

    let plans = quotad::plans::PlanBook::open(args.config.plans.clone())
        .map_err(|e| Failure::Config(e.to_string()))?;
    let names = quotad::export::PlanNames::of(&plans.current());
    let pool = db::lazy_pool(&args.config.database_url, None).map_err(Failure::DatabaseUrl)?;
    // A device or a pipe (`--output /dev/null`) is written as it is: only a file is renamed.
    let special = args
        .output
        .as_ref()
        .is_some_and(|path| std::fs::metadata(path).is_ok_and(|m| !m.file_type().is_file()));
    let (mut out, what, part): (Box<dyn Write>, String, _) = match &args.output {
        Some(path) if special => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| Failure::Output {
                    what: path.display().to_string(),
                    source,
                })?;
            (
                Box::new(std::io::BufWriter::new(file)),
                path.display().to_string(),
                None,
            )
        }
        Some(path) => {
            let mut part = path.as_os_str().to_owned();
            part.push(".part");
            let part = std::path::PathBuf::from(part);
            let file = std::fs::File::create(&part).map_err(|source| Failure::Output {
                what: part.display().to_string(),
                source,
            })?;
            let what = part.display().to_string();
            (Box::new(std::io::BufWriter::new(file)), what, Some(part))
        }
        None => (
            Box::new(std::io::stdout().lock()),
            "stdout".to_owned(),
            None,
        ),
    };
    let written = async {
        let tx = quotad::export::open(&pool, &args.period, &names)
            .await
            .map_err(Failure::Export)?;
        let mut rows = std::pin::pin!(quotad::export::stream(tx, args.format));
        let failed = |source| Failure::Output {
            what: what.clone(),
            source,
        };
        while let Some(chunk) = rows.next().await {
            out.write_all(&chunk.map_err(Failure::Export)?)
                .map_err(failed)?;
        }
        out.flush().map_err(failed)
    }
    .await;
    drop(out);
    match (written, part, &args.output) {
        (Ok(()), Some(part), Some(path)) => {
            std::fs::rename(&part, path).map_err(|source| Failure::Output {
                what: path.display().to_string(),
                source,
            })
        }
        (Err(e), Some(part), _) => {
            let _ = std::fs::remove_file(part);
            Err(e)
        }
        (result, _, _) => result,
    }
}
