//! Dead-letter records: every message sluice cannot load is stored with the reason, in the same
//! transaction as the batch it came with, and optionally forwarded to an SQS dead-letter queue.
//!
//! Forwarding happens inside that transaction's window, before it commits: a crash between forward and
//! commit means the message comes back and is forwarded again (the queue may see it twice), whereas
//! forwarding after commit could lose it for good. At-least-once to the queue, exactly-once to the table.

use std::borrow::Cow;
use std::time::SystemTime;

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use tokio_postgres::{Statement, Transaction};

use crate::aws;
use crate::envelope::Reject;
use crate::retry;
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

/// Forwards rejects to an SQS queue: body unchanged, reason, stage and source message id as message
/// attributes, so a redrive tool or a human can act on them.
pub struct DeadLetterQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

/// Attempts per forward before the batch is retried as a whole.
const FORWARD_ATTEMPTS: usize = 4;

impl DeadLetterQueue {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: String) -> DeadLetterQueue {
        DeadLetterQueue { client, queue_url }
    }

    /// Sends every reject. `Err` means a transient failure: the caller retries the whole batch.
    /// An entry SQS refuses for its content (sender fault) cannot ever be sent; it is logged and
    /// stays in the dead-letter table.
    pub async fn forward(&self, rejects: &[&Reject]) -> Result<(), String> {
        let mut pending: Vec<&Reject> = rejects.to_vec();
        let mut pacing = retry::backoff();
        for attempt in 1..=FORWARD_ATTEMPTS {
            let mut retry_later = Vec::new();
            for group in pending.chunks(10) {
                retry_later.extend(self.send_group(group).await?);
            }
            if retry_later.is_empty() {
                return Ok(());
            }
            pending = retry_later;
            if attempt < FORWARD_ATTEMPTS {
                retry::pause(&mut pacing).await;
            }
        }
        Err(format!(
            "{} dead letters could not be forwarded to {}",
            pending.len(),
            self.queue_url
        ))
    }

    async fn send_group<'a>(&self, group: &[&'a Reject]) -> Result<Vec<&'a Reject>, String> {
        let entries: Vec<SendMessageBatchRequestEntry> = group
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let body = if r.body.is_empty() {
                    "(empty body)"
                } else {
                    r.body.as_str()
                };
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_attributes("sluice_reason", text_attribute(&r.reason))
                    .message_attributes("sluice_stage", text_attribute(r.stage.as_str()))
                    .message_attributes(
                        "sluice_source_message_id",
                        text_attribute(&r.meta.message_id.to_string()),
                    )
                    .build()
                    .ok()
            })
            .collect();
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "SQS dead-letter queue {}: {}",
                    self.queue_url,
                    aws::describe(&e)
                )
            })?;
        let mut again = Vec::new();
        for failed in out.failed {
            let Some(reject) = failed.id.parse::<usize>().ok().and_then(|i| group.get(i)) else {
                continue;
            };
            if failed.sender_fault {
                tracing::error!(
                    message_id = %reject.meta.message_id,
                    code = failed.code,
                    "SQS refused a dead letter; it is kept in the dead-letter table only"
                );
            } else {
                again.push(*reject);
            }
        }
        Ok(again)
    }
}

fn text_attribute(value: &str) -> MessageAttributeValue {
    let value = if value.is_empty() { "-" } else { value };
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .unwrap_or_else(|_| unreachable!("data_type is set"))
}
