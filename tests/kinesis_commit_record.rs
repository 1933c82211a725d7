//! The commit-record seam carries a fenced Kinesis checkpoint: written last in the batch's
//! transaction; when the lease moved to another process, the whole transaction rolls back and the
//! committer drops that shard's records unloaded and commits the rest. The record is the Kinesis
//! source's own ([`ShardCheckpoints`]), against the real PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sluice::envelope::{AckToken, Envelope, Meta};
use sluice::pg::Connector;
use sluice::sink::Committer;
use sluice::sink::batch::Batch;
use sluice::sink::postgres::{PgCopySinkBuilder, SinkSettings};
use sluice::sink::schema;
use sluice::source::kinesis::KinesisAck;
use sluice::source::kinesis::api::ShardDescription;
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope, Leases, lease_ddl};
use sluice::source::kinesis::metrics::KinesisStats;
use sluice::source::kinesis::record::ShardCheckpoints;
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::stage::transform::LoginRow;
use sluice::table_name::{TableName, Tables};

fn kinesis(token: &AckToken) -> Option<&KinesisAck> {
    match token {
        AckToken::Kinesis(ack) => Some(ack),
        _ => None,
    }
}

/// A row read from `lease`'s shard at `sequence`.
fn row(lease: &Arc<LeaseClaim>, sequence: u64) -> LoginRow {
    let mut meta = Meta::at_position(sequence, SystemTime::now());
    meta.ack = AckToken::Kinesis(KinesisAck {
        lease: lease.clone(),
        sequence: SequenceNumber::parse(&sequence.to_string()).expect("a sequence number"),
        user_record: 0,
        completes_record: true,
        ends_shard: false,
    });
    let body = login(&format!("{}-{sequence}", lease.shard_id));
    let event = sluice::stage::parse::parse_login(Envelope { body, meta })
        .unwrap_or_else(|_| panic!("a valid login"));
    let transformer = sluice::stage::transform::Transformer::new(
        sluice::stage::mask::Masker::new(
            sluice::stage::mask::MaskMode::HmacSha256,
            &sluice::stage::mask::MaskKey::from_bytes(MASK_KEY.as_bytes()),
        )
        .expect("a hash key"),
        Default::default(),
        Default::default(),
    );
    transformer
        .transform(event, chrono::Utc::now().date_naive())
        .unwrap_or_else(|_| panic!("a row"))
}

#[tokio::test]
async fn a_fenced_shard_is_dropped_and_the_rest_of_the_batch_commits() {
    let schema = TestSchema::new().await;
    let table = |name: &str| TableName::parse(&format!("{}.{name}", schema.name)).expect("name");
    let tables = Tables {
        target: table("user_logins"),
        dead_letter: table("user_logins_rejected"),
        ledger: table("unused_ledger"),
    };
    let mut admin = pg().await;
    schema::migrate(&mut admin, &tables, false)
        .await
        .expect("migrate");
    let lease_table = table("kinesis_leases");
    for statement in lease_ddl(&lease_table) {
        admin.batch_execute(&statement).await.expect("lease DDL");
    }
    let scope = || LeaseScope {
        table: lease_table.clone(),
        application: "app".into(),
        stream: "logins".into(),
    };
    let shards: Vec<ShardDescription> = (0..2)
        .map(|i| ShardDescription {
            shard_id: format!("shardId-{i:012}"),
            parent_shard_id: None,
            adjacent_parent_shard_id: None,
            closed: false,
        })
        .collect();
    let a = Leases::new(scope(), "a", Duration::from_millis(300));
    a.register(&admin, &shards).await.expect("register");
    let ids: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
    let held = a.acquire(&admin, &ids).await.expect("a takes both");
    assert_eq!(held.len(), 2);
    let lease = |i: usize| {
        let taken = held.iter().find(|t| t.claim.shard_id == ids[i]);
        Arc::new(taken.expect("both shards held").claim.clone())
    };
    let (zero, one) = (lease(0), lease(1));

    let columns = schema::verify(&admin, &tables, false)
        .await
        .expect("verify");
    let settings = SinkSettings {
        connector: Connector::new(database_url(), Duration::from_secs(10)),
        tables: tables.clone(),
        dead_letter_columns: columns,
        dead_letter_queue: None,
    };
    let mut committer =
        PgCopySinkBuilder::new(settings, Arc::new(sluice::stats::Stats::default())).committer(None);
    let kinesis_stats = Arc::new(KinesisStats::default());
    let record = ShardCheckpoints::new(kinesis_stats.clone());
    let checkpoint_sql = format!("SELECT checkpoint::text FROM {lease_table} ORDER BY shard_id");
    let first = Batch::new(
        vec![row(&zero, 10), row(&one, 20), row(&zero, 11), row(&one, 21)],
        Vec::new(),
    );
    let commit = committer.commit(first, &record).await.expect("commit");
    assert_eq!((commit.committed[0].counts.loaded, commit.dropped), (4, 0));
    assert_eq!(checkpoints(&admin, &checkpoint_sql).await, ["11", "21"]);

    // a is frozen past its leases; b takes shard 1 (shard 0 stays a's: nobody took it).
    let b = Leases::new(scope(), "b", Duration::from_secs(60));
    let started = Instant::now();
    while b.acquire(&admin, &ids[1..]).await.expect("b").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b took nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let second = Batch::new(
        vec![row(&zero, 12), row(&one, 22), row(&one, 23)],
        Vec::new(),
    );
    let commit = committer.commit(second, &record).await.expect("commit");
    assert_eq!(commit.dropped, 2, "shard 1's records are dropped unloaded");
    assert_eq!(
        kinesis_stats.fenced_commits.get(),
        1,
        "one fenced-off commit"
    );
    let loaded: usize = commit.committed.iter().map(|c| c.counts.loaded).sum();
    assert_eq!(loaded, 1, "shard 0's record is committed");
    let acknowledged: Vec<AckToken> = commit
        .committed
        .into_iter()
        .flat_map(|c| c.batch.into_ack_tokens())
        .collect();
    assert!(
        acknowledged
            .iter()
            .all(|t| kinesis(t).is_some_and(|a| a.lease.shard_id == zero.shard_id))
    );
    assert_eq!(schema.rows_loaded().await, 5);
    assert_eq!(checkpoints(&admin, &checkpoint_sql).await, ["12", "21"]);
}

async fn checkpoints(admin: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    admin
        .query(sql, &[])
        .await
        .expect("checkpoints")
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}
