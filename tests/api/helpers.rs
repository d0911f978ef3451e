//! Test harness: each test gets its own quotad, in-process on a free port, with its own Redis key
//! prefix and its own Postgres database, and a clock it sets by hand. Servers come from
//! `QUOTAD_TEST_REDIS_URL` / `QUOTAD_TEST_DATABASE_URL` (`deploy/test.sh` sets both); a test that
//! cannot reach them fails with a message saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use quotad::app::App;
use quotad::clock::ManualClock;
use quotad::config::Config;
use quotad::flusher::Flusher;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

pub fn redis_url() -> String {
    std::env::var("QUOTAD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn postgres_url() -> String {
    std::env::var("QUOTAD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

// Test instants are derived from the real clock, never fixed dates: the daemon runs on an
// injected clock, but Redis expires keys (a month's hashes 35 days after the month) by its own,
// so a test dated in the past would see its keys vanish. Every instant a test uses is in the
// current real month or later.

/// The first instant of the month `months` after the current real month (0 = this month).
///
/// "The current real month" is read once per test process, so a run that crosses a month end
/// still sees one month throughout (its instants then lie in the month just ended, which Redis
/// keeps for 35 more days).
pub fn month_start(months: i32) -> DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    static BASE: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let now = Utc::now();
        now.year() * 12 + now.month0() as i32
    });
    let index = base + months;
    Utc.with_ymd_and_hms(
        index.div_euclid(12),
        index.rem_euclid(12) as u32 + 1,
        1,
        0,
        0,
        0,
    )
    .unwrap()
}

/// The 15th of the current real month, noon UTC: the default "now" of a test.
pub fn mid_month() -> DateTime<Utc> {
    month_start(0) + chrono::Duration::days(14) + chrono::Duration::hours(12)
}

/// The period id (`2026-11`) of the month `months` after the current real month.
pub fn period_id(months: i32) -> String {
    month_start(months).format("%Y-%m").to_string()
}

/// The month `months` after the current real month, as a [`quotad::period::Period`] built from the
/// calendar here (not by the code under test).
pub fn month_period(months: i32) -> quotad::period::Period {
    use chrono::Datelike;
    let start = month_start(months);
    quotad::period::Period::Month {
        year: start.year(),
        month: start.month(),
    }
}

/// An instant as quotad writes it in JSON: `2026-11-01T00:00:00Z` (milliseconds when not whole).
pub fn rfc(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// An HTTP answer: status, headers, JSON body (`Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How to start a test daemon.
pub struct Options {
    pub gateway_tokens: Vec<String>,
    pub admin_tokens: Vec<String>,
    pub now: DateTime<Utc>,
    pub redis_url: String,
    /// Share this daemon's Redis prefix and database (a second replica).
    pub replica_of: Option<(String, String)>,
    /// Postgres server URL (no database); the shared test server by default.
    pub postgres_url: String,
    /// How often the flusher runs. Tests flush by hand ([`TestApp::flush`]) unless they set this.
    pub flush_interval_ms: u64,
    /// The shutdown bound.
    pub shutdown_timeout_ms: u64,
    /// A plans file; the built-in plans when `None`.
    pub plans: Option<PathBuf>,
    /// Changes any other setting, last.
    pub tune: fn(&mut Config),
    /// `QUOTAD_REDIS_TIMEOUT_MS`.
    pub redis_timeout_ms: u64,
    /// `QUOTAD_WEBHOOK_URLS` (the secret and the rest: set them in `tune`).
    pub webhook_urls: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateway_tokens: vec![],
            admin_tokens: vec![],
            now: mid_month(),
            redis_url: redis_url(),
            replica_of: None,
            postgres_url: postgres_url(),
            flush_interval_ms: 3_600_000,
            shutdown_timeout_ms: 10_000,
            plans: None,
            tune: |_| {},
            // Generous: a loaded CI machine must not turn a slow answer into a degraded one.
            redis_timeout_ms: 2000,
            webhook_urls: vec![],
        }
    }
}

/// A quotad running in this process.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub prefix: String,
    pub db_name: String,
    pub redis_url: String,
    pub postgres_url: String,
    pub flusher: Flusher,
    pub flush_interval_ms: u64,
    /// The daemon's shared state (its quota service, refusal cache, plans).
    pub state: quotad::http::AppState,
    /// The gRPC address, when the options set `grpc_listen`.
    pub grpc: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<Result<(), quotad::app::RunError>>>,
    owner: bool,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    /// A daemon under the plans file `plans` (written to a temporary file, returned with it: the
    /// daemon reads it again on a reload), with `opts` for the rest.
    pub async fn spawn_with_plans(
        plans: &str,
        opts: Options,
    ) -> (TestApp, tempfile_path::TempPath) {
        let file = tempfile_path::write(plans);
        let app = Self::spawn_with(Options {
            plans: Some(file.to_path_buf()),
            ..opts
        })
        .await;
        (app, file)
    }

    /// A daemon on a Redis server of the test's own, every other option at its default.
    pub async fn spawn_on(redis: &PrivateRedis) -> TestApp {
        Self::spawn_with(Options {
            redis_url: redis.url(),
            ..Options::default()
        })
        .await
    }

    /// The consume script's invocation (unarmed) for one `ai_generation` of `keys`' user in the
    /// current month, with `idempotency_key`, as the request path builds it.
    pub fn consume_invocation(
        &self,
        keys: &quotad::store::UserKeys,
        idempotency_key: Option<&str>,
    ) -> deadpool_redis::redis::ScriptInvocation<'static> {
        let plans = self.state.quota.plans.current();
        let ty = plans.usage_type("ai_generation").unwrap();
        self.state
            .quota
            .store
            .count_invocation(&quotad::store::CountCall {
                mode: quotad::store::Mode::Consume,
                keys,
                usage_type: ty,
                amount: 1,
                period: quotad::period::Period::current(ty.period, self.clock_now()),
                plan_override: None,
                default_plan: &plans.default_plan,
                idempotency_key,
                metadata: &[],
            })
    }

    /// A second daemon on the same Redis prefix and database as this one.
    pub async fn replica(&self) -> TestApp {
        Self::spawn_with(Options {
            replica_of: Some((self.prefix.clone(), self.db_name.clone())),
            redis_url: self.redis_url.clone(),
            postgres_url: self.postgres_url.clone(),
            flush_interval_ms: self.flush_interval_ms,
            now: self.clock_now(),
            ..Options::default()
        })
        .await
    }

    pub fn clock_now(&self) -> DateTime<Utc> {
        use quotad::clock::Clock;
        self.clock.now()
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        let id = Uuid::new_v4().simple().to_string()[..16].to_owned();
        let owner = opts.replica_of.is_none();
        let (prefix, db_name) = opts
            .replica_of
            .unwrap_or_else(|| (format!("t{id}"), format!("quotad_t_{id}")));
        let mut config = Config::defaults();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.redis_url = opts.redis_url.clone();
        config.database_url = format!("{}/{db_name}", opts.postgres_url);
        config.flush_interval_ms = opts.flush_interval_ms;
        config.shutdown_timeout_ms = opts.shutdown_timeout_ms;
        config.key_prefix = prefix.clone();
        config.gateway_tokens = opts.gateway_tokens;
        config.admin_tokens = opts.admin_tokens;
        config.plans = opts.plans;
        config.redis_timeout_ms = opts.redis_timeout_ms;
        config.webhook_urls = opts.webhook_urls;
        (opts.tune)(&mut config);
        let clock = ManualClock::new(opts.now);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let mut daemon =
            App::new(config, Arc::new(clock.clone())).expect("valid test configuration");
        let grpc = daemon.bind_grpc().await.expect("gRPC listener");
        let flusher = daemon.flusher().clone();
        let state = daemon.state().clone();
        let running = tokio::spawn(daemon.run(listener, async {
            let _ = rx.await;
        }));
        let app = TestApp {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            clock,
            prefix,
            db_name,
            redis_url: opts.redis_url,
            postgres_url: opts.postgres_url,
            flusher,
            flush_interval_ms: opts.flush_interval_ms,
            state,
            grpc,
            shutdown: Some(tx),
            running: Some(running),
            owner,
        };
        app.wait_ready().await;
        app
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => last = r.text().await.unwrap_or_default(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "quotad did not become ready within 30 s (Redis {}, Postgres {}); last /readyz: {last}. \
             Start them with deploy/ensure-services.sh.",
            self.redis_url,
            self.postgres_url
        );
    }

    /// Waits until the refusal cache is subscribed to invalidations (and so in use).
    pub async fn wait_refusal_cache_live(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.state.quota.refusals.is_live() {
            assert!(
                Instant::now() < deadline,
                "the refusal cache did not subscribe to invalidations within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs flusher passes until nothing is dirty.
    pub async fn flush(&self) {
        for _ in 0..100 {
            let out = self.flusher.flush_once().await.expect("flush");
            if out.counters == 0 {
                return;
            }
        }
        panic!("still dirty after 100 flush passes");
    }

    /// Stops the daemon as SIGTERM would and returns how its run ended. Its database and keys
    /// stay until the `TestApp` is dropped.
    pub async fn stop(&mut self) -> Result<(), quotad::app::RunError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.running.take().unwrap().await.expect("daemon task")
    }

    pub fn set_now(&self, at: &str) {
        self.clock.set(at.parse().unwrap());
    }

    /// The daemon's `/metrics` text (this process' one recorder: every test's series).
    pub async fn metrics_text(&self) -> String {
        let answer = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(answer.status(), 200, "GET /metrics");
        answer.text().await.expect("/metrics body")
    }

    /// Moves the daemon's clock to `at`.
    pub fn set_at(&self, at: DateTime<Utc>) {
        self.clock.set(at);
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Answer {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("quotad answers");
        Answer::read(resp).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, path, None, None).await
    }

    /// POSTs raw bytes (for malformed bodies).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("quotad answers");
        Answer::read(resp).await
    }

    pub async fn consume(&self, user: Uuid, usage_type: &str) -> Answer {
        self.post(
            "/v1/consume",
            serde_json::json!({"user_id": user, "type": usage_type}),
        )
        .await
    }

    pub async fn used(&self, user: Uuid, usage_type: &str) -> u64 {
        let a = self.get(&format!("/v1/users/{user}/usage")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.body["usage"][usage_type]["used"]
            .as_u64()
            .expect("used is a number")
    }

    pub async fn set_plan(&self, user: Uuid, plan: &str) {
        let a = self
            .send(
                reqwest::Method::PUT,
                &format!("/v1/users/{user}/plan"),
                Some(serde_json::json!({"plan": plan})),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }

    /// A pool on this app's database, for looking at or seeding Postgres directly.
    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&format!("{}/{}", self.postgres_url, self.db_name))
            .await
            .expect("test database")
    }

    /// A Redis connection to this app's Redis.
    pub async fn redis(&self) -> deadpool_redis::redis::aio::MultiplexedConnection {
        deadpool_redis::redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("test redis")
    }
}

impl Answer {
    pub async fn read(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if !self.owner {
            return;
        }
        // Clean up on a thread of its own: Drop cannot await, and this runs on panics too.
        let (prefix, db_name, redis_url, pg) = (
            self.prefix.clone(),
            self.db_name.clone(),
            self.redis_url.clone(),
            self.postgres_url.clone(),
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(2))
                    .connect(&format!("{pg}/postgres"))
                    .await
                {
                    // The name is made by this harness: letters, digits and underscores only.
                    let sql = format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
                if let Ok(client) = deadpool_redis::redis::Client::open(redis_url.as_str()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = deadpool_redis::redis::cmd("KEYS")
                            .arg(format!("{prefix}:*"))
                            .query_async(&mut c)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: Result<i64, _> = deadpool_redis::redis::cmd("DEL")
                                .arg(keys)
                                .query_async(&mut c)
                                .await;
                        }
                    }
                }
            })
        })
        .join();
    }
}

/// A redis-server of the test's own on a free port, killed on drop: for outage tests.
pub struct PrivateRedis {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    /// Extra `redis-server` arguments, kept across restarts.
    args: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        Self::start_with(&[])
    }

    /// Started with extra `redis-server` arguments (`["--key-load-delay", "50"]`).
    pub fn start_with(args: &[&str]) -> PrivateRedis {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("quotad-redis-{port}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = Self::launch(port, &dir, &args);
        PrivateRedis {
            port,
            child,
            dir,
            args,
        }
    }

    /// Starts it again on the same port: empty, unless a `SAVE` left a dump in its folder (it
    /// saves nothing by itself).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::launch(self.port, &self.dir, &self.args);
    }

    /// Stops the server (SIGSTOP): it holds its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT); it then runs what was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} redis-server");
    }

    /// Runs one command on a connection of its own (so a blocked connection cannot hold it up),
    /// e.g. `["CONFIG", "SET", "maxmemory", "1mb"]`.
    pub async fn call<T: deadpool_redis::redis::FromRedisValue>(
        &self,
        args: &[&str],
    ) -> deadpool_redis::redis::RedisResult<T> {
        let client = deadpool_redis::redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = deadpool_redis::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// One field of `INFO` (`"used_memory"`, `"loading"`).
    pub async fn info(&self, field: &str) -> String {
        let info: String = self.call(&["INFO"]).await.expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("INFO has no {field}"))
            .trim()
            .to_owned()
    }

    fn launch(port: u16, dir: &std::path::Path, args: &[String]) -> Child {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (deploy/ensure-services.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server on port {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The folder it saves in (its working directory).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL server of the test's own (initdb in a temporary folder, on a free port), for
/// outage tests: stop it, start it, kill it. Removed on drop.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (deploy/ensure-services.sh installs them)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("quotad-pg-{port}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = PrivatePostgres { port, dir, bin };
        // initdb and the server refuse to run as root; run them as the postgres user then.
        if is_root() {
            run(Command::new("chown").arg("postgres:postgres").arg(&pg.dir));
        }
        run(pg
            .as_owner("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(pg.dir.join("data")));
        pg.resume();
        pg
    }

    fn as_owner(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts (or starts again) the server and waits until it accepts connections.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        run(self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"]));
    }

    /// Stops the server: `fast` ends sessions cleanly, `immediate` is a crash.
    pub fn stop(&self, mode: &str) {
        run(self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "stop"]));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a load run saw, per user: answers allowed and counted, refused, and anything else.
#[derive(Debug, Default, Clone)]
pub struct LoadTally {
    pub allowed: std::collections::HashMap<Uuid, u64>,
    pub refused: u64,
    pub degraded: u64,
    pub failed: u64,
}

impl LoadTally {
    pub fn total_allowed(&self) -> u64 {
        self.allowed.values().sum()
    }
}

/// `clients` concurrent clients, each sending consumes one after another for `users` (round
/// robin) to `base` until `stop` is set or `limit` passes. Bounded in time; stops by itself.
pub async fn consume_load(
    base: String,
    users: Vec<Uuid>,
    usage_type: &'static str,
    clients: usize,
    limit: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> LoadTally {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + limit;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (base, users, stop) = (base.clone(), users.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut tally = LoadTally::default();
                let mut i = c;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let user = users[i % users.len()];
                    i += clients;
                    let sent = client
                        .post(format!("{base}/v1/consume"))
                        .json(&serde_json::json!({"user_id": user, "type": usage_type}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            match (status, body["degraded"].as_bool()) {
                                (200, Some(true)) => tally.degraded += 1,
                                (200, _) => *tally.allowed.entry(user).or_default() += 1,
                                (402, _) => tally.refused += 1,
                                _ => tally.failed += 1,
                            }
                        }
                        Err(_) => {
                            tally.failed += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = LoadTally::default();
    for t in tasks {
        let t = t.await.unwrap();
        for (u, n) in t.allowed {
            *all.allowed.entry(u).or_default() += n;
        }
        all.refused += t.refused;
        all.degraded += t.degraded;
        all.failed += t.failed;
    }
    all
}

/// Postgres' totals of `usage_type` per user, in the database at `url`.
pub async fn postgres_totals(url: &str, usage_type: &str) -> std::collections::HashMap<Uuid, u64> {
    let pool = sqlx::PgPool::connect(url).await.expect("test database");
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT user_id, count FROM usage_tracking WHERE type = $1")
            .bind(usage_type)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.into_iter().map(|(u, c)| (u, c as u64)).collect()
}

/// The real `quotad` binary as a child process, with its own port, key prefix and database
/// (unless the caller names them), its output in a file. Killed on drop; the owner of the
/// database drops it.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub prefix: String,
    pub db_name: String,
    pub postgres_url: String,
    owner: bool,
}

impl Daemon {
    /// Starts a daemon with `vars` set on top of test defaults (shared Redis and Postgres, a
    /// fresh prefix and database, a 50 ms flush interval).
    pub fn spawn(vars: &[(&str, String)]) -> Daemon {
        let id = Uuid::new_v4().simple().to_string()[..16].to_owned();
        let get = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        let prefix = get("QUOTAD_KEY_PREFIX").unwrap_or(format!("t{id}"));
        let owner = get("QUOTAD_DATABASE_URL").is_none();
        let postgres_url = get("QUOTAD_TEST_POSTGRES").unwrap_or_else(postgres_url);
        let db_name = format!("quotad_t_{id}");
        let port = free_port();
        let log = std::env::temp_dir().join(format!("quotad-{id}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotad"));
        cmd.arg("serve")
            .env("QUOTAD_LISTEN", format!("127.0.0.1:{port}"))
            .env("QUOTAD_REDIS_URL", redis_url())
            .env("QUOTAD_DATABASE_URL", format!("{postgres_url}/{db_name}"))
            .env("QUOTAD_KEY_PREFIX", &prefix)
            .env("QUOTAD_FLUSH_INTERVAL_MS", "50")
            .env("QUOTAD_REDIS_TIMEOUT_MS", "2000")
            .env_remove("QUOTAD_GATEWAY_TOKENS")
            .env_remove("QUOTAD_ADMIN_TOKENS")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit());
        for (k, v) in vars.iter().filter(|(k, _)| *k != "QUOTAD_TEST_POSTGRES") {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("quotad binary starts");
        let db_name = get("QUOTAD_DATABASE_URL")
            .map_or(db_name, |u| u.rsplit('/').next().unwrap().to_owned());
        Daemon {
            child,
            port,
            log,
            prefix,
            db_name,
            postgres_url,
            owner,
        }
    }

    /// Another daemon on this one's prefix and database.
    pub fn replica(&self) -> Daemon {
        Daemon::spawn(&[
            ("QUOTAD_KEY_PREFIX", self.prefix.clone()),
            ("QUOTAD_DATABASE_URL", self.database_url()),
            ("QUOTAD_TEST_POSTGRES", self.postgres_url.clone()),
        ])
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.postgres_url, self.db_name)
    }

    /// A plain HTTP/1.1 GET (no async runtime needed): status and JSON body.
    pub fn get(&self, path: &str) -> Option<(u16, Value)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1)?;
        Some((status, serde_json::from_str(body).unwrap_or_default()))
    }

    pub fn wait_for(&self, what: &str, mut ok: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_ready(&self) {
        self.wait_for("readiness", |d| {
            d.get("/readyz").is_some_and(|(s, _)| s == 200)
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`-TERM`, `-KILL`, `-HUP`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to end, at most `limit`; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        if self.owner {
            drop_database(&self.postgres_url, &self.db_name);
        }
    }
}

/// Drops database `name` on the Postgres server at `server`, ending its sessions; best effort.
pub fn drop_database(server: &str, name: &str) {
    let _ = Command::new("psql")
        .arg(format!("{server}/postgres"))
        .args([
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The built-in plans with FREE's `ai_generation` limit set to `free_ai_limit`, in a temp file.
pub fn plans_file(free_ai_limit: &str) -> tempfile_path::TempPath {
    let text = quotad::plans::BUILT_IN.replace(
        "ai_generation = 50",
        &format!("ai_generation = {free_ai_limit}"),
    );
    tempfile_path::write(&text)
}

/// A file in the temp dir, removed on drop.
pub mod tempfile_path {
    use std::path::PathBuf;

    pub struct TempPath(pub PathBuf);

    impl std::ops::Deref for TempPath {
        type Target = std::path::Path;
        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub fn write(text: &str) -> TempPath {
        let path = std::env::temp_dir().join(format!(
            "quotad-plans-{}.toml",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text).unwrap();
        TempPath(path)
    }

    pub fn rewrite(path: &TempPath, text: &str) {
        std::fs::write(&path.0, text).unwrap();
    }
}

/// A `usage_tracking` row, written straight into a test's database (past periods, periods with
/// other bounds than calendar months, metadata).
pub struct UsageRow {
    pub user: Uuid,
    pub usage_type: &'static str,
    pub count: i64,
    pub overage: i64,
    pub start: DateTime<Utc>,
    /// `None` for a lifetime row.
    pub end: Option<DateTime<Utc>>,
    pub metadata: Value,
}

impl UsageRow {
    /// The calendar month `months` after the current real month.
    pub fn month(user: Uuid, usage_type: &'static str, months: i32, count: i64) -> UsageRow {
        UsageRow::from(
            user,
            usage_type,
            month_start(months),
            month_start(months + 1),
            count,
        )
    }

    /// A period from `start` to `end`.
    pub fn from(
        user: Uuid,
        usage_type: &'static str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        count: i64,
    ) -> UsageRow {
        UsageRow {
            user,
            usage_type,
            count,
            overage: 0,
            start,
            end: Some(end),
            metadata: serde_json::json!({}),
        }
    }

    pub async fn insert(&self, db: &sqlx::PgPool) {
        sqlx::query(
            "INSERT INTO usage_tracking (user_id, type, count, overage, period_start, period_end, metadata, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1)",
        )
        .bind(self.user)
        .bind(self.usage_type)
        .bind(self.count)
        .bind(self.overage)
        .bind(self.start)
        .bind(self.end)
        .bind(&self.metadata)
        .execute(db)
        .await
        .expect("seed a usage_tracking row");
    }
}

/// The start of a user's "anniversary" month: the 15th, 09:30 UTC, of the month `months` after
/// the current real month.
pub fn anniversary(months: i32) -> DateTime<Utc> {
    month_start(months) + chrono::Duration::days(14) + chrono::Duration::minutes(9 * 60 + 30)
}
