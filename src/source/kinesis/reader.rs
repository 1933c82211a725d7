//! One shard's reading loop: `GetRecords` pages turned into chunks, within the shard's limits.
//!
//! A reader starts from an iterator at its start position (after the checkpoint, normally) and then
//! follows `NextShardIterator`. It keeps to what the service allows per shard: at most five calls a
//! second and 2 MB a second, so after a large page it waits as long as the page took of the budget;
//! once caught up (an empty page, or `MillisBehindLatest` of 0) it polls only every
//! `idle_poll_interval`. Throttling is answered with exponential backoff and jitter. An iterator
//! that expired (it lives five minutes, which a reader held up by a stalled sink can outlive) is
//! replaced by one after the last record fetched, so nothing is skipped or read twice.
//!
//! The shard's end is what the API documents: a page without `NextShardIterator`. A reader relies
//! neither on `ChildShards` nor on an empty page. The last message of a page that ends the shard
//! says so, so that the commit of that message finishes the shard in the same transaction. When the
//! end comes on an empty page, there is no message to carry it, and the reader's outcome tells the
//! caller to finish the shard once everything read is committed ([`super::checkpoint::finish`]).
//!
//! Each page becomes one chunk (so a KPL aggregate never straddles two chunks), sent into a bounded
//! channel: a full channel holds the reader at `send`, which is the backpressure that stops reading
//! when the sink stalls. On stop the page in hand is dropped: it was never acknowledged, so it is read
//! again from the checkpoint by whoever reads the shard next.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::api::{FetchedRecord, KinesisApi, KinesisError, RecordsPage, StreamRef};
use super::kpl::{self, NotAggregated};
use super::lease::LeaseClaim;
use super::position::StartPosition;
use super::progress::KinesisAck;
use super::sequence::SequenceNumber;
use crate::envelope::{AckToken, Chunk, Envelope, MessageId, Meta, Reject, Stage};
use crate::message_file::{BadBody, DEFAULT_MAX_MESSAGE_BYTES, TOO_LARGE_HEAD_BYTES};
use crate::retry;
use crate::shutdown::Shutdown;
use crate::stats::{CatchingUp, Stats};

/// At most five `GetRecords` calls per second per shard.
pub const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);
/// At most 2 MB per second read from a shard.
pub const MAX_BYTES_PER_SECOND: f64 = 2_000_000.0;
/// The most records one `GetRecords` call may ask for.
pub const MAX_RECORDS_PER_CALL: i32 = 10_000;

/// How a reader paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderSettings {
    /// `Limit` of each `GetRecords` call, 1 to 10,000.
    pub max_records_per_call: i32,
    /// The pause between calls once caught up; never less than [`MIN_CALL_INTERVAL`].
    pub idle_poll_interval: Duration,
    /// `source.max_message_bytes`: a message (a plain record's data, or one user record of a KPL
    /// aggregate) longer than this becomes a dead letter keeping only its start, as an SQS body or
    /// a file line would, so that what the pipeline holds stays bounded in bytes whatever the
    /// producers write.
    pub max_message_bytes: usize,
}

impl Default for ReaderSettings {
    fn default() -> Self {
        ReaderSettings {
            max_records_per_call: MAX_RECORDS_PER_CALL,
            idle_poll_interval: Duration::from_secs(1),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// How a reader finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The shard is closed and was read to its end.
    ShardEnded {
        /// Its last record read (by this reader, or the checkpoint it started after), if any.
        last_read: Option<SequenceNumber>,
        /// The last delivered message carries the end, so its commit finishes the shard. When false,
        /// call [`super::checkpoint::finish`] with `last_read` once everything delivered is committed.
        end_delivered: bool,
    },
    /// `stop` was requested.
    Stopped,
    /// The channel is closed: nobody takes chunks any more.
    ChannelClosed,
}

#[derive(Debug, thiserror::Error)]
#[error("shard {shard}: {source}")]
pub struct ReadError {
    pub shard: String,
    #[source]
    pub source: KinesisError,
}

/// Live figures of one reader, for metrics and `sluice report`.
#[derive(Debug)]
pub struct ShardProgress {
    /// The last `MillisBehindLatest`; -1 until the first page.
    pub millis_behind_latest: AtomicI64,
    pub records: AtomicU64,
    pub get_records_calls: AtomicU64,
    pub throttled: AtomicU64,
    pub expired_iterators: AtomicU64,
}

impl Default for ShardProgress {
    fn default() -> Self {
        ShardProgress {
            millis_behind_latest: AtomicI64::new(-1),
            records: AtomicU64::new(0),
            get_records_calls: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            expired_iterators: AtomicU64::new(0),
        }
    }
}

/// Reads one leased shard.
pub struct ShardReader {
    api: Arc<dyn KinesisApi>,
    stream: StreamRef,
    lease: Arc<LeaseClaim>,
    start: StartPosition,
    settings: ReaderSettings,
    progress: Arc<ShardProgress>,
    /// Counts messages delivered (and those dropped on stop), when running in a pipeline.
    stats: Option<Arc<Stats>>,
    /// Held until the first page at the shard's tip: an idle exit must not end a run whose shard
    /// has not been read yet (or answered only "more is behind this", which an empty page can).
    /// Taken when the reader is made, so that no moment passes between a lease handed over and
    /// its reader counting as catching up.
    catching_up: Option<CatchingUp>,
}

/// When the next call may go out.
struct Pace {
    next_call: Instant,
    idle: Duration,
}

impl Pace {
    /// After a call that began at `started` and returned `bytes`.
    fn after_call(&mut self, started: Instant, bytes: usize, caught_up: bool) {
        let for_bytes = Duration::from_secs_f64(bytes as f64 / MAX_BYTES_PER_SECOND);
        let mut wait = MIN_CALL_INTERVAL.max(for_bytes);
        if caught_up {
            wait = wait.max(self.idle);
        }
        self.next_call = started + wait;
    }
}

impl ShardReader {
    pub fn new(
        api: Arc<dyn KinesisApi>,
        stream: StreamRef,
        lease: Arc<LeaseClaim>,
        start: StartPosition,
        settings: ReaderSettings,
    ) -> ShardReader {
        ShardReader {
            api,
            stream,
            lease,
            start,
            settings,
            progress: Arc::default(),
            stats: None,
            catching_up: None,
        }
    }

    /// Counts what this reader delivers in the pipeline's figures: received when it is handed
    /// over, released when a stop drops it in hand.
    pub fn with_stats(mut self, stats: Arc<Stats>) -> ShardReader {
        self.catching_up = Some(stats.catching_up());
        self.stats = Some(stats);
        self
    }

    pub fn progress(&self) -> Arc<ShardProgress> {
        self.progress.clone()
    }

    fn shard(&self) -> &str {
        &self.lease.shard_id
    }

    /// Reads until the shard ends, `stop` is requested or the channel closes.
    pub async fn run(
        mut self,
        out: mpsc::Sender<Chunk<Envelope>>,
        stop: Shutdown,
    ) -> Result<ReadEnd, ReadError> {
        let mut last_read = match &self.start {
            StartPosition::AfterSequence(sequence) => Some(sequence.clone()),
            _ => None,
        };
        let mut catching_up = self.catching_up.take();
        let Some(mut iterator) = self.iterator(&self.start, &stop).await? else {
            return Ok(ReadEnd::Stopped);
        };
        let mut pace = Pace {
            next_call: Instant::now(),
            idle: self.settings.idle_poll_interval.max(MIN_CALL_INTERVAL),
        };
        let mut pacing = retry::backoff();
        let limit = self
            .settings
            .max_records_per_call
            .clamp(1, MAX_RECORDS_PER_CALL);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(pace.next_call) => {}
                _ = stop.requested() => return Ok(ReadEnd::Stopped),
            }
            let started = Instant::now();
            self.progress
                .get_records_calls
                .fetch_add(1, Ordering::Relaxed);
            let fetched = tokio::select! {
                fetched = self.api.get_records(&iterator, limit) => fetched,
                _ = stop.requested() => return Ok(ReadEnd::Stopped),
            };
            let page = match fetched {
                Ok(page) => page,
                Err(e) => {
                    pace.after_call(started, 0, false);
                    match self.recover(e, &last_read, &mut pacing, &stop).await? {
                        Recovery::Retry => continue,
                        Recovery::NewIterator(fresh) => {
                            iterator = fresh;
                            continue;
                        }
                        Recovery::Stopped => return Ok(ReadEnd::Stopped),
                    }
                }
            };
            pacing = retry::backoff();
            let RecordsPage {
                records,
                next_iterator,
                millis_behind_latest,
            } = page;
            let bytes: usize = records.iter().map(|r| r.data.len()).sum();
            let caught_up = records.is_empty() || millis_behind_latest == Some(0);
            pace.after_call(started, bytes, caught_up);
            if millis_behind_latest.map_or(records.is_empty(), |behind| behind == 0) {
                drop(catching_up.take());
            }
            if let Some(behind) = millis_behind_latest {
                self.progress
                    .millis_behind_latest
                    .store(behind, Ordering::Relaxed);
            }
            let ended = next_iterator.is_none();
            let delivered = !records.is_empty();
            if let Some(last) = records.last() {
                last_read = Some(last.sequence_number.clone());
                self.progress
                    .records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let chunk = self.chunk(records, ended);
                let n = chunk.len();
                if let Some(stats) = &self.stats {
                    stats.record_received(n);
                }
                let stopped = tokio::select! {
                    sent = out.send(chunk) => sent.err().map(|_| ReadEnd::ChannelClosed),
                    _ = stop.requested() => Some(ReadEnd::Stopped),
                };
                if let Some(end) = stopped {
                    if let Some(stats) = &self.stats {
                        stats.record_released(n);
                    }
                    return Ok(end);
                }
            }
            match next_iterator {
                Some(next) => iterator = next,
                None => {
                    tracing::info!(shard = self.shard(), "shard read to its end");
                    return Ok(ReadEnd::ShardEnded {
                        last_read,
                        end_delivered: delivered,
                    });
                }
            }
        }
    }

    /// What to do after a failed `GetRecords`.
    async fn recover(
        &self,
        error: KinesisError,
        last_read: &Option<SequenceNumber>,
        pacing: &mut (impl Iterator<Item = Duration> + Send),
        stop: &Shutdown,
    ) -> Result<Recovery, ReadError> {
        match error {
            KinesisError::ExpiredIterator(_) => {
                self.progress
                    .expired_iterators
                    .fetch_add(1, Ordering::Relaxed);
                let from = match last_read {
                    Some(sequence) => StartPosition::AfterSequence(sequence.clone()),
                    None => self.start.clone(),
                };
                tracing::debug!(
                    shard = self.shard(),
                    ?from,
                    "shard iterator expired; getting a new one"
                );
                Ok(match self.iterator(&from, stop).await? {
                    Some(iterator) => Recovery::NewIterator(iterator),
                    None => Recovery::Stopped,
                })
            }
            KinesisError::Fatal(_) => Err(ReadError {
                shard: self.shard().to_owned(),
                source: error,
            }),
            KinesisError::Throttled(_) | KinesisError::Transient(_) => {
                if matches!(error, KinesisError::Throttled(_)) {
                    self.progress.throttled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(shard = self.shard(), %error, "GetRecords throttled; backing off");
                } else {
                    tracing::warn!(shard = self.shard(), %error, "GetRecords failed; retrying");
                }
                if pause_or_stop(pacing, stop, self.stats.as_deref()).await {
                    Ok(Recovery::Stopped)
                } else {
                    Ok(Recovery::Retry)
                }
            }
        }
    }

    /// A shard iterator from `from`, retrying throttling and transient failures; `None` on stop.
    async fn iterator(
        &self,
        from: &StartPosition,
        stop: &Shutdown,
    ) -> Result<Option<String>, ReadError> {
        let mut pacing = retry::backoff();
        loop {
            let got = tokio::select! {
                got = self.api.shard_iterator(&self.stream, self.shard(), from) => got,
                _ = stop.requested() => return Ok(None),
            };
            match got {
                Ok(iterator) => return Ok(Some(iterator)),
                Err(KinesisError::Fatal(message)) => {
                    return Err(ReadError {
                        shard: self.shard().to_owned(),
                        source: KinesisError::Fatal(message),
                    });
                }
                Err(e) => {
                    tracing::warn!(shard = self.shard(), error = %e, "GetShardIterator failed; retrying");
                    if pause_or_stop(&mut pacing, stop, self.stats.as_deref()).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One page as one chunk: a message per plain record, or per user record of a KPL aggregate.
    fn chunk(&self, records: Vec<FetchedRecord>, shard_ended: bool) -> Chunk<Envelope> {
        let received_at = SystemTime::now();
        let mut chunk = Chunk::new(Vec::with_capacity(records.len()));
        let count = records.len();
        for (i, record) in records.into_iter().enumerate() {
            let last_of_shard = shard_ended && i + 1 == count;
            self.add_record(&mut chunk, record, last_of_shard, received_at);
        }
        chunk
    }

    fn add_record(
        &self,
        chunk: &mut Chunk<Envelope>,
        record: FetchedRecord,
        last_of_shard: bool,
        received_at: SystemTime,
    ) {
        let users = match kpl::deaggregate(&record.data) {
            Ok(users) => users,
            Err(NotAggregated::NoMagic) => Vec::new(),
            Err(reason) => {
                tracing::warn!(
                    shard = self.shard(),
                    sequence = %record.sequence_number,
                    %reason,
                    "record delivered as it is"
                );
                Vec::new()
            }
        };
        let FetchedRecord {
            sequence_number,
            data,
            arrival_ms,
            ..
        } = record;
        let message = |sub_sequence, completes_record, ends_shard| Message {
            sequence: &sequence_number,
            arrival_ms,
            sub_sequence,
            completes_record,
            ends_shard,
        };
        if users.is_empty() {
            self.push(chunk, message(None, true, last_of_shard), data, received_at);
            return;
        }
        let last = users.len() - 1;
        for (sub, user) in users.into_iter().enumerate() {
            let done = sub == last;
            let made = message(Some(sub), done, last_of_shard && done);
            self.push(chunk, made, user.data, received_at);
        }
    }

    fn push(
        &self,
        chunk: &mut Chunk<Envelope>,
        message: Message<'_>,
        data: Vec<u8>,
        received_at: SystemTime,
    ) {
        let id = match message.sub_sequence {
            Some(sub) => format!("{}/{}:{sub}", self.shard(), message.sequence),
            None => format!("{}/{}", self.shard(), message.sequence),
        };
        let meta = Meta {
            message_id: MessageId::Text(id),
            dedupe_key: None,
            sent_at_ms: message.arrival_ms,
            received_at,
            receive_count: 1,
            ack: AckToken::Kinesis(KinesisAck {
                lease: self.lease.clone(),
                sequence: message.sequence.clone(),
                user_record: message.sub_sequence.unwrap_or(0),
                completes_record: message.completes_record,
                ends_shard: message.ends_shard,
            }),
        };
        let limit = self.settings.max_message_bytes;
        if data.len() > limit {
            let too_large = too_large(data, limit);
            tracing::warn!(shard = self.shard(), message_id = %meta.message_id, reason = %too_large, "Kinesis message over `source.max_message_bytes`; dead-lettering it");
            chunk.rejects.push(Reject {
                body: String::from_utf8_lossy(too_large.kept_bytes()).into_owned(),
                meta,
                stage: Stage::Source,
                reason: too_large.to_string(),
            });
            return;
        }
        match String::from_utf8(data) {
            Ok(body) => chunk.items.push(Envelope { body, meta }),
            Err(e) => chunk.rejects.push(Reject {
                body: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                meta,
                stage: Stage::Source,
                reason: "record data is not UTF-8 text".into(),
            }),
        }
    }
}

/// A message over the limit, as a file's over-size line is described: its size and its first
/// [`TOO_LARGE_HEAD_BYTES`] bytes (cut back to a character boundary when they are text).
fn too_large(mut data: Vec<u8>, limit: usize) -> BadBody {
    let bytes = data.len() as u64;
    let mut head = TOO_LARGE_HEAD_BYTES.min(data.len());
    if let Err(e) = std::str::from_utf8(&data[..head])
        && e.error_len().is_none()
    {
        // The head ends inside a character: keep the whole characters before it.
        head = e.valid_up_to();
    }
    data.truncate(head);
    data.shrink_to_fit();
    BadBody::TooLarge {
        bytes,
        limit,
        head: data,
    }
}

/// Which message of which record is being made.
struct Message<'a> {
    sequence: &'a SequenceNumber,
    arrival_ms: Option<i64>,
    /// The user record's index within a KPL aggregate.
    sub_sequence: Option<usize>,
    completes_record: bool,
    ends_shard: bool,
}

enum Recovery {
    Retry,
    NewIterator(String),
    Stopped,
}

/// Sleeps for the next backoff delay, counting it in `stats`; true if `stop` came first.
async fn pause_or_stop(
    pacing: &mut (impl Iterator<Item = Duration> + Send),
    stop: &Shutdown,
    stats: Option<&Stats>,
) -> bool {
    let delay = retry::next_delay(pacing);
    if let Some(stats) = stats {
        stats.record_source_retry(delay);
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.requested() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kinesis::fake::FakeKinesis;
    use crate::source::kinesis::kpl::{UserRecord, aggregate};
    use crate::source::kinesis::lease::LeaseScope;
    use crate::table_name::TableName;

    const SHARD: &str = "shardId-000000000000";

    fn lease() -> Arc<LeaseClaim> {
        Arc::new(LeaseClaim {
            scope: Arc::new(LeaseScope {
                table: TableName::unqualified("leases"),
                application: "app".into(),
                stream: "logins".into(),
            }),
            shard_id: SHARD.into(),
            owner: Arc::from("me"),
            epoch: 1,
            duration: std::time::Duration::from_secs(30),
            fenced_off: Default::default(),
        })
    }

    fn settings(limit: i32) -> ReaderSettings {
        ReaderSettings {
            max_records_per_call: limit,
            idle_poll_interval: Duration::from_secs(1),
            ..ReaderSettings::default()
        }
    }

    fn reader(api: &Arc<FakeKinesis>, start: StartPosition, limit: i32) -> ShardReader {
        ShardReader::new(
            api.clone(),
            StreamRef::Name("logins".into()),
            lease(),
            start,
            settings(limit),
        )
    }

    fn ack(meta: &Meta) -> &KinesisAck {
        match &meta.ack {
            AckToken::Kinesis(ack) => ack,
            other => panic!("not a Kinesis token: {other:?}"),
        }
    }

    /// Receives chunks until `n` messages came; returns their bodies and acks in order.
    async fn receive(
        rx: &mut mpsc::Receiver<Chunk<Envelope>>,
        n: usize,
    ) -> Vec<(String, KinesisAck)> {
        let mut got = Vec::new();
        while got.len() < n {
            let chunk = rx.recv().await.expect("reader still sending");
            got.extend(chunk.items.into_iter().map(|e| {
                let a = ack(&e.meta).clone();
                (e.body, a)
            }));
        }
        got
    }

    fn bodies(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{{\"n\":{i}}}")).collect()
    }

    /// Reads a closed shard until the reader returns, its pages left in the channel.
    async fn read_to_end(
        api: &Arc<FakeKinesis>,
        start: StartPosition,
    ) -> (ReadEnd, mpsc::Receiver<Chunk<Envelope>>) {
        let (tx, rx) = mpsc::channel(4);
        let end = reader(api, start, 10)
            .run(tx, Shutdown::new())
            .await
            .expect("read");
        (end, rx)
    }

    /// A fake stream whose one shard holds `n` small records.
    fn shard_holding(n: usize) -> Arc<FakeKinesis> {
        let api = FakeKinesis::new();
        for body in bodies(n) {
            api.put(SHARD, body.as_bytes());
        }
        api
    }

    /// No window of one second holds more than five calls.
    fn assert_within_five_calls_a_second(calls: &[Instant]) {
        for window in calls.windows(6) {
            let span = window[5] - window[0];
            assert!(
                span >= Duration::from_secs(1),
                "six calls within {span:?}: {:?}",
                window.iter().map(|t| *t - calls[0]).collect::<Vec<_>>()
            );
        }
    }

    /// For the idle exit, a reader is catching up from the moment it is made until a page finds
    /// it at the shard's tip; pages with more behind them keep it so.
    #[tokio::test(start_paused = true)]
    async fn a_reader_catches_up_at_the_first_page_at_the_tip() {
        let api = shard_holding(25);
        let stats = Arc::new(Stats::default());
        let reader = reader(&api, StartPosition::TrimHorizon, 10).with_stats(stats.clone());
        assert!(stats.is_catching_up(), "before its first call");
        let (tx, mut rx) = mpsc::channel(1);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader.run(tx, stop.clone()));
        receive(&mut rx, 10).await;
        assert!(stats.is_catching_up(), "a page with more behind it");
        receive(&mut rx, 15).await;
        assert!(!stats.is_catching_up(), "the page that reached the tip");
        stop.stop();
        task.await.expect("join").expect("read");
        assert!(!stats.is_catching_up());
    }

    #[tokio::test(start_paused = true)]
    async fn every_record_arrives_once_in_order_across_pages() {
        let api = FakeKinesis::new();
        let sent = bodies(25);
        let sequences: Vec<SequenceNumber> =
            sent.iter().map(|b| api.put(SHARD, b.as_bytes())).collect();
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));

        let got = receive(&mut rx, 25).await;
        assert_eq!(got.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(), sent);
        let got_sequences: Vec<SequenceNumber> =
            got.iter().map(|(_, a)| a.sequence.clone()).collect();
        assert_eq!(got_sequences, sequences);
        assert!(got.iter().all(|(_, a)| a.completes_record && !a.ends_shard));

        stop.stop();
        assert_eq!(task.await.expect("join").expect("read"), ReadEnd::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_carry_their_shard_sequence_and_arrival_time() {
        let api = FakeKinesis::new();
        let sequence = api.put(SHARD, br#"{"user_id":"u1"}"#);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));
        let chunk = rx.recv().await.expect("a chunk");
        let meta = &chunk.items[0].meta;
        assert_eq!(
            meta.message_id,
            MessageId::Text(format!("{SHARD}/{sequence}"))
        );
        assert_eq!(meta.sent_at_ms, Some(1_700_000_000_001));
        assert_eq!(*ack(meta).lease, *lease());
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_and_expired_iterators_lose_nothing_and_keep_within_five_calls_a_second() {
        let sent = bodies(60);
        let api = shard_holding(60);
        api.close(SHARD);
        let throttled = || Some(KinesisError::Throttled("Rate exceeded for shard".into()));
        let expired = || Some(KinesisError::ExpiredIterator("Iterator expired".into()));
        api.script([
            throttled(),
            throttled(),
            throttled(),
            None,
            expired(),
            None,
            throttled(),
            None,
            expired(),
            expired(),
            None,
            None,
            throttled(),
            throttled(),
        ]);
        let (tx, mut rx) = mpsc::channel(2);
        let task =
            tokio::spawn(reader(&api, StartPosition::TrimHorizon, 7).run(tx, Shutdown::new()));

        let got = receive(&mut rx, 60).await;
        assert_eq!(got.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(), sent);
        let end = task.await.expect("join").expect("read");
        assert_eq!(
            end,
            ReadEnd::ShardEnded {
                last_read: Some(got[59].1.sequence.clone()),
                end_delivered: true
            }
        );
        assert!(rx.recv().await.is_none(), "nothing after the shard's end");
        let calls = api.get_records_calls();
        assert_eq!(calls.len(), 9 + 9, "nine pages and nine failed calls");
        assert_within_five_calls_a_second(&calls);
        // Each expired iterator was replaced by one right after the last record fetched.
        let requests = api.iterator_requests();
        assert_eq!(requests[0], StartPosition::TrimHorizon);
        assert_eq!(requests.len(), 4);
        assert_eq!(
            requests[1],
            StartPosition::AfterSequence(got[6].1.sequence.clone())
        );
        assert!(
            requests[2..]
                .iter()
                .all(|r| *r == StartPosition::AfterSequence(got[20].1.sequence.clone()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_iterator_that_expires_before_any_record_restarts_from_the_checkpoint() {
        let api = FakeKinesis::new();
        let checkpoint = api.put(SHARD, b"committed before");
        api.put(SHARD, b"next");
        api.script([Some(KinesisError::ExpiredIterator("expired".into()))]);
        let (tx, mut rx) = mpsc::channel(2);
        let stop = Shutdown::new();
        let start = StartPosition::AfterSequence(checkpoint.clone());
        let task = tokio::spawn(reader(&api, start.clone(), 10).run(tx, stop.clone()));
        let got = receive(&mut rx, 1).await;
        assert_eq!(got[0].0, "next");
        assert_eq!(api.iterator_requests(), [start.clone(), start]);
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_on_an_empty_page_is_left_to_a_separate_finish() {
        let api = shard_holding(3);
        api.close(SHARD);
        api.end_on_empty_page();
        let (end, mut rx) = read_to_end(&api, StartPosition::TrimHorizon).await;
        let got = receive(&mut rx, 3).await;
        assert!(got.iter().all(|(_, a)| !a.ends_shard));
        assert_eq!(
            end,
            ReadEnd::ShardEnded {
                last_read: Some(got[2].1.sequence.clone()),
                end_delivered: false
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_shard_read_up_to_its_checkpoint_ends_without_delivering() {
        let api = FakeKinesis::new();
        let last = api.put(SHARD, b"already committed");
        api.close(SHARD);
        let (end, mut rx) = read_to_end(&api, StartPosition::AfterSequence(last.clone())).await;
        assert_eq!(
            end,
            ReadEnd::ShardEnded {
                last_read: Some(last),
                end_delivered: false
            }
        );
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_message_of_a_closed_shard_says_so() {
        let api = shard_holding(3);
        api.close(SHARD);
        let (end, mut rx) = read_to_end(&api, StartPosition::TrimHorizon).await;
        let got = receive(&mut rx, 3).await;
        let ends: Vec<bool> = got.iter().map(|(_, a)| a.ends_shard).collect();
        assert_eq!(ends, [false, false, true]);
        assert!(matches!(
            end,
            ReadEnd::ShardEnded {
                end_delivered: true,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caught_up_reader_polls_at_the_idle_interval_and_sees_new_records() {
        let api = FakeKinesis::new();
        api.add_shard(SHARD);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::Latest, 10).run(tx, stop.clone()));
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let idle_calls = api.get_records_calls().len();
        assert!(
            (10..=12).contains(&idle_calls),
            "{idle_calls} calls in 10.5 s"
        );

        api.put(SHARD, b"late");
        let got = receive(&mut rx, 1).await;
        assert_eq!(got[0].0, "late");
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn large_pages_keep_the_reader_within_two_megabytes_a_second() {
        let api = FakeKinesis::new();
        let megabyte = vec![b'x'; 1_000_000];
        for _ in 0..8 {
            api.put(SHARD, &megabyte);
        }
        api.close(SHARD);
        let (tx, mut rx) = mpsc::channel(8);
        let start = Instant::now();
        reader(&api, StartPosition::TrimHorizon, 2)
            .run(tx, Shutdown::new())
            .await
            .expect("read");
        assert_eq!(receive(&mut rx, 8).await.len(), 8);
        let calls = api.get_records_calls();
        assert_eq!(calls.len(), 4);
        for pair in calls.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_secs(1),
                "2 MB read faster than in 1 s"
            );
        }
        assert!(Instant::now() - start >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_channel_holds_the_reader_until_there_is_room() {
        let sent = bodies(100);
        let api = shard_holding(100);
        let (tx, mut rx) = mpsc::channel(1);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            api.get_records_calls().len(),
            2,
            "one page in the channel, one in hand, no more"
        );
        let got = receive(&mut rx, 100).await;
        assert_eq!(got.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(), sent);
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_releases_a_reader_blocked_on_a_full_channel() {
        let api = shard_holding(30);
        let (tx, _rx) = mpsc::channel(1);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.stop();
        let end = tokio::time::timeout(Duration::from_millis(10), task)
            .await
            .expect("stops at once")
            .expect("join")
            .expect("read");
        assert_eq!(end, ReadEnd::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kpl_aggregate_becomes_one_message_per_user_record() {
        let api = FakeKinesis::new();
        let users: Vec<UserRecord> = ["a", "b", "c"]
            .iter()
            .map(|u| UserRecord {
                partition_key: (*u).into(),
                explicit_hash_key: None,
                data: format!("{{\"user_id\":\"{u}\"}}").into_bytes(),
            })
            .collect();
        let aggregated = api.put(SHARD, &aggregate(&users));
        let plain = api.put(SHARD, b"{\"user_id\":\"d\"}");
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));
        let chunk = rx.recv().await.expect("one chunk for the page");
        let ids: Vec<String> = chunk
            .items
            .iter()
            .map(|e| e.meta.message_id.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                format!("{SHARD}/{aggregated}:0"),
                format!("{SHARD}/{aggregated}:1"),
                format!("{SHARD}/{aggregated}:2"),
                format!("{SHARD}/{plain}"),
            ]
        );
        let bodies: Vec<&str> = chunk.items.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies[1], r#"{"user_id":"b"}"#);
        let completes: Vec<bool> = chunk
            .items
            .iter()
            .map(|e| ack(&e.meta).completes_record)
            .collect();
        assert_eq!(completes, [false, false, true, true]);
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn records_and_user_records_over_the_limit_are_dead_letters_naming_their_size() {
        let api = FakeKinesis::new();
        // 13 bytes, then two-byte characters: byte 1,024 falls inside one.
        let big = format!("{{\"user_id\": \"{}\"}}", "é".repeat(600));
        let users: Vec<UserRecord> = [r#"{"user_id":"a"}"#, big.as_str()]
            .iter()
            .map(|data| UserRecord {
                partition_key: "k".into(),
                explicit_hash_key: None,
                data: data.as_bytes().to_vec(),
            })
            .collect();
        let plain = api.put(SHARD, big.as_bytes());
        let aggregated = api.put(SHARD, &aggregate(&users));
        let mut reader = reader(&api, StartPosition::TrimHorizon, 10);
        reader.settings.max_message_bytes = 1100;
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader.run(tx, stop.clone()));
        let chunk = rx.recv().await.expect("one chunk for the page");
        let bodies: Vec<&str> = chunk.items.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, [r#"{"user_id":"a"}"#]);
        let reason = format!(
            "message is {} bytes, more than `source.max_message_bytes` (1100); its first 1023 bytes are kept",
            big.len()
        );
        let rejects: Vec<(String, Stage, &str, usize, bool)> = chunk
            .rejects
            .iter()
            .map(|r| {
                let ack = ack(&r.meta);
                (
                    r.meta.message_id.to_string(),
                    r.stage,
                    r.reason.as_str(),
                    r.body.len(),
                    ack.completes_record,
                )
            })
            .collect();
        assert_eq!(
            rejects,
            [
                (
                    format!("{SHARD}/{plain}"),
                    Stage::Source,
                    reason.as_str(),
                    1023,
                    true
                ),
                (
                    format!("{SHARD}/{aggregated}:1"),
                    Stage::Source,
                    reason.as_str(),
                    1023,
                    true
                ),
            ],
            "the head is cut back to a whole character"
        );
        assert!(big.starts_with(&chunk.rejects[0].body));
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn data_that_is_not_text_is_rejected_with_its_reason() {
        let api = FakeKinesis::new();
        api.put(SHARD, &[0xFF, 0xFE, b'x']);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn(reader(&api, StartPosition::TrimHorizon, 10).run(tx, stop.clone()));
        let chunk = rx.recv().await.expect("a chunk");
        assert!(chunk.items.is_empty());
        assert_eq!(chunk.rejects.len(), 1);
        assert_eq!(chunk.rejects[0].stage, Stage::Source);
        assert_eq!(chunk.rejects[0].reason, "record data is not UTF-8 text");
        assert!(ack(&chunk.rejects[0].meta).completes_record);
        stop.stop();
        task.await.expect("join").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_ends_the_reader_with_it() {
        let api = FakeKinesis::new();
        api.put(SHARD, b"x");
        api.script([Some(KinesisError::Fatal("stream deleted".into()))]);
        let (tx, _rx) = mpsc::channel(4);
        let err = reader(&api, StartPosition::TrimHorizon, 10)
            .run(tx, Shutdown::new())
            .await
            .expect_err("fatal");
        assert_eq!(err.shard, SHARD);
        assert_eq!(err.source, KinesisError::Fatal("stream deleted".into()));
    }
}
