//! Envoy's rate-limit service over gRPC (`envoy.service.ratelimit.v3.RateLimitService`) and the
//! gRPC health service (`grpc.health.v1.Health`), on `QUOTAD_GRPC_LISTEN`, beside the HTTP API.
//!
//! - [`ratelimit`]: a `ShouldRateLimit` request read into a consume, and the decision written
//!   back as Envoy's answer.
//! - here: the server and its limits, the health reports, the mapping of [`ApiError`] to a gRPC
//!   status, and a shutdown bounded like the HTTP server's.
//!
//! Limits: a message over [`MAX_MESSAGE`] is refused; calls share the HTTP API's cap on requests
//! in flight (`QUOTAD_MAX_IN_FLIGHT`, past it `UNAVAILABLE` at once) and its deadline
//! (`QUOTAD_REQUEST_TIMEOUT_MS`); each call runs as a task of its own, so a slow one holds back
//! no other on the same connection; HTTP/2 keepalive pings close connections to peers that
//! vanished; at most `QUOTAD_MAX_CONNECTIONS` connections are open, as on the HTTP port.

mod ratelimit;

pub use ratelimit::{Names, RateLimiter};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::http::error::ApiError;
use crate::http::{not_ready, AppState};

/// Largest request message taken (a rate-limit request is a few hundred bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest header block (metadata) taken.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How often the health reports look at readiness.
const HEALTH_POLL: Duration = Duration::from_millis(100);

/// The name the rate-limit service answers health checks under.
pub const SERVICE: &str = <RateLimitServiceServer<RateLimiter> as NamedService>::NAME;

/// The limits of the gRPC server.
pub(crate) struct Settings {
    /// The domain and descriptor keys.
    pub names: Names,
    /// Most calls one HTTP/2 connection may have open at once.
    pub max_streams: u32,
    /// Most connections open at once (`QUOTAD_MAX_CONNECTIONS`, as for HTTP); further ones wait
    /// in the kernel's listen backlog instead of using up file descriptors.
    pub max_connections: usize,
    /// Longest wait for a new connection's first bytes (HTTP/2's preface and its first frame
    /// header; `QUOTAD_HEADER_TIMEOUT_MS`, as for an HTTP request header): a connection that
    /// sends nothing is closed, and gives its slot back.
    pub preface_timeout: Duration,
    /// Longest wait for running calls once shutdown begins.
    pub bound: Duration,
}

/// Serves the rate-limit and health services on `listener` until `stop` turns true, then
/// finishes running calls within `settings.bound` and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    settings: Settings,
    stop: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Not serving until the daemon is ready (the reporter starts with "" serving).
    report(&reporter, ServingStatus::NotServing).await;
    let ratelimit = RateLimitServiceServer::new(RateLimiter::new(state.clone(), settings.names))
        .max_decoding_message_size(MAX_MESSAGE);
    let incoming = capped(
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60))),
        settings.max_connections,
        settings.preface_timeout,
    );
    let mut signal = stop.clone();
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(settings.max_streams)
        .add_service(health)
        .add_service(ratelimit)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = signal.wait_for(|s| *s).await;
        });
    let mut stopping = stop.clone();
    let bounded = async {
        tokio::pin!(server);
        tokio::select! {
            served = &mut server => served,
            () = async { let _ = stopping.wait_for(|s| *s).await; } => {
                // Connections were told to go away; calls running finish, up to the bound.
                match tokio::time::timeout(settings.bound, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!("gRPC: shutdown bound reached with calls still running; closing");
                        Ok(())
                    }
                }
            }
        }
    };
    let (served, ()) = tokio::join!(bounded, watch_readiness(reporter, state, stop));
    tracing::info!("gRPC server stopped");
    served
}

/// `incoming`, taking a connection only while fewer than `max` are open: each one holds a slot
/// until it closes, and is closed if its first [`PREFACE_BYTES`] do not come within `preface`.
fn capped(
    incoming: TcpIncoming,
    max: usize,
    preface: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<Capped>> {
    let slots = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold(
        (Box::pin(incoming), slots),
        move |(mut incoming, slots)| async move {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let next = incoming.next().await?;
            let capped = next.map(|stream| Capped {
                stream,
                _slot: slot,
                preface: Some((Box::pin(tokio::time::sleep(preface)), 0)),
            });
            Some((capped, (incoming, slots)))
        },
    )
}

/// HTTP/2's client preface (24 bytes) and the header of its first frame (9): what a client sends
/// first, unasked.
const PREFACE_BYTES: usize = 24 + 9;

/// A connection holding one of the server's slots until it closes.
struct Capped {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the client's first [`PREFACE_BYTES`] are read: the deadline, and the bytes read.
    preface: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some((deadline, _)) = &mut this.preface {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within QUOTAD_HEADER_TIMEOUT_MS",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((_, seen))) = (&read, &mut this.preface) {
            *seen += buf.filled().len() - before;
            if *seen >= PREFACE_BYTES {
                this.preface = None;
            }
        }
        read
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Keeps the health reports in step with readiness (`SERVING` once quotad counts, `NOT_SERVING`
/// before, while Redis could evict, and from the start of shutdown), until `stop`.
async fn watch_readiness(
    reporter: HealthReporter,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported = ServingStatus::NotServing;
    loop {
        let stopping = *stop.borrow();
        let now = if !stopping && not_ready(&state).is_none() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if now != reported {
            report(&reporter, now).await;
            reported = now;
        }
        if stopping {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_POLL) => {}
            changed = stop.changed() => if changed.is_err() {
                report(&reporter, ServingStatus::NotServing).await;
                return;
            },
        }
    }
}

/// Sets the status of the server as a whole ("") and of the rate-limit service.
async fn report(reporter: &HealthReporter, status: ServingStatus) {
    for name in ["", SERVICE] {
        reporter.set_service_status(name, status).await;
    }
}

/// An [`ApiError`] as a gRPC status: the code by the HTTP status it stands for, and
/// `"<CODE>: <sentence>"` as the message. A 409 (an idempotency key used for another call, or
/// refunded) is `FAILED_PRECONDITION`: the same call will not succeed until the caller changes
/// it (a new key), which is not what `ABORTED` (retry the sequence) says.
pub(crate) fn status_of(e: ApiError) -> tonic::Status {
    use tonic::Code;
    let code = match e.status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::CONFLICT => Code::FailedPrecondition,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        _ => Code::Internal,
    };
    tonic::Status::new(code, format!("{}: {}", e.code, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_the_grpc_status_of_their_http_status_with_code_and_sentence() {
        let cases = [
            (
                ApiError::bad_request("X", "bad"),
                tonic::Code::InvalidArgument,
            ),
            (
                ApiError::unauthorized("X", "who"),
                tonic::Code::Unauthenticated,
            ),
            (
                ApiError::forbidden("X", "no"),
                tonic::Code::PermissionDenied,
            ),
            (
                ApiError::conflict("X", "again"),
                tonic::Code::FailedPrecondition,
            ),
            (
                ApiError::unavailable("X", "later"),
                tonic::Code::Unavailable,
            ),
            (ApiError::not_found("X", "none"), tonic::Code::NotFound),
        ];
        for (error, code) in cases {
            let message = format!("X: {}", error.message);
            let status = status_of(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
        let internal = ApiError::internal(&std::io::Error::other("boom"));
        assert_eq!(status_of(internal).code(), tonic::Code::Internal);
    }

    #[test]
    fn the_service_is_named_as_envoy_calls_it() {
        assert_eq!(SERVICE, "envoy.service.ratelimit.v3.RateLimitService");
    }
}
