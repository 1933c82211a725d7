//! One retry policy for every transient failure: exponential backoff with jitter (so that many
//! replicas hitting the same outage do not retry in lockstep), through `backon`, either until the
//! call succeeds or for a bounded number of attempts.
//!
//! Each caller names its policy where it retries: the sink's commits and the SQS receives retry
//! for as long as an outage lasts (the data stays in hand, the pipeline stalls and loses nothing);
//! acknowledgements, dead-letter forwarding and seeding give up after a few attempts, each for its
//! own reason, stated where its policy is defined.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How often a failing call is tried, and how long to wait in between: 100 ms, doubling up to
/// 30 s, jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `None`: until it succeeds.
    attempts: Option<usize>,
}

const FIRST_DELAY: Duration = Duration::from_millis(100);
const LONGEST_DELAY: Duration = Duration::from_secs(30);

impl RetryPolicy {
    /// Retries for as long as the failure lasts: for work whose data is held until it succeeds.
    pub const FOREVER: RetryPolicy = RetryPolicy { attempts: None };

    /// At most `attempts` attempts in all (at least one).
    pub const fn attempts(attempts: usize) -> RetryPolicy {
        RetryPolicy {
            attempts: Some(if attempts == 0 { 1 } else { attempts }),
        }
    }

    /// The delays between attempts, as `backon` takes them.
    pub fn backoff(self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::default()
            .with_min_delay(FIRST_DELAY)
            .with_max_delay(LONGEST_DELAY)
            .with_jitter();
        match self.attempts {
            Some(n) => builder.with_max_times(n - 1),
            None => builder.without_max_times(),
        }
    }
}

/// The delays of [`RetryPolicy::FOREVER`], for a loop that paces itself rather than retrying one
/// call (a reader whose pacing starts over as soon as it makes progress).
pub fn backoff() -> impl Iterator<Item = Duration> + Send {
    RetryPolicy::FOREVER.backoff().build()
}

/// Sleeps for the next delay of `pacing`.
pub async fn pause(pacing: &mut (impl Iterator<Item = Duration> + Send)) {
    tokio::time::sleep(next_delay(pacing)).await;
}

/// The next delay of `pacing`, for a caller that records it before sleeping.
pub fn next_delay(pacing: &mut (impl Iterator<Item = Duration> + Send)) -> Duration {
    pacing.next().unwrap_or(LONGEST_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::Retryable;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn bounded_policies_stop_after_their_attempts() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), &str> = (|| async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err("down")
        })
        .retry(RetryPolicy::attempts(3).backoff())
        .await;
        assert_eq!(result, Err("down"));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn forever_retries_until_success_with_growing_delays() {
        let calls = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<usize, &str> = (|| async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                n if n < 20 => Err("down"),
                n => Ok(n),
            }
        })
        .retry(RetryPolicy::FOREVER.backoff())
        .await;
        assert_eq!(result, Ok(20));
        // Twenty delays, most of them at the 30 s ceiling (jitter only adds).
        assert!(
            started.elapsed() >= Duration::from_secs(300),
            "{:?}",
            started.elapsed()
        );
    }
}
