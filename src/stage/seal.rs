//! Recoverable masking: deterministic authenticated encryption (AES-SIV, RFC 5297) of `ip` and
//! `device_id`, for deployments that must be able to give the real value back (a lawful request)
//! while analysts still see duplicates.
//!
//! SIV without a nonce is deterministic: one value under one key always gives one output, so equal
//! values stay equal in the table, as with the keyed hash. Unlike the hash it can be reversed by
//! whoever holds the key, and only by them: the synthetic IV is also an authentication tag, so a
//! wrong key or an altered value is refused, never decrypted into garbage.
//!
//! Keys rotate. A keyring holds several keys, each under a short id; new values are sealed with the
//! last key listed (the current one) and carry its id as a prefix, `id:base64url(tag ‖ ciphertext)`,
//! so values sealed under older keys stay readable as long as their key stays in the ring. The id
//! is also the associated data, so a value cannot be passed off under another key's id. Values of
//! the same field sealed under two keys differ: after a rotation, duplicates are visible within
//! each key's rows (or after unmasking), not across them.

use std::fmt;

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::login_table::MASK_MAX;

/// AES-256-SIV takes two AES-256 keys: one for the MAC (S2V), one for CTR encryption.
pub const KEY_BYTES: usize = 64;
/// Longest key id; ids are short because every sealed value carries one.
pub const KEY_ID_MAX: usize = 8;
/// The synthetic IV (the tag) prepended to every ciphertext.
const TAG_BYTES: usize = 16;

/// The longest plaintext, in bytes, whose sealed form fits a masked column under any key id.
pub const PLAINTEXT_MAX: usize = max_plaintext(MASK_MAX);

/// Characters of the sealed form of `plaintext_len` bytes under an id of `id_len` characters.
pub const fn sealed_len(id_len: usize, plaintext_len: usize) -> usize {
    id_len + 1 + (4 * (TAG_BYTES + plaintext_len)).div_ceil(3)
}

const fn max_plaintext(column: usize) -> usize {
    let mut n = 0;
    while sealed_len(KEY_ID_MAX, n + 1) <= column {
        n += 1;
    }
    n
}

/// A keyring that cannot be used, said without showing any key.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("the keyring is empty: give at least one `ID:BASE64KEY` entry")]
    Empty,
    #[error("keyring entry {position} is not `ID:BASE64KEY`")]
    NotAnEntry { position: usize },
    #[error(
        "keyring entry {position}: the id {id:?} must be 1 to {KEY_ID_MAX} letters, digits, `-` or `_`"
    )]
    BadId { position: usize, id: String },
    #[error("keyring entry {position} ({id}): the key is not standard base64")]
    NotBase64 { position: usize, id: String },
    #[error(
        "keyring entry {position} ({id}): the key is {len} bytes; AES-256-SIV needs {KEY_BYTES}"
    )]
    WrongLength {
        position: usize,
        id: String,
        len: usize,
    },
    #[error("keyring entry {position}: the id {id:?} is listed twice")]
    DuplicateId { position: usize, id: String },
}

/// Why a sealed value cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed value (expected `ID:BASE64URL`)")]
    Malformed,
    #[error("sealed under key {0:?}, which is not in the keyring")]
    UnknownKey(String),
    #[error("does not authenticate under key {0:?}: the key is wrong or the value was altered")]
    Refused(String),
}

struct Key {
    id: String,
    bytes: [u8; KEY_BYTES],
}

/// Sealing keys by id; the last one seals new values. Its `Debug` shows ids only.
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "Keyring(ids {ids:?}, keys redacted)")
    }
}

impl Keyring {
    /// Reads `ID:BASE64KEY` entries separated by whitespace, newlines or commas; lines starting
    /// with `#` are comments. The last entry is the current key.
    pub fn parse(text: &str) -> Result<Keyring, KeyringError> {
        let entries = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ','))
            .filter(|entry| !entry.is_empty());
        let mut keys: Vec<Key> = Vec::new();
        for (i, entry) in entries.enumerate() {
            let position = i + 1;
            let key = parse_entry(entry, position)?;
            if keys.iter().any(|k| k.id == key.id) {
                return Err(KeyringError::DuplicateId {
                    position,
                    id: key.id,
                });
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Keyring { keys })
    }

    /// The id new values are sealed under.
    pub fn current_id(&self) -> &str {
        self.current().id.as_str()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    fn current(&self) -> &Key {
        // `parse` refuses an empty ring.
        &self.keys[self.keys.len() - 1]
    }

    /// Seals `plaintext` under the current key; `None` if the result would not fit a masked column
    /// (longer than [`PLAINTEXT_MAX`] bytes).
    pub fn seal(&self, plaintext: &[u8]) -> Option<String> {
        if plaintext.len() > PLAINTEXT_MAX {
            return None;
        }
        let key = self.current();
        let sealed = cipher(key).encrypt([key.id.as_bytes()], plaintext).ok()?;
        let mut out = String::with_capacity(sealed_len(key.id.len(), plaintext.len()));
        out.push_str(&key.id);
        out.push(':');
        URL_SAFE_NO_PAD.encode_string(sealed, &mut out);
        Some(out)
    }

    /// Opens a value sealed under any key of the ring.
    pub fn open(&self, value: &str) -> Result<Vec<u8>, OpenError> {
        let (id, encoded) = value.trim().split_once(':').ok_or(OpenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| OpenError::UnknownKey(id.to_owned()))?;
        let sealed = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| OpenError::Malformed)?;
        if sealed.len() < TAG_BYTES {
            return Err(OpenError::Malformed);
        }
        cipher(key)
            .decrypt([key.id.as_bytes()], &sealed)
            .map_err(|_| OpenError::Refused(id.to_owned()))
    }
}

fn cipher(key: &Key) -> Aes256Siv {
    Aes256Siv::new(&key.bytes.into())
}

fn parse_entry(entry: &str, position: usize) -> Result<Key, KeyringError> {
    let (id, encoded) = entry
        .split_once(':')
        .ok_or(KeyringError::NotAnEntry { position })?;
    let id_ok = (1..=KEY_ID_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok {
        return Err(KeyringError::BadId {
            position,
            id: id.to_owned(),
        });
    }
    let decoded = STANDARD
        .decode(encoded)
        .map_err(|_| KeyringError::NotBase64 {
            position,
            id: id.to_owned(),
        })?;
    let bytes: [u8; KEY_BYTES] =
        decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyringError::WrongLength {
                position,
                id: id.to_owned(),
                len: decoded.len(),
            })?;
    Ok(Key {
        id: id.to_owned(),
        bytes,
    })
}

/// A new keyring entry `ID:BASE64KEY` with a key from the operating system's random source.
pub fn generate_entry(id: &str) -> String {
    let mut bytes = [0u8; KEY_BYTES];
    rand::fill(&mut bytes);
    format!("{id}:{}", STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fill: u8) -> String {
        format!("{id}:{}", STANDARD.encode([fill; KEY_BYTES]))
    }

    #[test]
    fn sealing_is_deterministic_and_opens() {
        let ring = Keyring::parse(&entry("k1", 7)).expect("ring");
        let a = ring.seal(b"10.0.0.1").expect("fits");
        assert_eq!(a, ring.seal(b"10.0.0.1").expect("fits"), "deterministic");
        assert_ne!(a, ring.seal(b"10.0.0.2").expect("fits"));
        assert!(a.starts_with("k1:"), "{a}");
        assert_eq!(a.len(), sealed_len(2, 8));
        assert_eq!(ring.open(&a).expect("opens"), b"10.0.0.1");
    }

    #[test]
    fn every_accepted_length_fits_the_column_and_longer_is_refused() {
        let id = "k".repeat(KEY_ID_MAX);
        let ring = Keyring::parse(&entry(&id, 1)).expect("ring");
        let longest = ring.seal(&[b'x'; PLAINTEXT_MAX]).expect("fits");
        assert!(longest.len() <= MASK_MAX, "{}", longest.len());
        assert!(sealed_len(KEY_ID_MAX, PLAINTEXT_MAX + 1) > MASK_MAX);
        assert_eq!(ring.seal(&[b'x'; PLAINTEXT_MAX + 1]), None);
        assert_eq!(ring.open(&longest).expect("opens").len(), PLAINTEXT_MAX);
        assert_eq!(ring.seal(b"").map(|s| ring.open(&s)), Some(Ok(Vec::new())));
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let old = Keyring::parse(&entry("k1", 1)).expect("ring");
        let sealed_old = old.seal(b"dev-1").expect("fits");
        let rotated = Keyring::parse(&format!(
            "# rotated\n{}\n{}\n",
            entry("k1", 1),
            entry("k2", 2)
        ))
        .expect("ring");
        assert_eq!(rotated.current_id(), "k2");
        let sealed_new = rotated.seal(b"dev-1").expect("fits");
        assert!(sealed_new.starts_with("k2:"));
        assert_eq!(rotated.open(&sealed_old).expect("old"), b"dev-1");
        assert_eq!(rotated.open(&sealed_new).expect("new"), b"dev-1");
        assert_eq!(
            old.open(&sealed_new),
            Err(OpenError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn a_wrong_key_or_an_altered_value_is_refused() {
        let ring = Keyring::parse(&entry("k1", 1)).expect("ring");
        let other = Keyring::parse(&entry("k1", 9)).expect("ring");
        let sealed = ring.seal(b"1.2.3.4").expect("fits");
        assert_eq!(other.open(&sealed), Err(OpenError::Refused("k1".into())));
        let mut altered = sealed.clone().into_bytes();
        // A character in the middle: the last one may only carry padding bits.
        let middle = altered.len() / 2;
        altered[middle] = if altered[middle] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).expect("ascii");
        assert_eq!(ring.open(&altered), Err(OpenError::Refused("k1".into())));
        // Moving a value under another id of the same ring is refused too.
        let two = Keyring::parse(&format!("{} {}", entry("k1", 1), entry("k2", 1))).expect("ring");
        let moved = sealed.replacen("k1:", "k2:", 1);
        assert_eq!(two.open(&moved), Err(OpenError::Refused("k2".into())));
        assert_eq!(ring.open("no colon"), Err(OpenError::Malformed));
        assert_eq!(ring.open("k1:!!"), Err(OpenError::Malformed));
    }

    #[test]
    fn bad_keyrings_say_which_entry_without_showing_keys() {
        let cases = [
            ("", "empty"),
            ("k1", "entry 1 is not"),
            (
                &format!("{} toolongid9:AAAA", entry("k1", 1)),
                "entry 2: the id",
            ),
            ("k1:***", "not standard base64"),
            ("k1:AAAA", "is 3 bytes"),
            (
                &format!("{},{}", entry("k1", 1), entry("k1", 2)),
                "listed twice",
            ),
        ];
        for (text, expected) in cases {
            let err = Keyring::parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let ring = Keyring::parse(&entry("k1", 1)).expect("ring");
        assert!(!format!("{ring:?}").contains(&STANDARD.encode([1u8; KEY_BYTES])));
        let generated = Keyring::parse(&generate_entry("new")).expect("a generated entry parses");
        assert_eq!(generated.current_id(), "new");
    }
}
