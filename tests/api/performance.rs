//! The hot path's cost in Redis commands: one round trip per allowed consume.

use std::collections::BTreeMap;

use deadpool_redis::redis;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Options, PrivateRedis, TestApp};

async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test]
async fn an_allowed_consume_is_exactly_one_redis_round_trip() {
    // A Redis of this test's own, so no other test's commands are counted.
    let redis_server = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis_server.url(),
        ..Options::default()
    })
    .await;
    let users: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        assert_eq!(
            app.consume(*u, "ai_generation").await.status,
            200,
            "first use loads the counter"
        );
    }
    let mut conn = app.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();

    let calls = 100;
    for i in 0..calls {
        let a = app
            .post(
                "/v1/consume",
                json!({"user_id": users[i % users.len()], "type": "ai_generation"}),
            )
            .await;
        assert_eq!(a.status, 200);
    }
    let stats = commandstats(&mut conn).await;

    // Commands the consume script runs inside Redis are counted too; none of them is a round trip.
    let inside_the_script = ["hexists", "hget", "hincrby", "zadd", "time"];
    let mut round_trips: BTreeMap<String, u64> = stats
        .iter()
        .filter(|(name, _)| !inside_the_script.contains(&name.as_str()))
        .map(|(n, c)| (n.clone(), *c))
        .collect();
    round_trips.remove("info"); // this test's own INFO
    round_trips.remove("config|resetstat");
    assert_eq!(
        round_trips,
        BTreeMap::from([("evalsha".to_owned(), calls as u64)]),
        "all commands: {stats:?}"
    );
    assert_eq!(
        stats.get("hincrby"),
        Some(&(2 * calls as u64)),
        "count and version, inside the script"
    );
}
