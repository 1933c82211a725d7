//! The tables sluice writes, created when missing and checked before the first batch.
//!
//! `user_logins` has a fixed DDL that sluice never alters. What it does instead is check, at start,
//! that an existing table has the columns and types binary COPY will send, because a mismatch would
//! otherwise surface as every row failing at runtime.

use tokio_postgres::Client;

use crate::table_name::TableName;

/// The three tables of one deployment.
#[derive(Debug, Clone)]
pub struct Tables {
    pub target: TableName,
    pub dead_letter: TableName,
    pub ledger: TableName,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Db(String),
    #[error(
        "table {table} does not exist; run `sluice migrate` (or set `sink.postgres.create_tables = true`)"
    )]
    Missing { table: String },
    #[error("table {table}: {problem}")]
    Mismatch { table: String, problem: String },
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(e: tokio_postgres::Error) -> Self {
        SchemaError::Db(crate::pg::describe(&e))
    }
}

/// The fixed DDL of the target table.
pub fn target_ddl(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table}(
    user_id             varchar(128),
    device_type         varchar(32),
    masked_ip           varchar(256),
    masked_device_id    varchar(256),
    locale              varchar(32),
    app_version         integer,
    create_date         date
)"
    )
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

/// Keys of committed messages, for skipping redeliveries; pruned by `seen_at`. Keys arrive in time
/// order, so a BRIN index finds the old ones for pruning at almost no cost per insert.
pub fn ledger_ddl(table: &TableName) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table}(
    message_key  text PRIMARY KEY,
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
    let mut statuses = Vec::new();
    let mut plan: Vec<(&TableName, Vec<String>)> = vec![
        (&tables.target, vec![target_ddl(&tables.target)]),
        (
            &tables.dead_letter,
            vec![dead_letter_ddl(&tables.dead_letter)],
        ),
    ];
    if with_ledger {
        plan.push((&tables.ledger, ledger_ddl(&tables.ledger)));
    }
    for (table, statements) in plan {
        let existed = exists(&tx, table).await?;
        if let Some(schema) = &table.schema {
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await?;
        }
        for statement in statements {
            tx.batch_execute(&statement).await?;
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
    client: &Client,
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

const TEXT_TYPES: &[&str] = &["text", "character varying"];

/// The target's columns as binary COPY needs them: text-like for strings, exactly `integer` and `date`
/// for the others (binary COPY does not convert).
const TARGET_COLUMNS: &[(&str, &[&str])] = &[
    ("user_id", TEXT_TYPES),
    ("device_type", TEXT_TYPES),
    ("masked_ip", TEXT_TYPES),
    ("masked_device_id", TEXT_TYPES),
    ("locale", TEXT_TYPES),
    ("app_version", &["integer"]),
    ("create_date", &["date"]),
];

/// Which optional dead-letter columns an existing table has (a table made by hand may hold only the
/// required four).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterColumns {
    pub stage: bool,
    pub sent_at: bool,
}

/// Checks all tables; the error names the table and the column that is off.
pub async fn verify(
    client: &Client,
    tables: &Tables,
    with_ledger: bool,
) -> Result<DeadLetterColumns, SchemaError> {
    let target = require(client, &tables.target).await?;
    check_columns(&tables.target, &target, TARGET_COLUMNS)?;

    let dead_letter = require(client, &tables.dead_letter).await?;
    let ts: &[&str] = &["timestamp with time zone"];
    check_columns(
        &tables.dead_letter,
        &dead_letter,
        &[
            ("message_id", TEXT_TYPES),
            ("body", TEXT_TYPES),
            ("reason", TEXT_TYPES),
            ("received_at", ts),
        ],
    )?;
    let has = |name: &str| dead_letter.iter().any(|(n, _)| n == name);
    let optional = DeadLetterColumns {
        stage: has("stage"),
        sent_at: has("sent_at"),
    };

    if with_ledger {
        let ledger = require(client, &tables.ledger).await?;
        check_columns(
            &tables.ledger,
            &ledger,
            &[("message_key", TEXT_TYPES), ("seen_at", ts)],
        )?;
    }
    Ok(optional)
}

async fn require(client: &Client, table: &TableName) -> Result<Vec<(String, String)>, SchemaError> {
    columns(client, table)
        .await?
        .ok_or_else(|| SchemaError::Missing {
            table: table.to_string(),
        })
}

fn check_columns(
    table: &TableName,
    actual: &[(String, String)],
    wanted: &[(&str, &[&str])],
) -> Result<(), SchemaError> {
    for (name, types) in wanted {
        let Some((_, ty)) = actual.iter().find(|(n, _)| n == name) else {
            return Err(SchemaError::Mismatch {
                table: table.to_string(),
                problem: format!("column `{name}` is missing"),
            });
        };
        let base = ty.split('(').next().unwrap_or_default();
        if !types.contains(&base) {
            return Err(SchemaError::Mismatch {
                table: table.to_string(),
                problem: format!(
                    "column `{name}` is `{ty}`; sluice writes {}",
                    types.join(" or ")
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_ddl_is_the_fixed_one() {
        let ddl = target_ddl(&TableName::unqualified("user_logins"));
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"user_logins\"("));
        for column in [
            "user_id             varchar(128)",
            "app_version         integer",
            "create_date         date",
        ] {
            assert!(ddl.contains(column), "{column}");
        }
    }

    #[test]
    fn mismatches_name_the_column() {
        let t = TableName::unqualified("t");
        let actual = vec![("app_version".to_owned(), "bigint".to_owned())];
        let err = check_columns(&t, &actual, &[("app_version", &["integer"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "table \"t\": column `app_version` is `bigint`; sluice writes integer"
        );
        let ok = vec![("user_id".to_owned(), "character varying(64)".to_owned())];
        assert!(check_columns(&t, &ok, &[("user_id", TEXT_TYPES)]).is_ok());
    }
}
