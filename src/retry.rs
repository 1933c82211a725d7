//! One retry pacing for every transient failure: exponential backoff with jitter, so that many
//! replicas hitting the same outage do not retry in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays starting at 100 ms, doubling up to 30 s, jittered, never giving up: the daemon keeps the
/// data in hand and waits for the outage to end.
pub fn backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps for the next delay of `pacing`.
pub async fn pause(pacing: &mut (impl Iterator<Item = Duration> + Send)) {
    let delay = pacing.next().unwrap_or(Duration::from_secs(30));
    tokio::time::sleep(delay).await;
}
