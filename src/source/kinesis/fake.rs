//! An in-memory Kinesis behind [`KinesisApi`], for the faults the emulator cannot produce on demand:
//! throttling and expired iterators, at chosen calls, under paused time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::time::Instant;

use super::api::{
    FetchedRecord, KinesisApi, KinesisError, RecordsPage, ShardDescription, ShardPage, StreamRef,
};
use super::position::StartPosition;
use super::sequence::SequenceNumber;

#[derive(Default)]
struct FakeShard {
    records: Vec<FetchedRecord>,
    closed: bool,
}

#[derive(Default)]
struct State {
    shards: BTreeMap<String, FakeShard>,
    /// One entry consumed per `GetRecords` call: `Some` fails that call.
    faults: VecDeque<Option<KinesisError>>,
    get_records_calls: Vec<Instant>,
    iterator_requests: Vec<StartPosition>,
    /// A closed shard's last records come with a next iterator, and the end on an empty page after.
    end_on_empty_page: bool,
    next_sequence: u64,
}

#[derive(Default)]
pub struct FakeKinesis {
    state: Mutex<State>,
}

impl FakeKinesis {
    pub fn new() -> Arc<FakeKinesis> {
        Arc::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a record to `shard` (created if new); returns its sequence number.
    pub fn put(&self, shard: &str, data: &[u8]) -> SequenceNumber {
        let mut state = self.state();
        state.next_sequence += 1;
        let sequence = SequenceNumber::parse(&format!(
            "49590338271490256608559692538{:027}",
            state.next_sequence
        ))
        .expect("valid sequence number");
        let arrival_ms = 1_700_000_000_000 + state.next_sequence as i64;
        state
            .shards
            .entry(shard.into())
            .or_default()
            .records
            .push(FetchedRecord {
                sequence_number: sequence.clone(),
                partition_key: "pk".into(),
                data: data.to_vec(),
                arrival_ms: Some(arrival_ms),
            });
        sequence
    }

    pub fn add_shard(&self, shard: &str) {
        self.state().shards.entry(shard.into()).or_default();
    }

    pub fn close(&self, shard: &str) {
        self.state().shards.entry(shard.into()).or_default().closed = true;
    }

    pub fn end_on_empty_page(&self) {
        self.state().end_on_empty_page = true;
    }

    /// The next calls to `GetRecords` fail or succeed in this order (`None`: served normally).
    pub fn script(&self, faults: impl IntoIterator<Item = Option<KinesisError>>) {
        self.state().faults.extend(faults);
    }

    pub fn get_records_calls(&self) -> Vec<Instant> {
        self.state().get_records_calls.clone()
    }

    pub fn iterator_requests(&self) -> Vec<StartPosition> {
        self.state().iterator_requests.clone()
    }
}

fn iterator(shard: &str, index: usize) -> String {
    format!("{shard}|{index}")
}

#[async_trait]
impl KinesisApi for FakeKinesis {
    async fn list_shards(
        &self,
        _stream: &StreamRef,
        _next_token: Option<&str>,
    ) -> Result<ShardPage, KinesisError> {
        let state = self.state();
        Ok(ShardPage {
            shards: state
                .shards
                .iter()
                .map(|(id, shard)| ShardDescription {
                    shard_id: id.clone(),
                    parent_shard_id: None,
                    adjacent_parent_shard_id: None,
                    closed: shard.closed,
                })
                .collect(),
            next_token: None,
        })
    }

    async fn shard_iterator(
        &self,
        _stream: &StreamRef,
        shard_id: &str,
        start: &StartPosition,
    ) -> Result<String, KinesisError> {
        let mut state = self.state();
        state.iterator_requests.push(start.clone());
        let shard = state
            .shards
            .get(shard_id)
            .ok_or_else(|| KinesisError::Fatal(format!("no shard {shard_id}")))?;
        let index = match start {
            StartPosition::TrimHorizon => 0,
            StartPosition::Latest => shard.records.len(),
            StartPosition::AtTimestamp { millis } => shard
                .records
                .iter()
                .position(|r| r.arrival_ms >= Some(*millis))
                .unwrap_or(shard.records.len()),
            StartPosition::AfterSequence(sequence) => {
                shard
                    .records
                    .iter()
                    .position(|r| r.sequence_number == *sequence)
                    .ok_or_else(|| KinesisError::Fatal(format!("no record {sequence}")))?
                    + 1
            }
        };
        Ok(iterator(shard_id, index))
    }

    async fn get_records(
        &self,
        iterator_text: &str,
        limit: i32,
    ) -> Result<RecordsPage, KinesisError> {
        let mut state = self.state();
        state.get_records_calls.push(Instant::now());
        if let Some(Some(fault)) = state.faults.pop_front() {
            return Err(fault);
        }
        let (shard_id, index) = iterator_text
            .split_once('|')
            .and_then(|(s, i)| Some((s.to_owned(), i.parse::<usize>().ok()?)))
            .ok_or_else(|| KinesisError::Fatal(format!("bad iterator {iterator_text}")))?;
        let end_on_empty_page = state.end_on_empty_page;
        let shard = state
            .shards
            .get(&shard_id)
            .ok_or_else(|| KinesisError::Fatal(format!("no shard {shard_id}")))?;
        let end = (index + limit as usize).min(shard.records.len());
        let records = shard.records[index..end].to_vec();
        let at_end = end == shard.records.len();
        // With `end_on_empty_page`, a page that brings the last records still has a next iterator.
        let shard_over = shard.closed && at_end && (records.is_empty() || !end_on_empty_page);
        Ok(RecordsPage {
            records,
            next_iterator: (!shard_over).then(|| iterator(&shard_id, end)),
            millis_behind_latest: Some(if at_end { 0 } else { 1000 }),
        })
    }
}
