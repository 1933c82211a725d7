//! The commit-record seam carries a fenced Kinesis checkpoint: written last in the batch's
//! transaction; when the lease moved to another process, the whole transaction rolls back and the
//! committer drops that shard's records unloaded and commits the rest. The record is the Kinesis
//! source's own ([`ShardCheckpoints`]), against the real PostgreSQL. Once fenced off, a claim's
//! later records are dropped before their batch's transaction; a new claim of the shard commits.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sluice::envelope::{AckToken, Meta};
use sluice::sink::Committer;
use sluice::sink::batch::Batch;
use sluice::sink::commit_order::Turn;
use sluice::sink::postgres::PgCopySink;
use sluice::source::kinesis::KinesisAck;
use sluice::source::kinesis::api::ShardDescription;
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope, Leases, lease_ddl};
use sluice::source::kinesis::metrics::KinesisStats;
use sluice::source::kinesis::record::ShardCheckpoints;
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::stage::transform::LoginRow;
use sluice::table_name::TableName;

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
    login_row(&format!("{}-{sequence}", lease.shard_id), meta)
}

/// A schema with the sink's tables and a lease table, shards 0 and 1 leased to process `a`, and a
/// committer with the Kinesis source's commit record.
struct Fixture {
    schema: TestSchema,
    admin: tokio_postgres::Client,
    scope: LeaseScope,
    ids: Vec<String>,
    zero: Arc<LeaseClaim>,
    one: Arc<LeaseClaim>,
    committer: PgCopySink,
    record: ShardCheckpoints,
    kinesis_stats: Arc<KinesisStats>,
    checkpoint_sql: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let schema = TestSchema::new().await;
        let (_, committer) = committer_in(&schema, false).await;
        let admin = pg().await;
        let lease_table =
            TableName::parse(&format!("{}.kinesis_leases", schema.name)).expect("name");
        for statement in lease_ddl(&lease_table) {
            admin.batch_execute(&statement).await.expect("lease DDL");
        }
        let scope = LeaseScope {
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
        let a = Leases::new(scope.clone(), "a", Duration::from_millis(300));
        a.register(&admin, &shards).await.expect("register");
        let ids: Vec<String> = shards.iter().map(|s| s.shard_id.clone()).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let held = a.acquire(&admin, &id_refs).await.expect("a takes both");
        assert_eq!(held.len(), 2);
        let lease = |i: usize| {
            let taken = held.iter().find(|t| t.claim.shard_id == ids[i]);
            Arc::new(taken.expect("both shards held").claim.clone())
        };
        let (zero, one) = (lease(0), lease(1));
        let kinesis_stats = Arc::new(KinesisStats::default());
        let record = ShardCheckpoints::new(kinesis_stats.clone());
        let checkpoint_sql =
            format!("SELECT checkpoint::text FROM {lease_table} ORDER BY shard_id");
        Fixture {
            schema,
            admin,
            scope,
            ids,
            zero,
            one,
            committer,
            record,
            kinesis_stats,
            checkpoint_sql,
        }
    }

    async fn checkpoints(&self) -> Vec<String> {
        checkpoints(&self.admin, &self.checkpoint_sql).await
    }
}

#[tokio::test]
async fn a_fenced_shard_is_dropped_and_the_rest_of_the_batch_commits_and_its_claim_costs_no_more_transactions()
 {
    let Fixture {
        schema,
        admin,
        scope,
        ids,
        zero,
        one,
        mut committer,
        record,
        kinesis_stats,
        checkpoint_sql,
    } = Fixture::new().await;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let scope = || scope.clone();
    let first = Batch::new(
        vec![row(&zero, 10), row(&one, 20), row(&zero, 11), row(&one, 21)],
        Vec::new(),
    );
    let commit = committer
        .commit(first, &record, &mut Turn::free())
        .await
        .expect("commit");
    assert_eq!((commit.committed[0].counts.loaded, commit.dropped), (4, 0));
    assert_eq!(checkpoints(&admin, &checkpoint_sql).await, ["11", "21"]);

    // a is frozen past its leases; b takes shard 1 (shard 0 stays a's: nobody took it).
    let b = Leases::new(scope(), "b", Duration::from_secs(60));
    let started = Instant::now();
    let b_held = loop {
        let taken = b.acquire(&admin, &ids[1..]).await.expect("b");
        if !taken.is_empty() {
            break taken;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b took nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let second = Batch::new(
        vec![row(&zero, 12), row(&one, 22), row(&one, 23)],
        Vec::new(),
    );
    let commit = committer
        .commit(second, &record, &mut Turn::free())
        .await
        .expect("commit");
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

    // Later batches of the fenced-off claim open no transaction for it: no more fenced commits,
    // the other shard's records still commit, and a batch of that claim alone commits nothing.
    let third = Batch::new(
        vec![row(&one, 24), row(&zero, 13), row(&one, 25)],
        Vec::new(),
    );
    let commit = committer
        .commit(third, &record, &mut Turn::free())
        .await
        .expect("commit");
    assert_eq!(commit.dropped, 2, "the lost claim's records are dropped");
    assert_eq!(
        kinesis_stats.fenced_commits.get(),
        1,
        "no transaction was fenced off for the lost claim's records"
    );
    assert_eq!(commit.committed.len(), 1, "one transaction, for shard 0");
    assert_eq!(commit.committed[0].counts.loaded, 1);
    let fourth = Batch::new(vec![row(&one, 26)], Vec::new());
    let commit = committer
        .commit(fourth, &record, &mut Turn::free())
        .await
        .expect("commit");
    assert_eq!((commit.dropped, commit.committed.len()), (1, 0));
    assert_eq!(kinesis_stats.fenced_commits.get(), 1);
    assert_eq!(schema.rows_loaded().await, 6);
    assert_eq!(checkpoints(&admin, &checkpoint_sql).await, ["13", "21"]);

    // b hands shard 1 back and a takes it again: a new claim, whose records commit.
    let a = Leases::new(scope(), "a", Duration::from_millis(300));
    let b_claims: Vec<LeaseClaim> = b_held.into_iter().map(|t| t.claim).collect();
    assert_eq!(b.release(&admin, &b_claims).await.expect("release"), 1);
    let again = a
        .acquire(&admin, &ids[1..])
        .await
        .expect("a takes shard 1 again");
    assert_eq!(again.len(), 1, "shard 1 is free");
    let renewed = Arc::new(again[0].claim.clone());
    assert!(renewed.epoch > one.epoch);
    let fifth = Batch::new(vec![row(&renewed, 22), row(&one, 27)], Vec::new());
    let commit = committer
        .commit(fifth, &record, &mut Turn::free())
        .await
        .expect("commit");
    assert_eq!(commit.dropped, 1, "only the old claim's record is dropped");
    let loaded: usize = commit.committed.iter().map(|c| c.counts.loaded).sum();
    assert_eq!(loaded, 1, "the new claim's record is committed");
    assert_eq!(kinesis_stats.fenced_commits.get(), 1);
    assert_eq!(checkpoints(&admin, &checkpoint_sql).await, ["13", "22"]);
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

/// A retry of a batch whose COMMIT succeeded but whose answer was lost (the connection broke right
/// after the COMMIT was sent): the committer cannot tell it committed and sends it again. The
/// checkpoints say it did, so the retry loads nothing twice and its records are acknowledged.
#[tokio::test]
async fn a_batch_committed_before_is_recognised_by_its_checkpoints_and_not_loaded_twice() {
    let mut f = Fixture::new().await;
    let batch = |f: &Fixture| {
        Batch::new(
            vec![row(&f.zero, 10), row(&f.one, 20), row(&f.zero, 11)],
            Vec::new(),
        )
    };
    let first = f
        .committer
        .commit(batch(&f), &f.record, &mut Turn::free())
        .await
        .expect("commit");
    assert_eq!(first.committed[0].counts.loaded, 3);
    assert_eq!(f.checkpoints().await, ["11", "20"]);

    let again = f
        .committer
        .commit(batch(&f), &f.record, &mut Turn::free())
        .await
        .expect("the retry commits");
    let loaded: usize = again.committed.iter().map(|c| c.counts.loaded).sum();
    let duplicates: usize = again.committed.iter().map(|c| c.counts.duplicates).sum();
    assert_eq!((loaded, duplicates, again.dropped), (0, 3, 0));
    assert_eq!(f.schema.rows_loaded().await, 3, "nothing loaded twice");
    assert_eq!(f.checkpoints().await, ["11", "20"]);

    // A batch that goes on from there loads only what is new.
    let next = Batch::new(
        vec![row(&f.zero, 11), row(&f.zero, 12), row(&f.one, 21)],
        Vec::new(),
    );
    let next = f
        .committer
        .commit(next, &f.record, &mut Turn::free())
        .await
        .expect("commit");
    let loaded: usize = next.committed.iter().map(|c| c.counts.loaded).sum();
    assert_eq!(
        loaded, 2,
        "record 11 was committed before, 12 and 21 are new"
    );
    assert_eq!(f.schema.rows_loaded().await, 5);
    assert_eq!(f.checkpoints().await, ["12", "21"]);
}
