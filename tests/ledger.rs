//! The dedupe ledger against a real PostgreSQL: which keys it reports as new, on its fast path (every
//! key new: one plain insert) and on its fallback (some key committed before: that insert is undone
//! and the keys are inserted again `ON CONFLICT DO NOTHING`), and how two transactions holding the
//! same key are ordered.

mod common;

use std::time::Duration;

use common::*;
use sluice::sink::commit_record::Statements;
use sluice::sink::ledger::{Ledger, LedgerKey, MessageKeys};
use sluice::sink::schema;
use sluice::table_name::TableName;
use tokio_postgres::Client;

fn key(name: &str) -> LedgerKey {
    LedgerKey::of(&[b"ledger test", name.as_bytes()])
}

fn keys(names: &[&str]) -> Vec<LedgerKey> {
    names.iter().map(|n| key(n)).collect()
}

struct TestLedger {
    schema: TestSchema,
    table: TableName,
    ledger: Ledger,
}

impl TestLedger {
    async fn new() -> TestLedger {
        let schema = TestSchema::new().await;
        let table = TableName {
            schema: Some(schema.name.clone()),
            name: "ledger".into(),
        };
        for ddl in schema::ledger_ddl(&table) {
            schema
                .client
                .batch_execute(&ddl)
                .await
                .expect("ledger table");
        }
        let ledger = Ledger::new(&table);
        TestLedger {
            schema,
            table,
            ledger,
        }
    }

    /// Records `names` in a transaction of `client` and commits it; what the ledger answered.
    async fn commit(&self, client: &mut Client, names: &[&str]) -> Vec<bool> {
        let tx = client.transaction().await.expect("begin");
        let fresh = self
            .ledger
            .record(&tx, &mut Statements::default(), &keys(names))
            .await
            .expect("record");
        tx.commit().await.expect("commit");
        fresh
    }

    async fn stored(&self) -> i64 {
        self.schema.count(&self.table.to_string()).await
    }
}

#[tokio::test]
async fn new_keys_are_new_once_and_committed_ones_are_not() {
    let l = TestLedger::new().await;
    let mut client = pg().await;
    assert_eq!(
        l.commit(&mut client, &["a", "b", "a"]).await,
        [true, true, false],
        "a key repeated in one list is new only the first time"
    );
    assert_eq!(l.stored().await, 2);
    assert_eq!(
        l.commit(&mut client, &["c", "b", "d", "c"]).await,
        [true, false, true, false],
        "a key committed before is not new; the others still are"
    );
    assert_eq!(l.stored().await, 4, "each key stored once");
    assert_eq!(l.commit(&mut client, &[]).await, Vec::<bool>::new());
}

#[tokio::test]
async fn a_message_claimed_under_two_keys_is_new_only_if_both_are() {
    // A redelivery claims its key and the one an earlier version gave it: committed under
    // either, it is not new, and both keys are recorded either way.
    let l = TestLedger::new().await;
    let mut client = pg().await;
    l.commit(&mut client, &["own-committed", "earlier-committed"])
        .await;
    let claim = |own: &str, earlier: Option<&str>| MessageKeys {
        key: key(own),
        earlier: earlier.map(key),
    };
    let messages = [
        claim("own-committed", Some("earlier-1")),
        claim("own-2", Some("earlier-committed")),
        claim("own-3", Some("earlier-3")),
        claim("own-4", None),
        claim("own-3", Some("earlier-3")),
    ];
    let tx = client.transaction().await.expect("begin");
    let fresh = l
        .ledger
        .record_messages(&tx, &mut Statements::default(), &messages)
        .await
        .expect("record");
    tx.commit().await.expect("commit");
    assert_eq!(fresh, [false, false, true, true, false]);
    assert_eq!(l.stored().await, 7, "every distinct key recorded once");
}

#[tokio::test]
async fn the_ledger_takes_the_batch_rows_after_it_either_way() {
    // The fallback undoes only its own insert: what the transaction writes next still commits.
    let l = TestLedger::new().await;
    let mut client = pg().await;
    l.commit(&mut client, &["old"]).await;
    let rows = format!("{}.rows", l.schema.name);
    client
        .batch_execute(&format!("CREATE TABLE {rows} (n int)"))
        .await
        .expect("rows table");
    for names in [&["new-1", "new-2"][..], &["old", "new-3"][..]] {
        let tx = client.transaction().await.expect("begin");
        l.ledger
            .record(&tx, &mut Statements::default(), &keys(names))
            .await
            .expect("record");
        tx.execute(&format!("INSERT INTO {rows} VALUES (1)"), &[])
            .await
            .expect("a row after the ledger");
        tx.commit().await.expect("commit");
    }
    assert_eq!(l.schema.count(&rows).await, 2);
    assert_eq!(l.stored().await, 4);
}

#[tokio::test]
async fn a_key_held_by_an_open_transaction_waits_for_its_outcome() {
    let l = std::sync::Arc::new(TestLedger::new().await);
    let mut first = pg().await;
    let tx = first.transaction().await.expect("begin");
    let held = l
        .ledger
        .record(
            &tx,
            &mut Statements::default(),
            &keys(&["shared", "rolled-back"]),
        )
        .await
        .expect("record");
    assert_eq!(held, [true, true]);

    let second = {
        let l = l.clone();
        tokio::spawn(async move {
            let mut client = pg().await;
            client
                .batch_execute("SET application_name = 'ledger-second'")
                .await
                .expect("name");
            l.commit(&mut client, &["shared", "other"]).await
        })
    };
    let watcher = pg().await;
    eventually(
        Duration::from_secs(20),
        "the second transaction waits on the first's key",
        || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'ledger-second' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("activity")
                .get(0);
            waiting == 1
        },
    )
    .await;
    tx.commit().await.expect("commit the first");
    let answered = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second goes on once the first commits")
        .expect("joined");
    assert_eq!(answered, [false, true], "the first committed 'shared'");

    // A key whose transaction rolled back was never committed: it is new again.
    let mut client = pg().await;
    let tx = client.transaction().await.expect("begin");
    l.ledger
        .record(&tx, &mut Statements::default(), &keys(&["gone"]))
        .await
        .expect("record");
    tx.rollback().await.expect("rollback");
    assert_eq!(l.commit(&mut client, &["gone"]).await, [true]);
}
