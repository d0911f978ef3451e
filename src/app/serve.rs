//! The HTTP server: hyper's HTTP/1 connection driver under our own accept loop, so that what
//! `axum::serve` leaves open is bounded.
//!
//! - A connection must send a complete request header within the header timeout, counted from
//!   when it opened or its previous answer was sent (hyper's header-read timer starts whenever
//!   the connection waits for a request); so a half-sent header, and a keep-alive connection
//!   left idle, are closed after it.
//! - At most `max_connections` are open; further ones wait in the kernel's listen backlog
//!   instead of using up file descriptors.
//! - On shutdown the listener closes, connections with no request running are closed at once
//!   (a half-sent header is not a request quotad took), and those with one finish it and close,
//!   up to the shutdown bound; whatever is left then is closed.
//!
//! Each request carries the peer address as `ConnectInfo<SocketAddr>`, as axum's
//! `into_make_service_with_connect_info` would add it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The limits of the server.
pub(super) struct Settings {
    /// Longest wait for a complete request header (and longest keep-alive idle time).
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest wait for running requests once shutdown begins.
    pub bound: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then closes every connection within
/// `settings.bound`.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // pause briefly rather than spin, and go on.
                    tracing::warn!(error.message = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let running = Arc::new(AtomicUsize::new(0));
        let service = {
            let (router, running) = (router.clone(), running.clone());
            hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                // Auth reads the peer address, as with axum's `into_make_service_with_connect_info`.
                request.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                let running = Running::enter(running.clone());
                async move {
                    let response =
                        tower_service::Service::call(&mut router, request.map(Body::new)).await;
                    drop(running);
                    response
                }
            })
        };
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let mut closing = closing.clone();
        connections.spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|c| *c) => {}
            }
            // No more requests on this connection: an idle one closes now, one with a request
            // running closes once its answer is written.
            conn.as_mut().graceful_shutdown();
            if running.load(Ordering::Acquire) > 0 {
                let _ = conn.await;
            } else {
                // Nothing running: at most an answer still being written, or a header that
                // hyper would otherwise wait for until the header timeout. A short grace for
                // the first, then the connection is dropped (closed).
                let _ = tokio::time::timeout(IDLE_GRACE, conn).await;
            }
        });
    }
    drop(listener);
    let began = Instant::now();
    let _ = closing_tx.send(true);
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.bound, all_closed)
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "shutdown bound reached with requests still running; closing their connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    tracing::info!(
        took_ms = began.elapsed().as_millis() as u64,
        "all connections closed"
    );
    Ok(())
}

/// How long a connection with no request running may take to close once shutdown begins.
const IDLE_GRACE: Duration = Duration::from_millis(200);

/// Marks a request as running on its connection while it lives.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn enter(count: Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::AcqRel);
        Running(count)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
