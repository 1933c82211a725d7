//! Deleting committed SQS messages, extending the visibility of waiting ones, releasing the rest.
//!
//! A delete that keeps failing is given up after a few attempts rather than retried forever: the
//! message's row is already committed, so when SQS hands it out again the dedupe ledger skips it. A
//! message is never deleted before its commit, whatever fails.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::in_flight::InFlight;
use crate::aws::AwsError;
use crate::aws::sqs_batch::{self, BatchCall, EntryFailure, entry_failures};
use crate::background::BackgroundTask;
use crate::envelope::AckToken;
use crate::error_chain::Chain;
use crate::retry::RetryPolicy;
use crate::source::Acknowledger;
use crate::stats::Stats;

/// Batch calls in flight at once per acknowledgement.
const PARALLEL_CALLS: usize = 8;
/// A delete that keeps failing is left to redelivery and the ledger after this many attempts.
const DELETE: RetryPolicy = RetryPolicy::attempts(6);
/// A visibility change is tried once: the extender tries again at its next tick, and a release that
/// fails only means the message reappears when its timeout runs out.
const CHANGE_VISIBILITY: RetryPolicy = RetryPolicy::attempts(1);

pub struct SqsAcknowledger {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    visibility: Duration,
    stats: Arc<Stats>,
}

impl SqsAcknowledger {
    /// Messages received with `visibility` are deleted once committed; the extender that keeps
    /// waiting ones invisible is [`SqsAcknowledger::visibility_extender`], run by the pipeline.
    pub fn new(
        client: aws_sdk_sqs::Client,
        queue_url: String,
        in_flight: Arc<InFlight>,
        visibility: Duration,
        stats: Arc<Stats>,
    ) -> SqsAcknowledger {
        SqsAcknowledger {
            client,
            queue_url,
            in_flight,
            visibility,
            stats,
        }
    }

    /// The background task that extends the visibility of the messages held; the pipeline stops it
    /// before [`Acknowledger::finish`] hands the rest back.
    pub fn visibility_extender(&self) -> BackgroundTask {
        let (client, queue_url) = (self.client.clone(), self.queue_url.clone());
        let (in_flight, visibility) = (self.in_flight.clone(), self.visibility);
        BackgroundTask::new("visibility extender", move |stop| async move {
            extend_visibility(client, queue_url, in_flight, visibility, stop).await;
            Ok(())
        })
    }

    async fn delete(&self, handles: Vec<String>) {
        let call = HandleCall {
            client: &self.client,
            queue_url: &self.queue_url,
            action: HandleAction::Delete,
        };
        let sent = sqs_batch::send_all(&call, handles, DELETE, PARALLEL_CALLS).await;
        for (_, why) in &sent.refused {
            // A stale receipt handle: the message was already handed out again.
            tracing::debug!(error = %why, "SQS refused a delete; the message will come back");
        }
        if !sent.unsent.is_empty() {
            tracing::warn!(
                count = sent.unsent.len(),
                error = sent.last_failure.as_ref().map(|e| Chain(e).to_string()),
                "could not delete committed SQS messages; they will be redelivered and skipped as duplicates"
            );
        }
    }
}

/// What to do with a batch of receipt handles.
#[derive(Clone, Copy)]
enum HandleAction {
    Delete,
    /// Set the visibility timeout to this many seconds.
    ChangeVisibility(i32),
}

/// DeleteMessageBatch or ChangeMessageVisibilityBatch: receipt handles, each once per call.
struct HandleCall<'a> {
    client: &'a aws_sdk_sqs::Client,
    queue_url: &'a str,
    action: HandleAction,
}

#[async_trait]
impl BatchCall for HandleCall<'_> {
    type Entry = String;

    fn name(&self) -> &'static str {
        match self.action {
            HandleAction::Delete => "DeleteMessageBatch",
            HandleAction::ChangeVisibility(_) => "ChangeMessageVisibilityBatch",
        }
    }

    fn distinct_key<'a>(&self, handle: &'a String) -> Option<&'a str> {
        Some(handle)
    }

    async fn call(&self, handles: &[&String]) -> Result<Vec<EntryFailure>, AwsError> {
        let ids = (0..handles.len()).map(|i| i.to_string());
        let failed = match self.action {
            HandleAction::Delete => {
                let entries = ids.zip(handles).filter_map(delete_entry).collect();
                let request = self.client.delete_message_batch();
                let out = request.queue_url(self.queue_url).set_entries(Some(entries));
                out.send().await?.failed
            }
            HandleAction::ChangeVisibility(seconds) => {
                let entries = ids
                    .zip(handles)
                    .filter_map(|(id, h)| visibility_entry(id, h, seconds));
                let request = self.client.change_message_visibility_batch();
                let out = request.queue_url(self.queue_url);
                out.set_entries(Some(entries.collect()))
                    .send()
                    .await?
                    .failed
            }
        };
        Ok(entry_failures(failed))
    }
}

fn delete_entry((id, handle): (String, &&String)) -> Option<DeleteMessageBatchRequestEntry> {
    let entry = DeleteMessageBatchRequestEntry::builder().id(id);
    entry.receipt_handle(*handle).build().ok()
}

fn visibility_entry(
    id: String,
    handle: &str,
    seconds: i32,
) -> Option<ChangeMessageVisibilityBatchRequestEntry> {
    let entry = ChangeMessageVisibilityBatchRequestEntry::builder().id(id);
    entry
        .receipt_handle(handle)
        .visibility_timeout(seconds)
        .build()
        .ok()
}

/// Sets the visibility of `handles` to `seconds`; returns the handles that were changed.
async fn change_visibility(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    handles: Vec<String>,
    seconds: i32,
) -> Vec<String> {
    let call = HandleCall {
        client,
        queue_url,
        action: HandleAction::ChangeVisibility(seconds),
    };
    let sent = sqs_batch::send_all(&call, handles, CHANGE_VISIBILITY, PARALLEL_CALLS).await;
    if let Some(e) = &sent.last_failure {
        tracing::warn!(error = %Chain(e), "SQS ChangeMessageVisibilityBatch failed");
    }
    sent.delivered
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
        let extended = change_visibility(&client, &queue_url, due.clone(), seconds).await;
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
        let left = self.in_flight.handles();
        if left.is_empty() {
            return 0;
        }
        // Visibility 0: another consumer (or our next start) gets them at once instead of after the
        // timeout. Best effort: if this fails they reappear when the timeout runs out anyway.
        let released = change_visibility(&self.client, &self.queue_url, left.clone(), 0).await;
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
