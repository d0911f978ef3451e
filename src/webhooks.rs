//! Webhooks: delivers the outbox's events to `QUOTAD_WEBHOOK_URLS`, signed as Standard Webhooks
//! specifies.
//!
//! Every event has one delivery per endpoint (`event_deliveries`, made with the event). The
//! dispatcher claims due deliveries in Postgres (`FOR UPDATE SKIP LOCKED`, and a lease: the
//! claim moves `next_attempt_at` past the attempt's deadline), so several daemons share the work
//! and a daemon killed mid-attempt leaves the delivery to be tried again once the lease ends.
//! An attempt is a POST of the event's body with `webhook-id` (the event's stable id: receivers
//! deduplicate by it), `webhook-timestamp` (this attempt's time, Unix seconds) and
//! `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under the
//! secret). A 2xx answer delivers it; anything else (another status, a redirect, which is never
//! followed, no answer within the timeout, a refused connection) is retried after a delay that
//! doubles from `QUOTAD_WEBHOOK_RETRY_MS` up to an hour, ±20 %, until
//! `QUOTAD_WEBHOOK_MAX_ATTEMPTS` attempts failed: the delivery is then `failed` until an
//! operator redelivers it (`POST /v1/admin/events/{id}/redeliver`). At least once: a receiver
//! that took an event but whose answer was lost gets it again, with the same id.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::config::redact_url;
use crate::db;
use crate::metrics as m;

/// Deliveries claimed per round.
const BATCH: i64 = 64;
/// Attempts in flight at once.
const IN_FLIGHT: usize = 16;
/// Longest delay between two attempts of one delivery.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Longest wait between two looks at the outbox (a flush in this daemon wakes it sooner).
const MAX_POLL: Duration = Duration::from_secs(1);
/// How often the pending and failed gauges are counted.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Deadline of one dispatcher statement.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim outlives its attempt's deadline.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// Longest `last_error` kept.
const MAX_ERROR: usize = 500;

/// The webhook settings, checked.
#[derive(Clone)]
pub struct Webhooks {
    /// Where every event goes.
    pub endpoints: Vec<String>,
    /// The signing key (the bytes after `whsec_`, decoded).
    key: Vec<u8>,
    /// Deadline of one attempt.
    pub timeout: Duration,
    /// Delay before the first retry; it doubles after each failure.
    pub retry: Duration,
    /// Attempts before a delivery is `failed`.
    pub max_attempts: u32,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("key", &"[hidden]")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// Most webhook endpoints.
pub const MAX_ENDPOINTS: usize = 10;
/// Longest endpoint URL.
const MAX_URL: usize = 2048;

impl Webhooks {
    /// Checks the settings: every URL an absolute `http://` URL (quotad builds no TLS stack: an
    /// `https://` receiver is reached through a local forwarder), at most [`MAX_ENDPOINTS`], none
    /// twice; the secret `whsec_` and base64 of 24 to 64 bytes, required when there are URLs.
    /// `None` when no URL is set: events are recorded in the outbox and nothing is sent.
    pub fn from_settings(
        urls: &[String],
        secret: Option<&str>,
        timeout: Duration,
        retry: Duration,
        max_attempts: u32,
    ) -> Result<Option<Webhooks>, String> {
        let urls: Vec<&str> = urls
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        if urls.len() > MAX_ENDPOINTS {
            return Err(format!(
                "QUOTAD_WEBHOOK_URLS lists {} URLs; at most {MAX_ENDPOINTS} are allowed",
                urls.len()
            ));
        }
        let mut endpoints = Vec::new();
        for url in urls {
            if url.len() > MAX_URL {
                return Err(format!(
                    "QUOTAD_WEBHOOK_URLS: a URL of {} characters is too long (at most {MAX_URL})",
                    url.len()
                ));
            }
            if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(format!(
                    "QUOTAD_WEBHOOK_URLS: {url:?} holds a space or a control character; percent-encode it"
                ));
            }
            let parsed = reqwest::Url::parse(url).map_err(|e| {
                format!("QUOTAD_WEBHOOK_URLS: {url:?} is not a URL ({e}); give absolute URLs such as http://127.0.0.1:9000/hooks, separated by commas")
            })?;
            match parsed.scheme() {
                "http" => {}
                "https" => {
                    return Err(format!(
                        "QUOTAD_WEBHOOK_URLS: {url:?} is https, and quotad sends plain HTTP only (it builds no TLS stack); send to a local forwarder that speaks TLS (e.g. http://127.0.0.1:8443 in front of the receiver)"
                    ))
                }
                other => {
                    return Err(format!(
                        "QUOTAD_WEBHOOK_URLS: {url:?} has scheme {other:?}; use http://"
                    ))
                }
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(format!("QUOTAD_WEBHOOK_URLS: {url:?} names no host"));
            }
            if parsed.fragment().is_some() {
                return Err(format!(
                    "QUOTAD_WEBHOOK_URLS: {url:?} has a #fragment, which is never sent; remove it"
                ));
            }
            let url = url.to_owned();
            if endpoints.contains(&url) {
                return Err(format!(
                    "QUOTAD_WEBHOOK_URLS lists {url:?} twice; each endpoint would get every event twice"
                ));
            }
            endpoints.push(url);
        }
        let secret = secret.map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
            "QUOTAD_WEBHOOK_URLS is set but QUOTAD_WEBHOOK_SECRET is not: set it to whsec_ and the base64 of 24 to 64 random bytes (e.g. whsec_$(head -c 32 /dev/urandom | base64)), and give receivers the same".to_owned()
        })?;
        let key = parse_secret(secret)?;
        Ok(Some(Webhooks {
            endpoints,
            key,
            timeout,
            retry,
            max_attempts,
        }))
    }

    /// The `webhook-signature` header of a message: `v1,` and the base64 HMAC-SHA256 of
    /// `id.timestamp.body`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }

    /// The delay after the `attempts`-th failed attempt: the retry delay doubled per earlier
    /// failure, at most an hour, ±20 % so deliveries that failed together do not come back
    /// together.
    fn delay(&self, attempts: u32, jitter: f64) -> Duration {
        let doubled = self
            .retry
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        doubled
            .min(MAX_DELAY)
            .mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }
}

/// `whsec_<base64>` → the key's bytes.
fn parse_secret(secret: &str) -> Result<Vec<u8>, String> {
    let bad = |why: &str| {
        format!("QUOTAD_WEBHOOK_SECRET {why}: give whsec_ and the base64 of 24 to 64 random bytes, e.g. whsec_$(head -c 32 /dev/urandom | base64)")
    };
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| bad("does not start with whsec_"))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| bad("is not valid base64 after whsec_"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(bad(&format!("holds {} bytes", key.len())));
    }
    Ok(key)
}

/// One delivery claimed for an attempt.
type Claimed = db::Delivery;

/// How an attempt went.
enum Attempt {
    /// The endpoint answered 2xx.
    Delivered(u16),
    /// Anything else: the status, if one came, and why.
    Failed(Option<u16>, String),
}

/// Sends the outbox's deliveries.
#[derive(Clone)]
pub struct Dispatcher {
    db: PgPool,
    client: reqwest::Client,
    hooks: Arc<Webhooks>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// A dispatcher on a small pool of its own, like the flusher's.
    pub fn new(db: &PgPool, hooks: Webhooks, wake: Arc<Notify>) -> Dispatcher {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(hooks.timeout)
            .connect_timeout(hooks.timeout)
            .user_agent(concat!("quotad/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(IN_FLIGHT)
            .build()
            .expect("a client without TLS builds");
        Dispatcher {
            db: db::pool_like(db, DB_TIMEOUT, 2),
            client,
            hooks: Arc::new(hooks),
            wake,
        }
    }

    /// Delivers until `stop` turns true: claims what is due, sends it, records how it went;
    /// waits for a flush of this daemon or the next poll when nothing is due. An attempt under
    /// way when `stop` turns true is dropped: its lease ends and it is sent again.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let poll = self.hooks.retry.min(MAX_POLL);
        let mut backoff = poll;
        let mut counted = Instant::now() - GAUGE_EVERY;
        loop {
            if counted.elapsed() >= GAUGE_EVERY {
                counted = Instant::now();
                self.count().await;
            }
            let round = tokio::select! {
                r = self.round() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let wait = match round {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => {
                    backoff = poll;
                    poll
                }
                Err(e) => {
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tracing::warn!(error.message = %e, retry_in_ms = backoff.as_millis() as u64, "webhook dispatcher cannot read the outbox; will retry");
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One round: claims up to [`BATCH`] due deliveries, attempts them ([`IN_FLIGHT`] at once),
    /// records each outcome. Returns how many were claimed.
    pub async fn round(&self) -> Result<usize, sqlx::Error> {
        // Past the attempt's own deadline, with room to record its outcome.
        let lease = self.hooks.timeout + LEASE_MARGIN;
        let claimed = db::within(
            DB_TIMEOUT,
            db::claim_deliveries(&self.db, &self.hooks.endpoints, BATCH, lease),
        )
        .await?;
        let n = claimed.len();
        let mut attempts = futures_util::stream::iter(claimed.into_iter().map(|c| async move {
            let started = Instant::now();
            let outcome = self.attempt(&c).await;
            metrics::histogram!(m::WEBHOOK_SECONDS).record(started.elapsed());
            (c, outcome)
        }))
        .buffer_unordered(IN_FLIGHT);
        while let Some((c, outcome)) = attempts.next().await {
            self.record(&c, outcome).await?;
        }
        Ok(n)
    }

    /// One POST of `c`'s event to its endpoint.
    async fn attempt(&self, c: &Claimed) -> Attempt {
        let body = match serde_json::to_vec(&c.event.body()) {
            Ok(b) => b,
            Err(e) => return Attempt::Failed(None, format!("cannot encode the event: {e}")),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let sent = self
            .client
            .post(&c.endpoint)
            .header("content-type", "application/json")
            .header("webhook-id", &c.event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                self.hooks.signature(&c.event.id, timestamp, &body),
            )
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Attempt::Delivered(r.status().as_u16()),
            Ok(r) if r.status().is_redirection() => Attempt::Failed(
                Some(r.status().as_u16()),
                format!(
                    "answered {} (redirects are not followed; configure the final URL)",
                    r.status()
                ),
            ),
            Ok(r) => Attempt::Failed(
                Some(r.status().as_u16()),
                format!("answered {}", r.status()),
            ),
            Err(e) if e.is_timeout() => Attempt::Failed(
                None,
                format!("no answer within {} ms", self.hooks.timeout.as_millis()),
            ),
            Err(e) => Attempt::Failed(None, describe(&e)),
        }
    }

    /// Writes how an attempt went.
    async fn record(&self, c: &Claimed, outcome: Attempt) -> Result<(), sqlx::Error> {
        match outcome {
            Attempt::Delivered(status) => {
                metrics::counter!(m::WEBHOOK_ATTEMPTS, "result" => "delivered").increment(1);
                db::within(
                    DB_TIMEOUT,
                    db::delivered(&self.db, &c.event.id, &c.endpoint, status),
                )
                .await
            }
            Attempt::Failed(status, error) => {
                let gave_up = c.attempts >= self.hooks.max_attempts;
                let delay = self.hooks.delay(
                    c.attempts,
                    uuid::Uuid::new_v4().as_u128() as f64 / u128::MAX as f64,
                );
                let mut error = error;
                if error.len() > MAX_ERROR {
                    let mut cut = MAX_ERROR;
                    while !error.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    error.truncate(cut);
                }
                metrics::counter!(m::WEBHOOK_ATTEMPTS, "result" => if gave_up { "gave_up" } else { "failed" })
                    .increment(1);
                if gave_up {
                    tracing::error!(event.id = %c.event.id, endpoint = %redact_url(&c.endpoint), attempts = c.attempts, error.message = %error, "webhook delivery failed every attempt; it waits for POST /v1/admin/events/{{id}}/redeliver");
                } else {
                    tracing::warn!(event.id = %c.event.id, endpoint = %redact_url(&c.endpoint), attempts = c.attempts, retry_in_ms = delay.as_millis() as u64, error.message = %error, "webhook attempt failed; will retry");
                }
                db::within(
                    DB_TIMEOUT,
                    db::attempt_failed(
                        &self.db,
                        &c.event.id,
                        &c.endpoint,
                        status,
                        &error,
                        gave_up,
                        delay,
                    ),
                )
                .await
            }
        }
    }

    /// Sets the pending and failed gauges.
    async fn count(&self) {
        match db::within(DB_TIMEOUT, db::delivery_counts(&self.db)).await {
            Ok((pending, failed)) => {
                metrics::gauge!(m::WEBHOOK_PENDING).set(pending as f64);
                metrics::gauge!(m::WEBHOOK_FAILED).set(failed as f64);
            }
            Err(e) => tracing::debug!(error.message = %e, "cannot count webhook deliveries"),
        }
    }
}

/// A transport error in one line: what failed, without the URL again.
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(secret: &str) -> Result<Option<Webhooks>, String> {
        Webhooks::from_settings(
            &["http://127.0.0.1:9000/hooks".to_owned()],
            Some(secret),
            Duration::from_secs(10),
            Duration::from_secs(5),
            20,
        )
    }

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification's reference libraries.
        let h = hooks("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap()
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            h.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn settings_are_refused_with_a_reason() {
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let with = |urls: &[&str], secret: Option<&str>| {
            Webhooks::from_settings(
                &urls.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
                secret,
                Duration::from_secs(1),
                Duration::from_secs(1),
                3,
            )
        };
        assert!(with(&[], None).unwrap().is_none());
        assert!(with(&[" ", ""], Some(good)).unwrap().is_none());
        for (urls, secret, says) in [
            (&["http://a/h"][..], None, "QUOTAD_WEBHOOK_SECRET is not"),
            (
                &["http://a/h"][..],
                Some("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                "whsec_",
            ),
            (&["http://a/h"][..], Some("whsec_not base64!"), "base64"),
            (&["http://a/h"][..], Some("whsec_c2hvcnQ="), "holds 5 bytes"),
            (&["https://a/h"][..], Some(good), "forwarder"),
            (&["ftp://a/h"][..], Some(good), "scheme"),
            (&["/hooks"][..], Some(good), "not a URL"),
            (&["http://a/h#x"][..], Some(good), "fragment"),
            (&["http://a/h", "http://a/h"][..], Some(good), "twice"),
            (&["http://a/\u{7}"][..], Some(good), "control character"),
            (&["http://a/b c"][..], Some(good), "space"),
        ] {
            let err = with(urls, secret).unwrap_err();
            assert!(err.contains(says), "{urls:?} {secret:?}: {err}");
        }
        let many: Vec<String> = (0..11).map(|i| format!("http://a/{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(with(&refs, Some(good)).unwrap_err().contains("at most 10"));
        let h = with(&[" http://a/h ", "http://b:81/x?y=1"], Some(good))
            .unwrap()
            .unwrap();
        assert_eq!(h.endpoints, ["http://a/h", "http://b:81/x?y=1"]);
        assert!(
            !format!("{h:?}").contains("MfKQ"),
            "the key is never printed"
        );
    }

    #[test]
    fn the_delay_doubles_up_to_an_hour_with_jitter() {
        let h = hooks("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap()
            .unwrap();
        assert_eq!(h.delay(1, 0.5), Duration::from_secs(5));
        assert_eq!(h.delay(2, 0.5), Duration::from_secs(10));
        assert_eq!(h.delay(4, 0.5), Duration::from_secs(40));
        assert_eq!(h.delay(30, 0.5), Duration::from_secs(3600));
        assert_eq!(h.delay(1, 0.0), Duration::from_secs(4));
        assert_eq!(h.delay(1, 1.0), Duration::from_secs(6));
    }
}
