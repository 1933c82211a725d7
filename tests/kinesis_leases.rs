//! Shard leases and fenced checkpoints against the real PostgreSQL: competing owners, expiry by the
//! database's clock, fencing after a take-over, balance across processes, release, resharding order.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestSchema;
use sluice::sink::commit_record::Statements;
use sluice::source::kinesis::api::ShardDescription;
use sluice::source::kinesis::checkpoint::{self, CheckpointError};
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope, Leases, TakenLease, lease_ddl};
use sluice::source::kinesis::position::{InitialPosition, StartPosition};
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::table_name::TableName;
use tokio_postgres::Client;

const LONG: Duration = Duration::from_secs(60);

/// A lease table in a schema of its own, plus a table standing in for the sink's rows.
struct Fixture {
    schema: TestSchema,
    table: TableName,
}

impl Fixture {
    async fn new() -> Fixture {
        let schema = TestSchema::new().await;
        let table = TableName {
            schema: Some(schema.name.clone()),
            name: "kinesis_leases".into(),
        };
        for statement in lease_ddl(&table) {
            schema
                .client
                .batch_execute(&statement)
                .await
                .expect("lease DDL");
        }
        schema
            .client
            .batch_execute(&format!("CREATE TABLE {}.loaded(v text)", schema.name))
            .await
            .expect("rows table");
        Fixture { schema, table }
    }

    fn leases(&self, owner: &str, duration: Duration) -> Leases {
        self.leases_for("app", owner, duration)
    }

    fn leases_for(&self, application: &str, owner: &str, duration: Duration) -> Leases {
        let scope = LeaseScope {
            table: self.table.clone(),
            application: application.into(),
            stream: "logins".into(),
        };
        Leases::new(scope, owner, duration)
    }

    fn client(&self) -> &Client {
        &self.schema.client
    }

    async fn owners(&self) -> HashMap<String, Option<String>> {
        let rows = self
            .client()
            .query(
                &format!(
                    "SELECT shard_id, owner FROM {} WHERE application = 'app'",
                    self.table
                ),
                &[],
            )
            .await
            .expect("owners");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    async fn loaded(&self) -> i64 {
        self.schema
            .count(&format!("{}.loaded", self.schema.name))
            .await
    }

    /// Loads `value` and checkpoints in one transaction, committing only if the checkpoint holds.
    async fn commit(
        &self,
        client: &mut Client,
        lease: &Arc<LeaseClaim>,
        sequence: &str,
        finished: bool,
    ) -> Result<(), CheckpointError> {
        let tx = client.transaction().await.expect("begin");
        tx.execute(
            &format!("INSERT INTO {}.loaded VALUES ($1)", self.schema.name),
            &[&sequence],
        )
        .await
        .expect("insert");
        let written = checkpoint::checkpoint(
            &tx,
            &mut Statements::default(),
            lease,
            &seq(sequence),
            finished,
        )
        .await;
        match written {
            Ok(()) => tx.commit().await.expect("commit"),
            Err(_) => tx.rollback().await.expect("rollback"),
        }
        written
    }
}

fn seq(text: &str) -> SequenceNumber {
    SequenceNumber::parse(text).expect("valid sequence number")
}

fn shard(id: &str, parents: &[&str]) -> ShardDescription {
    ShardDescription {
        shard_id: id.into(),
        parent_shard_id: parents.first().map(|p| (*p).into()),
        adjacent_parent_shard_id: parents.get(1).map(|p| (*p).into()),
        closed: false,
    }
}

fn shards(n: usize) -> Vec<ShardDescription> {
    (0..n)
        .map(|i| shard(&format!("shardId-{i:012}"), &[]))
        .collect()
}

fn ids(shards: &[ShardDescription]) -> Vec<&str> {
    shards.iter().map(|s| s.shard_id.as_str()).collect()
}

fn claim(taken: &TakenLease) -> Arc<LeaseClaim> {
    Arc::new(taken.claim.clone())
}

/// Runs rounds of `acquire` until one takes something, polling until `limit`.
async fn acquire_within(
    leases: &Leases,
    client: &Client,
    eligible: &[&str],
    limit: Duration,
) -> Vec<TakenLease> {
    let start = Instant::now();
    loop {
        let taken = leases.acquire(client, eligible).await.expect("acquire");
        if !taken.is_empty() {
            return taken;
        }
        assert!(start.elapsed() < limit, "nothing taken within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn client() -> Client {
    common::pg().await
}

#[tokio::test]
async fn two_owners_racing_for_free_leases_never_share_one() {
    let f = Fixture::new().await;
    let all = shards(8);
    let a = f.leases("a", LONG);
    let b = f.leases("b", LONG);
    a.register(f.client(), &all).await.expect("register");
    let (ca, cb) = (client().await, client().await);
    let eligible = ids(&all);
    let (got_a, got_b) = tokio::join!(a.acquire(&ca, &eligible), b.acquire(&cb, &eligible));
    let (got_a, got_b) = (got_a.expect("a"), got_b.expect("b"));
    let taken_a: HashSet<&str> = got_a.iter().map(|t| t.claim.shard_id.as_str()).collect();
    let taken_b: HashSet<&str> = got_b.iter().map(|t| t.claim.shard_id.as_str()).collect();
    assert!(
        taken_a.is_disjoint(&taken_b),
        "{taken_a:?} and {taken_b:?} overlap"
    );
    let owners = f.owners().await;
    for taken in got_a.iter().chain(&got_b) {
        assert_eq!(
            owners[&taken.claim.shard_id].as_deref(),
            Some(&*taken.claim.owner),
            "the table agrees with what each owner believes it took"
        );
        assert_eq!(taken.claim.epoch, 1);
        assert_eq!(taken.checkpoint, None);
    }
}

#[tokio::test]
async fn a_lease_expires_by_the_database_clock_and_then_changes_hands() {
    let f = Fixture::new().await;
    let one = shards(1);
    let a = f.leases("a", Duration::from_secs(1));
    let b = f.leases("b", LONG);
    a.register(f.client(), &one).await.expect("register");
    let taken = a.acquire(f.client(), &ids(&one)).await.expect("a takes");
    assert_eq!(taken.len(), 1);
    assert!(
        b.acquire(f.client(), &ids(&one))
            .await
            .expect("b")
            .is_empty(),
        "a live lease is not free, and one shard is no reason to rebalance"
    );

    let started = Instant::now();
    let stolen = acquire_within(&b, f.client(), &ids(&one), Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "taken before it expired"
    );
    assert_eq!(
        stolen[0].claim.epoch, 2,
        "a change of owner moves the epoch"
    );
    assert_eq!(
        stolen[0].taken_from, None,
        "an expired lease is free, not stolen"
    );
    let expired_by_db: bool = f
        .client()
        .query_one(
            &format!(
                "SELECT expires_at - make_interval(secs => 60) <= now() FROM {} WHERE shard_id = $1",
                f.table
            ),
            &[&one[0].shard_id],
        )
        .await
        .expect("expiry")
        .get(0);
    assert!(
        expired_by_db,
        "the new expiry counts from the database's now()"
    );
    assert!(
        a.renew(f.client(), &[taken[0].claim.clone()])
            .await
            .expect("renew")
            .is_empty(),
        "the old owner's renewal finds the lease gone"
    );
}

#[tokio::test]
async fn a_commit_after_a_take_over_is_fenced_and_rolls_the_batch_back() {
    let f = Fixture::new().await;
    let one = shards(1);
    let a = f.leases("a", Duration::from_millis(300));
    let b = f.leases("b", LONG);
    a.register(f.client(), &one).await.expect("register");
    let held = claim(&a.acquire(f.client(), &ids(&one)).await.expect("a")[0]);
    let mut ca = client().await;
    f.commit(&mut ca, &held, "100", false)
        .await
        .expect("a commits while it holds the lease");

    // a is frozen past its lease; b takes the shard.
    let taken = acquire_within(&b, f.client(), &ids(&one), Duration::from_secs(10)).await;
    assert_eq!(taken[0].checkpoint, Some(seq("100")));
    assert_eq!(
        taken[0].start_position(InitialPosition::TrimHorizon),
        StartPosition::AfterSequence(seq("100"))
    );

    let fenced = f.commit(&mut ca, &held, "200", false).await;
    match fenced {
        Err(e @ CheckpointError::Fenced { .. }) => assert!(e.is_fenced()),
        other => panic!("expected a fenced commit, got {other:?}"),
    }
    assert_eq!(
        f.loaded().await,
        1,
        "the fenced batch's rows were rolled back"
    );

    let mut cb = client().await;
    f.commit(&mut cb, &claim(&taken[0]), "150", false)
        .await
        .expect("the new owner commits");
    assert_eq!(f.loaded().await, 2);
}

#[tokio::test]
async fn a_lease_stolen_while_a_commit_is_in_flight_waits_for_it() {
    let f = Fixture::new().await;
    let all = shards(2);
    let a = f.leases("a", LONG);
    let b = f.leases("b", LONG);
    a.register(f.client(), &all).await.expect("register");
    let held: Vec<Arc<LeaseClaim>> = a
        .acquire(f.client(), &ids(&all))
        .await
        .expect("a")
        .iter()
        .map(claim)
        .collect();
    assert_eq!(held.len(), 2);

    // a's transaction has written the checkpoint of both shards but not committed yet.
    let mut ca = client().await;
    let tx = ca.transaction().await.expect("begin");
    let batch: Vec<checkpoint::ShardCheckpoint> = held
        .iter()
        .map(|lease| checkpoint::ShardCheckpoint {
            lease: lease.clone(),
            sequence: seq("500"),
            finished: false,
        })
        .collect();
    checkpoint::checkpoint_all(&tx, &mut Statements::default(), &batch)
        .await
        .expect("fenced write holds");

    // b steals one (a holds 2, b 0): the steal waits on the row lock until a commits.
    let cb = client().await;
    let steal = tokio::spawn(async move {
        b.acquire(&cb, &["shardId-000000000000", "shardId-000000000001"])
            .await
    });
    let waiting = format!("%{}%", f.schema.name);
    let f = &f;
    common::eventually(
        Duration::from_secs(10),
        "the take-over to wait on the row lock",
        || {
            let waiting = waiting.clone();
            async move {
                let n: i64 = f
                    .client()
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query LIKE $1 AND query LIKE '%UPDATE%'",
                        &[&waiting],
                    )
                    .await
                    .expect("pg_stat_activity")
                    .get(0);
                n == 1
            }
        },
    )
    .await;
    assert!(
        !steal.is_finished(),
        "the take-over waits for the commit in flight"
    );
    tx.commit().await.expect("commit");
    let stolen = steal.await.expect("join").expect("b");
    assert_eq!(stolen.len(), 1);
    assert_eq!(stolen[0].taken_from.as_deref(), Some("a"));
    assert_eq!(
        stolen[0].checkpoint,
        Some(seq("500")),
        "the new owner resumes after what a committed"
    );
}

#[tokio::test]
async fn a_commit_frozen_while_it_holds_the_lease_row_does_not_hold_up_the_take_over() {
    let f = Fixture::new().await;
    let one = shards(1);
    let lease = Duration::from_secs(3);
    let a = f.leases("a", lease);
    let b = f.leases("b", LONG);
    a.register(f.client(), &one).await.expect("register");
    let held = claim(&a.acquire(f.client(), &ids(&one)).await.expect("a")[0]);

    // a's commit has written its rows and checkpoint, so it holds the lease row's lock, and then
    // a stops (SIGSTOP, a long pause, a network partition) before its COMMIT.
    let mut ca = client().await;
    let tx = ca.transaction().await.expect("begin");
    tx.execute(
        &format!("INSERT INTO {}.loaded VALUES ('frozen')", f.schema.name),
        &[],
    )
    .await
    .expect("insert");
    checkpoint::checkpoint(&tx, &mut Statements::default(), &held, &seq("100"), false)
        .await
        .expect("a still holds the lease");

    let cb = client().await;
    let started = Instant::now();
    let bound = lease * 5;
    let taken = tokio::time::timeout(bound, acquire_within(&b, &cb, &ids(&one), bound))
        .await
        .unwrap_or_else(|_| {
            panic!("the take-over still waits on the frozen commit's row lock after {bound:?}")
        });
    assert!(
        started.elapsed() < lease * 2,
        "taken over {:?} after the lease was last renewed",
        started.elapsed()
    );
    assert_eq!(
        taken[0].checkpoint, None,
        "the frozen commit's checkpoint is not where the new owner starts"
    );
    assert!(
        tx.commit().await.is_err(),
        "the frozen commit fails when it resumes"
    );
    assert_eq!(f.loaded().await, 0, "its rows were rolled back");
}

#[tokio::test]
async fn checkpoints_move_forward_only_and_compare_as_numbers() {
    let f = Fixture::new().await;
    let one = shards(1);
    let a = f.leases("a", LONG);
    a.register(f.client(), &one).await.expect("register");
    let held = claim(&a.acquire(f.client(), &ids(&one)).await.expect("a")[0]);
    let mut c = client().await;
    f.commit(&mut c, &held, "9", false).await.expect("9");
    f.commit(&mut c, &held, "10", false)
        .await
        .expect("10 is past 9 as a number");
    f.commit(&mut c, &held, "10", false)
        .await
        .expect("the same checkpoint again is harmless");
    let wide = "49680679764066926942364775110934109916332102231976312834";
    f.commit(&mut c, &held, wide, false).await.expect("wide");
    match f.commit(&mut c, &held, "9223372036854775807", false).await {
        Err(CheckpointError::Backwards { committed, .. }) => assert_eq!(committed, wide),
        other => panic!("expected a refusal to go backwards, got {other:?}"),
    }
    let stored: String = f
        .client()
        .query_one(&format!("SELECT checkpoint::text FROM {}", f.table), &[])
        .await
        .expect("checkpoint")
        .get(0);
    assert_eq!(stored, wide);
    assert_eq!(f.loaded().await, 4, "the refused batch was rolled back");
}

/// Every process renews and runs a round, in turn, until three full rounds change nothing.
async fn settle(f: &Fixture, processes: &[&Leases], all: &[ShardDescription]) -> Vec<usize> {
    let mut held: Vec<Vec<LeaseClaim>> = vec![Vec::new(); processes.len()];
    let mut quiet = 0;
    for _ in 0..100 {
        let mut changed = false;
        for (p, leases) in processes.iter().enumerate() {
            held[p] = leases.renew(f.client(), &held[p]).await.expect("renew");
            let taken = leases
                .acquire(f.client(), &ids(all))
                .await
                .expect("acquire");
            changed |= !taken.is_empty();
            held[p].extend(taken.into_iter().map(|t| t.claim));
        }
        quiet = if changed { 0 } else { quiet + 1 };
        if quiet == 3 {
            let owners = f.owners().await;
            return processes
                .iter()
                .map(|l| {
                    owners
                        .values()
                        .filter(|o| o.as_deref() == Some(l.owner()))
                        .count()
                })
                .collect();
        }
    }
    panic!("leases never settled");
}

#[tokio::test]
async fn shards_balance_across_two_and_then_three_processes() {
    let f = Fixture::new().await;
    let all = shards(4);
    let (a, b, c) = (
        f.leases("a", LONG),
        f.leases("b", LONG),
        f.leases("c", LONG),
    );
    a.register(f.client(), &all).await.expect("register");
    assert_eq!(settle(&f, &[&a], &all).await, [4]);
    assert_eq!(settle(&f, &[&a, &b], &all).await, [2, 2]);
    let mut three = settle(&f, &[&a, &b, &c], &all).await;
    three.sort();
    assert_eq!(three, [1, 1, 2]);

    let odd = Fixture::new().await;
    let five = shards(5);
    let (a, b) = (odd.leases("a", LONG), odd.leases("b", LONG));
    a.register(odd.client(), &five).await.expect("register");
    settle(&odd, &[&a], &five).await;
    let mut split = settle(&odd, &[&a, &b], &five).await;
    split.sort();
    assert_eq!(split, [2, 3], "the odd shard stays where it is");
}

#[tokio::test]
async fn a_graceful_release_hands_leases_over_at_once_and_fences_the_old_claims() {
    let f = Fixture::new().await;
    let all = shards(2);
    let a = f.leases("a", LONG);
    let b = f.leases("b", LONG);
    a.register(f.client(), &all).await.expect("register");
    let held: Vec<LeaseClaim> = a
        .acquire(f.client(), &ids(&all))
        .await
        .expect("a")
        .into_iter()
        .map(|t| t.claim)
        .collect();
    assert_eq!(a.release(f.client(), &held).await.expect("release"), 2);
    assert!(f.owners().await.values().all(Option::is_none));
    let taken = b.acquire(f.client(), &ids(&all)).await.expect("b");
    assert_eq!(taken.len(), 2, "free at once, no expiry to wait for");
    let mut c = client().await;
    assert!(
        f.commit(&mut c, &Arc::new(held[0].clone()), "1", false)
            .await
            .is_err_and(|e| e.is_fenced())
    );
}

#[tokio::test]
async fn an_expired_lease_nobody_took_still_commits_and_renews() {
    let f = Fixture::new().await;
    let one = shards(1);
    let a = f.leases("a", Duration::from_millis(200));
    a.register(f.client(), &one).await.expect("register");
    let held = a.acquire(f.client(), &ids(&one)).await.expect("a")[0]
        .claim
        .clone();
    common::eventually(Duration::from_secs(10), "the lease to expire", || async {
        f.client()
            .query_one(&format!("SELECT expires_at <= now() FROM {}", f.table), &[])
            .await
            .expect("expiry")
            .get::<_, bool>(0)
    })
    .await;
    let mut c = client().await;
    f.commit(&mut c, &Arc::new(held.clone()), "7", false)
        .await
        .expect("the epoch has not moved, so nobody else read the shard");
    assert_eq!(
        a.renew(f.client(), std::slice::from_ref(&held))
            .await
            .expect("renew"),
        [held]
    );
}

#[tokio::test]
async fn children_are_leased_only_after_their_parent_is_finished_and_start_at_its_trim_horizon() {
    let f = Fixture::new().await;
    let parent = shard("shardId-000000000000", &[]);
    let children = [
        shard("shardId-000000000001", &["shardId-000000000000"]),
        shard("shardId-000000000002", &["shardId-000000000000"]),
    ];
    let all = [parent.clone(), children[0].clone(), children[1].clone()];
    let graph = sluice::source::kinesis::shards::ShardGraph::new(all.clone());
    let a = f.leases("a", LONG);
    a.register(f.client(), &all).await.expect("register");

    let finished = a.finished_shards(f.client()).await.expect("finished");
    let readable = graph.readable(&finished);
    assert_eq!(readable, ["shardId-000000000000"]);
    let taken = a.acquire(f.client(), &readable).await.expect("parent");
    assert_eq!(taken.len(), 1);
    let lease = claim(&taken[0]);

    let mut c = client().await;
    f.commit(&mut c, &lease, "300", false)
        .await
        .expect("rows of the parent");
    match checkpoint::finish(f.client(), &lease, Some(&seq("400"))).await {
        Err(CheckpointError::NotCaughtUp {
            committed,
            expected,
            ..
        }) => {
            assert_eq!(committed.as_deref(), Some("300"));
            assert_eq!(expected.as_deref(), Some("400"));
        }
        other => panic!("finishing before the last record is committed must fail: {other:?}"),
    }
    checkpoint::finish(f.client(), &lease, Some(&seq("300")))
        .await
        .expect("finished once everything read is committed");

    let finished = a.finished_shards(f.client()).await.expect("finished");
    let readable = graph.readable(&finished);
    assert_eq!(readable, ["shardId-000000000001", "shardId-000000000002"]);
    let taken = a.acquire(f.client(), &readable).await.expect("children");
    assert_eq!(taken.len(), 2);
    for child in &taken {
        assert!(child.parent_read_to_end);
        assert_eq!(
            child.start_position(InitialPosition::Latest),
            StartPosition::TrimHorizon,
            "a child continues its parent's data whatever the configured start"
        );
    }
    assert!(
        a.renew(f.client(), &[lease.as_ref().clone()])
            .await
            .expect("renew")
            .is_empty(),
        "a finished shard's lease is not renewed"
    );
}

#[tokio::test]
async fn two_applications_read_one_stream_independently() {
    let f = Fixture::new().await;
    let one = shards(1);
    let a = f.leases_for("loader", "a", LONG);
    let b = f.leases_for("auditor", "b", LONG);
    a.register(f.client(), &one).await.expect("register");
    b.register(f.client(), &one).await.expect("register");
    let la = claim(&a.acquire(f.client(), &ids(&one)).await.expect("a")[0]);
    let lb = claim(&b.acquire(f.client(), &ids(&one)).await.expect("b")[0]);
    let mut c = client().await;
    f.commit(&mut c, &la, "50", true).await.expect("loader");
    f.commit(&mut c, &lb, "20", false)
        .await
        .expect("auditor keeps its own checkpoint");
    let rows = b.rows(f.client()).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].checkpoint.as_deref(), Some("20"));
    assert!(!rows[0].finished);
    assert!(a.rows(f.client()).await.expect("rows")[0].finished);
}
