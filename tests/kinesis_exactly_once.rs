//! The Kinesis parts together, against the emulator and the real PostgreSQL: records read under a
//! lease, committed with their checkpoints in one transaction, a process that stops mid-stream, and
//! the next owner resuming after the checkpoint. Every record lands once; the late commit of the
//! process that lost its lease is fenced off and rolled back.

mod common;
mod kinesis_common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestSchema;
use kinesis_common::TestStream;
use sluice::envelope::{Chunk, Envelope};
use sluice::shutdown::Shutdown;
use sluice::sink::commit_record::Statements;
use sluice::source::kinesis::api::{KinesisApi, StreamRef};
use sluice::source::kinesis::checkpoint::{self, CheckpointError};
use sluice::source::kinesis::lease::{LeaseScope, Leases, TakenLease, lease_ddl};
use sluice::source::kinesis::position::InitialPosition;
use sluice::source::kinesis::progress;
use sluice::source::kinesis::reader::{ReaderSettings, ShardReader};
use sluice::source::kinesis::shards::list_shards;
use sluice::table_name::TableName;
use tokio::sync::mpsc;
use tokio_postgres::Client;

const LEASE: Duration = Duration::from_secs(1);

struct Fixture {
    schema: TestSchema,
    table: TableName,
    stream: TestStream,
}

impl Fixture {
    fn leases(&self, owner: &str) -> Leases {
        let scope = LeaseScope {
            table: self.table.clone(),
            application: "loader".into(),
            stream: self.stream.name.clone(),
        };
        Leases::new(scope, owner, LEASE)
    }

    fn rows(&self) -> String {
        format!("{}.rows", self.schema.name)
    }

    /// Starts a reader for `taken` and returns its channel and stop switch.
    fn read(&self, taken: &TakenLease) -> (mpsc::Receiver<Chunk<Envelope>>, Shutdown) {
        let api: Arc<dyn KinesisApi> = Arc::new(self.stream.client.clone());
        let reader = ShardReader::new(
            api,
            StreamRef::Name(self.stream.name.clone()),
            Arc::new(taken.claim.clone()),
            taken.start_position(InitialPosition::TrimHorizon),
            ReaderSettings {
                max_records_per_call: 10,
                idle_poll_interval: Duration::from_millis(200),
                ..ReaderSettings::default()
            },
        );
        let (tx, rx) = mpsc::channel(64);
        let stop = Shutdown::new();
        tokio::spawn(reader.run(tx, stop.clone()));
        (rx, stop)
    }

    /// Loads the chunks' bodies and writes their checkpoints in one transaction, as the sink will.
    async fn commit(
        &self,
        client: &mut Client,
        chunks: &[Chunk<Envelope>],
    ) -> Result<(), CheckpointError> {
        let tx = client.transaction().await.expect("begin");
        let bodies: Vec<&str> = chunks
            .iter()
            .flat_map(|c| c.items.iter().map(|e| e.body.as_str()))
            .collect();
        tx.execute(
            &format!("INSERT INTO {} SELECT unnest($1::text[])", self.rows()),
            &[&bodies],
        )
        .await
        .expect("insert");
        let tokens = chunks
            .iter()
            .flat_map(|c| c.items.iter().map(|e| &e.meta.ack));
        let written = checkpoint::checkpoint_all(
            &tx,
            &mut Statements::default(),
            &progress::checkpoints(tokens),
        )
        .await;
        match &written {
            Ok(()) => tx.commit().await.expect("commit"),
            Err(_) => tx.rollback().await.expect("rollback"),
        }
        written
    }
}

/// Receives at least `n` messages' worth of chunks.
async fn take(rx: &mut mpsc::Receiver<Chunk<Envelope>>, n: usize) -> Vec<Chunk<Envelope>> {
    let mut chunks = Vec::new();
    let mut got = 0;
    while got < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("records in time")
            .expect("reader running");
        got += chunk.items.len();
        chunks.push(chunk);
    }
    chunks
}

#[tokio::test]
async fn a_shard_taken_over_mid_stream_loads_every_record_once() {
    let schema = TestSchema::new().await;
    let table = TableName {
        schema: Some(schema.name.clone()),
        name: "kinesis_leases".into(),
    };
    for statement in lease_ddl(&table) {
        schema.client.batch_execute(&statement).await.expect("DDL");
    }
    schema
        .client
        .batch_execute(&format!("CREATE TABLE {}.rows(body text)", schema.name))
        .await
        .expect("rows table");
    let stream = TestStream::new(1).await;
    let f = Fixture {
        schema,
        table,
        stream,
    };
    let records: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (format!("user-{i}"), format!(r#"{{"n":{i}}}"#).into_bytes()))
        .collect();
    f.stream.put(&records).await;
    let api: Arc<dyn KinesisApi> = Arc::new(f.stream.client.clone());
    let graph = list_shards(api.as_ref(), &StreamRef::Name(f.stream.name.clone()))
        .await
        .expect("ListShards");
    let shards: Vec<_> = graph.shards().cloned().collect();

    // Process a: takes the shard, commits its first 20 records, holds 10 more uncommitted, freezes.
    let a = f.leases("a");
    a.register(&f.schema.client, &shards)
        .await
        .expect("register");
    let taken_a = a
        .acquire(&f.schema.client, &graph.readable(&HashSet::new()))
        .await
        .expect("a acquires");
    let (mut rx_a, stop_a) = f.read(&taken_a[0]);
    let first = take(&mut rx_a, 20).await;
    let second = take(&mut rx_a, 10).await;
    stop_a.stop();
    let mut client_a = common::pg().await;
    f.commit(&mut client_a, &first)
        .await
        .expect("a commits what it holds the lease for");

    // Process b takes the shard once a's lease expired, and resumes after a's checkpoint.
    let b = f.leases("b");
    let start = Instant::now();
    let taken_b = loop {
        let taken = b
            .acquire(&f.schema.client, &graph.readable(&HashSet::new()))
            .await
            .expect("b acquires");
        if !taken.is_empty() {
            break taken;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a's lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut rx_b, stop_b) = f.read(&taken_b[0]);
    let loaded_so_far = f.schema.count(&f.rows()).await as usize;
    let rest = take(&mut rx_b, 60 - loaded_so_far).await;
    stop_b.stop();

    // a wakes up and commits the records it read after losing the lease: fenced, rolled back.
    let late = f.commit(&mut client_a, &second).await;
    assert!(
        late.is_err_and(|e| e.is_fenced()),
        "a's late commit must be fenced off"
    );

    let mut client_b = common::pg().await;
    f.commit(&mut client_b, &rest).await.expect("b commits");
    let loaded: Vec<String> = f
        .schema
        .client
        .query(&format!("SELECT body FROM {} ORDER BY body", f.rows()), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want: Vec<String> = records
        .iter()
        .map(|(_, b)| String::from_utf8(b.clone()).expect("utf-8"))
        .collect();
    want.sort();
    assert_eq!(loaded, want, "every record exactly once");
}
