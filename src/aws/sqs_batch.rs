//! SQS batch calls, written once: groups of at most ten entries, failed entries retried, entries
//! SQS refuses for themselves set aside.
//!
//! Deleting acknowledged messages, changing their visibility, forwarding dead letters and seeding
//! all send entries in `…Batch` calls, and each call can fail three ways: for some entries on SQS's
//! side (retry those), for some entries for themselves (a stale receipt handle, a body the queue will
//! not take: never retried), or as a whole. A whole call that failed is retried as its
//! [`RetryPolicy`] allows, unless retrying cannot help: a call SQS refused for its shape (two
//! entries naming one receipt handle, too many bytes) is split into single entries instead, which
//! always form a valid call, and a fatal error (the queue is gone, access denied) ends at once.
//!
//! What each kind of call sends is its [`BatchCall`]; this module packs entries into calls (never
//! one receipt handle twice per call, never more than the call's byte limit) and accounts for every
//! entry: each ends in exactly one of [`Sent::delivered`], [`Sent::refused`] or [`Sent::unsent`].

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use backon::RetryableWithContext;
use futures::stream::{self, Stream, StreamExt};

use super::AwsError;
use crate::retry::RetryPolicy;

/// SQS takes at most ten entries per batch call.
pub const MAX_ENTRIES: usize = 10;

/// One kind of SQS batch call.
#[async_trait]
pub trait BatchCall: Send + Sync {
    type Entry: Send + Sync;

    /// What the call is, for logs (`"DeleteMessageBatch"`).
    fn name(&self) -> &'static str;

    /// Bytes an entry adds to a call, for calls SQS limits in size; 0 where only the count matters.
    fn size(&self, _entry: &Self::Entry) -> usize {
        0
    }

    /// Most bytes one call may carry.
    fn max_call_bytes(&self) -> usize {
        usize::MAX
    }

    /// A key that must not appear twice in one call (a receipt handle): a repeat is dropped before
    /// packing, keeping the first.
    fn distinct_key<'a>(&self, _entry: &'a Self::Entry) -> Option<&'a str> {
        None
    }

    /// One call with `entries`, the id of each being its position in the slice; returns the entries
    /// that failed, by position.
    async fn call(&self, entries: &[&Self::Entry]) -> Result<Vec<EntryFailure>, AwsError>;
}

/// An entry a successful call did not carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    /// Position in the call.
    pub index: usize,
    /// SQS blames the entry itself: never retried.
    pub sender_fault: bool,
    pub code: String,
    pub message: Option<String>,
}

/// A message for SendMessageBatch, its size as SQS counts it (body and attributes), and what the
/// caller knows it by.
pub struct Outgoing<T> {
    /// Its id is set per call.
    pub entry: SendMessageBatchRequestEntry,
    pub bytes: usize,
    pub tag: T,
}

/// SendMessageBatch of prepared messages, within a byte limit per call, each call answered within
/// an optional time limit (a stuck queue must not hold up its caller for long).
pub struct SendMessages<'a, T> {
    pub client: &'a aws_sdk_sqs::Client,
    pub queue_url: &'a str,
    pub max_call_bytes: usize,
    pub timeout: Option<Duration>,
    pub tag: PhantomData<fn() -> T>,
}

#[async_trait]
impl<T: Send + Sync> BatchCall for SendMessages<'_, T> {
    type Entry = Outgoing<T>;

    fn name(&self) -> &'static str {
        "SendMessageBatch"
    }

    fn size(&self, message: &Outgoing<T>) -> usize {
        message.bytes
    }

    fn max_call_bytes(&self) -> usize {
        self.max_call_bytes
    }

    async fn call(&self, messages: &[&Outgoing<T>]) -> Result<Vec<EntryFailure>, AwsError> {
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut entry = m.entry.clone();
                entry.id = i.to_string();
                entry
            })
            .collect();
        let request = self.client.send_message_batch();
        let call = request
            .queue_url(self.queue_url)
            .set_entries(Some(entries))
            .send();
        let out = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| AwsError::no_answer(limit))??,
            None => call.await?,
        };
        Ok(entry_failures(out.failed))
    }
}

/// SQS's failed entries, by position (the ids sluice gives are positions).
pub fn entry_failures(failed: Vec<aws_sdk_sqs::types::BatchResultErrorEntry>) -> Vec<EntryFailure> {
    failed
        .into_iter()
        .filter_map(|f| {
            Some(EntryFailure {
                index: f.id.parse().ok()?,
                sender_fault: f.sender_fault,
                code: f.code,
                message: f.message,
            })
        })
        .collect()
}

/// Why an entry or a call did not go through, for logs.
#[derive(Debug, thiserror::Error)]
pub enum BatchFailure {
    #[error("{code}: {}", .message.as_deref().unwrap_or("refused"))]
    Entry {
        code: String,
        message: Option<String>,
    },
    #[error("the call failed")]
    Call(#[source] AwsError),
}

impl From<&EntryFailure> for BatchFailure {
    fn from(f: &EntryFailure) -> Self {
        BatchFailure::Entry {
            code: f.code.clone(),
            message: f.message.clone(),
        }
    }
}

/// Where every entry ended.
pub struct Sent<E> {
    /// Carried out.
    pub delivered: Vec<E>,
    /// Refused by SQS for itself, with why.
    pub refused: Vec<(E, BatchFailure)>,
    /// Given up: the policy's attempts ran out, or the call failed for good.
    pub unsent: Vec<E>,
    /// The last failure that left entries unsent.
    pub last_failure: Option<BatchFailure>,
}

impl<E> Default for Sent<E> {
    fn default() -> Self {
        Sent {
            delivered: Vec::new(),
            refused: Vec::new(),
            unsent: Vec::new(),
            last_failure: None,
        }
    }
}

impl<E> fmt::Debug for Sent<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sent")
            .field("delivered", &self.delivered.len())
            .field("refused", &self.refused.len())
            .field("unsent", &self.unsent.len())
            .field("last_failure", &self.last_failure)
            .finish()
    }
}

impl<E> Sent<E> {
    fn merge(&mut self, other: Sent<E>) {
        self.delivered.extend(other.delivered);
        self.refused.extend(other.refused);
        self.unsent.extend(other.unsent);
        if other.last_failure.is_some() {
            self.last_failure = other.last_failure;
        }
    }
}

/// Sends every entry, up to `parallel` calls at once, and reports where each ended.
pub async fn send_all<C: BatchCall>(
    call: &C,
    entries: impl IntoIterator<Item = C::Entry>,
    policy: RetryPolicy,
    parallel: usize,
) -> Sent<C::Entry> {
    let mut all = Sent::default();
    let mut groups = std::pin::pin!(send_groups(call, entries, policy, parallel));
    while let Some(sent) = groups.next().await {
        all.merge(sent);
    }
    all
}

/// Sends the entries as they come, up to `parallel` calls at once, yielding each call's outcome
/// (for callers that stream many entries and report progress).
pub fn send_groups<'a, C: BatchCall>(
    call: &'a C,
    entries: impl IntoIterator<Item = C::Entry> + 'a,
    policy: RetryPolicy,
    parallel: usize,
) -> impl Stream<Item = Sent<C::Entry>> + 'a {
    stream::iter(pack(call, entries))
        .map(move |group| send_group(call, group, policy))
        .buffer_unordered(parallel.max(1))
}

/// Consecutive calls' worth of entries: at most ten, within the call's byte limit, no distinct key
/// twice (a repeat anywhere is dropped).
pub fn pack<'a, C: BatchCall>(
    call: &'a C,
    entries: impl IntoIterator<Item = C::Entry> + 'a,
) -> impl Iterator<Item = Vec<C::Entry>> + 'a {
    let mut seen: HashSet<String> = HashSet::new();
    let mut entries = entries
        .into_iter()
        .filter(move |e| match call.distinct_key(e) {
            Some(key) => seen.insert(key.to_owned()),
            None => true,
        })
        .peekable();
    std::iter::from_fn(move || {
        let first = entries.next()?;
        let mut bytes = call.size(&first);
        let mut group = vec![first];
        while group.len() < MAX_ENTRIES {
            let fits = entries
                .peek()
                .is_some_and(|next| bytes + call.size(next) <= call.max_call_bytes());
            if !fits {
                break;
            }
            if let Some(next) = entries.next() {
                bytes += call.size(&next);
                group.push(next);
            }
        }
        Some(group)
    })
}

/// What one attempt leaves to the next.
struct Attempt<E> {
    pending: Vec<E>,
    sent: Sent<E>,
}

/// Why an attempt asks for another.
enum Retry {
    /// Some entries failed on SQS's side.
    Entries(BatchFailure),
    /// The whole call failed.
    Call(AwsError),
}

/// Sends one call's entries, retrying as `policy` allows.
pub async fn send_group<C: BatchCall>(
    call: &C,
    group: Vec<C::Entry>,
    policy: RetryPolicy,
) -> Sent<C::Entry> {
    let start = Attempt {
        pending: group,
        sent: Sent::default(),
    };
    let (mut done, result) = (|attempt: Attempt<C::Entry>| attempt_once(call, attempt))
        .retry(policy.backoff())
        .context(start)
        .when(|retry| match retry {
            Retry::Entries(_) => true,
            Retry::Call(e) => !e.is_fatal() && !e.is_malformed_batch(),
        })
        .notify(|retry, delay| match retry {
            Retry::Entries(why) => {
                tracing::debug!(call = call.name(), error = %why, ?delay, "SQS failed some entries; retrying them")
            }
            Retry::Call(e) => {
                tracing::debug!(call = call.name(), error = %e, ?delay, "SQS batch call failed; retrying")
            }
        })
        .await;
    let pending = std::mem::take(&mut done.pending);
    match result {
        Ok(()) => {}
        Err(Retry::Call(e)) if e.is_malformed_batch() && pending.len() > 1 => {
            tracing::debug!(call = call.name(), error = %e, "SQS refused the call for its shape; sending entries one by one");
            for entry in pending {
                done.sent
                    .merge(Box::pin(send_group(call, vec![entry], policy)).await);
            }
        }
        Err(Retry::Call(e)) => {
            done.sent.unsent.extend(pending);
            done.sent.last_failure = Some(BatchFailure::Call(e));
        }
        Err(Retry::Entries(why)) => {
            done.sent.unsent.extend(pending);
            done.sent.last_failure = Some(why);
        }
    }
    done.sent
}

async fn attempt_once<C: BatchCall>(
    call: &C,
    mut attempt: Attempt<C::Entry>,
) -> (Attempt<C::Entry>, Result<(), Retry>) {
    let pending = std::mem::take(&mut attempt.pending);
    let refs: Vec<&C::Entry> = pending.iter().collect();
    let failures = match call.call(&refs).await {
        Ok(failures) => failures,
        Err(e) => {
            attempt.pending = pending;
            return (attempt, Err(Retry::Call(e)));
        }
    };
    let mut again = None;
    for (index, entry) in pending.into_iter().enumerate() {
        match failures.iter().find(|f| f.index == index) {
            None => attempt.sent.delivered.push(entry),
            Some(f) if f.sender_fault => attempt.sent.refused.push((entry, f.into())),
            Some(f) => {
                again.get_or_insert_with(|| BatchFailure::from(f));
                attempt.pending.push(entry);
            }
        }
    }
    match again {
        None => (attempt, Ok(())),
        Some(why) => (attempt, Err(Retry::Entries(why))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use aws_sdk_sqs::error::{ErrorMetadata, SdkError};
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;

    /// A call that answers from a script and records what it was sent.
    struct Scripted {
        answers: Mutex<Vec<Result<Vec<EntryFailure>, AwsError>>>,
        calls: Mutex<Vec<Vec<String>>>,
        max_bytes: usize,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Vec<EntryFailure>, AwsError>>) -> Scripted {
            Scripted {
                answers: Mutex::new(answers),
                calls: Mutex::new(Vec::new()),
                max_bytes: usize::MAX,
            }
        }
        fn calls(&self) -> Vec<Vec<String>> {
            self.calls.lock().expect("lock").clone()
        }
    }

    #[async_trait]
    impl BatchCall for Scripted {
        type Entry = String;
        fn name(&self) -> &'static str {
            "Scripted"
        }
        fn size(&self, entry: &String) -> usize {
            entry.len()
        }
        fn max_call_bytes(&self) -> usize {
            self.max_bytes
        }
        fn distinct_key<'a>(&self, entry: &'a String) -> Option<&'a str> {
            Some(entry)
        }
        async fn call(&self, entries: &[&String]) -> Result<Vec<EntryFailure>, AwsError> {
            self.calls
                .lock()
                .expect("lock")
                .push(entries.iter().map(|e| (*e).clone()).collect());
            let mut answers = self.answers.lock().expect("lock");
            if answers.is_empty() {
                Ok(Vec::new())
            } else {
                answers.remove(0)
            }
        }
    }

    fn refused(code: &str) -> AwsError {
        let meta = ErrorMetadata::builder().code(code).build();
        AwsError::from(SdkError::<_, ()>::service_error(
            SendMessageBatchError::generic(meta),
            (),
        ))
    }

    fn failure(index: usize, sender_fault: bool) -> EntryFailure {
        EntryFailure {
            index,
            sender_fault,
            code: "X".into(),
            message: None,
        }
    }

    fn entries(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn calls_hold_ten_distinct_entries_within_the_byte_limit() {
        let mut call = Scripted::new(Vec::new());
        let handles: Vec<String> = ["a", "b", "a", "c", "b"]
            .into_iter()
            .map(String::from)
            .chain((0..25).map(|i| format!("h{i:02}")))
            .collect();
        let sizes: Vec<usize> = pack(&call, handles).map(|g| g.len()).collect();
        assert_eq!(sizes, [10, 10, 8], "repeats dropped, ten per call");
        call.max_bytes = 7;
        let groups: Vec<Vec<String>> =
            pack(&call, entries(&["aaa", "bbb", "ccc", "ddddddd"])).collect();
        assert_eq!(
            groups,
            [
                entries(&["aaa", "bbb"]),
                entries(&["ccc"]),
                entries(&["ddddddd"])
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_entries_are_retried_and_refused_ones_set_aside() {
        let call = Scripted::new(vec![Ok(vec![failure(1, false), failure(2, true)])]);
        let sent = send_group(&call, entries(&["a", "b", "c"]), RetryPolicy::attempts(3)).await;
        assert_eq!(sent.delivered, entries(&["a", "b"]));
        assert_eq!(sent.refused.len(), 1);
        assert!(sent.unsent.is_empty());
        assert_eq!(call.calls(), [entries(&["a", "b", "c"]), entries(&["b"])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_refused_for_its_shape_is_split_not_retried() {
        let call = Scripted::new(vec![Err(refused("BatchEntryIdsNotDistinct"))]);
        let sent = send_group(&call, entries(&["a", "b"]), RetryPolicy::attempts(5)).await;
        assert_eq!(sent.delivered, entries(&["a", "b"]));
        assert_eq!(
            call.calls(),
            [entries(&["a", "b"]), entries(&["a"]), entries(&["b"])]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_and_fatal_errors_end_at_once() {
        let down = || Err(AwsError::no_answer(std::time::Duration::from_secs(5)));
        let call = Scripted::new(vec![down(), down(), down(), down()]);
        let sent = send_group(&call, entries(&["a"]), RetryPolicy::attempts(3)).await;
        assert_eq!(sent.unsent, entries(&["a"]));
        assert_eq!(call.calls().len(), 3);
        assert!(matches!(sent.last_failure, Some(BatchFailure::Call(_))));

        let call = Scripted::new(vec![Err(refused("AccessDenied"))]);
        let sent = send_group(&call, entries(&["a"]), RetryPolicy::attempts(3)).await;
        assert_eq!(sent.unsent, entries(&["a"]));
        assert_eq!(call.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_entry_is_accounted_for_once() {
        let call = Scripted::new(vec![
            Ok(vec![failure(0, true)]),
            Ok(vec![failure(3, false)]),
        ]);
        let all: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
        let sent = send_all(&call, all, RetryPolicy::attempts(1), 1).await;
        assert_eq!(
            sent.delivered.len() + sent.refused.len() + sent.unsent.len(),
            25
        );
        assert_eq!((sent.refused.len(), sent.unsent.len()), (1, 1));
    }
}
