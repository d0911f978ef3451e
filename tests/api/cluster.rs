//! quotad on a real Redis Cluster of the test's own: six `redis-server --cluster-enabled yes`
//! processes on loopback ports (three masters, three replicas), joined with
//! `redis-cli --cluster create … --cluster-replicas 1` and killed when the test ends. Each test
//! starts its own cluster, since most of them break it (failover, resharding).

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{free_port, month_start, period_id, Options, PrivateRedis, TestApp};

/// Node timeout of the test clusters: a master unreachable this long is failed over.
const NODE_TIMEOUT_MS: u64 = 1000;

struct TestCluster {
    nodes: Vec<PrivateRedis>,
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    /// For a replica, its master's id.
    of: String,
}

impl TestCluster {
    /// Six nodes joined into three masters with a replica each; waits until every node sees the
    /// cluster whole and every replica is in sync.
    async fn start() -> TestCluster {
        let nodes: Vec<PrivateRedis> = (0..6)
            .map(|_| {
                let bus = free_port().to_string();
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    "--cluster-port",
                    &bus,
                    // Slots of a failed master are refused until its replica takes over; the
                    // other masters keep serving theirs (the README's advice for quotad).
                    "--cluster-require-full-coverage",
                    "no",
                    // A replica may always take over, however long since it heard from its
                    // master: the replication tests stop one on purpose.
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (deploy/ensure-services.sh installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = TestCluster { nodes };
        cluster.wait_whole(&[]).await;
        cluster
    }

    /// The seed URLs quotad is given: three of the six nodes, comma-separated.
    fn seeds(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node(&self, port: u16) -> &PrivateRedis {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    fn node_mut(&mut self, port: u16) -> &mut PrivateRedis {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }

    /// `CLUSTER NODES`, as node `via` sees it.
    async fn topology(&self, via: u16) -> Vec<Node> {
        let text: String = self
            .node(via)
            .call(&["CLUSTER", "NODES"])
            .await
            .expect("CLUSTER NODES");
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit_once(':')?
                    .1
                    .parse()
                    .ok()?;
                Some(Node {
                    id: f[0].to_owned(),
                    port,
                    master: f[2].contains("master"),
                    failed: f[2].contains("fail"),
                    of: f[3].to_owned(),
                })
            })
            .collect()
    }

    /// Waits until every live node but `dead` reports `cluster_state:ok`, three masters that
    /// are not failed, and every replica of a live master has its link up.
    async fn wait_whole(&self, dead: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut whole = true;
            for n in self.nodes.iter().filter(|n| !dead.contains(&n.port)) {
                let info: String = n.call(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                whole &= info.contains("cluster_state:ok");
                let repl: String = n.call(&["INFO", "replication"]).await.unwrap_or_default();
                if repl.contains("role:slave") {
                    whole &= repl.contains("master_link_status:up");
                }
                let live_masters = self
                    .topology(n.port)
                    .await
                    .iter()
                    .filter(|m| m.master && !m.failed)
                    .count();
                whole &= live_masters == 3;
            }
            if whole {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not become whole within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the master serving `user`'s bucket (a user without an account).
    async fn master_of(&self, user: Uuid) -> u16 {
        let tag = format!("{{{}}}", quotad::store::keys::bucket(&user));
        let slot: i64 = self.nodes[0]
            .call(&["CLUSTER", "KEYSLOT", &tag])
            .await
            .unwrap();
        let slots: Vec<redis::Value> = self.nodes[0].call(&["CLUSTER", "SLOTS"]).await.unwrap();
        for range in slots {
            let range: Vec<redis::Value> = redis::from_redis_value(range).unwrap();
            let lo: i64 = redis::from_redis_value_ref(&range[0]).unwrap();
            let hi: i64 = redis::from_redis_value_ref(&range[1]).unwrap();
            if (lo..=hi).contains(&slot) {
                let master: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).unwrap();
                let port: i64 = redis::from_redis_value_ref(&master[1]).unwrap();
                return port as u16;
            }
        }
        panic!("slot {slot} is served by no master");
    }

    /// `n` new users on each master, by master port.
    async fn users_per_master(&self, n: usize) -> HashMap<u16, Vec<Uuid>> {
        let mut by: HashMap<u16, Vec<Uuid>> = HashMap::new();
        while by.len() < 3 || by.values().any(|v| v.len() < n) {
            let u = Uuid::new_v4();
            let m = self.master_of(u).await;
            let list = by.entry(m).or_default();
            if list.len() < n {
                list.push(u);
            }
        }
        by
    }

    /// The replica of the master at `port`.
    async fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.topology(port).await;
        let id = &nodes.iter().find(|n| n.port == port).unwrap().id;
        nodes.iter().find(|n| &n.of == id).unwrap().port
    }
}

async fn daemon_on(cluster: &TestCluster, tune: fn(&mut quotad::config::Config)) -> TestApp {
    TestApp::spawn_with(Options {
        redis_url: cluster.seeds(),
        tune,
        ..Options::default()
    })
    .await
}

/// Flusher passes until nothing is dirty, going on after a failed pass (the first pass after a
/// failover can meet a node that is gone, as the flusher's own next pass would).
async fn flush_through(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match app.flusher.flush_once().await {
            Ok(out) if out.counters == 0 => return,
            Ok(_) => {}
            Err(e) => {
                eprintln!("flush failed: {e}");
                assert!(Instant::now() < deadline, "flush still failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What Postgres holds for `user`'s `ty` this month.
async fn stored(app: &TestApp, user: Uuid, ty: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(SUM(count), 0)::bigint FROM usage_tracking WHERE user_id = $1 AND type = $2 AND period_start = $3",
    )
    .bind(user)
    .bind(ty)
    .bind(month_start(0))
    .fetch_one(&app.db().await)
    .await
    .unwrap()
}

#[tokio::test]
async fn several_urls_of_servers_that_are_no_cluster_are_refused_with_a_sentence() {
    let (a, b) = (PrivateRedis::start(), PrivateRedis::start());
    let store = quotad::store::RedisStore::new(
        &format!("{},{}", a.url(), b.url()),
        "tnocluster",
        Duration::from_millis(500),
    )
    .unwrap();
    let e = store.ping().await.unwrap_err().to_string();
    assert!(
        e.contains("not a Redis Cluster") && e.contains("give one URL"),
        "{e}"
    );
    assert!(store.topology().is_none(), "nothing was taken for granted");
    // One URL of the same server is a single Redis, as ever.
    let single =
        quotad::store::RedisStore::new(&a.url(), "tnocluster", Duration::from_millis(500)).unwrap();
    single.ping().await.unwrap();
    let t = single.topology().unwrap();
    assert_eq!((t.mode, t.masters), ("single", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_seed_checklist_holds_on_a_cluster_with_users_on_every_master() {
    let cluster = TestCluster::start().await;
    // The first seed is down: quotad asks the next.
    let app = TestApp::spawn_with(Options {
        redis_url: format!("redis://127.0.0.1:{},{}", free_port(), cluster.seeds()),
        ..Options::default()
    })
    .await;

    // quotad found the cluster by itself, from three seed URLs.
    let ready = app.get("/readyz").await;
    assert_eq!(
        (&ready.body["redis_mode"], &ready.body["redis_masters"]),
        (&json!("cluster"), &json!(3)),
        "{:?}",
        ready.body
    );
    assert!(
        app.metrics_text()
            .await
            .contains("quotad_redis_masters{mode=\"cluster\"} 3"),
        "the masters gauge"
    );

    let users = cluster.users_per_master(1).await;
    for (master, users) in &users {
        let user = users[0];
        // 50 allowed, the 51st refused with the upgrade link.
        for i in 1..=50 {
            let a = app.consume(user, "ai_generation").await;
            assert_eq!(
                a.status, 200,
                "consume {i} of a user on {master}: {:?}",
                a.body
            );
        }
        let refused = app.consume(user, "ai_generation").await;
        assert_eq!(refused.status, 402, "{:?}", refused.body);
        assert_eq!(refused.body["code"], "USAGE_LIMIT_EXCEEDED");
        assert_eq!(
            (&refused.body["used"], &refused.body["limit"]),
            (&json!(50), &json!(50))
        );
    }

    // PRO is unlimited.
    let pro = users.values().next().unwrap()[0];
    app.set_plan(pro, "PRO").await;
    for _ in 0..5 {
        assert_eq!(app.consume(pro, "ai_generation").await.status, 200);
    }

    // Idempotency and refund, on a user of another master.
    let keyed = *users.values().nth(1).unwrap().first().unwrap();
    let body = json!({"user_id": keyed, "type": "export", "idempotency_key": "exp-1"});
    let first = app.post("/v1/consume", body.clone()).await;
    let again = app.post("/v1/consume", body).await;
    assert_eq!((first.status, again.status), (200, 200));
    assert_eq!(
        (&first.body["used"], &again.body["used"]),
        (&json!(1), &json!(1))
    );
    let refund = app
        .post(
            "/v1/refund",
            json!({"user_id": keyed, "idempotency_key": "exp-1"}),
        )
        .await;
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(app.used(keyed, "export").await, 0);

    // check, track and release.
    let third = users.values().nth(2).unwrap()[0];
    let check = app
        .post(
            "/v1/check",
            json!({"user_id": third, "type": "ai_generation"}),
        )
        .await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    assert_eq!(check.body["allowed"], json!(false), "{:?}", check.body);
    let track = app
        .post(
            "/v1/track",
            json!({"user_id": third, "type": "kb_file", "amount": 3}),
        )
        .await;
    assert_eq!(track.status, 200, "{:?}", track.body);
    let release = app
        .post(
            "/v1/release",
            json!({"user_id": third, "type": "kb_file", "amount": 1}),
        )
        .await;
    assert_eq!(release.status, 200, "{:?}", release.body);
    assert_eq!(app.used(third, "kb_file").await, 2);

    // 200 concurrent consumes for one new user: exactly 50 allowed.
    let hot = Uuid::new_v4();
    let answers =
        futures::future::join_all((0..200).map(|_| app.consume(hot, "ai_generation"))).await;
    let allowed = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers.iter().filter(|a| a.status == 402).count();
    assert_eq!((allowed, refused), (50, 150));

    // The flusher walks every bucket's dirty set on whichever master owns it.
    app.flush().await;
    for users in users.values() {
        let u = users[0];
        let want = if u == pro { 55 } else { 50 };
        assert_eq!(stored(&app, u, "ai_generation").await, want, "user {u}");
    }
    assert_eq!(stored(&app, hot, "ai_generation").await, 50);
    assert_eq!(
        stored(&app, third, "kb_file").await,
        0,
        "lifetime rows are not this month's"
    );

    // Reconcile scans every master: everything is in sync.
    let report = app
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(report.body["drift"], json!([]), "{:?}", report.body);
    assert!(
        report.body["in_sync"].as_u64().unwrap() >= 5,
        "{:?}",
        report.body
    );

    // A counter set back by hand (a restore of older data) heals from Postgres at the next
    // flush: the user never gets back what they spent.
    let (master, set_back) = users.iter().next().map(|(m, u)| (*m, u[0])).unwrap();
    if set_back != pro {
        let key = format!(
            "{}:1:{{{}}}:c:{}:{}",
            app.prefix,
            quotad::store::keys::bucket(&set_back),
            set_back,
            period_id(0)
        );
        let _: () = cluster
            .node(master)
            .call(&["HSET", &key, "ai_generation", "10", "v", "1"])
            .await
            .unwrap();
        let _: () = cluster
            .node(master)
            .call(&[
                "ZADD",
                &format!(
                    "{}:1:{{{}}}:dirty",
                    app.prefix,
                    quotad::store::keys::bucket(&set_back)
                ),
                "1",
                &format!("{set_back}:{}", period_id(0)),
            ])
            .await
            .unwrap();
        app.flush().await;
        assert_eq!(app.used(set_back, "ai_generation").await, 50);
        assert_eq!(app.consume(set_back, "ai_generation").await.status, 402);
        assert!(
            app.metrics_text()
                .await
                .lines()
                .any(|l| l.starts_with("quotad_flush_behind_counters_total") && !l.ends_with(" 0")),
            "the healing is counted"
        );
    }

    // One master that could evict counters stops quotad, as a single Redis would: /readyz names
    // the policy until that master is noeviction again (checked every 5 s).
    let evicting = *users.keys().max().unwrap();
    let policy = |p: &'static str| {
        let node = cluster.node(evicting);
        async move {
            let _: () = node
                .call(&["CONFIG", "SET", "maxmemory-policy", p])
                .await
                .unwrap();
        }
    };
    let readyz_until = |ok: bool| {
        let app = &app;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let r = app.get("/readyz").await;
                if (r.status == 200) == ok {
                    return r;
                }
                assert!(Instant::now() < deadline, "/readyz stayed {:?}", r.body);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    policy("allkeys-lru").await;
    let refused = readyz_until(false).await;
    assert!(
        refused.body["redis"]
            .as_str()
            .is_some_and(|r| r.contains("allkeys-lru")),
        "{:?}",
        refused.body
    );
    let not_ready = app.consume(Uuid::new_v4(), "ai_generation").await;
    assert_eq!(
        (not_ready.status, &not_ready.body["code"]),
        (503, &json!("NOT_READY"))
    );
    policy("noeviction").await;
    readyz_until(true).await;

    // A new month starts fresh for every master's users.
    app.set_at(month_start(1) + chrono::Duration::hours(1));
    for users in users.values() {
        let a = app.consume(users[0], "ai_generation").await;
        assert_eq!(
            (a.status, &a.body["used"]),
            (200, &json!(1)),
            "{:?}",
            a.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_daemons_on_one_cluster_count_exactly_and_flush_once() {
    let cluster = TestCluster::start().await;
    let a = daemon_on(&cluster, |_| {}).await;
    let b = a.replica().await;
    let c = a.replica().await;
    let users: Vec<Uuid> = cluster
        .users_per_master(4)
        .await
        .into_values()
        .flatten()
        .collect();
    assert_eq!(users.len(), 12);
    // Every user gets 30 consumes from each daemon at once: 90 asked, 50 allowed.
    let daemons = [&a, &b, &c];
    let answers = futures::future::join_all(users.iter().flat_map(|u| {
        daemons
            .iter()
            .flat_map(move |d| (0..30).map(move |_| d.consume(*u, "ai_generation")))
    }))
    .await;
    let allowed = answers.iter().filter(|x| x.status == 200).count();
    assert_eq!(allowed, 50 * users.len());
    assert!(answers.iter().all(|x| x.status == 200 || x.status == 402));
    // The three flushers run at once; versions keep them from writing twice.
    futures::future::join3(a.flush(), b.flush(), c.flush()).await;
    for u in &users {
        assert_eq!(stored(&a, *u, "ai_generation").await, 50, "user {u}");
    }
    let report = b
        .post("/v1/admin/reconcile", json!({"period": period_id(0)}))
        .await;
    assert_eq!(report.body["drift"], json!([]), "{:?}", report.body);
    assert_eq!(
        report.body["in_sync"],
        json!(users.len()),
        "{:?}",
        report.body
    );
    // Invalidations cross the cluster: b and c remember a refusal; a plan change made through a
    // (its script runs on the user's master and PUBLISHes there) reaches b's and c's
    // subscriptions, which sit on one seed node, for a user of every master.
    b.wait_refusal_cache_live().await;
    c.wait_refusal_cache_live().await;
    let upgraded: Vec<Uuid> = cluster
        .users_per_master(1)
        .await
        .into_values()
        .flatten()
        .collect();
    for u in &upgraded {
        for _ in 0..50 {
            assert_eq!(a.consume(*u, "ai_generation").await.status, 200);
        }
        for d in [&b, &c] {
            assert_eq!(d.consume(*u, "ai_generation").await.status, 402);
        }
        a.set_plan(*u, "PRO").await;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for u in &upgraded {
        for d in [&b, &c] {
            loop {
                let answer = d.consume(*u, "ai_generation").await;
                if answer.status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "a replica still refuses user {u} 2 s after the upgrade: {:?}",
                    answer.body
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One call of a load run: when it ended (since the run began), whose, and how it went.
#[derive(Debug, Clone, Copy)]
struct Call {
    at: Duration,
    master: u16,
    user: Uuid,
    outcome: u16,
}

/// One client per user, each consuming `export` (fail closed: an outage answers 503) for its
/// user until `stop`; every call recorded.
fn load(
    app: &TestApp,
    users: &[(u16, Uuid)],
    stop: Arc<AtomicBool>,
    began: Instant,
) -> tokio::task::JoinHandle<Vec<Call>> {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = users
        .iter()
        .map(|(master, user)| {
            let (base, client, stop, calls) = (
                app.base.clone(),
                app.client.clone(),
                stop.clone(),
                calls.clone(),
            );
            let (master, user) = (*master, *user);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .post(format!("{base}/v1/consume"))
                        .json(&json!({"user_id": user, "type": "export"}))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    // 0: no answer at all.
                    let outcome = r.map(|r| r.status().as_u16()).unwrap_or(0);
                    calls.lock().unwrap().push(Call {
                        at: began.elapsed(),
                        master,
                        user,
                        outcome,
                    });
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for t in tasks {
            t.await.unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        calls
    })
}

/// Plans where `export` (fail closed) allows a million a month: a load never runs out.
fn big_export_plans() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("quotad-cluster-plans-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        r#"
upgrade_url = "/settings/billing"
default_plan = "FREE"
[types]
ai_generation = { period = "month" }
export = { period = "month", fail = "closed" }
kb_file = { period = "lifetime", fail = "closed" }
[plans.FREE]
ai_generation = 50
export = 1000000
kb_file = 20
[plans.PRO]
ai_generation = -1
export = -1
kb_file = 1000
"#,
    )
    .unwrap();
    path
}

/// After a flush, each user's counter holds every call answered as allowed, and at most the
/// calls answered otherwise more (a call that ran but whose answer was lost with a dying master,
/// or that no replica confirmed in time); Postgres holds the same.
async fn assert_counts_match_answers(app: &TestApp, calls: &[Call], users: &[(u16, Uuid)]) {
    flush_through(app).await;
    for (_, user) in users {
        let allowed = allowed_of(calls, *user);
        let used = app.used(*user, "export").await;
        let failed = calls
            .iter()
            .filter(|c| c.user == *user && c.outcome != 200)
            .count() as u64;
        assert!(
            used >= allowed && used <= allowed + failed,
            "user {user}: {allowed} allowed, {failed} failed, {used} held"
        );
        assert_eq!(
            stored(app, *user, "export").await as u64,
            used,
            "user {user}"
        );
    }
}

fn allowed_of(calls: &[Call], user: Uuid) -> u64 {
    calls
        .iter()
        .filter(|c| c.user == user && c.outcome == 200)
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_fails_over_and_quotad_recovers_without_a_restart() {
    let mut cluster = TestCluster::start().await;
    let plans = big_export_plans();
    let app = TestApp::spawn_with(Options {
        redis_url: cluster.seeds(),
        plans: Some(plans.clone()),
        ..Options::default()
    })
    .await;
    let by_master = cluster.users_per_master(2).await;
    let victim = *by_master.keys().min().unwrap();
    let users: Vec<(u16, Uuid)> = by_master
        .iter()
        .flat_map(|(m, us)| us.iter().map(move |u| (*m, *u)))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let running = load(&app, &users, stop.clone(), began);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = began.elapsed();
    cluster.node_mut(victim).kill();
    cluster.wait_whole(&[victim]).await;
    let promoted_at = began.elapsed();
    // The load goes on after the promotion: quotad must serve the moved slots again by itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let calls = running.await.unwrap();

    let hit: Vec<&Call> = calls
        .iter()
        .filter(|c| c.master == victim && c.outcome != 200)
        .collect();
    let window = hit
        .last()
        .map(|l| l.at.saturating_sub(killed_at))
        .unwrap_or_default();
    let others_failed = calls
        .iter()
        .filter(|c| c.master != victim && c.outcome != 200)
        .count();
    let served_after = calls
        .iter()
        .filter(|c| c.master == victim && c.outcome == 200 && c.at > killed_at + window)
        .count();
    println!(
        "failover: {} calls; master killed at {} ms, replica promoted (seen by every node) at {} ms; \
         its users got the fail policy for {} ms after the kill ({} calls, all 503); \
         other masters' users: {} calls failed; {} calls served on the promoted replica after",
        calls.len(),
        killed_at.as_millis(),
        promoted_at.as_millis(),
        window.as_millis(),
        hit.len(),
        others_failed,
        served_after
    );
    assert_eq!(
        others_failed, 0,
        "users of the other masters noticed nothing"
    );
    assert!(
        served_after > 0,
        "quotad serves the failed-over slots again"
    );
    assert!(
        hit.iter().all(|c| c.outcome == 503),
        "an outage answers the fail policy (export: closed), nothing else: {:?}",
        hit.iter().filter(|c| c.outcome != 503).collect::<Vec<_>>()
    );

    // Nothing was lost here (the replica was in sync): each user's counter on the new master
    // holds every count answered as allowed, and at most the calls answered 503 more (a call
    // the dying master ran but whose answer never came back). The wait setting's own test
    // makes the replica lag.
    assert_counts_match_answers(&app, &calls, &users).await;
    let _ = std::fs::remove_file(plans);
}

/// Counts `n` exports for `user` while its master's replica lags (the replica stopped with
/// SIGSTOP and its link dropped by the master, so nothing more reaches it), optionally flushes,
/// then kills the master, lets the replica go on and waits for it to take over. Returns the
/// answers' statuses.
async fn count_while_the_replica_lags(
    cluster: &mut TestCluster,
    app: &TestApp,
    user: Uuid,
    n: usize,
    flush_first: bool,
) -> Vec<u16> {
    let master = cluster.master_of(user).await;
    let replica = cluster.replica_of(master).await;
    // Stopped for far less than the node timeout: the cluster still counts it as healthy.
    cluster.node(replica).pause();
    let _: i64 = cluster
        .node(master)
        .call(&["CLIENT", "KILL", "TYPE", "replica"])
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(app.consume(user, "export").await.status);
    }
    if flush_first {
        flush_through(app).await;
    }
    cluster.node_mut(master).kill();
    cluster.node(replica).resume();
    cluster.wait_whole(&[master]).await;
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_for_a_replica_keeps_every_allowed_count_through_a_failover() {
    let plans = big_export_plans();
    let mut lost = Vec::new();
    for wait in [0u64, 1] {
        let mut cluster = TestCluster::start().await;
        let plans = plans.clone();
        let app = TestApp::spawn_with(Options {
            redis_url: cluster.seeds(),
            plans: Some(plans),
            // No flush during the test: Postgres cannot heal what it never got.
            flush_interval_ms: 3_600_000,
            tune: if wait == 0 {
                |_| {}
            } else {
                |c| c.redis_wait_replicas = 1
            },
            ..Options::default()
        })
        .await;
        let user = Uuid::new_v4();
        // Loaded and replicated before the fault.
        assert_eq!(app.consume(user, "export").await.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let statuses = count_while_the_replica_lags(&mut cluster, &app, user, 20, false).await;
        let allowed = 1 + statuses.iter().filter(|s| **s == 200).count() as u64;
        let held = app.used(user, "export").await;
        println!(
            "QUOTAD_REDIS_WAIT_REPLICAS={wait}: answers while the replica lagged {statuses:?}; \
             {allowed} allowed in all, {held} held after the failover, {} lost",
            allowed.saturating_sub(held)
        );
        lost.push((wait, allowed, held));
    }
    let (_, allowed0, held0) = lost[0];
    let (_, allowed1, held1) = lost[1];
    assert!(
        held0 < allowed0,
        "without the wait the failover loses allowed counts: {lost:?}"
    );
    assert_eq!(
        allowed1, 1,
        "with the wait nothing unconfirmed is allowed: {lost:?}"
    );
    assert!(
        held1 >= allowed1,
        "with the wait every allowed count survives: {lost:?}"
    );
    let _ = std::fs::remove_file(plans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_failover_that_lost_counts_heals_from_postgres() {
    let mut cluster = TestCluster::start().await;
    let plans = big_export_plans();
    let app = TestApp::spawn_with(Options {
        redis_url: cluster.seeds(),
        plans: Some(plans.clone()),
        flush_interval_ms: 3_600_000,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    for _ in 0..30 {
        assert_eq!(app.consume(user, "export").await.status, 200);
    }
    flush_through(&app).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 20 more reach the master and Postgres (flushed), not the lagging replica.
    let statuses = count_while_the_replica_lags(&mut cluster, &app, user, 20, true).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(stored(&app, user, "export").await, 50);
    let behind = |text: String| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("quotad_flush_behind_counters_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let behind_before = behind(app.metrics_text().await);
    // The promoted replica went back in time: it holds 30, at an older version than Postgres'.
    // The next count marks the counter; the flusher finds Postgres ahead and raises it.
    let next = app.consume(user, "export").await;
    assert_eq!(next.status, 200, "{:?}", next.body);
    // The request path saw the dead master: the flusher's connection is made again before its
    // next pass, which succeeds at once rather than waiting out its deadline.
    app.flush().await;
    let healed = app.used(user, "export").await;
    assert!(
        healed >= 50,
        "spent quota never comes back: {healed} held after healing"
    );
    assert_eq!(
        app.consume(user, "export").await.body["used"],
        json!(healed + 1)
    );
    assert!(
        behind(app.metrics_text().await) > behind_before,
        "the healing is counted"
    );
    let _ = std::fs::remove_file(plans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_moved_between_masters_under_load_keep_the_totals_exact() {
    let cluster = TestCluster::start().await;
    let plans = big_export_plans();
    let app = TestApp::spawn_with(Options {
        redis_url: cluster.seeds(),
        plans: Some(plans.clone()),
        ..Options::default()
    })
    .await;
    let mut users: Vec<(u16, Uuid)> = cluster
        .users_per_master(2)
        .await
        .into_iter()
        .flat_map(|(m, us)| us.into_iter().map(move |u| (m, u)))
        .collect();
    // Users in the slots that move: `redis-cli --cluster reshard` takes a master's lowest slots.
    let lowest = *users.iter().map(|(m, _)| m).min().unwrap();
    let first_slot: i64 = {
        let slots: Vec<redis::Value> = cluster.nodes[0].call(&["CLUSTER", "SLOTS"]).await.unwrap();
        slots
            .iter()
            .filter_map(|r| {
                let r: Vec<redis::Value> = redis::from_redis_value_ref(r).ok()?;
                let master: Vec<redis::Value> = redis::from_redis_value_ref(&r[2]).ok()?;
                let port: i64 = redis::from_redis_value_ref(&master[1]).ok()?;
                (port as u16 == lowest).then(|| redis::from_redis_value_ref::<i64>(&r[0]).ok())?
            })
            .min()
            .unwrap()
    };
    while users.iter().filter(|(m, _)| *m == 0).count() < 3 {
        let u = Uuid::new_v4();
        let tag = format!("{{{}}}", quotad::store::keys::bucket(&u));
        let slot: i64 = cluster.nodes[0]
            .call(&["CLUSTER", "KEYSLOT", &tag])
            .await
            .unwrap();
        if (first_slot..first_slot + 2000).contains(&slot) {
            // Marked 0 until the load: their master is `lowest`.
            users.push((0, u));
        }
    }
    for (m, _) in users.iter_mut().filter(|(m, _)| *m == 0) {
        *m = lowest;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let running = load(&app, &users, stop.clone(), began);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Move 2,000 slots (those of three users among them) from the first master to the second,
    // key by key with MIGRATE (MOVED and ASK on the way), while the load runs.
    let masters: Vec<Node> = {
        let mut m: Vec<Node> = cluster
            .topology(cluster.nodes[0].port)
            .await
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .collect();
        m.sort_by_key(|n| n.port);
        m
    };
    let (from, to) = (&masters[0], &masters[1]);
    let out = tokio::task::spawn_blocking({
        let (from_addr, from_id, to_id) = (
            format!("127.0.0.1:{}", from.port),
            from.id.clone(),
            to.id.clone(),
        );
        move || {
            Command::new("redis-cli")
                .args(["--cluster", "reshard", &from_addr])
                .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
                .args(["--cluster-slots", "2000", "--cluster-yes"])
                .args(["--cluster-pipeline", "10"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "redis-cli --cluster reshard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let calls = running.await.unwrap();
    let moved: Vec<Uuid> = {
        let mut v = Vec::new();
        for (m, u) in &users {
            if cluster.master_of(*u).await != *m {
                v.push(*u);
            }
        }
        v
    };
    let failed = calls.iter().filter(|c| c.outcome != 200).count();
    let mut outcomes: Vec<u16> = calls.iter().map(|c| c.outcome).collect();
    outcomes.sort_unstable();
    outcomes.dedup();
    println!(
        "resharding 2,000 slots under load: {} calls, {failed} not allowed (statuses seen: {outcomes:?}), {} of {} users' slots moved",
        calls.len(),
        moved.len(),
        users.len()
    );
    assert!(
        moved.len() >= 3,
        "the reshard moved the chosen users' slots: {moved:?}"
    );
    assert_counts_match_answers(&app, &calls, &users).await;
    let _ = std::fs::remove_file(plans);
}
