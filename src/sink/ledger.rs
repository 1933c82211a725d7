//! The dedupe ledger: keys of committed messages, written in the same transaction as their rows.
//!
//! SQS delivers at least once: a crash between commit and delete, or a delete that fails, brings a
//! message back. Because its key was committed with its row, the redelivery finds the key and is
//! acknowledged without writing anything again. Keys are kept for the source's retention (after
//! that the source cannot redeliver) and pruned in small slices so pruning never holds long locks.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::{Statement, Transaction};
use tokio_util::sync::CancellationToken;

use crate::table_name::TableName;

pub struct Ledger {
    insert: String,
    prune: String,
}

impl Ledger {
    pub fn new(table: &TableName) -> Ledger {
        Ledger {
            insert: format!(
                "INSERT INTO {table} (message_key) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING message_key"
            ),
            prune: format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE seen_at < now() - make_interval(hours => $1) LIMIT 10000))"
            ),
        }
    }

    /// The recording statement, for preparing once per connection.
    pub fn sql(&self) -> &str {
        &self.insert
    }

    /// Records the keys with `statement` (the prepared form of [`Ledger::sql`]) and tells, per key in
    /// order, whether it is new. A key repeated within the same list is new only the first time.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        statement: &Statement,
        keys: &[&str],
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        let rows = tx.query(statement, &[&keys]).await?;
        let mut inserted: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(keys.iter().map(|k| inserted.remove(*k)).collect())
    }

    /// Deletes keys older than `retention`, slice by slice; returns how many went.
    pub async fn prune(
        &self,
        client: &tokio_postgres::Client,
        retention_hours: i32,
    ) -> Result<u64, tokio_postgres::Error> {
        let mut total = 0;
        loop {
            let n = client.execute(&self.prune, &[&retention_hours]).await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

/// Prunes at start and then hourly, on its own connection, until `stop`.
pub async fn prune_periodically(
    ledger: Ledger,
    url: String,
    retention_hours: i32,
    connect_timeout: Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        let outcome = async {
            let client = crate::pg::connect(&url, "sluice-ledger-pruner", connect_timeout).await?;
            ledger.prune(&client, retention_hours).await
        };
        tokio::select! {
            result = outcome => match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "pruned the dedupe ledger"),
                Err(e) => tracing::warn!(error = %crate::pg::describe(&e), "pruning the dedupe ledger failed; will try again"),
            },
            _ = stop.cancelled() => return,
        }
    }
}
