//! Reading a configuration file whole, so that one run names every key that is wrong.
//!
//! serde stops at the first value it cannot read. Rather than describe the tree a second time in a
//! hand-written schema that could drift from the typed one, the document is deserialized into the
//! typed tree again: each failure names its key (through `serde_path_to_error`), that key is taken
//! out of the document so that its default applies, and the next pass goes on past it. A file with
//! n unreadable keys costs n + 1 passes over a few hundred bytes. Only a required key that had to be
//! taken out ends the passes early: without it there is no tree left to check.
//!
//! The parsed document also says on which line each key is written, so every problem found later
//! (ranges, combinations) can point at its line too.

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A problem found while reading: the dotted key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub message: String,
}

/// A file parsed as TOML, not yet deserialized.
pub struct Document<'a> {
    text: &'a str,
    root: Spanned<DeTable<'a>>,
}

/// Most passes made over one file: more bad keys than a file has lines is not a config file.
const MAX_PASSES: usize = 200;

impl<'a> Document<'a> {
    /// Parses `text` as TOML (its syntax only).
    pub fn parse(text: &'a str) -> Result<Document<'a>, toml::de::Error> {
        Ok(Document {
            text,
            root: DeTable::parse(text)?,
        })
    }

    /// The typed tree, if one could be made, and every key that could not be read. Keys that could
    /// not be read are left at their defaults in the tree.
    pub fn deserialize<T: DeserializeOwned>(&self) -> (Option<T>, Vec<Unreadable>) {
        let mut root = self.root.clone();
        let mut problems: Vec<Unreadable> = Vec::new();
        for _ in 0..MAX_PASSES {
            let error =
                match serde_path_to_error::deserialize(toml::Deserializer::from(root.clone())) {
                    Ok(tree) => return (Some(tree), problems),
                    Err(error) => error,
                };
            let path: Vec<String> = error.path().iter().map(|s| s.to_string()).collect();
            let message = error.into_inner().message().to_owned();
            if let Some(field) = missing_field(&message) {
                let key = join(path.iter().map(String::as_str).chain([field]));
                // A required key taken out above was reported already, as what it held.
                if !problems.iter().any(|p| p.key == key) {
                    problems.push(Unreadable {
                        key,
                        message: "required".to_owned(),
                    });
                }
                return (None, problems);
            }
            let key = join(path.iter().map(String::as_str));
            let removed = remove(root.get_mut(), &path);
            problems.push(Unreadable { key, message });
            if !removed {
                return (None, problems);
            }
        }
        (None, problems)
    }

    /// The line (from 1) on which `key` (dotted) is written, if it is in the file.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        let mut table = self.root.get_ref();
        let mut segments = key.split('.').peekable();
        while let Some(segment) = segments.next() {
            let (name, value) = table.iter().find(|(k, _)| k.get_ref() == segment)?;
            if segments.peek().is_none() {
                return Some(self.line_at(name.span().start));
            }
            table = match value.get_ref() {
                DeValue::Table(inner) => inner,
                _ => return None,
            };
        }
        None
    }

    fn line_at(&self, offset: usize) -> usize {
        let before = self.text.get(..offset).unwrap_or(self.text);
        before.matches('\n').count() + 1
    }
}

/// `field` of serde's "missing field `field`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// `a.b.c`, without the `.` serde's path gives the document itself.
fn join<'s>(segments: impl Iterator<Item = &'s str>) -> String {
    segments.filter(|s| *s != ".").collect::<Vec<_>>().join(".")
}

/// Takes the value at `path` out of `table`; false if there is none (nothing left to take out).
fn remove(table: &mut DeTable<'_>, path: &[String]) -> bool {
    let [first, rest @ ..] = path else {
        return false;
    };
    if rest.is_empty() {
        let key = table.keys().find(|key| key.get_ref() == first).cloned();
        return key.is_some_and(|key| table.remove(&key).is_some());
    }
    let inner = table
        .iter_mut()
        .find(|(key, _)| key.get_ref() == first)
        .map(|(_, value)| value.get_mut());
    match inner {
        Some(DeValue::Table(inner)) => remove(inner, rest),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Tree {
        kind: Kind,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        #[serde(default)]
        count: u32,
        #[serde(default)]
        name: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        A,
    }

    fn read(text: &str) -> (bool, Vec<String>) {
        let document = Document::parse(text).expect("toml");
        let (tree, problems) = document.deserialize::<Tree>();
        let keys = problems
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        (tree.is_some(), keys)
    }

    #[test]
    fn every_unreadable_key_is_reported_and_the_rest_still_read() {
        let (tree, problems) =
            read("kind = \"a\"\nextra = 1\n[inner]\ncount = \"x\"\nname = 3\ntypo = 1\n");
        assert!(tree);
        assert_eq!(problems.len(), 4, "{problems:?}");
        for key in ["extra: unknown field", "inner.count: invalid type"] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} in {problems:?}"
            );
        }
    }

    #[test]
    fn a_required_key_ends_the_passes_once_reported() {
        assert_eq!(
            read("[inner]\n"),
            (false, vec!["kind: required".to_owned()])
        );
        let (tree, problems) = read("kind = \"b\"\n");
        assert!(!tree);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("kind: unknown variant `b`"));
    }

    #[test]
    fn keys_are_found_on_their_lines() {
        let document = Document::parse("kind = \"a\"\n\n[inner]\n\ncount = 1\n").expect("toml");
        assert_eq!(document.line_of("kind"), Some(1));
        assert_eq!(document.line_of("inner"), Some(3));
        assert_eq!(document.line_of("inner.count"), Some(5));
        assert_eq!(document.line_of("inner.name"), None);
    }
}
