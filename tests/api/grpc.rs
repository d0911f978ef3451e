//! Envoy's rate-limit service over gRPC, called with a client built from Envoy's published
//! definitions (the same crate quotad serves them with): the FREE user's 50 then OVER_LIMIT with
//! consume's 402 body, amounts, idempotency, every malformed request refused with nothing
//! counted, tokens, health, degraded answers, and the binary serving gRPC and stopping on SIGTERM.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use uuid::Uuid;

use crate::helpers::{free_port, mid_month, month_start, Daemon, Options, PrivateRedis, TestApp};

const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

fn with_grpc(c: &mut quotad::config::Config) {
    c.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
}

/// A daemon serving gRPC on a port of its own.
async fn grpc_app() -> TestApp {
    TestApp::spawn_with(Options {
        tune: with_grpc,
        ..Options::default()
    })
    .await
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("quotad's gRPC port answers")
}

async fn client(app: &TestApp) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(channel(app.grpc.expect("gRPC is on")).await)
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A request for one descriptor of `entries` in quotad's default domain.
fn request(entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "quotad".into(),
        descriptors: vec![descriptor(entries)],
        hits_addend: 0,
    }
}

fn consume_of(user: Uuid, usage_type: &str) -> RateLimitRequest {
    request(&[("user_id", &user.to_string()), ("usage_type", usage_type)])
}

async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    request: RateLimitRequest,
) -> Result<RateLimitResponse, tonic::Status> {
    client
        .should_rate_limit(request)
        .await
        .map(tonic::Response::into_inner)
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn seconds_until_next_month() -> i64 {
    (month_start(1) - mid_month()).num_seconds()
}

#[tokio::test]
async fn a_free_user_gets_50_ok_then_over_limit_with_the_body_and_headers_consume_gives() {
    let app = grpc_app().await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4();

    for n in 1..=50u32 {
        let r = ask(&mut rls, consume_of(user, "ai_generation"))
            .await
            .unwrap_or_else(|s| panic!("call {n}: {s:?}"));
        assert_eq!(r.overall_code, Code::Ok as i32, "call {n}");
        let status = &r.statuses[0];
        assert_eq!(status.code, Code::Ok as i32);
        assert_eq!(status.limit_remaining, 50 - n);
        let limit = status.current_limit.as_ref().expect("a limited type");
        assert_eq!(
            (limit.name.as_str(), limit.requests_per_unit, limit.unit),
            ("ai_generation", 50, Unit::Month as i32)
        );
        assert_eq!(
            status.duration_until_reset.as_ref().map(|d| d.seconds),
            Some(seconds_until_next_month())
        );
        assert_eq!(header(&r, "ratelimit-limit"), Some("50"));
        assert_eq!(
            header(&r, "ratelimit-remaining"),
            Some((50 - n).to_string().as_str())
        );
        assert!(r.raw_body.is_empty(), "an allowed call carries no body");
    }
    let refused = ask(&mut rls, consume_of(user, "ai_generation"))
        .await
        .unwrap();
    let over_http = app.consume(user, "ai_generation").await;

    assert_eq!(refused.overall_code, Code::OverLimit as i32);
    assert_eq!(refused.statuses.len(), 1);
    assert_eq!(refused.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(refused.statuses[0].limit_remaining, 0);
    assert_eq!(over_http.status, 402);
    let body: Value = serde_json::from_slice(&refused.raw_body).expect("raw_body is JSON");
    assert_eq!(body, over_http.body, "raw_body is consume's 402 body");
    assert_eq!(body["code"], "USAGE_LIMIT_EXCEEDED");
    assert_eq!(body["upgrade_url"], "/settings/billing");
    let wait = seconds_until_next_month().to_string();
    for (name, value) in [
        ("ratelimit-limit", "50"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", wait.as_str()),
        ("retry-after", wait.as_str()),
        ("content-type", "application/json"),
    ] {
        assert_eq!(header(&refused, name), Some(value), "{name}");
        if name != "content-type" {
            assert_eq!(over_http.header(name), Some(value), "HTTP {name}");
        }
    }
    assert_eq!(app.used(user, "ai_generation").await, 50);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"quotad_grpc_requests_total{code="OVER_LIMIT"}"#)
            && metrics.contains(r#"quotad_grpc_requests_total{code="OK"}"#),
        "gRPC calls are counted by code"
    );
}

#[tokio::test]
async fn hits_addend_sets_the_amount_the_descriptors_own_first_and_zero_counts_one() {
    let app = grpc_app().await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4();
    let mut by_request = consume_of(user, "ai_generation");
    by_request.hits_addend = 3;
    let mut by_descriptor = consume_of(user, "ai_generation");
    by_descriptor.hits_addend = 3;
    by_descriptor.descriptors[0].hits_addend = Some(UInt64Value { value: 5 });
    let mut too_much = consume_of(user, "ai_generation");
    too_much.hits_addend = 42;

    let three = ask(&mut rls, by_request).await.unwrap();
    let five = ask(&mut rls, by_descriptor).await.unwrap();
    let one = ask(&mut rls, consume_of(user, "ai_generation"))
        .await
        .unwrap();
    let refused = ask(&mut rls, too_much).await.unwrap();

    let remaining = |r: &RateLimitResponse| r.statuses[0].limit_remaining;
    assert_eq!(
        (remaining(&three), remaining(&five), remaining(&one)),
        (47, 42, 41)
    );
    assert_eq!(refused.overall_code, Code::OverLimit as i32);
    let body: Value = serde_json::from_slice(&refused.raw_body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .ends_with("This request needs 42, and 41 remain."),
        "{body}"
    );
    assert_eq!(
        app.used(user, "ai_generation").await,
        9,
        "counts made over gRPC are the HTTP API's counts; a refusal counts nothing"
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_first_answer_and_counts_once() {
    let app = grpc_app().await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4().to_string();
    let keyed = request(&[
        ("user_id", &user),
        ("usage_type", "export"),
        ("idempotency_key", "req-123"),
    ]);

    let first = ask(&mut rls, keyed.clone()).await.unwrap();
    let again = ask(&mut rls, keyed).await.unwrap();
    let over_http = app
        .post(
            "/v1/consume",
            serde_json::json!({"user_id": user, "type": "export", "idempotency_key": "req-123"}),
        )
        .await;

    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(header(&first, "idempotent-replayed"), None);
    assert_eq!(again.overall_code, Code::Ok as i32);
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    assert_eq!(again.statuses, first.statuses, "the first answer again");
    assert_eq!(
        (over_http.status, over_http.header("idempotent-replayed")),
        (200, Some("true")),
        "the same key over HTTP's consume is the same call"
    );
    assert_eq!(app.used(user.parse().unwrap(), "export").await, 1);
}

#[tokio::test]
async fn every_malformed_request_is_invalid_argument_with_a_sentence_and_counts_nothing() {
    let app = grpc_app().await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4();
    let id = user.to_string();
    let good = || consume_of(user, "ai_generation");
    let before = redis_keys(&app).await;

    let with = |change: fn(&mut RateLimitRequest)| {
        let mut r = good();
        change(&mut r);
        r
    };
    let cases: Vec<(&str, RateLimitRequest, &str)> = vec![
        (
            "another domain",
            with(|r| r.domain = "envoy".into()),
            "WRONG_DOMAIN: This request is for domain \"envoy\"; quotad answers domain \"quotad\"",
        ),
        ("no descriptor", with(|r| r.descriptors.clear()), "ONE_DESCRIPTOR: The request carries 0 descriptors"),
        (
            "two descriptors",
            with(|r| r.descriptors.push(r.descriptors[0].clone())),
            "cannot yet be all-or-nothing",
        ),
        (
            "no user",
            request(&[("usage_type", "ai_generation")]),
            "MISSING_DESCRIPTOR_KEY: The descriptor has no \"user_id\" entry",
        ),
        (
            "no type",
            request(&[("user_id", &id)]),
            "MISSING_DESCRIPTOR_KEY: The descriptor has no \"usage_type\" entry",
        ),
        (
            "a user that is not a UUID",
            request(&[("user_id", "alice"), ("usage_type", "ai_generation")]),
            "INVALID_USER_ID: Descriptor entry \"user_id\": user_id \"alice\" is not a UUID",
        ),
        (
            "an unknown type",
            request(&[("user_id", &id), ("usage_type", "teleport")]),
            "UNKNOWN_TYPE: Descriptor entry \"usage_type\": \"teleport\" is not a configured usage type; use one of: ai_generation, export, kb_file.",
        ),
        (
            "an unknown entry",
            request(&[("user_id", &id), ("usage_type", "ai_generation"), ("remote_address", "10.0.0.1")]),
            "UNKNOWN_DESCRIPTOR_KEY: The descriptor entry \"remote_address\" is not one quotad reads",
        ),
        (
            "an entry twice",
            request(&[("user_id", &id), ("usage_type", "ai_generation"), ("user_id", &id)]),
            "DUPLICATE_DESCRIPTOR_KEY",
        ),
        (
            "a control character in a key",
            request(&[("user_id\n", &id), ("usage_type", "ai_generation")]),
            "UNKNOWN_DESCRIPTOR_KEY: The descriptor entry \"user_id\\n\" is not one quotad reads",
        ),
        (
            "a control character in the idempotency key",
            request(&[("user_id", &id), ("usage_type", "ai_generation"), ("idempotency_key", "a\u{7}b")]),
            "INVALID_IDEMPOTENCY_KEY: idempotency_key must be 1 to 255 characters",
        ),
        (
            "an empty idempotency key",
            request(&[("user_id", &id), ("usage_type", "ai_generation"), ("idempotency_key", "")]),
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (
            "hits_addend too large",
            with(|r| r.hits_addend = 1_000_001),
            "INVALID_AMOUNT: hits_addend must be a whole number from 1 to 1000000; got 1000001.",
        ),
        (
            "the descriptor's hits_addend too large",
            with(|r| r.descriptors[0].hits_addend = Some(UInt64Value { value: u64::MAX })),
            "INVALID_AMOUNT",
        ),
        (
            "negative hits",
            with(|r| {
                r.descriptors[0].hits_addend = Some(UInt64Value { value: 1 });
                r.descriptors[0].is_negative_hits = true;
            }),
            "NEGATIVE_HITS",
        ),
        (
            "a limit override",
            with(|r| r.descriptors[0].limit = Some(RateLimitOverride { requests_per_unit: 1000, unit: 5 })),
            "LIMIT_OVERRIDE",
        ),
    ];
    for (what, bad, expected) in cases {
        let status = ask(&mut rls, bad).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().starts_with(expected) || status.message().contains(expected),
            "{what}: {:?} does not say {expected:?}",
            status.message()
        );
    }

    // Before the usage reads below, which load the user's counters into Redis.
    assert_eq!(redis_keys(&app).await, before, "no Redis key was written");
    for usage_type in ["ai_generation", "export", "kb_file"] {
        assert_eq!(app.used(user, usage_type).await, 0, "{usage_type}");
    }
    // The same connection still gets a good request counted.
    let ok = ask(&mut rls, good()).await.unwrap();
    assert_eq!(ok.statuses[0].limit_remaining, 49);
}

/// Every Redis key of `app`'s prefix, sorted.
async fn redis_keys(app: &TestApp) -> Vec<String> {
    let mut redis = app.redis().await;
    let mut keys: Vec<String> = deadpool_redis::redis::cmd("KEYS")
        .arg(format!("{}:*", app.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn unlimited_plans_carry_no_limit_and_lifetime_types_no_reset() {
    let app = grpc_app().await;
    let mut rls = client(&app).await;
    let pro = Uuid::new_v4();
    app.set_plan(pro, "PRO").await;
    let free = Uuid::new_v4();

    let unlimited = ask(&mut rls, consume_of(pro, "ai_generation"))
        .await
        .unwrap();
    let lifetime = ask(&mut rls, consume_of(free, "kb_file")).await.unwrap();

    let status = &unlimited.statuses[0];
    assert_eq!(unlimited.overall_code, Code::Ok as i32);
    assert_eq!(status.current_limit, None);
    assert_eq!(status.limit_remaining, u32::MAX);
    assert_eq!(header(&unlimited, "ratelimit-limit"), None);
    assert!(
        status.duration_until_reset.is_some(),
        "a month still resets"
    );
    let status = &lifetime.statuses[0];
    let limit = status.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (20, Unit::Unknown as i32)
    );
    assert_eq!(status.limit_remaining, 19);
    assert_eq!(status.duration_until_reset, None);
    assert_eq!(header(&lifetime, "ratelimit-reset"), None);
    assert_eq!(
        app.used(pro, "ai_generation").await,
        1,
        "unlimited is still counted"
    );
}

#[tokio::test]
async fn tokens_are_enforced_from_the_authorization_metadata() {
    let app = TestApp::spawn_with(Options {
        gateway_tokens: vec!["gw-token".into()],
        admin_tokens: vec!["admin-token".into()],
        tune: with_grpc,
        ..Options::default()
    })
    .await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4();
    let with_token = |token: Option<&str>| {
        let mut r = tonic::Request::new(consume_of(user, "ai_generation"));
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };

    let none = rls.should_rate_limit(with_token(None)).await.unwrap_err();
    let wrong = rls
        .should_rate_limit(with_token(Some("guess")))
        .await
        .unwrap_err();
    let gateway = rls.should_rate_limit(with_token(Some("gw-token"))).await;
    let admin = rls.should_rate_limit(with_token(Some("admin-token"))).await;

    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    assert!(none.message().starts_with("UNAUTHORIZED: "), "{none:?}");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    assert!(wrong.message().starts_with("INVALID_TOKEN: "), "{wrong:?}");
    assert_eq!(gateway.unwrap().get_ref().statuses[0].limit_remaining, 49);
    assert_eq!(admin.unwrap().get_ref().statuses[0].limit_remaining, 48);
    let usage = app
        .send(
            reqwest::Method::GET,
            &format!("/v1/users/{user}/usage"),
            None,
            Some("gw-token"),
        )
        .await;
    assert_eq!(
        usage.body["usage"]["ai_generation"]["used"], 2,
        "refused calls count nothing"
    );
}

async fn health(addr: SocketAddr, service: &str) -> Result<i32, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Waits until the health of `service` is `want`, at most 30 s.
async fn wait_health(addr: SocketAddr, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), health(addr, service)).await {
            Ok(Ok(status)) if status == want as i32 => return,
            other => last = Some(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health of {service:?} is not {want:?} after 30 s; last: {last:?}");
}

#[tokio::test]
async fn health_serves_the_rate_limit_service_and_the_server_once_ready() {
    let app = grpc_app().await;
    let addr = app.grpc.unwrap();

    wait_health(addr, "", ServingStatus::Serving).await;
    wait_health(addr, SERVICE, ServingStatus::Serving).await;
    let unknown = health(addr, "no.such.Service").await.unwrap_err();

    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn with_redis_down_open_types_answer_ok_marked_degraded_and_closed_types_unavailable() {
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        tune: with_grpc,
        ..Options::default()
    })
    .await;
    let mut rls = client(&app).await;
    let user = Uuid::new_v4();
    ask(&mut rls, consume_of(user, "ai_generation"))
        .await
        .unwrap();

    redis.kill();
    let open = ask(&mut rls, consume_of(user, "ai_generation"))
        .await
        .unwrap();
    let closed = ask(&mut rls, consume_of(user, "kb_file"))
        .await
        .unwrap_err();

    assert_eq!(open.overall_code, Code::Ok as i32);
    assert_eq!(header(&open, "quotad-degraded"), Some("true"));
    assert_eq!(open.statuses[0].current_limit, None, "the limit is unknown");
    assert_eq!(closed.code(), tonic::Code::Unavailable);
    assert!(
        closed.message().starts_with("REDIS_UNAVAILABLE: "),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_not_serving_until_ready_then_answers_and_stops_on_sigterm() {
    let redis = PrivateRedis::start();
    // A stopped Redis holds connections and answers nothing: quotad cannot become ready.
    redis.pause();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut daemon = Daemon::spawn(&[
        ("QUOTAD_REDIS_URL", redis.url()),
        ("QUOTAD_GRPC_LISTEN", addr.to_string()),
    ]);
    wait_health(addr, SERVICE, ServingStatus::NotServing).await;
    let user = Uuid::new_v4();
    let early = ask(
        &mut RateLimitServiceClient::new(channel(addr).await),
        consume_of(user, "ai_generation"),
    )
    .await
    .unwrap_err();

    redis.resume();
    wait_health(addr, SERVICE, ServingStatus::Serving).await;
    wait_health(addr, "", ServingStatus::Serving).await;
    let mut rls = RateLimitServiceClient::new(channel(addr).await);
    let answered = ask(&mut rls, consume_of(user, "ai_generation"))
        .await
        .unwrap();
    // The client's connection stays open (as Envoy's would) and answers the server's pings
    // on this runtime's other thread while this one waits.
    let stopping = Instant::now();
    daemon.signal("-TERM");
    let code = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(15)));
    let took = stopping.elapsed();

    assert_eq!(early.code(), tonic::Code::Unavailable);
    assert!(early.message().starts_with("NOT_READY: "), "{early:?}");
    assert_eq!(answered.statuses[0].limit_remaining, 49);
    assert_eq!(code, Some(0), "log:\n{}", daemon.log_text());
    assert!(
        took < Duration::from_secs(5),
        "an idle gRPC connection does not hold shutdown to its 10 s bound: {took:?}"
    );
    drop(rls);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the gRPC port is closed"
    );
}

#[test]
fn a_grpc_address_that_cannot_be_bound_or_parsed_stops_start_up_naming_the_variable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    for value in [busy.as_str(), "localhost:x"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
            .arg("serve")
            .env("QUOTAD_LISTEN", "127.0.0.1:0")
            .env("QUOTAD_GRPC_LISTEN", value)
            .env_remove("QUOTAD_GATEWAY_TOKENS")
            .env_remove("QUOTAD_ADMIN_TOKENS")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(err.contains("QUOTAD_GRPC_LISTEN"), "{value}: {err}");
    }
}

/// `QUOTAD_MAX_CONNECTIONS` bounds the gRPC port as it does the HTTP one: past it a new
/// connection waits in the kernel's backlog (it is not answered), and is taken once another
/// closes; the ones open go on being served meanwhile.
#[tokio::test]
async fn past_max_connections_a_new_grpc_connection_waits_until_one_closes() {
    let app = TestApp::spawn_with(Options {
        tune: |c| {
            with_grpc(c);
            c.max_connections = 2;
        },
        ..Options::default()
    })
    .await;
    let addr = app.grpc.expect("gRPC is on");
    wait_health(addr, SERVICE, ServingStatus::Serving).await;
    let check = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status)
    };
    let (first, second) = (channel(addr).await, channel(addr).await);
    assert_eq!(
        check(first.clone()).await.unwrap(),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        check(second.clone()).await.unwrap(),
        ServingStatus::Serving as i32
    );

    let third = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let waited = tokio::time::timeout(Duration::from_millis(800), check(third.clone())).await;
    assert!(
        waited.is_err(),
        "a third connection is not served while two are open: {waited:?}"
    );
    // The two open ones are still served.
    let user = Uuid::new_v4().to_string();
    let mut client = RateLimitServiceClient::new(second.clone());
    let answer = client
        .should_rate_limit(request(&[("user_id", &user), ("usage_type", "export")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.overall_code, Code::Ok as i32);

    drop((first, client));
    let started = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(10), check(third)).await;
    assert_eq!(
        served.expect("served once a slot is free").unwrap(),
        ServingStatus::Serving as i32,
        "after {:?}",
        started.elapsed()
    );
}

/// A connection that sends nothing, or only part of HTTP/2's preface, is closed after
/// `QUOTAD_HEADER_TIMEOUT_MS` (as a half-sent HTTP request header is) and gives its slot back:
/// with one connection allowed, a real client is served after it.
#[tokio::test]
async fn a_grpc_connection_that_sends_no_preface_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Options {
        tune: |c| {
            with_grpc(c);
            c.max_connections = 1;
            c.header_timeout_ms = 500;
        },
        ..Options::default()
    })
    .await;
    let addr = app.grpc.expect("gRPC is on");
    wait_health(addr, SERVICE, ServingStatus::Serving).await;
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(sent).await.unwrap();
        let started = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 256];
            // The server's own SETTINGS may come first; then the end of the connection.
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let took = started.elapsed();
        assert!(closed.is_ok(), "{sent:?}: still open after 5 s");
        assert!(
            took >= Duration::from_millis(400),
            "{sent:?}: closed after {took:?}, before the timeout"
        );
        // Its slot is free again: the one connection allowed serves a real client.
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), health(addr, SERVICE))
                .await
                .expect("served")
                .unwrap(),
            ServingStatus::Serving as i32
        );
    }
}

/// gRPC calls share the HTTP API's cap on requests in flight: with `QUOTAD_MAX_IN_FLIGHT=1` and
/// one call held up in a Redis that does not answer, another gRPC call, and an HTTP consume, are
/// refused at once (`UNAVAILABLE` with `OVERLOADED`, 503), counted in `quotad_http_shed_total`, and
/// nothing of theirs is counted.
#[tokio::test]
async fn past_max_in_flight_a_grpc_call_is_refused_at_once_as_overloaded() {
    let redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: redis.url(),
        tune: |c| {
            with_grpc(c);
            c.max_in_flight = 1;
        },
        ..Options::default()
    })
    .await;
    let addr = app.grpc.expect("gRPC is on");
    wait_health(addr, SERVICE, ServingStatus::Serving).await;
    let (held, other) = (Uuid::new_v4(), Uuid::new_v4());
    // Both users' counters loaded, so the held call waits on Redis alone.
    for user in [held, other] {
        let mut c = RateLimitServiceClient::new(channel(addr).await);
        c.should_rate_limit(consume_of(user, "export"))
            .await
            .unwrap();
    }
    redis.pause();
    let mut first = RateLimitServiceClient::new(channel(addr).await);
    let holding =
        tokio::spawn(async move { first.should_rate_limit(consume_of(held, "export")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut second = RateLimitServiceClient::new(channel(addr).await);
    let started = Instant::now();
    let refused = second
        .should_rate_limit(consume_of(other, "export"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().starts_with("OVERLOADED: "), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once, not queued: {:?}",
        started.elapsed()
    );
    let http = app.consume(other, "export").await;
    assert_eq!(
        (http.status, &http.body["code"]),
        (503, &serde_json::json!("OVERLOADED"))
    );

    redis.resume();
    holding
        .await
        .unwrap()
        .expect("the held call is answered once Redis is back");
    let metrics = app.metrics_text().await;
    let shed = metrics
        .lines()
        .find(|l| l.starts_with("quotad_http_shed_total{reason=\"overloaded\"}"))
        .unwrap_or_else(|| panic!("no overloaded shed counted:\n{metrics}"));
    let n: f64 = shed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2.0, "{shed}");
    assert_eq!(
        app.used(other, "export").await,
        1,
        "the refused calls counted nothing"
    );
}
