//! The `user_logins` table's columns, in one place.
//!
//! The parse stage's length limits, the DDL `migrate` runs, the check of an existing table and the
//! column list of binary COPY all describe the same seven columns; they read them from here, so the
//! limits the parser enforces are always the ones the table holds.

use crate::table_name::TableName;

/// Longest `user_id`, in characters.
pub const USER_ID_MAX: usize = 128;
/// Longest `device_type`, in characters.
pub const DEVICE_TYPE_MAX: usize = 32;
/// Longest `locale`, in characters.
pub const LOCALE_MAX: usize = 32;
/// Room for a mask (64 hex characters today), in characters.
pub const MASK_MAX: usize = 256;

/// What a column holds, as the DDL declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `varchar(n)`, counted in characters.
    Text {
        max_chars: usize,
    },
    Integer,
    Date,
}

impl ColumnType {
    /// The type in the DDL.
    pub fn ddl(self) -> String {
        match self {
            ColumnType::Text { max_chars } => format!("varchar({max_chars})"),
            ColumnType::Integer => "integer".into(),
            ColumnType::Date => "date".into(),
        }
    }

    /// `format_type` names an existing column may have for binary COPY to write it: any text type for
    /// strings, exactly `integer` and `date` for the others (binary COPY does not convert).
    pub fn accepted(self) -> &'static [&'static str] {
        match self {
            ColumnType::Text { .. } => TEXT_TYPES,
            ColumnType::Integer => &["integer"],
            ColumnType::Date => &["date"],
        }
    }
}

/// Text types binary COPY can write a string into.
pub const TEXT_TYPES: &[&str] = &["text", "character varying"];

/// One column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
}

/// The columns, in the order every row is encoded for COPY.
pub const COLUMNS: [Column; 7] = [
    text("user_id", USER_ID_MAX),
    text("device_type", DEVICE_TYPE_MAX),
    text("masked_ip", MASK_MAX),
    text("masked_device_id", MASK_MAX),
    text("locale", LOCALE_MAX),
    Column {
        name: "app_version",
        ty: ColumnType::Integer,
    },
    Column {
        name: "create_date",
        ty: ColumnType::Date,
    },
];

const fn text(name: &'static str, max_chars: usize) -> Column {
    Column {
        name,
        ty: ColumnType::Text { max_chars },
    }
}

/// `user_id, device_type, …`: the column list of COPY and INSERT statements.
pub fn column_list() -> String {
    COLUMNS.map(|c| c.name).join(", ")
}

/// The fixed DDL of the target table; sluice never alters an existing one.
pub fn ddl(table: &TableName) -> String {
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("    {:<20}{}", c.name, c.ty.ddl()))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {table}(\n{}\n)",
        columns.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_is_the_documented_one() {
        let ddl = ddl(&TableName::unqualified("user_logins"));
        let columns = ddl.split_once('(').map_or("", |(_, columns)| columns);
        let readme = include_str!("../README.md");
        assert!(
            readme.contains(columns),
            "README's DDL differs from:\n{ddl}"
        );
        assert_eq!(
            column_list(),
            "user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date"
        );
    }
}
