//! The tables sluice writes, created when missing and checked before the first batch.
//!
//! `user_logins` has a fixed DDL ([`crate::login_table`]) that sluice never alters. What it does
//! instead is check, at start, that an existing table has the columns and types binary COPY will
//! send, because a mismatch would otherwise surface as every row failing at runtime. Every table is
//! inspected before anything is created, and every column that is off is reported at once, so that
//! one look tells an operator everything to fix and a refused `migrate` leaves the database as it
//! found it. A ledger table of an earlier version (unscoped text keys) is recognised and refused,
//! never converted.

use tokio_postgres::Client;

use crate::login_table::{self, TEXT_TYPES};
use crate::pg::PgError;
use crate::table_name::{TableName, Tables};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("reading or creating the tables")]
    Db(#[from] PgError),
    #[error(
        "table {table} does not exist; run `sluice migrate` (or set `sink.postgres.create_tables = true`)"
    )]
    Missing { table: String },
    #[error("existing tables cannot be used as they are (nothing was changed): {}", .problems.join("; "))]
    Mismatch {
        /// `table "t": column `c` is …`, one per column that is off.
        problems: Vec<String>,
    },
    #[error(
        "table {table} is a dedupe ledger of an earlier sluice (text keys not scoped to their source); \
         sluice leaves it unchanged and does not use it: point `sink.postgres.ledger_table` at a new \
         table (the default is `sluice_ledger_v2`) and drop this one when you like"
    )]
    OldLedger { table: String },
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(e: tokio_postgres::Error) -> Self {
        SchemaError::Db(PgError(e))
    }
}

/// Rejected messages with their reason, the stage that refused them and when.
pub fn dead_letter_ddl(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table}(
    message_id   text,
    body         text,
    reason       text,
    stage        text,
    sent_at      timestamptz,
    received_at  timestamptz,
    rejected_at  timestamptz NOT NULL DEFAULT now()
)"
    )
}

/// Keys of committed messages (32 bytes made from the SHA-256 of source and key, see
/// [`crate::sink::ledger`]), for skipping redeliveries; pruned by `seen_at`. Keys arrive in time
/// order, so a BRIN index finds the old ones for pruning at almost no cost per insert.
pub fn ledger_ddl(table: &TableName) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table}(
    scoped_key   bytea PRIMARY KEY CHECK (length(scoped_key) = 32),
    seen_at      timestamptz NOT NULL DEFAULT now()
)"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {table} USING brin (seen_at)",
            table.derived("seen_at_brin")
        ),
    ]
}

/// What `migrate` did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatus {
    pub table: String,
    pub created: bool,
}

/// Creates whatever is missing, in one transaction under an advisory lock so that replicas starting
/// together do not race. Existing tables are left exactly as they are.
pub async fn migrate(
    client: &mut Client,
    tables: &Tables,
    with_ledger: bool,
) -> Result<Vec<TableStatus>, SchemaError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('sluice migrate'))",
        &[],
    )
    .await?;
    let inspection = inspect(&tx, tables, with_ledger).await?;
    inspection.fits()?;
    let mut statuses = Vec::new();
    let mut plan: Vec<(&TableName, Vec<String>)> = vec![
        (&tables.target, vec![login_table::ddl(&tables.target)]),
        (
            &tables.dead_letter,
            vec![dead_letter_ddl(&tables.dead_letter)],
        ),
    ];
    if with_ledger {
        plan.push((&tables.ledger, ledger_ddl(&tables.ledger)));
    }
    for (table, statements) in plan {
        let existed = !inspection.missing.contains(table);
        if !existed {
            if let Some(schema) = &table.schema {
                tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                    .await?;
            }
            for statement in statements {
                tx.batch_execute(&statement).await?;
            }
        }
        statuses.push(TableStatus {
            table: table.to_string(),
            created: !existed,
        });
    }
    tx.commit().await?;
    Ok(statuses)
}

async fn exists(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
) -> Result<bool, SchemaError> {
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.to_string()])
        .await?;
    Ok(row.get(0))
}

/// Column name → `format_type` text, or `None` if the table does not exist.
async fn columns(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
) -> Result<Option<Vec<(String, String)>>, SchemaError> {
    if !exists(client, table).await? {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.to_string()],
        )
        .await?;
    Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Which optional dead-letter columns an existing table has (a table made by hand may hold only the
/// required four).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterColumns {
    pub stage: bool,
    pub sent_at: bool,
}

/// What the tables look like, read before anything is changed.
struct Inspection {
    /// Tables that do not exist, in the order they are created.
    missing: Vec<TableName>,
    /// Every column of an existing table that is off.
    problems: Vec<String>,
    dead_letter: DeadLetterColumns,
}

impl Inspection {
    fn fits(&self) -> Result<(), SchemaError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(SchemaError::Mismatch {
                problems: self.problems.clone(),
            })
        }
    }
}

async fn inspect(
    client: &impl tokio_postgres::GenericClient,
    tables: &Tables,
    with_ledger: bool,
) -> Result<Inspection, SchemaError> {
    let mut inspection = Inspection {
        missing: Vec::new(),
        problems: Vec::new(),
        // What a table made by `migrate` has.
        dead_letter: DeadLetterColumns {
            stage: true,
            sent_at: true,
        },
    };
    let wanted: Vec<(&str, &[&str])> = login_table::COLUMNS
        .iter()
        .map(|c| (c.name, c.ty.accepted()))
        .collect();
    match columns(client, &tables.target).await? {
        Some(actual) => check_columns(&tables.target, &actual, &wanted, &mut inspection.problems),
        None => inspection.missing.push(tables.target.clone()),
    }

    let ts: &[&str] = &["timestamp with time zone"];
    match columns(client, &tables.dead_letter).await? {
        Some(actual) => {
            check_columns(
                &tables.dead_letter,
                &actual,
                &[
                    ("message_id", TEXT_TYPES),
                    ("body", TEXT_TYPES),
                    ("reason", TEXT_TYPES),
                    ("received_at", ts),
                ],
                &mut inspection.problems,
            );
            let has = |name: &str| actual.iter().any(|(n, _)| n == name);
            inspection.dead_letter = DeadLetterColumns {
                stage: has("stage"),
                sent_at: has("sent_at"),
            };
        }
        None => inspection.missing.push(tables.dead_letter.clone()),
    }

    if with_ledger {
        match columns(client, &tables.ledger).await? {
            Some(actual) if actual.iter().any(|(name, _)| name == "message_key") => {
                return Err(SchemaError::OldLedger {
                    table: tables.ledger.to_string(),
                });
            }
            Some(actual) => check_columns(
                &tables.ledger,
                &actual,
                &[("scoped_key", &["bytea"]), ("seen_at", ts)],
                &mut inspection.problems,
            ),
            None => inspection.missing.push(tables.ledger.clone()),
        }
    }
    Ok(inspection)
}

/// Checks all tables: every column that is off is named (with the types accepted), and only then
/// a table that is missing.
pub async fn verify(
    client: &Client,
    tables: &Tables,
    with_ledger: bool,
) -> Result<DeadLetterColumns, SchemaError> {
    let inspection = inspect(client, tables, with_ledger).await?;
    inspection.fits()?;
    match inspection.missing.first() {
        Some(table) => Err(SchemaError::Missing {
            table: table.to_string(),
        }),
        None => Ok(inspection.dead_letter),
    }
}

/// The tables of `tables` that do not exist.
pub async fn missing(client: &Client, tables: &[&TableName]) -> Result<Vec<String>, SchemaError> {
    let mut missing = Vec::new();
    for table in tables {
        if !exists(client, table).await? {
            missing.push(table.to_string());
        }
    }
    Ok(missing)
}

fn check_columns(
    table: &TableName,
    actual: &[(String, String)],
    wanted: &[(&str, &[&str])],
    problems: &mut Vec<String>,
) {
    for (name, types) in wanted {
        let Some((_, ty)) = actual.iter().find(|(n, _)| n == name) else {
            problems.push(format!("table {table}: column `{name}` is missing"));
            continue;
        };
        let base = ty.split('(').next().unwrap_or_default();
        if !types.contains(&base) {
            let accepted: Vec<String> = types.iter().map(|t| format!("`{t}`")).collect();
            problems.push(format!(
                "table {table}: column `{name}` is `{ty}`, accepted: {} (binary COPY does not convert)",
                accepted.join(" or ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mismatch_is_named_with_the_types_accepted() {
        let t = TableName::unqualified("t");
        let actual = vec![
            ("app_version".to_owned(), "bigint".to_owned()),
            ("user_id".to_owned(), "character varying(64)".to_owned()),
        ];
        let mut problems = Vec::new();
        check_columns(
            &t,
            &actual,
            &[
                ("app_version", &["integer"]),
                ("user_id", TEXT_TYPES),
                ("locale", TEXT_TYPES),
            ],
            &mut problems,
        );
        assert_eq!(
            problems,
            [
                "table \"t\": column `app_version` is `bigint`, accepted: `integer` (binary COPY does not convert)",
                "table \"t\": column `locale` is missing",
            ]
        );
    }
}
