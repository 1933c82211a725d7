//! A producer beside a test: it keeps sending logins to the queue while the daemon consumes and
//! the test breaks things, as real producers do (and as the emulator, which slows down as its
//! queue grows, handles best).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{TestQueue, eventually, login};

/// Messages are sent in slices of this many…
const SLICE: usize = 10;
/// …one slice every this long, until stopped.
const PACE: Duration = Duration::from_millis(300);
/// Every tenth message, from the first, is invalid: it must end in the dead-letter table, once.
pub const INVALID_EVERY: u64 = 10;

/// A producer beside the test: slices of logins (every tenth one invalid) until stopped, holding
/// back while paused.
pub struct Feed {
    pub paused: Arc<AtomicBool>,
    feeding: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    /// Feeds `queue`.
    pub fn start(queue: &TestQueue) -> Feed {
        let (client, url) = (queue.client.clone(), queue.url.clone());
        Feed::start_with(move |bodies| send_to_queue(client.clone(), url.clone(), bodies))
    }

    /// Feeds whatever `send` sends one slice of bodies to.
    pub fn start_with<F, Fut>(send: F) -> Feed
    where
        F: Fn(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let paused = Arc::new(AtomicBool::new(false));
        let feeding = Arc::new(AtomicBool::new(true));
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(feed(send, paused.clone(), feeding.clone(), sent.clone()));
        Feed {
            paused,
            feeding,
            sent,
            task,
        }
    }

    /// Returns once `n` more messages have been sent (the feed must not be paused).
    pub async fn sent_more(&self, n: u64) {
        let target = self.sent.load(Ordering::SeqCst) + n;
        eventually(
            Duration::from_secs(60),
            &format!("{n} more messages sent"),
            || async { self.sent.load(Ordering::SeqCst) >= target },
        )
        .await;
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops feeding; how many messages were sent in all.
    pub async fn stop(self) -> u64 {
        self.feeding.store(false, Ordering::SeqCst);
        self.task.await.expect("feeder");
        self.sent.load(Ordering::SeqCst)
    }
}

async fn feed<F, Fut>(
    send: F,
    paused: Arc<AtomicBool>,
    feeding: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut n = 0_u64;
    while feeding.load(Ordering::SeqCst) {
        // The pace of a producer, not a wait for anything.
        tokio::time::sleep(PACE).await;
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        let bodies = (n..n + SLICE as u64)
            .map(|i| {
                if i.is_multiple_of(INVALID_EVERY) {
                    format!("not json: bad-{i}")
                } else {
                    login(&format!("user-{i}"))
                }
            })
            .collect();
        send(bodies).await;
        n += SLICE as u64;
        sent.store(n, Ordering::SeqCst);
    }
}

async fn send_to_queue(client: aws_sdk_sqs::Client, queue_url: String, bodies: Vec<String>) {
    let entries = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
                .expect("entry")
        })
        .collect();
    let out = client
        .send_message_batch()
        .queue_url(&queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .expect("send batch");
    assert!(out.failed.is_empty(), "some sends failed: {:?}", out.failed);
}

/// Of `total` messages sent by a [`Feed`]: (valid, invalid).
pub fn valid_and_invalid(total: u64) -> (u64, u64) {
    let invalid = total.div_ceil(INVALID_EVERY);
    (total - invalid, invalid)
}
