//! Dead-letter records: every message sluice cannot load is stored with the reason, in the same
//! transaction as the batch it came with. The table is the record of truth; forwarding a copy to an
//! SQS queue is [`crate::sink::dead_letter_queue`]'s business.
//!
//! A dead letter must always be storable: one the database refuses would fail its batch, stop the
//! daemon, come back after the restart and stop it again, each restart raising every held message's
//! receive count. So a dead letter PostgreSQL refuses is stored in a form it takes ([`storable`]):
//! first escaped to printable ASCII and truncated, then without its body, the reason always kept and
//! saying what was done.

use std::borrow::Cow;
use std::time::SystemTime;

use tokio_postgres::{Statement, Transaction};

use std::fmt::Write;

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

/// The most bytes of a body kept when the database refused it as it came, then when it refused that
/// too.
pub const STORED_BODY_BYTES: [usize; 2] = [4096, 256];
/// The most bytes of a reason kept in that case.
const STORED_REASON_BYTES: usize = 2048;

/// `reject` in a form more likely to be stored after PostgreSQL refused it for `refusal`: its body
/// escaped to printable ASCII and cut to the first of [`STORED_BODY_BYTES`] that changes it, else
/// without its body; the reason keeps what it said and adds what was done, with the body's size and
/// the refusal. `None` when there is nothing left to change (the body is already empty).
pub fn storable(mut reject: Reject, refusal: &str) -> Option<Reject> {
    if reject.body.is_empty() {
        return None;
    }
    let size = reject.body.len();
    let shorter = STORED_BODY_BYTES
        .iter()
        .map(|max| escape_ascii(&reject.body, *max))
        .find(|escaped| *escaped != reject.body);
    let (body, done) = match shorter {
        Some(escaped) => {
            let kept = escaped.len();
            (
                escaped,
                format!("stored escaped to ASCII, {kept} bytes kept"),
            )
        }
        None => (String::new(), "not stored".to_owned()),
    };
    let reason = format!(
        "{} (body of {size} bytes {done}; PostgreSQL refused it as it came: {refusal})",
        reject.reason
    );
    reject.body = body;
    reject.reason = escape_ascii(&reason, STORED_REASON_BYTES);
    Some(reject)
}

/// `text` with every character outside printable ASCII escaped as `\u{…}`, cut at a character
/// boundary so that it fits `max` bytes with `[...]` marking the cut. Printable ASCII (a backslash
/// too) is left as it is, so escaping what was escaped before changes nothing.
pub fn escape_ascii(text: &str, max: usize) -> String {
    const CUT: &str = "[...]";
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let mut piece = String::new();
        match c {
            ' '..='~' => piece.push(c),
            _ => {
                let _ = write!(piece, "\\u{{{:x}}}", c as u32);
            }
        }
        if out.len() + piece.len() > max.saturating_sub(CUT.len()) {
            out.push_str(CUT);
            return out;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Meta, Stage};

    fn reject(body: &str) -> Reject {
        Reject {
            body: body.to_owned(),
            meta: Meta::at_position(1, SystemTime::now()),
            stage: Stage::Parse,
            reason: "parse: not JSON".into(),
        }
    }

    #[test]
    fn text_is_escaped_to_printable_ascii_and_cut_to_size() {
        assert_eq!(escape_ascii("a\\b\n\u{0}é", 100), "a\\b\\u{a}\\u{0}\\u{e9}");
        let once = escape_ascii("é\\", 100);
        assert_eq!(
            escape_ascii(&once, 100),
            once,
            "escaping twice changes nothing"
        );
        assert_eq!(escape_ascii("plain", 100), "plain");
        let long = "x".repeat(10_000);
        let cut = escape_ascii(&long, 64);
        assert!(cut.len() <= 64 && cut.ends_with("[...]"), "{cut}");
        assert!(escape_ascii(&"é".repeat(100), 64).len() <= 64);
    }

    #[test]
    fn a_refused_dead_letter_is_escaped_then_emptied_keeping_the_reason() {
        let big = format!("{}\u{1}", "y".repeat(10_000));
        let first = storable(reject(&big), "ERROR: value too long").expect("escaped");
        assert!(first.body.len() <= 4096 && first.body.starts_with("yyy"));
        assert!(
            first
                .reason
                .starts_with("parse: not JSON (body of 10001 bytes stored escaped"),
            "{}",
            first.reason
        );
        assert!(
            first.reason.contains("ERROR: value too long"),
            "{}",
            first.reason
        );
        let second = storable(first, "ERROR: still too long").expect("shorter");
        assert!(second.body.len() <= 256 && second.body.starts_with("yyy"));
        let third = storable(second, "ERROR: still refused").expect("emptied");
        assert_eq!(third.body, "");
        assert!(third.reason.contains("not stored"), "{}", third.reason);
        assert!(
            third.reason.starts_with("parse: not JSON"),
            "{}",
            third.reason
        );
        assert!(storable(third, "ERROR: again").is_none());
    }
}
