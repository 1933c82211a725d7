//! Graceful shutdown, as an explicit mechanism.
//!
//! One [`Shutdown`] means "stop receiving". The first SIGINT or SIGTERM (or the idle detector)
//! requests it; the source stops, which closes its channel, and each stage in turn drains what it holds
//! and closes its own output, down to the acknowledger. Nothing is cut off mid-batch, so a drained
//! shutdown loses nothing and leaves nothing unacknowledged. A second signal exits at once: what was
//! committed is safe, and what was not is simply not acknowledged, so the source delivers it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::background::BackgroundTask;
use crate::stats::Stats;

/// The request to stop receiving, and how urgently.
///
/// A signal or a failure stops at once: a long poll in progress gets a short grace, then is
/// abandoned. The idle detector stops patiently: receives in progress are allowed to return, since
/// one abandoned while the queue server still holds it can take messages that arrive meanwhile and
/// strand them until their visibility timeout.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    finish_receives: Arc<AtomicBool>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Stop receiving now.
    pub fn stop(&self) {
        self.token.cancel();
    }

    /// Stop receiving once the receives in progress have returned.
    pub fn stop_after_receives(&self) {
        if !self.token.is_cancelled() {
            self.finish_receives.store(true, Ordering::Relaxed);
        }
        self.token.cancel();
    }

    /// Resolves when a stop has been requested.
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Whether receives in progress may finish rather than be abandoned.
    pub fn finishes_receives(&self) -> bool {
        self.finish_receives.load(Ordering::Relaxed)
    }
}

/// Exit status after a second signal: the conventional 128 + SIGINT.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Listens for SIGINT/SIGTERM: the first requests `shutdown`, the second exits the process. The
/// handlers are installed now (so that a failure to install them stops the start); the returned
/// task listens until it is stopped.
pub fn listen_for_signals(shutdown: Shutdown) -> std::io::Result<BackgroundTask> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(BackgroundTask::new(
        "signal listener",
        move |stop| async move {
            let mut seen = 0;
            loop {
                let name = tokio::select! {
                    _ = interrupt.recv() => "SIGINT",
                    _ = terminate.recv() => "SIGTERM",
                    _ = stop.cancelled() => return Ok(()),
                };
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = name,
                        "shutting down: draining the pipeline (signal again to exit at once)"
                    );
                    shutdown.stop();
                } else {
                    tracing::warn!(
                        signal = name,
                        "second signal: exiting now; uncommitted messages stay at the source"
                    );
                    std::process::exit(FORCED_EXIT_CODE);
                }
            }
        },
    ))
}

/// Requests `shutdown` once every message received has been committed and acknowledged, no part
/// of the source is still catching up (see [`Stats::is_catching_up`]) and the source has delivered
/// nothing for `idle` (see [`Stats::idle_for`]).
pub fn exit_when_idle(shutdown: Shutdown, stats: Arc<Stats>, idle: Duration) -> BackgroundTask {
    BackgroundTask::new("idle watch", move |stop| async move {
        // Idle time counts from the start of the run at the earliest: a slow start-up (connecting,
        // resolving the queue) is not time in which the source found nothing.
        let running_since = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.requested() => return Ok(()),
                _ = stop.cancelled() => return Ok(()),
            }
            let idle_for = stats.idle_for().min(running_since.elapsed());
            if stats.in_flight() == 0 && !stats.is_catching_up() && idle_for >= idle {
                tracing::info!(
                    idle_seconds = idle.as_secs_f64(),
                    "source idle and everything acknowledged; stopping"
                );
                shutdown.stop_after_receives();
                return Ok(());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source still catching up (a Kinesis shard not yet read to its tip) is not idle, however
    /// long it has delivered nothing; the idle time counts once it has caught up.
    #[tokio::test(start_paused = true)]
    async fn a_source_catching_up_is_not_idle() {
        let stats = Arc::new(Stats::default());
        let shutdown = Shutdown::new();
        let idle = Duration::from_secs(1);
        let catching_up = stats.catching_up();
        let watch = exit_when_idle(shutdown.clone(), stats.clone(), idle);
        tokio::spawn(watch.start(CancellationToken::new()));

        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!shutdown.is_requested(), "stopped while catching up");
        drop(catching_up);
        tokio::time::timeout(Duration::from_millis(200), shutdown.requested())
            .await
            .expect("stops once caught up: nothing came for longer than the idle time");
    }

    /// A sink stall longer than the idle time must not end the run the moment it clears: the source
    /// was held back, not idle, and gets the full idle time to receive what is still queued.
    #[tokio::test(start_paused = true)]
    async fn a_cleared_stall_does_not_count_as_idle() {
        let stats = Arc::new(Stats::default());
        let shutdown = Shutdown::new();
        let idle = Duration::from_secs(1);
        stats.record_received(5);
        let watch = exit_when_idle(shutdown.clone(), stats.clone(), idle);
        tokio::spawn(watch.start(CancellationToken::new()));

        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!shutdown.is_requested(), "messages are still in flight");
        stats.record_acknowledged(5);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !shutdown.is_requested(),
            "stopped as soon as the stall cleared"
        );
        let cleared = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), shutdown.requested())
            .await
            .expect("stops once idle with nothing in flight");
        let waited = cleared.elapsed() + Duration::from_millis(300);
        assert!(
            waited >= idle && waited <= idle + Duration::from_millis(100),
            "stopped {waited:?} after the stall cleared"
        );
        assert!(shutdown.finishes_receives());
    }
}
