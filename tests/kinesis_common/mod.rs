//! A stream of its own in the Kinesis emulator for each test, found the way `make test` provides it
//! (`SLUICE_TEST_KINESIS_ENDPOINT`, default the local stack's kinesis-mock on port 4567). A test that
//! cannot reach it fails, naming what it tried: it never skips.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};

pub fn kinesis_endpoint() -> String {
    std::env::var("SLUICE_TEST_KINESIS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4567".into())
}

pub fn kinesis() -> aws_sdk_kinesis::Client {
    let creds = aws_sdk_kinesis::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_kinesis::config::Builder::new()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(kinesis_endpoint())
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// Where one record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub shard_id: String,
    pub sequence_number: String,
    pub data: Vec<u8>,
}

/// A stream of its own, deleted when the test ends.
pub struct TestStream {
    pub name: String,
    pub client: aws_sdk_kinesis::Client,
}

impl TestStream {
    pub async fn new(shards: i32) -> TestStream {
        let client = kinesis();
        let n: u64 = rand::random();
        let name = format!("sluice-t-{:012x}", n & 0xffff_ffff_ffff);
        client
            .create_stream()
            .stream_name(&name)
            .shard_count(shards)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Kinesis emulator at {} does not answer ({}); run `make up`",
                    kinesis_endpoint(),
                    DisplayErrorContext(e)
                )
            });
        let stream = TestStream { name, client };
        stream.wait_active().await;
        stream
    }

    /// Polls until the stream is ACTIVE again (after creation or a reshard).
    pub async fn wait_active(&self) {
        let start = Instant::now();
        loop {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(&self.name)
                .send()
                .await
                .expect("describe stream");
            let status = summary.stream_description_summary.map(|s| s.stream_status);
            if status == Some(StreamStatus::Active) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "stream {} still {status:?} after 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// PutRecords of `(partition key, data)` pairs in batches of up to 500; every entry must land.
    pub async fn put(&self, records: &[(String, Vec<u8>)]) -> Vec<Put> {
        let mut puts = Vec::new();
        for batch in records.chunks(500) {
            let entries = batch
                .iter()
                .map(|(key, data)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(key)
                        .data(Blob::new(data.clone()))
                        .build()
                        .expect("entry")
                })
                .collect();
            let out = self
                .client
                .put_records()
                .stream_name(&self.name)
                .set_records(Some(entries))
                .send()
                .await
                .expect("PutRecords");
            assert_eq!(
                out.failed_record_count,
                Some(0),
                "some records were refused"
            );
            for (entry, (_, data)) in out.records.into_iter().zip(batch) {
                puts.push(Put {
                    shard_id: entry.shard_id.expect("shard id"),
                    sequence_number: entry.sequence_number.expect("sequence number"),
                    data: data.clone(),
                });
            }
        }
        puts
    }

    /// Splits `shard_id` in the middle of its hash key range.
    pub async fn split(&self, shard_id: &str) {
        let shards = self
            .client
            .list_shards()
            .stream_name(&self.name)
            .send()
            .await
            .expect("ListShards")
            .shards
            .unwrap_or_default();
        let range = shards
            .iter()
            .find(|s| s.shard_id == shard_id)
            .and_then(|s| s.hash_key_range.clone())
            .expect("hash key range");
        let low: u128 = range.starting_hash_key.parse().expect("hash key");
        let high: u128 = range.ending_hash_key.parse().expect("hash key");
        let middle = low + (high - low) / 2 + 1;
        self.client
            .split_shard()
            .stream_name(&self.name)
            .shard_to_split(shard_id)
            .new_starting_hash_key(middle.to_string())
            .send()
            .await
            .expect("SplitShard");
        self.wait_active().await;
    }

    /// Merges two adjacent shards.
    pub async fn merge(&self, shard_id: &str, adjacent: &str) {
        self.client
            .merge_shards()
            .stream_name(&self.name)
            .shard_to_merge(shard_id)
            .adjacent_shard_to_merge(adjacent)
            .send()
            .await
            .expect("MergeShards");
        self.wait_active().await;
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                // A client of this runtime's own: connections pooled by the test's runtime would
                // stall here until they time out.
                let client = kinesis();
                rt.block_on(async {
                    let _ = client
                        .delete_stream()
                        .stream_name(name)
                        .enforce_consumer_deletion(true)
                        .send()
                        .await;
                });
            }
        })
        .join();
    }
}
