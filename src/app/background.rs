//! A thread of its own for the flusher: a single-threaded Tokio runtime.
//!
//! A flusher pass parses thousands of counter hashes and builds multi-row upserts; on the request
//! runtime that work holds a worker thread between two await points, and every request queued on
//! that worker waits behind it (at a constant 6,000 req/s on two cores the p99 was ten times what
//! it is with the flusher idle). On a thread of its own the kernel's scheduler interleaves it with
//! the request workers at a far finer grain. (It keeps the default priority: at nice +10 a
//! saturated machine starved it, and the flush lag under full load passed 2 s.) The runtime
//! lives until the daemon has drained, so the flusher's connections (created on it) outlive
//! every use.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A runtime on a thread of its own; stops when dropped.
pub struct Background {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the thread `name` with its runtime.
    pub fn start(name: &str) -> std::io::Result<Background> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(name)
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Background {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `f()` with this runtime as the current one, so that what it spawns runs here.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.handle.enter();
        f()
    }

    /// Runs `fut` on this runtime and waits for its output (from any runtime).
    pub async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.handle.spawn(fut).await
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropping the runtime cancels what still runs on it; that takes no time to speak of.
            let _ = thread.join();
        }
    }
}
