//! Command line and configuration. Every setting is a flag and an environment variable, parsed once
//! into types; an error names the variable. `Debug` hides tokens and database passwords.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `quotad`: meters usage and enforces plan limits.
#[derive(Debug, Parser)]
#[command(name = "quotad", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(Config),
    /// Create the database if missing, apply migrations, and exit.
    Migrate(Config),
    /// Compare Redis with Postgres for one period, print the drift, optionally repair it.
    /// Exits 1 when drift remains, 0 when there is none (or all of it was repaired).
    Reconcile(ReconcileArgs),
    /// Write every user's totals of one period, for invoicing, as CSV or JSON lines (to stdout, or
    /// to --output). Exits 2 on a bad argument, 1 when Postgres fails (a file is then not left).
    Export(ExportArgs),
    /// Load-test a running quotad's consume, against the raw-Redis ceiling in the same run: runs
    /// `quotad-bench` (built beside `quotad`) with these arguments (`quotad bench --help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments for quotad-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Arguments of `quotad reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The period: a month such as `2026-11`, or `lifetime`. Default: the current month (UTC).
    #[arg(long)]
    pub period: Option<String>,
    /// Write the newer side over the older.
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for each Postgres statement, a lock included, in milliseconds (1 to
    /// 3,600,000): past it reconcile stops with exit 2 instead of waiting on a hung or locked
    /// database.
    #[arg(long, default_value_t = 60_000, value_parser = ranged("--timeout-ms", 1..=3_600_000))]
    pub timeout_ms: u64,
    /// Where to connect.
    #[command(flatten)]
    pub config: Config,
}

/// Arguments of `quotad export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The period: a month such as `2026-11` (every period that began in it, UTC), or `lifetime`.
    #[arg(long, value_parser = export_period)]
    pub period: crate::export::ExportPeriod,
    /// `csv` (RFC 4180, with a header line) or `jsonl` (one JSON object per line).
    #[arg(long, default_value = "csv", value_parser = export_format)]
    pub format: crate::export::Format,
    /// Write to this file instead of stdout. It appears whole, or not at all: the rows go to
    /// `<FILE>.part`, renamed when the last is written.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Where to connect (`QUOTAD_DATABASE_URL`), and the plans file (`QUOTAD_PLANS`) that names
    /// the default plan.
    #[command(flatten)]
    pub config: Config,
}

fn export_period(text: &str) -> Result<crate::export::ExportPeriod, String> {
    crate::export::ExportPeriod::parse(text).ok_or_else(|| {
        "use a month such as 2026-11 (four digits, a dash, two digits), or lifetime".to_owned()
    })
}

fn export_format(text: &str) -> Result<crate::export::Format, String> {
    crate::export::Format::parse(text).ok_or_else(|| "use csv or jsonl".to_owned())
}

impl Command {
    /// The configuration every subcommand carries.
    pub fn config(&self) -> &Config {
        match self {
            Command::Serve(c) | Command::Migrate(c) => c,
            Command::Reconcile(r) => &r.config,
            Command::Export(e) => &e.config,
            Command::Bench { .. } => {
                static DEFAULTS: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
                DEFAULTS.get_or_init(Config::defaults)
            }
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for production log pipelines.
    Json,
}

/// Every setting of the daemon.
#[derive(Clone, Args)]
pub struct Config {
    /// HTTP address to listen on.
    #[arg(long, env = "QUOTAD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Redis URL (`redis://host:port/db`), or the seed nodes of a Redis Cluster separated by
    /// commas (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`): quotad asks the first that
    /// answers whether it is a cluster (`INFO cluster`) and talks to it accordingly.
    #[arg(
        long,
        env = "QUOTAD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Postgres URL; the database is created if missing. The default names the user `postgres`,
    /// so it does not depend on `USER` (unset in containers and systemd units, where the driver
    /// would otherwise log in as "anonymous").
    #[arg(
        long,
        env = "QUOTAD_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/quotad"
    )]
    pub database_url: String,
    /// Path of the plans file (TOML); the built-in plans when unset.
    #[arg(long, env = "QUOTAD_PLANS")]
    pub plans: Option<PathBuf>,
    /// First part of every Redis key, so deployments can share one Redis.
    #[arg(long, env = "QUOTAD_KEY_PREFIX", default_value = "q", value_parser = parse_key_prefix)]
    pub key_prefix: String,
    /// How often the flusher writes dirty counters to Postgres, in milliseconds.
    #[arg(long, env = "QUOTAD_FLUSH_INTERVAL_MS", default_value_t = 1000, value_parser = number::<u64>("QUOTAD_FLUSH_INTERVAL_MS"))]
    pub flush_interval_ms: u64,
    /// Comma-separated bearer tokens of the gateway scope.
    #[arg(
        long,
        env = "QUOTAD_GATEWAY_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub gateway_tokens: Vec<String>,
    /// Comma-separated bearer tokens of the admin scope.
    #[arg(
        long,
        env = "QUOTAD_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Vec<String>,
    /// Key that signs usage-page links. Set the same on every replica; when unset, a random key
    /// is made at start-up and links work only on the replica that issued them.
    #[arg(long, env = "QUOTAD_LINK_SECRET", hide_env_values = true)]
    pub link_secret: Option<String>,
    /// Deadline of one Redis call, in milliseconds; past it the type's fail policy decides.
    #[arg(long, env = "QUOTAD_REDIS_TIMEOUT_MS", default_value_t = 100, value_parser = number::<u64>("QUOTAD_REDIS_TIMEOUT_MS"))]
    pub redis_timeout_ms: u64,
    /// Replicas that must confirm a counting call's write before it is answered (`WAIT` sent
    /// with the script, in the same round trip); 0 answers as soon as the master counted. A
    /// count no replica confirmed in time is answered with the type's fail policy and counted in
    /// `quotad_redis_unreplicated_decisions_total`.
    #[arg(long, env = "QUOTAD_REDIS_WAIT_REPLICAS", default_value_t = 0, value_parser = number::<u64>("QUOTAD_REDIS_WAIT_REPLICAS"))]
    pub redis_wait_replicas: u64,
    /// Deadline of one Postgres call on the request path (loading a counter, reading or storing
    /// a plan), in milliseconds, enforced by quotad and by the server (`statement_timeout`,
    /// `lock_timeout`); past it the type's fail policy decides, and plan calls answer 503.
    #[arg(long, env = "QUOTAD_DATABASE_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub database_timeout_ms: u64,
    /// How long shutdown may take to finish requests and flush everything dirty, in milliseconds.
    #[arg(long, env = "QUOTAD_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000, value_parser = number::<u64>("QUOTAD_SHUTDOWN_TIMEOUT_MS"))]
    pub shutdown_timeout_ms: u64,
    /// How long a refusal is answered from memory at most, in milliseconds, when no
    /// invalidation arrives first; 0 turns the refusal cache off.
    #[arg(long, env = "QUOTAD_REFUSAL_CACHE_TTL_MS", default_value_t = 60_000, value_parser = number::<u64>("QUOTAD_REFUSAL_CACHE_TTL_MS"))]
    pub refusal_cache_ttl_ms: u64,
    /// Most users with a refusal remembered; 0 turns the cache off.
    #[arg(long, env = "QUOTAD_REFUSAL_CACHE_USERS", default_value_t = 200_000, value_parser = number::<usize>("QUOTAD_REFUSAL_CACHE_USERS"))]
    pub refusal_cache_users: usize,
    /// Most API requests in flight at once; past it a request is answered 503 `OVERLOADED` at
    /// once (never queued). `/healthz`, `/readyz` and `/metrics` are not counted.
    #[arg(long, env = "QUOTAD_MAX_IN_FLIGHT", default_value_t = 512, value_parser = number::<u64>("QUOTAD_MAX_IN_FLIGHT"))]
    pub max_in_flight: u64,
    /// Deadline of one API request, in milliseconds; past it the client gets 503 `TIMEOUT`.
    /// Must exceed what the request's own Redis and Postgres deadlines add up to.
    #[arg(long, env = "QUOTAD_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = number::<u64>("QUOTAD_REQUEST_TIMEOUT_MS"))]
    pub request_timeout_ms: u64,
    /// How long a connection may take to send a complete request header, counted from when it
    /// opened or its previous answer was sent; so it is also the idle keep-alive timeout.
    #[arg(long, env = "QUOTAD_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = number::<u64>("QUOTAD_HEADER_TIMEOUT_MS"))]
    pub header_timeout_ms: u64,
    /// Most client connections open at once; further ones wait in the listen backlog.
    #[arg(long, env = "QUOTAD_MAX_CONNECTIONS", default_value_t = 1024, value_parser = number::<u64>("QUOTAD_MAX_CONNECTIONS"))]
    pub max_connections: u64,
    /// gRPC address of Envoy's rate-limit service (`ShouldRateLimit`) and of grpc.health.v1;
    /// unset, quotad serves no gRPC.
    #[arg(long, env = "QUOTAD_GRPC_LISTEN", value_parser = socket_addr("QUOTAD_GRPC_LISTEN"))]
    pub grpc_listen: Option<SocketAddr>,
    /// The rate-limit domain quotad answers; a request for another is refused.
    #[arg(long, env = "QUOTAD_GRPC_DOMAIN", default_value = "quotad")]
    pub grpc_domain: String,
    /// Descriptor entry key whose value is the user (a UUID).
    #[arg(long, env = "QUOTAD_GRPC_USER_KEY", default_value = "user_id")]
    pub grpc_user_key: String,
    /// Descriptor entry key whose value is the usage type.
    #[arg(long, env = "QUOTAD_GRPC_TYPE_KEY", default_value = "usage_type")]
    pub grpc_type_key: String,
    /// Descriptor entry key whose value, when present, is the idempotency key.
    #[arg(
        long,
        env = "QUOTAD_GRPC_IDEMPOTENCY_KEY",
        default_value = "idempotency_key"
    )]
    pub grpc_idempotency_key: String,
    /// Comma-separated webhook URLs (`http://`) that every usage event is POSTed to, signed as
    /// Standard Webhooks specifies; unset, events are recorded in Postgres' outbox and not sent.
    #[arg(long, env = "QUOTAD_WEBHOOK_URLS", value_delimiter = ',')]
    pub webhook_urls: Vec<String>,
    /// The webhook signing secret, `whsec_` and the base64 of 24 to 64 random bytes; required
    /// with `QUOTAD_WEBHOOK_URLS`.
    #[arg(long, env = "QUOTAD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Deadline of one webhook attempt (connect, send, answer), in milliseconds.
    #[arg(long, env = "QUOTAD_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000, value_parser = number::<u64>("QUOTAD_WEBHOOK_TIMEOUT_MS"))]
    pub webhook_timeout_ms: u64,
    /// Delay before a failed webhook attempt is retried, in milliseconds; it doubles after
    /// every further failure, up to an hour.
    #[arg(long, env = "QUOTAD_WEBHOOK_RETRY_MS", default_value_t = 5_000, value_parser = number::<u64>("QUOTAD_WEBHOOK_RETRY_MS"))]
    pub webhook_retry_ms: u64,
    /// Attempts of one delivery before it is marked failed (and waits for a redelivery).
    #[arg(long, env = "QUOTAD_WEBHOOK_MAX_ATTEMPTS", default_value_t = 20, value_parser = number::<u64>("QUOTAD_WEBHOOK_MAX_ATTEMPTS"))]
    pub webhook_max_attempts: u64,
    /// How long the outbox keeps a usage event, in days: older events none of whose deliveries
    /// is still pending are deleted (with their deliveries) once an hour. At least 40, so an
    /// event outlives the period it is about (a month, and the time its counter stays in Redis).
    #[arg(long, env = "QUOTAD_EVENT_RETENTION_DAYS", default_value_t = 90, value_parser = number::<u64>("QUOTAD_EVENT_RETENTION_DAYS"))]
    pub event_retention_days: u64,
    /// tracing filter, e.g. `info` or `quotad=debug`.
    #[arg(long, env = "QUOTAD_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(long, env = "QUOTAD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The configuration as if no flag and no variable were given.
    pub fn defaults() -> Config {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        Only::parse_from(["quotad"]).config
    }

    /// Gateway tokens, blanks dropped.
    pub fn gateway_tokens(&self) -> impl Iterator<Item = &str> {
        self.gateway_tokens
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
    }

    /// Admin tokens, blanks dropped.
    pub fn admin_tokens(&self) -> impl Iterator<Item = &str> {
        self.admin_tokens
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
    }

    /// Whether any token is configured; without one quotad serves loopback only.
    pub fn auth_enabled(&self) -> bool {
        self.gateway_tokens().next().is_some() || self.admin_tokens().next().is_some()
    }

    /// The Redis call deadline.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// The deadline of one Postgres call on the request path.
    pub fn database_timeout(&self) -> Duration {
        Duration::from_millis(self.database_timeout_ms)
    }

    /// The flush interval.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    /// The refusal-cache TTL.
    pub fn refusal_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.refusal_cache_ttl_ms)
    }

    /// The shutdown bound.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The deadline of one API request.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// How long the outbox keeps a usage event (`QUOTAD_EVENT_RETENTION_DAYS`).
    pub fn event_retention(&self) -> chrono::Duration {
        chrono::Duration::days(self.event_retention_days as i64)
    }

    /// The header-read (and keep-alive idle) timeout.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// Every numeric setting with its value and the range it must be in. Values outside are
    /// refused at start: a huge interval or deadline would overflow an `Instant` and panic a
    /// task at run time instead.
    fn ranges(&self) -> [(&'static str, u64, RangeInclusive<u64>); 15] {
        [
            (
                "QUOTAD_EVENT_RETENTION_DAYS",
                self.event_retention_days,
                40..=36_500,
            ),
            (
                "QUOTAD_WEBHOOK_TIMEOUT_MS",
                self.webhook_timeout_ms,
                100..=60_000,
            ),
            (
                "QUOTAD_WEBHOOK_RETRY_MS",
                self.webhook_retry_ms,
                10..=3_600_000,
            ),
            (
                "QUOTAD_WEBHOOK_MAX_ATTEMPTS",
                self.webhook_max_attempts,
                1..=100,
            ),
            (
                "QUOTAD_REDIS_WAIT_REPLICAS",
                self.redis_wait_replicas,
                0..=16,
            ),
            (
                "QUOTAD_DATABASE_TIMEOUT_MS",
                self.database_timeout_ms,
                1..=60_000,
            ),
            (
                "QUOTAD_FLUSH_INTERVAL_MS",
                self.flush_interval_ms,
                1..=3_600_000,
            ),
            ("QUOTAD_REDIS_TIMEOUT_MS", self.redis_timeout_ms, 1..=60_000),
            (
                "QUOTAD_SHUTDOWN_TIMEOUT_MS",
                self.shutdown_timeout_ms,
                100..=600_000,
            ),
            (
                "QUOTAD_REFUSAL_CACHE_TTL_MS",
                self.refusal_cache_ttl_ms,
                0..=3_600_000,
            ),
            (
                "QUOTAD_REFUSAL_CACHE_USERS",
                self.refusal_cache_users as u64,
                0..=10_000_000,
            ),
            ("QUOTAD_MAX_IN_FLIGHT", self.max_in_flight, 1..=100_000),
            (
                "QUOTAD_REQUEST_TIMEOUT_MS",
                self.request_timeout_ms,
                100..=600_000,
            ),
            (
                "QUOTAD_HEADER_TIMEOUT_MS",
                self.header_timeout_ms,
                100..=600_000,
            ),
            (
                "QUOTAD_MAX_CONNECTIONS",
                self.max_connections,
                1..=1_000_000,
            ),
        ]
    }

    /// Refuses settings that parse but must not run: a number out of its range, a request
    /// deadline its own Redis and Postgres deadlines do not fit in, an open listener without
    /// tokens.
    pub fn validate(&self) -> Result<(), String> {
        for (var, value, range) in self.ranges() {
            if !range.contains(&value) {
                return Err(format!(
                    "{var}={value} is out of range: use {} to {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        // A consume may take three Redis calls (the script, a hydrate, the script again) and a
        // Postgres read in between; the request deadline must let all of them run to their own
        // deadlines, so that their fail policy answers, not a bare TIMEOUT.
        let needed = 3 * self.redis_timeout_ms + self.database_timeout_ms;
        if self.request_timeout_ms <= needed {
            return Err(format!(
                "QUOTAD_REQUEST_TIMEOUT_MS={} must be over {needed} (3 x QUOTAD_REDIS_TIMEOUT_MS={} for the Redis calls of a consume, plus QUOTAD_DATABASE_TIMEOUT_MS={} for its Postgres read)",
                self.request_timeout_ms, self.redis_timeout_ms, self.database_timeout_ms
            ));
        }
        self.validate_grpc()?;
        self.webhooks()?;
        if !self.auth_enabled() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "QUOTAD_LISTEN={} is not a loopback address, but no token is configured: set QUOTAD_GATEWAY_TOKENS and/or QUOTAD_ADMIN_TOKENS, or listen on 127.0.0.1",
                self.listen
            ));
        }
        Ok(())
    }

    /// The webhook settings, checked; `None` when no URL is set.
    pub fn webhooks(&self) -> Result<Option<crate::webhooks::Webhooks>, String> {
        crate::webhooks::Webhooks::from_settings(
            &self.webhook_urls,
            self.webhook_secret.as_deref(),
            Duration::from_millis(self.webhook_timeout_ms),
            Duration::from_millis(self.webhook_retry_ms),
            self.webhook_max_attempts as u32,
        )
    }

    /// The gRPC names: a domain and three distinct descriptor keys, each 1 to 255 characters
    /// without control characters; and no open gRPC listener without tokens.
    fn validate_grpc(&self) -> Result<(), String> {
        let names = [
            ("QUOTAD_GRPC_DOMAIN", &self.grpc_domain),
            ("QUOTAD_GRPC_USER_KEY", &self.grpc_user_key),
            ("QUOTAD_GRPC_TYPE_KEY", &self.grpc_type_key),
            ("QUOTAD_GRPC_IDEMPOTENCY_KEY", &self.grpc_idempotency_key),
        ];
        for (var, value) in names {
            if value.is_empty()
                || value.chars().count() > 255
                || value.chars().any(char::is_control)
            {
                return Err(format!(
                    "{var}={value:?} must be 1 to 255 characters, none of them a control character"
                ));
            }
        }
        // A descriptor entry must say what it is: one key for two meanings is ambiguous.
        let keys = &names[1..];
        for (i, (var, value)) in keys.iter().enumerate() {
            if let Some((other, _)) = keys[i + 1..].iter().find(|(_, v)| v == value) {
                return Err(format!(
                    "{var}={value:?} is also {other}: each descriptor key must be different"
                ));
            }
        }
        if let Some(addr) = self.grpc_listen {
            if !self.auth_enabled() && !addr.ip().is_loopback() {
                return Err(format!(
                    "QUOTAD_GRPC_LISTEN={addr} is not a loopback address, but no token is configured: set QUOTAD_GATEWAY_TOKENS, or listen on 127.0.0.1"
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("database_url", &redact_url(&self.database_url))
            .field("plans", &self.plans)
            .field("key_prefix", &self.key_prefix)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field(
                "gateway_tokens",
                &format_args!("[{} hidden]", self.gateway_tokens().count()),
            )
            .field(
                "admin_tokens",
                &format_args!("[{} hidden]", self.admin_tokens().count()),
            )
            .field(
                "webhook_urls",
                &self
                    .webhook_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "[hidden]"),
            )
            .field("webhook_timeout_ms", &self.webhook_timeout_ms)
            .field("webhook_retry_ms", &self.webhook_retry_ms)
            .field("webhook_max_attempts", &self.webhook_max_attempts)
            .field("event_retention_days", &self.event_retention_days)
            .field(
                "link_secret",
                &self.link_secret.as_ref().map(|_| "[hidden]"),
            )
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_wait_replicas", &self.redis_wait_replicas)
            .field("database_timeout_ms", &self.database_timeout_ms)
            .field("shutdown_timeout_ms", &self.shutdown_timeout_ms)
            .field("refusal_cache_ttl_ms", &self.refusal_cache_ttl_ms)
            .field("refusal_cache_users", &self.refusal_cache_users)
            .field("max_in_flight", &self.max_in_flight)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("grpc_listen", &self.grpc_listen)
            .field("grpc_domain", &self.grpc_domain)
            .field("grpc_user_key", &self.grpc_user_key)
            .field("grpc_type_key", &self.grpc_type_key)
            .field("grpc_idempotency_key", &self.grpc_idempotency_key)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// A parser of a whole number whose error names the environment variable.
fn number<T: FromStr>(var: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone {
    move |s: &str| {
        s.trim()
            .parse()
            .map_err(|_| format!("{var}={s:?} is not a whole number"))
    }
}

/// A parser of a whole number in `range`, whose error names the setting and the range.
fn ranged(
    var: &'static str,
    range: RangeInclusive<u64>,
) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s: &str| {
        let n: u64 = number(var)(s)?;
        if range.contains(&n) {
            Ok(n)
        } else {
            Err(format!(
                "{var}={n} is out of range: use {} to {}",
                range.start(),
                range.end()
            ))
        }
    }
}

/// A parser of a socket address (`127.0.0.1:9090`, `[::1]:9090`) whose error names the variable.
fn socket_addr(var: &'static str) -> impl Fn(&str) -> Result<SocketAddr, String> + Clone {
    move |s: &str| {
        s.trim().parse().map_err(|_| {
            format!("{var}={s:?} is not a socket address: use an IP address and a port, such as 127.0.0.1:9090")
        })
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

fn parse_key_prefix(s: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a key prefix is 1 to 32 letters, digits, '_', '-' or '.' (no ':' or braces, which the key format uses)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_a_local_machine() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.database_url, "postgres://postgres@127.0.0.1:5432/quotad");
        assert_eq!(c.key_prefix, "q");
        assert_eq!(c.flush_interval_ms, 1000);
        assert_eq!(c.redis_timeout_ms, 100);
        assert_eq!(c.database_timeout(), Duration::from_secs(1));
        assert!(!c.auth_enabled());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn an_open_listener_without_tokens_is_refused() {
        let mut c = Config::defaults();
        c.listen = "0.0.0.0:8080".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("QUOTAD_GATEWAY_TOKENS"));
        c.gateway_tokens = vec!["t".into()];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn every_numeric_setting_is_refused_outside_its_range_naming_the_variable() {
        // (variable, lowest accepted, highest accepted, setter)
        type Set = fn(&mut Config, u64);
        let cases: [(&str, u64, u64, Set); 11] = [
            ("QUOTAD_REDIS_WAIT_REPLICAS", 0, 16, |c, v| {
                c.redis_wait_replicas = v
            }),
            ("QUOTAD_DATABASE_TIMEOUT_MS", 1, 60_000, |c, v| {
                c.database_timeout_ms = v;
                c.request_timeout_ms = 600_000;
            }),
            ("QUOTAD_FLUSH_INTERVAL_MS", 1, 3_600_000, |c, v| {
                c.flush_interval_ms = v
            }),
            ("QUOTAD_REDIS_TIMEOUT_MS", 1, 60_000, |c, v| {
                c.redis_timeout_ms = v;
                // Keep the request deadline valid so only the bound under test decides.
                c.request_timeout_ms = 600_000;
            }),
            ("QUOTAD_SHUTDOWN_TIMEOUT_MS", 100, 600_000, |c, v| {
                c.shutdown_timeout_ms = v
            }),
            ("QUOTAD_REFUSAL_CACHE_TTL_MS", 0, 3_600_000, |c, v| {
                c.refusal_cache_ttl_ms = v
            }),
            ("QUOTAD_REFUSAL_CACHE_USERS", 0, 10_000_000, |c, v| {
                c.refusal_cache_users = v as usize
            }),
            ("QUOTAD_MAX_IN_FLIGHT", 1, 100_000, |c, v| {
                c.max_in_flight = v
            }),
            // The lowest is over 3 x 100 (Redis) + 1000 (Postgres), the defaults.
            ("QUOTAD_REQUEST_TIMEOUT_MS", 1_301, 600_000, |c, v| {
                c.request_timeout_ms = v
            }),
            ("QUOTAD_HEADER_TIMEOUT_MS", 100, 600_000, |c, v| {
                c.header_timeout_ms = v
            }),
            ("QUOTAD_MAX_CONNECTIONS", 1, 1_000_000, |c, v| {
                c.max_connections = v
            }),
        ];
        for (var, low, high, set) in cases {
            for ok in [low, high] {
                let mut c = Config::defaults();
                set(&mut c, ok);
                assert!(c.validate().is_ok(), "{var}={ok}: {:?}", c.validate());
            }
            let mut outside = vec![high + 1, u64::MAX];
            if low > 0 {
                outside.push(low - 1);
            }
            for bad in outside {
                let mut c = Config::defaults();
                set(&mut c, bad);
                let err = c.validate().expect_err(&format!("{var}={bad} accepted"));
                assert!(err.starts_with(var), "{var}={bad}: {err}");
            }
        }
    }

    #[test]
    fn the_request_deadline_must_outlast_its_redis_and_postgres_deadlines() {
        let mut c = Config::defaults();
        c.redis_timeout_ms = 2_000;
        c.database_timeout_ms = 2_000;
        c.request_timeout_ms = 8_000; // 3 x 2000 + 2000: no room left
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("QUOTAD_REQUEST_TIMEOUT_MS")
                && err.contains("QUOTAD_REDIS_TIMEOUT_MS")
                && err.contains("QUOTAD_DATABASE_TIMEOUT_MS"),
            "{err}"
        );
        c.request_timeout_ms = 8_001;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_number_that_does_not_parse_names_its_variable() {
        let err = Cli::try_parse_from(["quotad", "serve", "--max-in-flight", "lots"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("QUOTAD_MAX_IN_FLIGHT"), "{err}");
        let err = Cli::try_parse_from(["quotad", "serve", "--redis-timeout-ms=-5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("QUOTAD_REDIS_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = Config::defaults();
        c.database_url = "postgres://app:hunter2@db:5432/quotad".into();
        c.admin_tokens = vec!["s3cret".into()];
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://app:***@db:5432/quotad"),
            "{shown}"
        );
    }

    #[test]
    fn the_database_timeout_is_refused_outside_1_ms_to_60_s() {
        let parse = |v: &str| Cli::try_parse_from(["quotad", "serve", "--database-timeout-ms", v]);
        for bad in ["0", "60001", "-1", "x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let Command::Serve(c) = parse("60000").unwrap().command else {
            panic!("serve")
        };
        assert_eq!(c.database_timeout(), Duration::from_secs(60));
    }

    #[test]
    fn grpc_is_off_by_default_with_envoy_style_descriptor_keys() {
        let c = Config::defaults();
        assert_eq!(c.grpc_listen, None);
        assert_eq!(
            (
                c.grpc_domain.as_str(),
                c.grpc_user_key.as_str(),
                c.grpc_type_key.as_str(),
                c.grpc_idempotency_key.as_str()
            ),
            ("quotad", "user_id", "usage_type", "idempotency_key")
        );
    }

    #[test]
    fn bad_grpc_settings_are_refused_naming_the_variable() {
        let err = Cli::try_parse_from(["quotad", "serve", "--grpc-listen", "localhost"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("QUOTAD_GRPC_LISTEN"), "{err}");
        type Set = fn(&mut Config, String);
        let cases: [(&str, Set); 4] = [
            ("QUOTAD_GRPC_DOMAIN", |c, v| c.grpc_domain = v),
            ("QUOTAD_GRPC_USER_KEY", |c, v| c.grpc_user_key = v),
            ("QUOTAD_GRPC_TYPE_KEY", |c, v| c.grpc_type_key = v),
            ("QUOTAD_GRPC_IDEMPOTENCY_KEY", |c, v| {
                c.grpc_idempotency_key = v
            }),
        ];
        for (var, set) in cases {
            for bad in ["", "user\nid", "tab\there", &"k".repeat(256)] {
                let mut c = Config::defaults();
                set(&mut c, bad.to_owned());
                let err = c.validate().expect_err(&format!("{var}={bad:?} accepted"));
                assert!(err.starts_with(var), "{var}={bad:?}: {err}");
            }
        }
        let mut c = Config::defaults();
        c.grpc_type_key = "user_id".into();
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("QUOTAD_GRPC_USER_KEY") && err.contains("QUOTAD_GRPC_TYPE_KEY"),
            "{err}"
        );
    }

    #[test]
    fn an_open_grpc_listener_without_tokens_is_refused() {
        let mut c = Config::defaults();
        c.grpc_listen = Some("0.0.0.0:9090".parse().unwrap());
        assert!(c.validate().unwrap_err().starts_with("QUOTAD_GRPC_LISTEN"));
        c.gateway_tokens = vec!["t".into()];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn key_prefixes_with_separators_are_refused() {
        assert!(parse_key_prefix("q").is_ok());
        for bad in ["", "a:b", "{x}", "a b"] {
            assert!(parse_key_prefix(bad).is_err(), "{bad}");
        }
    }
}
