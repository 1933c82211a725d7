//! Dead-letter records: every message sluice cannot load is stored with the reason, in the same
//! transaction as the batch it came with. The table is the record of truth; forwarding a copy to an
//! SQS queue is [`crate::sink::dead_letter_queue`]'s business.

use std::borrow::Cow;
use std::time::SystemTime;

use tokio_postgres::{Statement, Transaction};

use crate::envelope::Reject;
use crate::sink::schema::DeadLetterColumns;
use crate::table_name::TableName;

/// Inserts reject records with one statement per batch.
pub struct DeadLetterWriter {
    insert: String,
    columns: DeadLetterColumns,
}

impl DeadLetterWriter {
    pub fn new(table: &TableName, columns: DeadLetterColumns) -> DeadLetterWriter {
        let mut names = vec!["message_id", "body", "reason", "received_at"];
        let mut types = vec!["text[]", "text[]", "text[]", "timestamptz[]"];
        if columns.stage {
            names.push("stage");
            types.push("text[]");
        }
        if columns.sent_at {
            names.push("sent_at");
            types.push("timestamptz[]");
        }
        let params: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{t}", i + 1))
            .collect();
        let insert = format!(
            "INSERT INTO {table} ({}) SELECT * FROM unnest({})",
            names.join(", "),
            params.join(", ")
        );
        DeadLetterWriter { insert, columns }
    }

    /// The INSERT statement, for preparing once per connection.
    pub fn sql(&self) -> &str {
        &self.insert
    }

    /// Inserts with `statement`, the prepared form of [`DeadLetterWriter::sql`].
    pub async fn insert(
        &self,
        tx: &Transaction<'_>,
        statement: &Statement,
        rejects: &[&Reject],
    ) -> Result<u64, tokio_postgres::Error> {
        if rejects.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = rejects
            .iter()
            .map(|r| r.meta.message_id.to_string())
            .collect();
        let bodies: Vec<Cow<'_, str>> = rejects.iter().map(|r| without_nul(&r.body)).collect();
        let reasons: Vec<Cow<'_, str>> = rejects.iter().map(|r| without_nul(&r.reason)).collect();
        let received: Vec<SystemTime> = rejects.iter().map(|r| r.meta.received_at).collect();
        let stages: Vec<&str> = rejects.iter().map(|r| r.stage.as_str()).collect();
        let sent: Vec<Option<SystemTime>> = rejects
            .iter()
            .map(|r| r.meta.sent_at_ms.and_then(millis_to_time))
            .collect();
        let bodies: Vec<&str> = bodies.iter().map(|b| b.as_ref()).collect();
        let reasons: Vec<&str> = reasons.iter().map(|b| b.as_ref()).collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&ids, &bodies, &reasons, &received];
        if self.columns.stage {
            params.push(&stages);
        }
        if self.columns.sent_at {
            params.push(&sent);
        }
        tx.execute(statement, &params).await
    }
}

/// PostgreSQL text cannot hold NUL; a body from a byte-oriented source might.
fn without_nul(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn millis_to_time(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
}
