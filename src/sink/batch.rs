//! Gathering chunks into transaction-sized batches, sized by the sink's own pace.
//!
//! Every COMMIT costs a round of durable writes whatever the batch holds, so under load a batch
//! should be as large as possible, and when traffic is light a message should not wait for company
//! that is not coming. The batcher therefore hands a batch over as soon as the sink has room for it
//! and nothing more is waiting in its input; while the sink is busy, the batch keeps growing. The
//! batch size follows the load without a setting to tune: a backlog (a file, a catching-up shard, a
//! queue with a backlog) fills batches to the caps, a trickle commits each message promptly.
//!
//! Three bounds hold whatever the pace: `rows` messages (chunks are split at the boundary, so no
//! batch exceeds it), `bytes` of message bodies held (checked per chunk, since a chunk is small, so a
//! batch may pass it by one chunk), and `linger`, the longest the first message of a batch waits
//! for a busy sink before the batch closes anyway. The batch's rows are encoded here, in their own
//! task, so that the next batch is ready the moment the current one commits.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::envelope::{AckToken, Chunk, Meta, Reject, SourceOrder};
use crate::sink::commit_record::{CommitRecord, Entry, Outcome, Prepared};
use crate::sink::copy_encode::encode_rows;
use crate::stage::transform::LoginRow;

/// What one transaction commits: rows, dead-letter records, the rows' COPY payload and what the
/// source's commit record prepared for them.
///
/// Rows stay in the vectors they arrived in (one per chunk): gathering ten thousand rows into one
/// vector would copy every row once more, for nothing.
pub struct Batch {
    chunks: Vec<Vec<LoginRow>>,
    pub rejects: Vec<Reject>,
    /// The encoded rows, made while the previous batch commits. The sink takes it (leaving it empty)
    /// for the COPY, and encodes again for a retry or when some rows turn out to be duplicates.
    pub copy_data: Bytes,
    /// What the commit record worked out ahead for these messages ([`CommitRecord::prepare`]),
    /// also made while the previous batch commits; dropped with any message.
    prepared: Option<Prepared>,
}

impl Batch {
    pub fn new(rows: Vec<LoginRow>, rejects: Vec<Reject>) -> Batch {
        Batch::from_chunks(vec![rows], rejects)
    }

    pub fn from_chunks(chunks: Vec<Vec<LoginRow>>, rejects: Vec<Reject>) -> Batch {
        let rows: usize = chunks.iter().map(Vec::len).sum();
        let copy_data = encode_rows(rows, chunks.iter().flatten());
        Batch {
            chunks,
            rejects,
            copy_data,
            prepared: None,
        }
    }

    /// Lets `record` prepare its claim of these messages now, outside the transaction.
    pub fn prepare(&mut self, record: &dyn CommitRecord) {
        let prepared = record.prepare(&mut self.each_entry());
        self.prepared = prepared;
    }

    /// What the commit record prepared for these messages, if anything.
    pub fn prepared(&self) -> Option<&(dyn Any + Send + Sync)> {
        self.prepared.as_deref()
    }

    /// Every message as the commit record sees it: the rows', then the dead letters'.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        self.each_entry().collect()
    }

    fn each_entry(&self) -> impl Iterator<Item = Entry<'_>> {
        self.rows()
            .map(|r| Entry {
                meta: &r.event.meta,
                body: r.event.body(),
                outcome: Outcome::Row,
            })
            .chain(self.rejects.iter().map(|r| Entry {
                meta: &r.meta,
                body: &r.body,
                outcome: Outcome::DeadLetter,
            }))
    }

    pub fn rows(&self) -> impl Iterator<Item = &LoginRow> + Clone {
        self.chunks.iter().flatten()
    }

    pub fn row_count(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// The rows as one vector, and the rejects: for the rare paths that take a batch apart.
    pub fn into_parts(self) -> (Vec<LoginRow>, Vec<Reject>) {
        (self.chunks.into_iter().flatten().collect(), self.rejects)
    }

    pub fn len(&self) -> usize {
        self.row_count() + self.rejects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every message's source data: the rows', then the dead letters'.
    pub fn metas(&self) -> impl Iterator<Item = &Meta> + '_ {
        self.rows()
            .map(|r| &r.event.meta)
            .chain(self.rejects.iter().map(|r| &r.meta))
    }

    /// When the source accepted each message that says so (milliseconds since the Unix epoch).
    pub fn sent_at_ms(&self) -> impl Iterator<Item = i64> + '_ {
        self.metas().filter_map(|m| m.sent_at_ms)
    }

    /// Removes the messages for which `drop` holds; returns how many went. The encoded rows are
    /// made again at the next commit.
    pub fn drop_where(&mut self, drop: impl Fn(&Meta) -> bool) -> usize {
        let before = self.len();
        for chunk in &mut self.chunks {
            chunk.retain(|r| !drop(&r.event.meta));
        }
        self.chunks.retain(|chunk| !chunk.is_empty());
        self.rejects.retain(|r| !drop(&r.meta));
        let dropped = before - self.len();
        if dropped > 0 {
            self.copy_data = Bytes::new();
            self.prepared = None;
        }
        dropped
    }

    /// Every message's acknowledgement token. Each is taken out in place: moving a row out of its
    /// vector only to keep its token would copy the whole row, which showed in profiles.
    pub fn into_ack_tokens(mut self) -> Vec<AckToken> {
        let take = |meta: &mut Meta| std::mem::replace(&mut meta.ack, AckToken::None);
        let mut tokens = Vec::with_capacity(self.len());
        tokens.extend(
            self.chunks
                .iter_mut()
                .flatten()
                .map(|r| take(&mut r.event.meta)),
        );
        tokens.extend(self.rejects.iter_mut().map(|r| take(&mut r.meta)));
        tokens
    }
}

/// The bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// The most messages (rows and dead letters) in one transaction.
    pub rows: usize,
    /// Message bodies held by one batch, in bytes, after which it closes.
    pub bytes: usize,
    /// The longest a batch's first message waits for a busy sink.
    pub linger: Duration,
}

/// Accumulates chunks up to the limits.
struct Gathering {
    chunks: Vec<Vec<LoginRow>>,
    rows: usize,
    rejects: Vec<Reject>,
    bytes: usize,
    limits: BatchLimits,
}

impl Gathering {
    fn new(limits: BatchLimits) -> Gathering {
        Gathering {
            chunks: Vec::new(),
            rows: 0,
            rejects: Vec::new(),
            bytes: 0,
            limits,
        }
    }

    fn len(&self) -> usize {
        self.rows + self.rejects.len()
    }

    fn is_full(&self) -> bool {
        self.len() >= self.limits.rows || self.bytes >= self.limits.bytes
    }

    /// Takes what fits; returns the rest of the chunk, if any.
    fn add(&mut self, mut chunk: Chunk<LoginRow>) -> Option<Chunk<LoginRow>> {
        self.bytes += held_bytes(&chunk);
        let room = self.limits.rows - self.len();
        if chunk.len() <= room {
            self.keep_rows(chunk.items);
            self.rejects.append(&mut chunk.rejects);
            return None;
        }
        let (take_rows, take_rejects) = split_point(&mut chunk, room);
        let rest_rows = chunk.items.split_off(take_rows);
        self.keep_rows(chunk.items);
        let rest_rejects = chunk.rejects.split_off(take_rejects);
        self.rejects.append(&mut chunk.rejects);
        Some(Chunk {
            items: rest_rows,
            rejects: rest_rejects,
        })
    }

    fn keep_rows(&mut self, rows: Vec<LoginRow>) {
        if !rows.is_empty() {
            self.rows += rows.len();
            self.chunks.push(rows);
        }
    }

    fn into_batch(self, record: &dyn CommitRecord) -> Batch {
        let mut batch = Batch::from_chunks(self.chunks, self.rejects);
        batch.prepare(record);
        batch
    }
}

/// How many rows and dead letters of `chunk` make the first `room` messages. Messages in their
/// source's own order (a file's lines, a Kinesis shard's records) are taken in that order, rows
/// and dead letters alike, so that each batch covers one stretch of the source and the position
/// it commits (a file offset, a shard checkpoint) passes nothing a later batch still holds;
/// others are taken rows first. Rows keep their source's order through the stages; dead letters
/// are gathered stage by stage, so they are put back in order here first.
fn split_point(chunk: &mut Chunk<LoginRow>, room: usize) -> (usize, usize) {
    if chunk
        .rejects
        .iter()
        .all(|r| r.meta.source_order().is_some())
    {
        chunk
            .rejects
            .sort_by(|a, b| a.meta.source_order().cmp(&b.meta.source_order()));
    }
    let rows: Option<Vec<SourceOrder<'_>>> = chunk
        .items
        .iter()
        .map(|r| r.event.meta.source_order())
        .collect();
    let rejects: Option<Vec<SourceOrder<'_>>> = chunk
        .rejects
        .iter()
        .map(|r| r.meta.source_order())
        .collect();
    let (Some(rows), Some(rejects)) = (rows, rejects) else {
        let take_rows = chunk.items.len().min(room);
        return (take_rows, room - take_rows);
    };
    let (mut r, mut d) = (0, 0);
    while r + d < room {
        match (rows.get(r), rejects.get(d)) {
            (Some(a), Some(b)) if a < b => r += 1,
            (Some(_), None) => r += 1,
            (_, Some(_)) => d += 1,
            (None, None) => break,
        }
    }
    (r, d)
}

/// The bodies a chunk holds: what a batch's memory grows with (a dead letter may be a large body).
fn held_bytes(chunk: &Chunk<LoginRow>) -> usize {
    let rows: usize = chunk.items.iter().map(|r| r.event.body().len()).sum();
    let rejects: usize = chunk.rejects.iter().map(|r| r.body.len()).sum();
    rows + rejects
}

/// The batching task: runs until its input closes, then sends the last partial batch and closes its
/// output. Each batch leaves encoded and prepared for `record`.
pub async fn run_batcher(
    mut input: mpsc::Receiver<Chunk<LoginRow>>,
    output: mpsc::Sender<Batch>,
    limits: BatchLimits,
    record: Arc<dyn CommitRecord>,
) {
    let mut carry: Option<Chunk<LoginRow>> = None;
    let mut input_open = true;
    while input_open || carry.is_some() {
        let mut gathering = Gathering::new(limits);
        let first = match carry.take() {
            Some(chunk) => chunk,
            None => match input.recv().await {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let deadline = Instant::now() + limits.linger;
        carry = gathering.add(first);
        let permit = loop {
            // Whatever is already waiting joins this batch before the sink is even asked.
            while carry.is_none() && !gathering.is_full() && input_open {
                match input.try_recv() {
                    Ok(chunk) => carry = gathering.add(chunk),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => input_open = false,
                }
            }
            if carry.is_some() || gathering.is_full() || !input_open {
                break output.reserve().await;
            }
            tokio::select! {
                biased;
                permit = output.reserve() => break permit,
                next = input.recv() => match next {
                    Some(chunk) => carry = gathering.add(chunk),
                    None => input_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => break output.reserve().await,
            }
        };
        let Ok(permit) = permit else {
            tracing::warn!("batcher: sink stopped; dropping out");
            return;
        };
        permit.send(gathering.into_batch(&*record));
    }
}

/// Rows of valid logins for users `u0`, `u1`, … and dead letters, for tests that take batches apart.
#[cfg(test)]
pub fn test_rows(rows: usize, rejects: usize) -> (Vec<LoginRow>, Vec<Reject>) {
    use crate::envelope::{Envelope, Stage};
    use crate::stage::mask::{MaskKey, MaskMode, Masker};
    use crate::stage::parse::parse_login;
    use crate::stage::transform::{AppVersionMode, CreateDateMode, Transformer};
    let transformer = Transformer::new(
        Masker::new(
            MaskMode::HmacSha256,
            &MaskKey::from_bytes(b"a test key of 16+ bytes"),
        )
        .unwrap_or_else(|_| unreachable!("a hash key")),
        AppVersionMode::Major,
        CreateDateMode::ProcessingTime,
    );
    let now = std::time::SystemTime::now();
    let rows = (0..rows)
        .map(|i| {
            let body = format!(
                r#"{{"user_id": "u{i}", "app_version": "2.3.0", "device_type": "ios", "ip": "10.0.0.1", "device_id": "d"}}"#
            );
            let meta = Meta::at_position(i as u64 + 1, now);
            let event = parse_login(Envelope { body, meta }).unwrap_or_else(|_| unreachable!("a valid login"));
            transformer
                .transform(event, chrono::Utc::now().date_naive())
                .unwrap_or_else(|_| unreachable!("a valid row"))
        })
        .collect();
    let rejects = (0..rejects)
        .map(|i| Reject {
            body: format!("bad {i}"),
            meta: Meta::at_position(1000 + i as u64, now),
            stage: Stage::Parse,
            reason: "x".into(),
        })
        .collect();
    (rows, rejects)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_chunk_is_split_in_file_order() {
        let (mut rows, mut rejects) = test_rows(4, 2);
        // Rows at lines 1, 2, 4, 6; dead letters at lines 3, 5.
        for (row, line) in rows.iter_mut().zip([1, 2, 4, 6]) {
            row.event.meta.message_id = MessageId::Position(line);
        }
        for (reject, line) in rejects.iter_mut().zip([3, 5]) {
            reject.meta.message_id = MessageId::Position(line);
        }
        let mut chunk = Chunk {
            items: rows,
            rejects,
        };
        assert_eq!(split_point(&mut chunk, 3), (2, 1), "lines 1-3");
        assert_eq!(split_point(&mut chunk, 4), (3, 1), "lines 1-4");
        assert_eq!(split_point(&mut chunk, 5), (3, 2), "lines 1-5");
    }

    /// A Kinesis message's acknowledgement: record `sequence`, user record `user_record` of it.
    fn shard_ack(sequence: u64, user_record: usize, completes_record: bool) -> AckToken {
        use crate::source::kinesis::KinesisAck;
        use crate::source::kinesis::lease::{LeaseClaim, LeaseScope};
        use crate::source::kinesis::sequence::SequenceNumber;
        use std::sync::Arc;
        AckToken::Kinesis(KinesisAck {
            lease: Arc::new(LeaseClaim {
                scope: Arc::new(LeaseScope {
                    table: crate::table_name::TableName::unqualified("leases"),
                    application: "app".into(),
                    stream: "logins".into(),
                }),
                shard_id: "shardId-000000000000".into(),
                owner: Arc::from("me"),
                epoch: 1,
                duration: Duration::from_secs(30),
                fenced_off: Default::default(),
            }),
            sequence: SequenceNumber::parse(&sequence.to_string()).expect("valid"),
            user_record,
            completes_record,
            ends_shard: false,
        })
    }

    #[test]
    fn a_kinesis_chunk_is_split_in_shard_order() {
        // One page: records 1, 2, 4 are rows, 3 a dead letter, and record 5 a KPL aggregate whose
        // user records 0 and 2 are rows and 1 a dead letter.
        let (mut rows, mut rejects) = test_rows(5, 2);
        let kinesis_id = |meta: &mut Meta| meta.message_id = MessageId::Text("shard/seq".into());
        for (row, (sequence, user, completes)) in rows.iter_mut().zip([
            (1, 0, true),
            (2, 0, true),
            (4, 0, true),
            (5, 0, false),
            (5, 2, true),
        ]) {
            kinesis_id(&mut row.event.meta);
            row.event.meta.ack = shard_ack(sequence, user, completes);
        }
        // Dead letters of two stages: the later stage's come last whatever their place.
        for (reject, (sequence, user)) in rejects.iter_mut().zip([(5, 1), (3, 0)]) {
            kinesis_id(&mut reject.meta);
            reject.meta.ack = shard_ack(sequence, user, false);
        }
        let mut chunk = Chunk {
            items: rows,
            rejects,
        };
        assert_eq!(split_point(&mut chunk, 2), (2, 0), "records 1-2");
        assert_eq!(split_point(&mut chunk, 3), (2, 1), "records 1-3");
        assert_eq!(
            split_point(&mut chunk, 5),
            (4, 1),
            "records 1-4 and 5's first user record"
        );
        assert_eq!(
            split_point(&mut chunk, 6),
            (4, 2),
            "all but the aggregate's last user record"
        );
    }

    use super::*;
    use crate::envelope::MessageId;
    use crate::sink::commit_record::NoCommitRecord;

    fn chunk_of_rejects(n: usize) -> Chunk<LoginRow> {
        Chunk {
            items: Vec::new(),
            rejects: test_rows(0, n).1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_cut_at_the_limit_and_the_tail_is_flushed() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(16);
        let task = tokio::spawn(batcher(rx, btx, limits(4, Duration::from_secs(60))));
        tx.send(chunk_of_rejects(3)).await.expect("send");
        tx.send(chunk_of_rejects(3)).await.expect("send");
        tx.send(chunk_of_rejects(3)).await.expect("send");
        drop(tx);
        let mut sizes = Vec::new();
        while let Some(b) = brx.recv().await {
            sizes.push(b.len());
        }
        task.await.expect("batcher");
        assert_eq!(sizes, [4, 4, 1]);
    }

    /// The batching task for a source with nothing to record.
    fn batcher(
        input: mpsc::Receiver<Chunk<LoginRow>>,
        output: mpsc::Sender<Batch>,
        limits: BatchLimits,
    ) -> impl Future<Output = ()> {
        run_batcher(input, output, limits, Arc::new(NoCommitRecord))
    }

    /// A record that prepares the number of dead letters it was shown.
    struct CountingRecord;

    impl CommitRecord for CountingRecord {
        fn prepare<'a>(&self, entries: &mut dyn Iterator<Item = Entry<'a>>) -> Option<Prepared> {
            let dead = entries.filter(|e| e.outcome == Outcome::DeadLetter);
            Some(Box::new(dead.count()))
        }
    }

    fn prepared_count(batch: &Batch) -> Option<usize> {
        batch
            .prepared()
            .and_then(|p| p.downcast_ref::<usize>())
            .copied()
    }

    #[tokio::test]
    async fn batches_leave_prepared_and_a_changed_batch_loses_what_was_prepared() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(16);
        let limits = limits(100, Duration::from_secs(60));
        tokio::spawn(run_batcher(rx, btx, limits, Arc::new(CountingRecord)));
        tx.send(chunk_of_rejects(3)).await.expect("send");
        let mut batch = brx.recv().await.expect("a batch");
        assert_eq!(prepared_count(&batch), Some(3));
        assert_eq!(batch.drop_where(|_| false), 0);
        assert_eq!(
            prepared_count(&batch),
            Some(3),
            "nothing dropped, still valid"
        );
        let first = batch.rejects[0].meta.message_id.clone();
        assert_eq!(batch.drop_where(|m| m.message_id == first), 1);
        assert_eq!(
            prepared_count(&batch),
            None,
            "made for messages no longer there"
        );
    }

    fn limits(rows: usize, linger: Duration) -> BatchLimits {
        BatchLimits {
            rows,
            bytes: usize::MAX,
            linger,
        }
    }

    /// A trickle: the sink is free, so the first message does not wait for company.
    #[tokio::test(start_paused = true)]
    async fn a_lone_message_leaves_at_once_when_the_sink_is_free() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(1);
        tokio::spawn(batcher(rx, btx, limits(100, Duration::from_secs(60))));
        tx.send(chunk_of_rejects(2)).await.expect("send");
        let started = Instant::now();
        let batch = brx.recv().await.expect("a batch");
        assert_eq!(batch.len(), 2);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A busy sink: the batch grows with what arrives meanwhile, and leaves when the sink takes it.
    #[tokio::test(start_paused = true)]
    async fn a_batch_grows_while_the_sink_is_busy() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(1);
        tokio::spawn(batcher(rx, btx, limits(100, Duration::from_secs(60))));
        tx.send(chunk_of_rejects(1)).await.expect("send");
        wait_until(|| !brx.is_empty()).await; // the sink's one slot now holds the first batch
        for _ in 0..5 {
            tx.send(chunk_of_rejects(3)).await.expect("send");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(brx.recv().await.expect("first").len(), 1);
        assert_eq!(brx.recv().await.expect("second").len(), 15);
    }

    /// A sink that stays busy: the batch closes after `linger` and waits for room, holding no more.
    #[tokio::test(start_paused = true)]
    async fn linger_bounds_how_long_a_batch_keeps_growing() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(1);
        tokio::spawn(batcher(rx, btx, limits(100, Duration::from_millis(250))));
        tx.send(chunk_of_rejects(1)).await.expect("send");
        wait_until(|| !brx.is_empty()).await;
        tx.send(chunk_of_rejects(2)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(chunk_of_rejects(4)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sizes = sizes_of_next(&mut brx, 3).await;
        assert_eq!(sizes, [1, 2, 4], "the second batch closed at its linger");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_its_byte_budget() {
        let (tx, rx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(1);
        let budget = BatchLimits {
            rows: 100,
            bytes: 10,
            linger: Duration::from_secs(60),
        };
        tokio::spawn(batcher(rx, btx, budget));
        tx.send(chunk_of_rejects(1)).await.expect("send");
        wait_until(|| !brx.is_empty()).await;
        for _ in 0..4 {
            tx.send(chunk_of_rejects(1)).await.expect("send"); // "bad N": 5 bytes each
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sizes = sizes_of_next(&mut brx, 3).await;
        assert_eq!(sizes, [1, 2, 2]);
    }

    /// The sizes of the next `n` batches the batcher hands over.
    async fn sizes_of_next(batches: &mut mpsc::Receiver<Batch>, n: usize) -> Vec<usize> {
        let mut sizes = Vec::with_capacity(n);
        for _ in 0..n {
            sizes.push(batches.recv().await.expect("a batch").len());
        }
        sizes
    }

    async fn wait_until(done: impl Fn() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn dropping_messages_keeps_the_rest_and_forgets_the_encoding() {
        let (rows, rejects) = test_rows(4, 2);
        let mut batch = Batch::new(rows, rejects);
        let odd = |m: &Meta| matches!(m.message_id, crate::envelope::MessageId::Position(n) if n % 2 == 1);
        assert_eq!(batch.drop_where(odd), 3, "rows 1 and 3, dead letter 1001");
        assert_eq!((batch.row_count(), batch.rejects.len()), (2, 1));
        assert!(batch.copy_data.is_empty());
        assert_eq!(batch.drop_where(|_| false), 0);
    }
}
