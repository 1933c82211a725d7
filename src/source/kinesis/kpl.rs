//! De-aggregation of records written by the Kinesis Producer Library (KPL).
//!
//! To get past the per-record overhead, the KPL packs many user records into one Kinesis record:
//! the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the 16-byte MD5 of the protobuf
//! bytes. Each user record is a message of its own for sluice. The messages are described here as
//! plain structs with `prost` derives (the format is three small messages, so no `.proto` build step).
//!
//! Anything that is not a whole, intact aggregate is a plain record: a producer may well write data
//! that happens to start with the magic bytes, and a damaged aggregate must still reach the pipeline,
//! where it is dead-lettered with its reason instead of vanishing. So a failed check never drops data,
//! it only means "deliver these bytes as they are".

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes that open every aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// The KPL's container message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// One user record inside an aggregate; keys are indexes into the aggregate's tables.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// A user record taken out of an aggregate, keys resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// Why a record is delivered as it is rather than as user records.
#[derive(Debug, thiserror::Error)]
pub enum NotAggregated {
    /// The usual case: a record written without aggregation.
    #[error("no KPL magic bytes")]
    NoMagic,
    #[error("KPL magic bytes but too short for a digest")]
    TooShort,
    #[error("KPL aggregate whose MD5 does not match its contents")]
    DigestMismatch,
    #[error("KPL aggregate that is not a valid AggregatedRecord")]
    Malformed(#[source] prost::DecodeError),
    #[error("KPL aggregate whose record {record} names key index {index} outside its table")]
    BadIndex { record: usize, index: u64 },
    #[error("KPL aggregate with no user records")]
    Empty,
}

/// The user records packed in `data`, in order, or why `data` is a plain record.
pub fn deaggregate(data: &[u8]) -> Result<Vec<UserRecord>, NotAggregated> {
    let Some(rest) = data.strip_prefix(&MAGIC) else {
        return Err(NotAggregated::NoMagic);
    };
    if rest.len() < DIGEST_LEN {
        return Err(NotAggregated::TooShort);
    }
    let (message, digest) = rest.split_at(rest.len() - DIGEST_LEN);
    if Md5::digest(message).as_slice() != digest {
        return Err(NotAggregated::DigestMismatch);
    }
    let aggregate = AggregatedRecord::decode(message).map_err(NotAggregated::Malformed)?;
    if aggregate.records.is_empty() {
        return Err(NotAggregated::Empty);
    }
    resolve(aggregate)
}

fn resolve(aggregate: AggregatedRecord) -> Result<Vec<UserRecord>, NotAggregated> {
    let AggregatedRecord {
        partition_key_table,
        explicit_hash_key_table,
        records,
    } = aggregate;
    let lookup = |table: &[String], record: usize, index: u64| {
        usize::try_from(index)
            .ok()
            .and_then(|i| table.get(i))
            .cloned()
            .ok_or(NotAggregated::BadIndex { record, index })
    };
    records
        .into_iter()
        .enumerate()
        .map(|(n, record)| {
            let explicit_hash_key = match record.explicit_hash_key_index {
                Some(index) => Some(lookup(&explicit_hash_key_table, n, index)?),
                None => None,
            };
            Ok(UserRecord {
                partition_key: lookup(&partition_key_table, n, record.partition_key_index)?,
                explicit_hash_key,
                data: record.data,
            })
        })
        .collect()
}

/// Packs user records the way the KPL does: keys in shared tables, magic bytes in front, MD5 behind.
/// sluice reads aggregates rather than writing them; this is how producers and tests make them.
pub fn aggregate(records: &[UserRecord]) -> Vec<u8> {
    let mut message = AggregatedRecord::default();
    for record in records {
        let partition_key_index = index_in(&mut message.partition_key_table, &record.partition_key);
        let explicit_hash_key_index = record
            .explicit_hash_key
            .as_ref()
            .map(|key| index_in(&mut message.explicit_hash_key_table, key));
        message.records.push(Record {
            partition_key_index,
            explicit_hash_key_index,
            data: record.data.clone(),
            tags: Vec::new(),
        });
    }
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + body.len() + DIGEST_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(Md5::digest(&body).as_slice());
    out
}

/// The index of `key` in `table`, appending it when new.
fn index_in(table: &mut Vec<String>, key: &str) -> u64 {
    let position = match table.iter().position(|k| k == key) {
        Some(i) => i,
        None => {
            table.push(key.to_owned());
            table.len() - 1
        }
    };
    position as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(key: &str, data: &str) -> UserRecord {
        UserRecord {
            partition_key: key.into(),
            explicit_hash_key: None,
            data: data.as_bytes().to_vec(),
        }
    }

    /// An aggregate built by hand from the documented layout, independent of [`aggregate`].
    fn documented_layout(message: &AggregatedRecord) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0xF3, 0x89, 0x9A, 0xC2];
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }

    #[test]
    fn user_records_come_out_in_order_with_their_keys() {
        let message = AggregatedRecord {
            partition_key_table: vec!["user-1".into(), "user-2".into()],
            explicit_hash_key_table: vec!["170141183460469231731687303715884105728".into()],
            records: vec![
                Record {
                    partition_key_index: 1,
                    explicit_hash_key_index: None,
                    data: b"{\"a\":1}".to_vec(),
                    tags: vec![],
                },
                Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: Some(0),
                    data: b"{\"a\":2}".to_vec(),
                    tags: vec![Tag {
                        key: "k".into(),
                        value: Some("v".into()),
                    }],
                },
            ],
        };
        let records = deaggregate(&documented_layout(&message)).expect("an aggregate");
        assert_eq!(
            records,
            vec![
                user("user-2", "{\"a\":1}"),
                UserRecord {
                    explicit_hash_key: Some("170141183460469231731687303715884105728".into()),
                    ..user("user-1", "{\"a\":2}")
                },
            ]
        );
    }

    #[test]
    fn aggregate_round_trips_and_shares_repeated_keys() {
        let records: Vec<UserRecord> = (0..50)
            .map(|i| user(&format!("user-{}", i % 3), &format!("{{\"n\":{i}}}")))
            .collect();
        let packed = aggregate(&records);
        assert_eq!(packed[..4], MAGIC);
        let body = &packed[4..packed.len() - 16];
        let decoded = AggregatedRecord::decode(body).expect("protobuf");
        assert_eq!(decoded.partition_key_table.len(), 3);
        assert_eq!(deaggregate(&packed).expect("an aggregate"), records);
    }

    #[test]
    fn a_wrong_digest_makes_it_a_plain_record() {
        let mut packed = aggregate(&[user("k", "x")]);
        let last = packed.len() - 1;
        packed[last] ^= 0xFF;
        assert!(matches!(
            deaggregate(&packed),
            Err(NotAggregated::DigestMismatch)
        ));
    }

    #[test]
    fn changed_contents_fail_the_digest() {
        let mut packed = aggregate(&[user("k", "hello")]);
        let middle = packed.len() - 18;
        packed[middle] ^= 0x01;
        assert!(matches!(
            deaggregate(&packed),
            Err(NotAggregated::DigestMismatch)
        ));
    }

    #[test]
    fn truncated_aggregates_are_plain_records() {
        let packed = aggregate(&[user("k", "hello"), user("j", "world")]);
        assert!(matches!(
            deaggregate(&packed[..10]),
            Err(NotAggregated::TooShort)
        ));
        assert!(matches!(
            deaggregate(&packed[..packed.len() - 1]),
            Err(NotAggregated::DigestMismatch)
        ));
        assert!(matches!(deaggregate(&MAGIC), Err(NotAggregated::TooShort)));
    }

    #[test]
    fn intact_digest_over_bytes_that_are_not_protobuf_is_a_plain_record() {
        let garbage = [0xFFu8, 0xFF, 0xFF, 0xFF, 0x0F];
        let mut packed = MAGIC.to_vec();
        packed.extend_from_slice(&garbage);
        packed.extend_from_slice(&Md5::digest(garbage));
        assert!(matches!(
            deaggregate(&packed),
            Err(NotAggregated::Malformed(_))
        ));
    }

    #[test]
    fn an_index_outside_the_key_table_is_a_plain_record() {
        let message = AggregatedRecord {
            partition_key_table: vec!["only".into()],
            explicit_hash_key_table: vec![],
            records: vec![Record {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: b"x".to_vec(),
                tags: vec![],
            }],
        };
        assert!(matches!(
            deaggregate(&documented_layout(&message)),
            Err(NotAggregated::BadIndex {
                record: 0,
                index: 3
            })
        ));
    }

    #[test]
    fn an_aggregate_without_user_records_is_a_plain_record() {
        let packed = documented_layout(&AggregatedRecord::default());
        assert!(matches!(deaggregate(&packed), Err(NotAggregated::Empty)));
    }

    #[test]
    fn ordinary_records_are_not_aggregates() {
        assert!(matches!(
            deaggregate(br#"{"user_id":"u1"}"#),
            Err(NotAggregated::NoMagic)
        ));
        assert!(matches!(deaggregate(b""), Err(NotAggregated::NoMagic)));
        assert!(matches!(
            deaggregate(&MAGIC[..3]),
            Err(NotAggregated::NoMagic)
        ));
    }
}
