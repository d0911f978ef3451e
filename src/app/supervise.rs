//! Background tasks, watched. Each runs until the daemon stops; one that ends before that (it
//! panicked, or returned) is logged by name, counted in `quotad_task_restarts_total`, and started
//! again after a backoff.
//!
//! Restarted rather than taking the daemon down: every background task is safe to start again
//! (the flusher finds its work in Redis' dirty sets, the invalidation listener forgets every
//! remembered refusal when it subscribes, start-up checks are idempotent, the SIGHUP listener
//! registers again), while a daemon that exits on a bug in one of them would stop answering
//! consumes for every user until an orchestrator restarted it, and would exit again on the same
//! input. The request path needs none of them to answer; the metric and its alert
//! (`QuotadTaskRestarting`) make a task that keeps failing visible.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics as m;

/// The first wait before a restart; it doubles on each restart up to [`MAX_BACKOFF`], and starts
/// again from here once a task has run for [`SETTLED`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const SETTLED: Duration = Duration::from_secs(60);

/// Runs `task(stop)` as the background task `name` until `stop` turns true, restarting it when it
/// ends before that. When `stop` turns true the task is dropped where it waits (the flusher, which
/// gets `stop` too, ends the same way: a shutdown drains with a pass of its own).
pub fn supervise<F, Fut>(name: &'static str, stop: watch::Receiver<bool>, task: F) -> JoinHandle<()>
where
    F: Fn(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // The series exist from the start at 0, so `increase()` sees the first restart.
    for how in ["panicked", "returned"] {
        metrics::counter!(m::TASK_RESTARTS, "task" => name, "how" => how).increment(0);
    }
    tokio::spawn(async move {
        let mut delay = MIN_BACKOFF;
        loop {
            let started = tokio::time::Instant::now();
            let run = task(stop.clone());
            let mut stopped = stop.clone();
            let outcome = tokio::spawn(async move {
                tokio::select! {
                    () = run => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            })
            .await;
            if *stop.borrow() {
                return;
            }
            let how = match &outcome {
                Ok(()) => "returned",
                Err(e) if e.is_panic() => "panicked",
                Err(_) => "cancelled",
            };
            if started.elapsed() >= SETTLED {
                delay = MIN_BACKOFF;
            }
            metrics::counter!(m::TASK_RESTARTS, "task" => name, "how" => how).increment(1);
            tracing::error!(
                task = name,
                how,
                restart_in_ms = delay.as_millis() as u64,
                "background task stopped unexpectedly; starting it again"
            );
            let mut stopped = stop.clone();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_returns_is_started_again_with_a_growing_backoff() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let counted = runs.clone();
        let started = tokio::time::Instant::now();
        let supervisor = supervise("test", stopped, move |_| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("first run fails"),
                    1 => {} // returns
                    _ => std::future::pending().await,
                }
            }
        });
        // 0: panics at once; restart after 100 ms; 1: returns; restart after 200 ms; 2: runs on.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        stop.send(true).unwrap();
        supervisor.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not started again after stop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_drops_a_running_task_and_does_not_start_it_again() {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let (d, r) = (dropped.clone(), runs.clone());
        let supervisor = supervise("test", stopped, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            let guard = Dropped(d.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        stop.send(true).unwrap();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
