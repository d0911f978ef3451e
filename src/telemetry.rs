//! tracing to stdout (to stderr for a command whose output is stdout, such as `quotad export`):
//! readable text by default, one JSON object per line in production. Lines are written by a
//! background thread, so a request never waits on stdout; if stdout cannot keep up, lines beyond a
//! 128,000-line buffer are dropped rather than slowing requests.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Standard output: the daemon's.
    Stdout,
    /// Standard error: for a command that writes its result to stdout.
    Stderr,
}

/// Installs the global subscriber, writing to stdout. `filter` is a tracing filter such as
/// `info` or `quotad=debug`. Keep the returned guard until exit: dropping it flushes what is
/// buffered.
pub fn init(
    filter: &str,
    format: LogFormat,
) -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    init_to(filter, format, Sink::Stdout)
}

/// [`init`], writing to `sink`.
pub fn init_to(
    filter: &str,
    format: LogFormat,
    sink: Sink,
) -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    let mut env_filter = EnvFilter::try_new(filter)
        .map_err(|e| format!("QUOTAD_LOG={filter:?} is not a valid filter: {e}"))?;
    // Postgres NOTICEs (e.g. "column already exists, skipping" from idempotent migrations) are
    // not worth an info line; a filter that names sqlx decides for itself.
    if !filter.contains("sqlx") {
        env_filter = env_filter.add_directive(
            "sqlx::postgres::notice=warn"
                .parse()
                .expect("valid directive"),
        );
    }
    let (out, terminal): (Box<dyn std::io::Write + Send>, bool) = match sink {
        Sink::Stdout => (Box::new(std::io::stdout()), std::io::stdout().is_terminal()),
        Sink::Stderr => (Box::new(std::io::stderr()), std::io::stderr().is_terminal()),
    };
    let (writer, guard) = tracing_appender::non_blocking(out);
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are noise
    // ("\x1b[2m") that breaks grep and parsers.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(terminal)
        .with_writer(writer);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    Ok(guard)
}
