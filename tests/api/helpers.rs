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
use quotad::clock::ManualClock;
use quotad::config::Config;
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

/// 15 November 2026, noon UTC: the default "now" of a test.
pub fn mid_november() -> DateTime<Utc> {
    "2026-11-15T12:00:00Z".parse().unwrap()
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateway_tokens: vec![],
            admin_tokens: vec![],
            now: mid_november(),
            redis_url: redis_url(),
            replica_of: None,
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
    shutdown: Option<oneshot::Sender<()>>,
    owner: bool,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    /// A second daemon on the same Redis prefix and database as this one.
    pub async fn replica(&self) -> TestApp {
        Self::spawn_with(Options {
            replica_of: Some((self.prefix.clone(), self.db_name.clone())),
            redis_url: self.redis_url.clone(),
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
        config.database_url = format!("{}/{db_name}", postgres_url());
        config.key_prefix = prefix.clone();
        config.gateway_tokens = opts.gateway_tokens;
        config.admin_tokens = opts.admin_tokens;
        // Generous: a loaded CI machine must not turn a slow answer into a degraded one.
        config.redis_timeout_ms = 2000;
        let clock = ManualClock::new(opts.now);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(quotad::app::run(
            config,
            Arc::new(clock.clone()),
            listener,
            async {
                let _ = rx.await;
            },
        ));
        let app = TestApp {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            clock,
            prefix,
            db_name,
            redis_url: opts.redis_url,
            shutdown: Some(tx),
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
            postgres_url()
        );
    }

    pub fn set_now(&self, at: &str) {
        self.clock.set(at.parse().unwrap());
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
        sqlx::PgPool::connect(&format!("{}/{}", postgres_url(), self.db_name))
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
    async fn read(resp: reqwest::Response) -> Answer {
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
        let (prefix, db_name, redis_url) = (
            self.prefix.clone(),
            self.db_name.clone(),
            self.redis_url.clone(),
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(pool) =
                    sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await
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
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("quotad-redis-{port}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::launch(port, &dir);
        PrivateRedis { port, child, dir }
    }

    /// Starts it again on the same port, empty (it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::launch(self.port, &self.dir);
    }

    fn launch(port: u16, dir: &std::path::Path) -> Child {
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
