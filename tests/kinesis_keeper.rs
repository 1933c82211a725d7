//! The lease keeper against the real PostgreSQL: processes share a stream's shards, a dead process's
//! shards move within `lease_duration + interval`, a stopped one hands them over at once, and a
//! finished shard gives way to its children.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestSchema;
use sluice::shutdown::Shutdown;
use sluice::sink::commit_record::Statements;
use sluice::source::kinesis::api::ShardDescription;
use sluice::source::kinesis::checkpoint;
use sluice::source::kinesis::keeper::{KeeperSettings, LeaseEvent, LeaseKeeper};
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope, Leases, TakenLease, lease_ddl};
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::source::kinesis::shards::ShardGraph;
use sluice::table_name::TableName;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

const LEASE: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(300);

fn shard(id: &str, parents: &[&str]) -> ShardDescription {
    ShardDescription {
        shard_id: id.into(),
        parent_shard_id: parents.first().map(|p| (*p).into()),
        adjacent_parent_shard_id: None,
        closed: false,
    }
}

fn four_shards() -> ShardGraph {
    ShardGraph::new((0..4).map(|i| shard(&format!("shardId-{i:012}"), &[])))
}

async fn lease_table() -> (TestSchema, TableName) {
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
    (schema, table)
}

/// A running keeper and the leases it reports holding.
struct Process {
    held: Arc<Mutex<HashMap<String, TakenLease>>>,
    stop: Shutdown,
    /// Ends the keeper as a crash would: no release.
    kill: AbortHandle,
    task: JoinHandle<()>,
}

impl Process {
    fn start(table: &TableName, owner: &str, graph: watch::Receiver<Arc<ShardGraph>>) -> Process {
        let scope = LeaseScope {
            table: table.clone(),
            application: "app".into(),
            stream: "logins".into(),
        };
        let keeper = LeaseKeeper::new(
            Leases::new(scope, owner, LEASE),
            KeeperSettings {
                connector: sluice::pg::Connector::new(
                    common::database_url(),
                    Duration::from_secs(5),
                ),
                interval: INTERVAL,
            },
        );
        let (tx, mut rx) = mpsc::channel(16);
        let stop = Shutdown::new();
        let keeper_task = tokio::spawn(keeper.run(graph, tx, stop.clone()));
        let kill = keeper_task.abort_handle();
        let held: Arc<Mutex<HashMap<String, TakenLease>>> = Arc::default();
        let book = held.clone();
        // The keeper ends when its task is aborted or stopped; the book-keeping ends with it.
        let task = tokio::spawn(async move {
            let listen = async {
                while let Some(event) = rx.recv().await {
                    let mut held = book.lock().expect("lock");
                    match event {
                        LeaseEvent::Acquired(taken) => {
                            held.insert(taken.claim.shard_id.clone(), taken);
                        }
                        LeaseEvent::Lost(claim) => {
                            held.remove(&claim.shard_id);
                        }
                    }
                }
            };
            let (_, keeper) = tokio::join!(listen, keeper_task);
            if let Err(e) = keeper
                && e.is_panic()
            {
                panic!("keeper panicked: {e}");
            }
        });
        Process {
            held,
            stop,
            kill,
            task,
        }
    }

    fn count(&self) -> usize {
        self.held.lock().expect("lock").len()
    }

    fn lease(&self, shard: &str) -> Option<TakenLease> {
        self.held.lock().expect("lock").get(shard).cloned()
    }
}

async fn until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn processes_share_the_shards_and_a_dead_ones_move_within_the_bound() {
    let (_schema, table) = lease_table().await;
    let (_graph_tx, graph) = watch::channel(Arc::new(four_shards()));
    let a = Process::start(&table, "a", graph.clone());
    until(Duration::from_secs(10), "a to hold all four", || {
        a.count() == 4
    })
    .await;

    let b = Process::start(&table, "b", graph.clone());
    until(Duration::from_secs(20), "a 2/2 split", || {
        a.count() == 2 && b.count() == 2
    })
    .await;

    // b dies: no release, its leases must expire.
    b.kill.abort();
    let killed = Instant::now();
    let _ = b.task.await;
    until(Duration::from_secs(20), "a to take b's shards", || {
        a.count() == 4
    })
    .await;
    let moved = killed.elapsed();
    assert!(
        moved >= LEASE / 2,
        "taken over after {moved:?}, before b's leases could expire"
    );
    assert!(
        moved <= LEASE + INTERVAL + Duration::from_secs(1),
        "took {moved:?}, beyond lease_duration + one interval (+1 s of slack)"
    );
    a.stop.stop();
    let _ = a.task.await;
}

#[tokio::test]
async fn a_stopped_process_hands_its_shards_over_at_once() {
    let (_schema, table) = lease_table().await;
    let (_graph_tx, graph) = watch::channel(Arc::new(four_shards()));
    let a = Process::start(&table, "a", graph.clone());
    until(Duration::from_secs(10), "a to hold all four", || {
        a.count() == 4
    })
    .await;
    let c = Process::start(&table, "c", graph.clone());
    until(Duration::from_secs(20), "a 2/2 split", || {
        a.count() == 2 && c.count() == 2
    })
    .await;

    a.stop.stop();
    let stopped = Instant::now();
    a.task.await.expect("a stops cleanly");
    until(Duration::from_secs(10), "c to take a's shards", || {
        c.count() == 4
    })
    .await;
    assert!(
        stopped.elapsed() < LEASE,
        "handed over in {:?}: released, not expired",
        stopped.elapsed()
    );
    c.stop.stop();
    let _ = c.task.await;
}

#[tokio::test]
async fn a_finished_shard_is_let_go_and_its_children_are_taken_up() {
    let (schema, table) = lease_table().await;
    let parent = "shardId-000000000000";
    let (graph_tx, graph) = watch::channel(Arc::new(ShardGraph::new([shard(parent, &[])])));
    let a = Process::start(&table, "a", graph);
    until(Duration::from_secs(10), "a to hold the parent", || {
        a.count() == 1
    })
    .await;
    let lease: LeaseClaim = a.lease(parent).expect("parent lease").claim;

    // Its last rows commit, finishing the shard.
    let mut client = common::pg().await;
    let tx = client.transaction().await.expect("begin");
    let last = SequenceNumber::parse("12345").expect("valid");
    checkpoint::checkpoint(
        &tx,
        &mut Statements::default(),
        &Arc::new(lease),
        &last,
        true,
    )
    .await
    .expect("fenced write");
    tx.commit().await.expect("commit");
    until(
        Duration::from_secs(10),
        "the finished parent to be let go",
        || a.count() == 0,
    )
    .await;

    // Discovery finds the children of the split.
    graph_tx.send_replace(Arc::new(ShardGraph::new([
        shard(parent, &[]),
        shard("shardId-000000000001", &[parent]),
        shard("shardId-000000000002", &[parent]),
    ])));
    until(Duration::from_secs(10), "a to take both children", || {
        a.count() == 2
    })
    .await;
    let child = a.lease("shardId-000000000001").expect("child lease");
    assert!(child.parent_read_to_end);
    assert_eq!(child.checkpoint, None);
    a.stop.stop();
    let _ = a.task.await;
    drop(schema);
}
