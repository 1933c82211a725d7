//! Deleting committed SQS messages, extending the visibility of waiting ones, releasing the rest.
//!
//! A delete that keeps failing is given up after a few attempts rather than retried forever: the
//! message's row is already committed, so when SQS hands it out again the dedupe ledger skips it. A
//! message is never deleted before its commit, whatever fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use futures::stream::{self, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::in_flight::InFlight;
use crate::aws;
use crate::envelope::AckToken;
use crate::retry;
use crate::source::Acknowledger;
use crate::stats::Stats;

/// SQS accepts at most 10 entries per batch call.
const SQS_BATCH: usize = 10;
/// Batch calls in flight at once per acknowledgement.
const PARALLEL_CALLS: usize = 8;
/// Attempts for a delete before leaving the message to redelivery and the ledger.
const DELETE_ATTEMPTS: usize = 6;

pub struct SqsAcknowledger {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    extender: Mutex<Option<JoinHandle<()>>>,
}

impl SqsAcknowledger {
    /// Starts the visibility extender, which runs until [`Acknowledger::finish`].
    pub fn start(
        client: aws_sdk_sqs::Client,
        queue_url: String,
        in_flight: Arc<InFlight>,
        visibility: Duration,
        stats: Arc<Stats>,
    ) -> SqsAcknowledger {
        let stop = CancellationToken::new();
        let extender = tokio::spawn(extend_visibility(
            client.clone(),
            queue_url.clone(),
            in_flight.clone(),
            visibility,
            stop.clone(),
        ));
        SqsAcknowledger {
            client,
            queue_url,
            in_flight,
            stats,
            stop,
            extender: Mutex::new(Some(extender)),
        }
    }

    async fn delete(&self, handles: Vec<String>) {
        let mut pending = handles;
        let mut pacing = retry::backoff();
        for attempt in 1..=DELETE_ATTEMPTS {
            let results: Vec<Vec<String>> = stream::iter(groups_of_ten(&pending))
                .map(|group| delete_group(&self.client, &self.queue_url, group))
                .buffer_unordered(PARALLEL_CALLS)
                .collect()
                .await;
            pending = results.into_iter().flatten().collect();
            if pending.is_empty() {
                return;
            }
            if attempt < DELETE_ATTEMPTS {
                retry::pause(&mut pacing).await;
            }
        }
        tracing::warn!(
            count = pending.len(),
            "could not delete committed SQS messages; they will be redelivered and skipped as duplicates"
        );
    }
}

/// Owned groups of at most 10 distinct handles, one per batch call. SQS refuses a whole batch call
/// that names one receipt handle twice, and one message can reach the pipeline twice (a queue may
/// hand it to two concurrent receives), so repeats are dropped here, keeping the first.
fn groups_of_ten(handles: &[String]) -> Vec<Vec<String>> {
    let mut seen = std::collections::HashSet::with_capacity(handles.len());
    let distinct: Vec<String> = handles
        .iter()
        .filter(|h| seen.insert(h.as_str()))
        .cloned()
        .collect();
    distinct.chunks(SQS_BATCH).map(<[String]>::to_vec).collect()
}

/// Deletes up to 10 messages; returns the handles worth another attempt.
async fn delete_group(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    handles: Vec<String>,
) -> Vec<String> {
    let entries: Vec<DeleteMessageBatchRequestEntry> = handles
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .build()
                .ok()
        })
        .collect();
    match client
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) => out
            .failed
            .into_iter()
            .filter_map(|f| {
                if f.sender_fault {
                    // A stale receipt handle: the message was already handed out again.
                    tracing::debug!(
                        code = f.code,
                        "SQS refused a delete; the message will come back"
                    );
                    None
                } else {
                    f.id.parse::<usize>()
                        .ok()
                        .and_then(|i| handles.get(i).cloned())
                }
            })
            .collect(),
        Err(e) if aws::is_malformed_batch(&e) && handles.len() > 1 => {
            // Retrying the same call cannot cure it; one call per message always forms a valid batch.
            tracing::debug!(error = %aws::describe(&e), "SQS refused a delete batch; deleting one by one");
            let mut again = Vec::new();
            for handle in handles {
                again.extend(Box::pin(delete_group(client, queue_url, vec![handle])).await);
            }
            again
        }
        Err(e) => {
            tracing::warn!(error = %aws::describe(&e), "SQS DeleteMessageBatch failed");
            match aws::classify(&e) {
                aws::AwsErrorClass::Transient if !aws::is_malformed_batch(&e) => handles,
                _ => Vec::new(),
            }
        }
    }
}

/// Sets the visibility timeout of up to 10 messages; returns the handles that were changed.
async fn change_visibility(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    handles: Vec<String>,
    seconds: i32,
) -> Vec<String> {
    let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = handles
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .visibility_timeout(seconds)
                .build()
                .ok()
        })
        .collect();
    match client
        .change_message_visibility_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(out) => out
            .successful
            .into_iter()
            .filter_map(|s| {
                s.id.parse::<usize>()
                    .ok()
                    .and_then(|i| handles.get(i).cloned())
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %aws::describe(&e), "SQS ChangeMessageVisibilityBatch failed");
            Vec::new()
        }
    }
}

/// Keeps waiting messages invisible: every quarter of the timeout, any message due to reappear within
/// half of it gets a fresh full timeout.
async fn extend_visibility(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    visibility: Duration,
    stop: CancellationToken,
) {
    let tick = (visibility / 4).max(Duration::from_millis(500));
    let seconds = visibility.as_secs() as i32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
        let due = in_flight.due(Instant::now(), visibility / 2);
        if due.is_empty() {
            continue;
        }
        let requested_at = Instant::now();
        let extended: Vec<String> = stream::iter(groups_of_ten(&due))
            .map(|group| change_visibility(&client, &queue_url, group, seconds))
            .buffer_unordered(PARALLEL_CALLS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();
        tracing::debug!(
            due = due.len(),
            extended = extended.len(),
            "extended SQS visibility"
        );
        in_flight.extended(&extended, requested_at + visibility);
    }
}

#[async_trait]
impl Acknowledger for SqsAcknowledger {
    async fn acknowledge(&self, tokens: Vec<AckToken>) {
        let handles: Vec<String> = tokens
            .into_iter()
            .filter_map(|t| match t {
                AckToken::Sqs { receipt_handle } => Some(receipt_handle),
                AckToken::None | AckToken::Kinesis(_) => None,
            })
            .collect();
        self.delete(handles.clone()).await;
        self.in_flight.finish(handles.iter().map(String::as_str));
    }

    async fn finish(&self) -> usize {
        self.stop.cancel();
        let extender = self
            .extender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(extender) = extender {
            let _ = extender.await;
        }
        let left = self.in_flight.handles();
        if left.is_empty() {
            return 0;
        }
        // Visibility 0: another consumer (or our next start) gets them at once instead of after the
        // timeout. Best effort: if this fails they reappear when the timeout runs out anyway.
        let released: Vec<String> = stream::iter(groups_of_ten(&left))
            .map(|group| change_visibility(&self.client, &self.queue_url, group, 0))
            .buffer_unordered(PARALLEL_CALLS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();
        let n = self.in_flight.finish(left.iter().map(String::as_str));
        self.stats.record_released(n);
        tracing::info!(
            held = n,
            released = released.len(),
            "handed unprocessed SQS messages back to the queue"
        );
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hold_each_handle_once_and_at_most_ten() {
        let handles: Vec<String> = ["a", "b", "a", "c", "b"]
            .into_iter()
            .chain((0..20).map(|_| "d"))
            .map(String::from)
            .collect();
        assert_eq!(groups_of_ten(&handles), vec![vec!["a", "b", "c", "d"]]);
        let many: Vec<String> = (0..25).map(|i| i.to_string()).collect();
        let sizes: Vec<usize> = groups_of_ten(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
    }
}
