//! Keyed masking of the PII fields `ip` and `device_id`.
//!
//! The mask must keep equal values equal (analysts look for duplicates) without being reversible by
//! anyone holding the table: a plain hash of an IPv4 address is undone by hashing all 2^32 addresses,
//! so the default is HMAC-SHA256 under a secret key. The key never lives in the repository; it comes
//! from `SLUICE_MASK_KEY` or a file. Addresses are masked in their canonical text form so that
//! `::ffff:1.2.3.4`, `1.2.3.4` and differently-abbreviated IPv6 spellings of one address mask alike.
//!
//! The keyed state is built once and cloned per value; the canonical address is written into a stack
//! buffer, so hashing allocates nothing. Where the law requires that a value can be given back,
//! `mask.mode = "aes-siv"` seals instead of hashing ([`crate::stage::seal`]): still deterministic,
//! but reversible by whoever holds the keyring.

use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::stage::seal::{Keyring, KeyringError};

/// The key the demo configuration names. It is public: data masked with it is not protected, and the
/// daemon says so in its log whenever it is in use.
pub const DEVELOPMENT_KEY: &str = "sluice-development-key-NOT-SECRET-do-not-use-in-production";

/// The keyring `config/dev-siv.keys` holds for `mask.mode = "aes-siv"`: public, like
/// [`DEVELOPMENT_KEY`], and warned about in the same way.
pub const DEVELOPMENT_KEYRING: &str = include_str!("../../config/dev-siv.keys");

/// Shortest key accepted: an HMAC key shorter than this is guessable.
pub const MIN_KEY_BYTES: usize = 16;

/// How masked values are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskMode {
    /// `hex(HMAC-SHA256(key, value))`: cannot be brute-forced without the key.
    #[default]
    HmacSha256,
    /// `hex(SHA-256(salt ‖ value))`, for compatibility with tables filled by that older scheme.
    SaltedSha256,
    /// `ID:base64url(AES-256-SIV(key ID, value))`: deterministic and recoverable with the keyring.
    AesSiv,
}

/// Secret bytes used to mask. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskKey(Vec<u8>);

impl fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MaskKey({} bytes, redacted)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no masking key: set SLUICE_MASK_KEY or name a file in `mask.key_file` (the daemon refuses to store unmasked or weakly masked data)"
    )]
    Missing,
    #[error("cannot read the masking key file {path}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the masking key from {origin} is {len} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort { origin: String, len: usize },
    #[error("the masking keyring (mask.mode = \"aes-siv\")")]
    Keyring(#[from] KeyringError),
}

impl MaskKey {
    /// Picks the key: the environment wins over the file, as for every deployment-specific setting.
    /// Surrounding whitespace (a trailing newline in a file) is not part of the key.
    pub fn load(from_env: Option<&str>, key_file: Option<&Path>) -> Result<MaskKey, KeyError> {
        let (text, origin) = match (from_env, key_file) {
            (Some(value), _) => (value.to_owned(), "SLUICE_MASK_KEY".to_owned()),
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| KeyError::Unreadable {
                        path: path.to_owned(),
                        source,
                    })?;
                (text, format!("file {}", path.display()))
            }
            (None, None) => return Err(KeyError::Missing),
        };
        let key = text.trim().as_bytes().to_vec();
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                origin,
                len: key.len(),
            });
        }
        Ok(MaskKey(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> MaskKey {
        MaskKey(bytes.to_vec())
    }

    /// True for the public demo key or keyring, which protect nothing.
    pub fn is_development_key(&self) -> bool {
        self.0 == DEVELOPMENT_KEY.as_bytes() || self.0 == DEVELOPMENT_KEYRING.trim().as_bytes()
    }

    /// The key as a keyring (`mask.mode = "aes-siv"`).
    pub fn keyring(&self) -> Result<Keyring, KeyError> {
        let text = std::str::from_utf8(&self.0).unwrap_or_default();
        Ok(Keyring::parse(text)?)
    }
}

/// A masked value as stored in a `masked_*` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masked {
    /// A keyed hash, stored as 64 lowercase hex characters.
    Digest(Digest32),
    /// A sealed value, `ID:base64url`, stored as it is.
    Sealed(String),
}

impl Masked {
    /// The column's text.
    pub fn to_text(&self) -> String {
        match self {
            Masked::Digest(d) => String::from_utf8_lossy(&to_hex(d)).into_owned(),
            Masked::Sealed(s) => s.clone(),
        }
    }
}

/// Computes masks with a pre-keyed hash state.
#[derive(Clone)]
pub struct Masker {
    state: KeyedState,
}

#[derive(Clone)]
enum KeyedState {
    Hmac(Hmac<Sha256>),
    Salted(Sha256),
    Sealed(std::sync::Arc<Keyring>),
}

/// A SHA-256 digest; printed as 64 lowercase hex characters when stored.
pub type Digest32 = [u8; 32];

impl Masker {
    /// Fails only for `aes-siv` when the key is not a usable keyring.
    pub fn new(mode: MaskMode, key: &MaskKey) -> Result<Masker, KeyError> {
        let state = match mode {
            // HMAC takes keys of any length; `new_from_slice` only fails for fixed-size-key MACs.
            MaskMode::HmacSha256 => KeyedState::Hmac(
                <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0)
                    .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length")),
            ),
            MaskMode::SaltedSha256 => {
                let mut sha = Sha256::new();
                Digest::update(&mut sha, &key.0);
                KeyedState::Salted(sha)
            }
            MaskMode::AesSiv => KeyedState::Sealed(std::sync::Arc::new(key.keyring()?)),
        };
        Ok(Masker { state })
    }

    /// Masks a value taken as given (`device_id`); `None` when its sealed form would not fit the
    /// column (longer than [`crate::stage::seal::PLAINTEXT_MAX`] bytes; hashes always fit).
    pub fn mask(&self, value: &[u8]) -> Option<Masked> {
        match &self.state {
            KeyedState::Hmac(mac) => {
                let mut mac = mac.clone();
                mac.update(value);
                Some(Masked::Digest(mac.finalize().into_bytes().into()))
            }
            KeyedState::Salted(sha) => {
                let mut sha = sha.clone();
                Digest::update(&mut sha, value);
                Some(Masked::Digest(sha.finalize().into()))
            }
            KeyedState::Sealed(ring) => ring.seal(value).map(Masked::Sealed),
        }
    }

    /// Masks an address in its canonical text form (at most 45 bytes: it always fits).
    pub fn mask_ip(&self, ip: IpAddr) -> Option<Masked> {
        let mut buf = [0u8; 48];
        let len = canonical_ip(ip, &mut buf);
        self.mask(&buf[..len])
    }
}

/// Writes the canonical text of an address into `buf` and returns its length: IPv4-mapped IPv6
/// addresses become IPv4, IPv6 is printed per RFC 5952 (lowercase, longest zero run as `::`).
pub fn canonical_ip(ip: IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let text = digits.format(octet).as_bytes();
                buf[len..len + text.len()].copy_from_slice(text);
                len += text.len();
            }
            len
        }
        IpAddr::V6(v6) => {
            // At most 45 characters ("ffff:…" with an embedded IPv4), so the buffer always suffices.
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    }
}

/// Lowercase hex of a digest, as stored in `masked_*` columns.
pub fn to_hex(digest: &Digest32) -> [u8; 64] {
    let mut out = [0u8; 64];
    // The output is exactly twice the input's length, so this cannot fail.
    let _ = hex::encode_to_slice(digest, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_str(m: Option<Masked>) -> String {
        m.expect("a hash always fits").to_text()
    }

    /// HMAC: RFC 4231 test case 2; salted: SHA-256 of "abc" (salt "ab", value "c").
    #[test]
    fn masks_match_known_answers() {
        let cases: [(MaskMode, &[u8], &[u8], &str); 2] = [
            (
                MaskMode::HmacSha256,
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                MaskMode::SaltedSha256,
                b"ab",
                b"c",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ];
        for (mode, key, value, expected) in cases {
            let masker = Masker::new(mode, &MaskKey::from_bytes(key)).expect("a hash key");
            assert_eq!(hex_str(masker.mask(value)), expected, "{mode:?}");
        }
    }

    #[test]
    fn equal_addresses_written_differently_mask_alike() {
        let masker = Masker::new(
            MaskMode::HmacSha256,
            &MaskKey::from_bytes(b"0123456789abcdef"),
        )
        .expect("a hash key");
        let m = |s: &str| masker.mask_ip(s.parse().expect("address"));
        assert_eq!(m("1.2.3.4"), m("::ffff:1.2.3.4"));
        assert_eq!(
            m("2001:db8::1"),
            m("2001:0DB8:0000:0000:0000:0000:0000:0001")
        );
        assert_ne!(m("1.2.3.4"), m("1.2.3.5"));
        assert_eq!(m("1.2.3.4"), masker.mask(b"1.2.3.4"));
    }

    #[test]
    fn sealed_masks_open_to_the_canonical_address_and_the_device_id() {
        let ring_text = DEVELOPMENT_KEYRING.trim();
        let masker = Masker::new(MaskMode::AesSiv, &MaskKey::from_bytes(ring_text.as_bytes()))
            .expect("ring");
        let ring = Keyring::parse(ring_text).expect("ring");
        let open = |m: Option<Masked>| match m {
            Some(Masked::Sealed(s)) => {
                String::from_utf8(ring.open(&s).expect("opens")).expect("utf-8")
            }
            other => panic!("not sealed: {other:?}"),
        };
        assert_eq!(
            open(masker.mask_ip("::FFFF:1.2.3.4".parse().expect("ip"))),
            "1.2.3.4"
        );
        let longest_v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        assert_eq!(
            open(masker.mask_ip(longest_v6.parse().expect("ip"))),
            longest_v6
        );
        assert_eq!(open(masker.mask("593-47-5928".as_bytes())), "593-47-5928");
        assert_eq!(
            masker.mask(&[b'x'; crate::stage::seal::PLAINTEXT_MAX + 1]),
            None
        );
    }

    #[test]
    fn canonical_text_is_the_standard_form() {
        let text = |s: &str| {
            let mut buf = [0u8; 48];
            let n = canonical_ip(s.parse().expect("address"), &mut buf);
            String::from_utf8(buf[..n].to_vec()).expect("ascii")
        };
        assert_eq!(text("199.172.111.135"), "199.172.111.135");
        assert_eq!(text("0.0.0.0"), "0.0.0.0");
        assert_eq!(text("::FFFF:10.0.0.1"), "10.0.0.1");
        assert_eq!(text("2001:DB8:0:0:1:0:0:1"), "2001:db8::1:0:0:1");
        assert_eq!(
            text("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn key_comes_from_env_before_file_and_must_be_long_enough() {
        let dir = std::env::temp_dir().join(format!("sluice-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("key");
        std::fs::write(&file, "file-key-0123456789\n").expect("write");
        let from_file = MaskKey::load(None, Some(&file)).expect("file key");
        assert_eq!(from_file, MaskKey::from_bytes(b"file-key-0123456789"));
        let from_env = MaskKey::load(Some("env-key-0123456789"), Some(&file)).expect("env key");
        assert_eq!(from_env, MaskKey::from_bytes(b"env-key-0123456789"));
        assert!(matches!(
            MaskKey::load(Some("short"), None),
            Err(KeyError::TooShort { .. })
        ));
        assert!(matches!(MaskKey::load(None, None), Err(KeyError::Missing)));
        assert!(matches!(
            MaskKey::load(None, Some(&dir.join("absent"))),
            Err(KeyError::Unreadable { .. })
        ));
        assert!(MaskKey::from_bytes(DEVELOPMENT_KEY.as_bytes()).is_development_key());
        let dev_ring = MaskKey::from_bytes(DEVELOPMENT_KEYRING.trim().as_bytes());
        assert!(dev_ring.is_development_key());
        assert!(Masker::new(MaskMode::AesSiv, &dev_ring).is_ok());
        assert!(matches!(
            Masker::new(MaskMode::AesSiv, &from_env),
            Err(KeyError::Keyring(_))
        ));
        assert!(!format!("{from_env:?}").contains("env-key"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
