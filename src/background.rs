//! Work a run does beside its stages (extending SQS visibility, pruning the ledger, serving metrics,
//! listening for signals, watching for idleness), started and watched by the pipeline.
//!
//! Such work never ends by itself while the run lasts, so a task of its own that panics or returns
//! an error would otherwise die unseen: visibility would stop being extended and messages would be
//! redelivered to someone else mid-batch, or the metrics would silently go dark. Whoever needs
//! background work therefore does not spawn it but hands a [`BackgroundTask`] to the pipeline, which
//! runs it beside the stages: a failure or panic is logged, stops the run, and, once the stages have
//! drained as after a signal, makes the run end with an error. When the stages are done the
//! pipeline cancels the token each task was started with and waits for it (briefly) to end.

use std::future::Future;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

/// Why a background task failed; the cause is kept for the log and the run's error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BackgroundError(Box<dyn std::error::Error + Send + Sync>);

impl BackgroundError {
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> BackgroundError {
        BackgroundError(Box::new(cause))
    }
}

/// What a started background task runs: it ends with `Ok` once its stop token is cancelled (or
/// when its work is done), with an error when it cannot go on.
pub type BackgroundWork = Pin<Box<dyn Future<Output = Result<(), BackgroundError>> + Send>>;

/// A background task not started yet: its name (for logs and errors) and how to start it with the
/// token that stops it.
pub struct BackgroundTask {
    pub name: &'static str,
    start: Box<dyn FnOnce(CancellationToken) -> BackgroundWork + Send>,
}

impl BackgroundTask {
    pub fn new<F, W>(name: &'static str, start: F) -> BackgroundTask
    where
        F: FnOnce(CancellationToken) -> W + Send + 'static,
        W: Future<Output = Result<(), BackgroundError>> + Send + 'static,
    {
        BackgroundTask {
            name,
            start: Box::new(move |stop| Box::pin(start(stop))),
        }
    }

    /// The work, to be spawned; it stops when `stop` is cancelled.
    pub fn start(self, stop: CancellationToken) -> BackgroundWork {
        (self.start)(stop)
    }
}

impl std::fmt::Debug for BackgroundTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundTask")
            .field("name", &self.name)
            .finish()
    }
}
