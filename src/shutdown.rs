//! Graceful shutdown, as an explicit mechanism.
//!
//! One [`CancellationToken`] means "stop receiving". The first SIGINT or SIGTERM (or the idle detector)
//! cancels it; the source stops, which closes its channel, and each stage in turn drains what it holds
//! and closes its own output, down to the acknowledger. Nothing is cut off mid-batch, so a drained
//! shutdown loses nothing and leaves nothing unacknowledged. A second signal exits at once: what was
//! committed is safe, and what was not is simply not acknowledged, so the source delivers it again.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// Exit status after a second signal: the conventional 128 + SIGINT.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Listens for SIGINT/SIGTERM: the first cancels `token`, the second exits the process.
pub fn listen_for_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down: draining the pipeline (signal again to exit at once)"
                );
                token.cancel();
            } else {
                tracing::warn!(
                    signal = name,
                    "second signal: exiting now; uncommitted messages stay at the source"
                );
                std::process::exit(FORCED_EXIT_CODE);
            }
        }
    });
    Ok(())
}

/// Cancels `token` once the source has delivered nothing for `idle` and every message received has
/// been committed and acknowledged.
pub fn exit_when_idle(token: CancellationToken, stats: std::sync::Arc<Stats>, idle: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = token.cancelled() => return,
            }
            if stats.idle_for() >= idle && stats.in_flight() == 0 {
                tracing::info!(
                    idle_seconds = idle.as_secs_f64(),
                    "source idle and everything acknowledged; stopping"
                );
                token.cancel();
                return;
            }
        }
    });
}
