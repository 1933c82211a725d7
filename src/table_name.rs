//! Table names from configuration, checked and quoted once.
//!
//! Names end up inside SQL text (COPY cannot take a table name as a parameter), so only plain
//! identifiers, optionally schema-qualified, are accepted, and they are always double-quoted. The
//! configuration deserializes straight into [`TableName`], so a name is checked once, at load, and
//! the rest of the code never sees raw text.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

/// Why a text is not a table name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableNameError {
    #[error("{0:?} is not a table name (letters, digits and `_`, optionally `schema.table`)")]
    NotAnIdentifier(String),
    #[error("{0:?} is not a table name (at most one `.`)")]
    TooManyParts(String),
}

impl TableName {
    /// `table` or `schema.table`, each part a plain identifier of at most 63 bytes.
    pub fn parse(text: &str) -> Result<TableName, TableNameError> {
        let check = |part: &str| -> Result<String, TableNameError> {
            let mut chars = part.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if first_ok && part.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                Ok(part.to_owned())
            } else {
                Err(TableNameError::NotAnIdentifier(text.to_owned()))
            }
        };
        match text.split('.').collect::<Vec<_>>().as_slice() {
            [name] => Ok(TableName {
                schema: None,
                name: check(name)?,
            }),
            [schema, name] => Ok(TableName {
                schema: Some(check(schema)?),
                name: check(name)?,
            }),
            _ => Err(TableNameError::TooManyParts(text.to_owned())),
        }
    }

    pub fn unqualified(name: &str) -> TableName {
        TableName {
            schema: None,
            name: name.to_owned(),
        }
    }

    /// A name for an index or constraint derived from this table.
    pub fn derived(&self, suffix: &str) -> String {
        format!("\"{}_{}\"", self.name, suffix)
    }
}

impl TryFrom<String> for TableName {
    type Error = TableNameError;

    fn try_from(text: String) -> Result<TableName, TableNameError> {
        TableName::parse(&text)
    }
}

impl fmt::Display for TableName {
    /// The quoted SQL form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "\"{schema}\".\"{}\"", self.name),
            None => write!(f, "\"{}\"", self.name),
        }
    }
}

/// The three tables of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// Where rows land (`user_logins`).
    pub target: TableName,
    /// Where messages that cannot be loaded are kept with their reason.
    pub dead_letter: TableName,
    /// Keys of committed messages, for skipping redeliveries.
    pub ledger: TableName,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_qualified_names_are_quoted() {
        assert_eq!(
            TableName::parse("user_logins").expect("ok").to_string(),
            "\"user_logins\""
        );
        assert_eq!(
            TableName::parse("etl.user_logins").expect("ok").to_string(),
            "\"etl\".\"user_logins\""
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "a.b.c",
            "x\"; drop",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }
}
