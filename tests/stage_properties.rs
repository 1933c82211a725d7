//! Properties of the CPU stages, parse → mask/transform → binary COPY encoding (every mask mode),
//! on any input:
//! arbitrary bytes, arbitrary text, and valid bodies mutated byte by byte or field by field. None of
//! them panics, and every input ends as exactly one row or exactly one dead letter with a reason;
//! every row encodes to a well-formed COPY tuple whose text PostgreSQL can hold.
//!
//! Bytes that are not UTF-8 are rejected by the source before the stages see them (the file
//! source's rule, `body is not valid UTF-8`), as the pipeline does.

use std::collections::BTreeSet;
use std::time::SystemTime;

use proptest::prelude::*;
use sluice::envelope::{Chunk, Envelope, MessageId, Meta, Reject, Stage};
use sluice::sink::copy_encode::encode_rows;
use sluice::stage::mask::{MaskKey, MaskMode, Masker};
use sluice::stage::parse::parse_chunk;
use sluice::stage::transform::{AppVersionMode, CreateDateMode, Transformer};

/// Valid bodies to mutate: plain, escaped, with optional fields present, null and absent.
const VALID: &[&str] = &[
    r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#,
    r#"{"user_id":"a\"b\u00e9","device_type":"ios","ip":"::ffff:1.2.3.4","device_id":"d\/2","app_version":"0.96","locale":null}"#,
    r#"{"user_id":"u","device_type":"ios","ip":"fe80::1","device_id":"d","app_version":"6.4.8","create_date":"2024-02-29","extra":{"a":[1,2,{"b":null}]}}"#,
    r#"{"app_version":"1","device_id":"x","ip":"10.0.0.1","device_type":"web","user_id":"é漢字","locale":""}"#,
];

/// Fields a mutation may replace, and JSON fragments to put there.
const FIELDS: &[&str] = &[
    "user_id",
    "app_version",
    "device_type",
    "ip",
    "locale",
    "device_id",
    "create_date",
];

fn json_fragment() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).expect("a string encodes")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| serde_json::to_string(&n).unwrap_or_else(|_| "0".into())),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"99999999999.1\"".to_owned()),
        Just("\"1.2.3.4.5\"".to_owned()),
        Just("\"0001-01-01\"".to_owned()),
        Just("\"9999-12-31\"".to_owned()),
        (1usize..300).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        (0usize..200).prop_map(|n| format!("\"{}\"", "é".repeat(n))),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(inner, 0..4).prop_map(|v| {
                let pairs: Vec<String> = v
                    .iter()
                    .enumerate()
                    .map(|(i, x)| format!("\"k{i}\":{x}"))
                    .collect();
                format!("{{{}}}", pairs.join(","))
            }),
        ]
    })
}

/// One change to a body's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Replace(usize, u8),
    Truncate(usize),
    Repeat(usize, usize),
    /// `"field": value` put at the front of the object, so it wins or duplicates.
    Field(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..32).prop_map(|(at, n)| Mutation::Repeat(at, n)),
        (0..FIELDS.len(), json_fragment()).prop_map(|(f, v)| Mutation::Field(f, v)),
    ]
}

fn apply(body: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = body.as_bytes().to_vec();
    for m in mutations {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Insert(i, b) => {
                let i = at(*i, bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(*i, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Replace(i, b) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] = *b;
            }
            Mutation::Replace(..) => {}
            Mutation::Truncate(i) => bytes.truncate(at(*i, bytes.len())),
            Mutation::Repeat(i, n) => {
                let i = at(*i, bytes.len());
                let end = (i + n).min(bytes.len());
                let copy = bytes[i..end].to_vec();
                bytes.splice(end..end, copy);
            }
            Mutation::Field(f, value) => {
                if let Some(open) = bytes.iter().position(|b| *b == b'{') {
                    let pair = format!("\"{}\":{value},", FIELDS[*f]);
                    bytes.splice(open + 1..open + 1, pair.into_bytes());
                }
            }
        }
    }
    bytes
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<String>().prop_map(String::into_bytes),
        (0..VALID.len(), proptest::collection::vec(mutation(), 0..4))
            .prop_map(|(v, m)| apply(VALID[v], &m)),
    ]
}

fn position(meta: &Meta) -> u64 {
    match meta.message_id {
        MessageId::Position(n) => n,
        MessageId::Text(ref t) => panic!("unexpected message id {t}"),
    }
}

/// What the source hands the stages: text as an envelope, other bytes as its dead letter.
fn from_source(inputs: &[Vec<u8>]) -> Chunk<Envelope> {
    let mut chunk = Chunk::new(Vec::new());
    for (i, bytes) in inputs.iter().enumerate() {
        let meta = Meta::at_position(i as u64 + 1, SystemTime::now());
        match String::from_utf8(bytes.clone()) {
            Ok(body) => chunk.items.push(Envelope { body, meta }),
            Err(e) => chunk.rejects.push(Reject {
                body: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                meta,
                stage: Stage::Source,
                reason: "body is not valid UTF-8".into(),
            }),
        }
    }
    chunk
}

/// Reads a binary COPY payload back: its tuples' text fields, checking the framing on the way.
fn copy_tuples(payload: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
    let mut rest = payload
        .strip_prefix(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0")
        .expect("COPY header");
    let mut take = |n: usize| {
        assert!(rest.len() >= n, "COPY payload cut short");
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head.to_vec()
    };
    let mut tuples = Vec::new();
    loop {
        let fields = i16::from_be_bytes(take(2).try_into().expect("2 bytes"));
        if fields == -1 {
            break;
        }
        assert_eq!(fields, 7, "fields per tuple");
        let mut tuple = Vec::new();
        for _ in 0..fields {
            let len = i32::from_be_bytes(take(4).try_into().expect("4 bytes"));
            tuple.push((len >= 0).then(|| take(len as usize)));
        }
        tuples.push(tuple);
    }
    assert!(take(0).is_empty());
    tuples
}

/// A key for each mode: any bytes for the hashes, a one-key keyring for `aes-siv`.
fn masker(mode: MaskMode) -> Masker {
    let key: &[u8] = match mode {
        MaskMode::AesSiv => {
            b"k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+Pw=="
        }
        _ => b"property-test-mask-key-0123456789",
    };
    Masker::new(mode, &MaskKey::from_bytes(key)).expect("a usable key")
}

/// A mask as the column holds it: 64 hex digits for the hashes, `ID:…` within the column for
/// sealed values.
fn well_formed_mask(mode: MaskMode, mask: Option<&Vec<u8>>) -> bool {
    let Some(mask) = mask else { return false };
    match mode {
        MaskMode::AesSiv => mask.starts_with(b"k1:") && mask.len() <= 256 && mask.is_ascii(),
        _ => mask.len() == 64 && mask.iter().all(u8::is_ascii_hexdigit),
    }
}

fn check(
    inputs: Vec<Vec<u8>>,
    mode: MaskMode,
    versions: AppVersionMode,
) -> Result<(), TestCaseError> {
    let transformer = Transformer::new(masker(mode), versions, CreateDateMode::SentTime);
    let out = transformer.transform_chunk(parse_chunk(from_source(&inputs)));

    let mut seen = BTreeSet::new();
    for row in &out.items {
        prop_assert!(seen.insert(position(&row.event.meta)), "a message twice");
    }
    for reject in &out.rejects {
        prop_assert!(seen.insert(position(&reject.meta)), "a message twice");
        prop_assert!(!reject.reason.is_empty(), "a dead letter without a reason");
    }
    let expected: BTreeSet<u64> = (1..=inputs.len() as u64).collect();
    prop_assert_eq!(
        seen,
        expected,
        "every input ends as one row or one dead letter"
    );

    let tuples = copy_tuples(&encode_rows(out.items.len(), out.items.iter()));
    prop_assert_eq!(tuples.len(), out.items.len());
    for tuple in tuples {
        // user_id, device_type, masked_ip, masked_device_id, locale: text PostgreSQL can hold.
        for text in tuple[..5].iter().flatten() {
            let text = std::str::from_utf8(text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(!text.contains('\0'), "a NUL in a text column");
        }
        prop_assert!(tuple[0].as_ref().is_some_and(|t| !t.is_empty()), "user_id");
        prop_assert!(well_formed_mask(mode, tuple[2].as_ref()), "masked_ip");
        prop_assert!(
            well_formed_mask(mode, tuple[3].as_ref()),
            "masked_device_id"
        );
        prop_assert_eq!(
            tuple[5].as_ref().map(Vec::len),
            Some(4),
            "app_version is an integer"
        );
        prop_assert_eq!(
            tuple[6].as_ref().map(Vec::len),
            Some(4),
            "create_date is a date"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_input_ends_as_one_row_or_one_dead_letter(
        inputs in proptest::collection::vec(input(), 1..24),
        packed in any::<bool>(),
        mode in prop_oneof![
            Just(MaskMode::HmacSha256),
            Just(MaskMode::SaltedSha256),
            Just(MaskMode::AesSiv),
        ],
    ) {
        let versions = if packed { AppVersionMode::Packed } else { AppVersionMode::Major };
        check(inputs, mode, versions)?;
    }
}

/// The bodies mutated above are valid to begin with, so the property is not met by rejecting all.
#[test]
fn the_bodies_mutated_start_valid() {
    let inputs: Vec<Vec<u8>> = VALID.iter().map(|b| b.as_bytes().to_vec()).collect();
    let transformer = Transformer::new(
        masker(MaskMode::AesSiv),
        AppVersionMode::Packed,
        CreateDateMode::SentTime,
    );
    let out = transformer.transform_chunk(parse_chunk(from_source(&inputs)));
    assert_eq!(out.items.len(), VALID.len(), "{:?}", out.rejects);
}
