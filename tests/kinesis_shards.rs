//! Shard discovery and shard readers against the Kinesis emulator: every record read once from each
//! shard, KPL aggregates taken apart, and resharding (a split and a merge) seen the way the API
//! documents it: closed parents end without a next iterator, children carry on.

mod kinesis_common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kinesis_common::{Put, TestStream};
use sluice::envelope::{AckToken, Chunk, Envelope, MessageId, Reject, Stage};
use sluice::shutdown::Shutdown;
use sluice::source::kinesis::KinesisAck;
use sluice::source::kinesis::api::{KinesisApi, StreamRef};
use sluice::source::kinesis::kpl::{UserRecord, aggregate};
use sluice::source::kinesis::lease::{LeaseClaim, LeaseScope};
use sluice::source::kinesis::position::StartPosition;
use sluice::source::kinesis::reader::{ReadEnd, ReaderSettings, ShardReader};
use sluice::source::kinesis::sequence::SequenceNumber;
use sluice::source::kinesis::shards::{ShardGraph, list_shards};
use sluice::table_name::TableName;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

fn api(stream: &TestStream) -> Arc<dyn KinesisApi> {
    Arc::new(stream.client.clone())
}

fn stream_ref(stream: &TestStream) -> StreamRef {
    StreamRef::Name(stream.name.clone())
}

/// A claim for reading without a lease table: these tests exercise reading, not leasing.
fn claim(stream: &TestStream, shard_id: &str) -> Arc<LeaseClaim> {
    Arc::new(LeaseClaim {
        scope: Arc::new(LeaseScope {
            table: TableName::unqualified("unused"),
            application: "test".into(),
            stream: stream.name.clone(),
        }),
        shard_id: shard_id.into(),
        owner: Arc::from("test"),
        epoch: 1,
        duration: std::time::Duration::from_secs(30),
    })
}

fn logins(n: usize, tag: &str) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let user = format!("{tag}-user-{i}");
            let body = format!(r#"{{"user_id":"{user}","n":{i}}}"#);
            (user, body.into_bytes())
        })
        .collect()
}

/// What a reader delivered, and how it ended.
struct Read {
    messages: Vec<Envelope>,
    rejects: Vec<Reject>,
    end: ReadEnd,
}

/// Reads `shard_id` from `start` until `expected` messages arrived and, for a closed shard, until
/// the reader reports its end; an open shard's reader is stopped once everything arrived.
async fn read_shard(
    stream: &TestStream,
    shard_id: &str,
    start: StartPosition,
    expected: usize,
    closed: bool,
) -> Read {
    let reader = ShardReader::new(
        api(stream),
        stream_ref(stream),
        claim(stream, shard_id),
        start,
        ReaderSettings {
            max_records_per_call: 7,
            idle_poll_interval: Duration::from_millis(200),
            ..ReaderSettings::default()
        },
    );
    let (tx, mut rx) = mpsc::channel::<Chunk<Envelope>>(4);
    let stop = Shutdown::new();
    let task = tokio::spawn(reader.run(tx, stop.clone()));
    let mut messages = Vec::new();
    let mut rejects = Vec::new();
    while messages.len() + rejects.len() < expected {
        let chunk = tokio::time::timeout(LIMIT, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{shard_id}: {} of {expected} messages after {LIMIT:?}",
                    messages.len()
                )
            })
            .unwrap_or_else(|| {
                panic!("{shard_id}: reader ended after {} messages", messages.len())
            });
        messages.extend(chunk.items);
        rejects.extend(chunk.rejects);
    }
    if !closed {
        stop.stop();
    }
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("reader ends")
        .expect("join")
        .expect("read");
    // Nothing more than expected: the channel holds no further message.
    while let Ok(chunk) = rx.try_recv() {
        messages.extend(chunk.items);
        rejects.extend(chunk.rejects);
    }
    Read {
        messages,
        rejects,
        end,
    }
}

fn ack(envelope: &Envelope) -> &KinesisAck {
    match &envelope.meta.ack {
        AckToken::Kinesis(ack) => ack,
        other => panic!("not a Kinesis token: {other:?}"),
    }
}

fn puts_on<'a>(puts: &'a [Put], shard_id: &str) -> Vec<&'a Put> {
    puts.iter().filter(|p| p.shard_id == shard_id).collect()
}

fn seq(text: &str) -> SequenceNumber {
    SequenceNumber::parse(text).expect("valid sequence number")
}

#[tokio::test]
async fn every_record_is_read_once_from_each_shard_in_order() {
    let stream = TestStream::new(4).await;
    let puts = stream.put(&logins(200, "r")).await;
    let graph = list_shards(api(&stream).as_ref(), &stream_ref(&stream))
        .await
        .expect("ListShards");
    assert_eq!(graph.len(), 4);
    assert_eq!(
        graph.readable(&HashSet::new()).len(),
        4,
        "no parents, all readable"
    );

    // One reader per shard, all at once, as the source runs them.
    let reads = futures::future::join_all(graph.shards().map(|shard| {
        let expected = puts_on(&puts, &shard.shard_id).len();
        read_shard(
            &stream,
            &shard.shard_id,
            StartPosition::TrimHorizon,
            expected,
            false,
        )
    }))
    .await;
    let mut total = 0;
    for (shard, read) in graph.shards().zip(reads) {
        let expected = puts_on(&puts, &shard.shard_id);
        assert_eq!(read.end, ReadEnd::Stopped);
        assert!(read.rejects.is_empty(), "{:?}", read.rejects);
        let got: Vec<(String, Vec<u8>)> = read
            .messages
            .iter()
            .map(|e| (ack(e).sequence.to_string(), e.body.clone().into_bytes()))
            .collect();
        let want: Vec<(String, Vec<u8>)> = expected
            .iter()
            .map(|p| (p.sequence_number.clone(), p.data.clone()))
            .collect();
        assert_eq!(
            got, want,
            "shard {}: each record once, in order",
            shard.shard_id
        );
        for (envelope, put) in read.messages.iter().zip(&expected) {
            assert_eq!(
                envelope.meta.message_id,
                MessageId::Text(format!("{}/{}", put.shard_id, put.sequence_number))
            );
            assert!(envelope.meta.sent_at_ms.is_some(), "arrival time carried");
        }
        total += read.messages.len();
    }
    assert_eq!(total, 200);
}

#[tokio::test]
async fn a_reader_resumes_right_after_its_checkpoint() {
    let stream = TestStream::new(1).await;
    let puts = stream.put(&logins(10, "c")).await;
    let shard = puts[0].shard_id.clone();
    let checkpoint = StartPosition::AfterSequence(seq(&puts[3].sequence_number));
    let read = read_shard(&stream, &shard, checkpoint, 6, false).await;
    assert!(read.rejects.is_empty(), "{:?}", read.rejects);
    let sequences: Vec<String> = read
        .messages
        .iter()
        .map(|e| ack(e).sequence.to_string())
        .collect();
    let want: Vec<String> = puts[4..]
        .iter()
        .map(|p| p.sequence_number.clone())
        .collect();
    assert_eq!(sequences, want);
}

#[tokio::test]
async fn kpl_aggregates_are_read_as_their_user_records() {
    let stream = TestStream::new(1).await;
    let users: Vec<UserRecord> = (0..5)
        .map(|i| UserRecord {
            partition_key: format!("user-{i}"),
            explicit_hash_key: None,
            data: format!(r#"{{"user_id":"user-{i}"}}"#).into_bytes(),
        })
        .collect();
    let mut corrupt = aggregate(&users[..2]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xFF;
    let puts = stream
        .put(&[
            ("agg".into(), aggregate(&users)),
            ("plain".into(), br#"{"user_id":"plain"}"#.to_vec()),
            ("corrupt".into(), corrupt.clone()),
        ])
        .await;
    let shard = puts[0].shard_id.clone();
    let read = read_shard(
        &stream,
        &shard,
        StartPosition::TrimHorizon,
        5 + 1 + 1,
        false,
    )
    .await;
    let bodies: Vec<&str> = read.messages.iter().map(|e| e.body.as_str()).collect();
    assert_eq!(
        bodies,
        [
            r#"{"user_id":"user-0"}"#,
            r#"{"user_id":"user-1"}"#,
            r#"{"user_id":"user-2"}"#,
            r#"{"user_id":"user-3"}"#,
            r#"{"user_id":"user-4"}"#,
            r#"{"user_id":"plain"}"#,
        ]
    );
    let ids: Vec<String> = read
        .messages
        .iter()
        .map(|e| e.meta.message_id.to_string())
        .collect();
    assert_eq!(ids[4], format!("{shard}/{}:4", puts[0].sequence_number));
    assert_eq!(ids[5], format!("{shard}/{}", puts[1].sequence_number));
    let completes: Vec<bool> = read
        .messages
        .iter()
        .map(|e| ack(e).completes_record)
        .collect();
    assert_eq!(completes, [false, false, false, false, true, true]);

    // The aggregate whose MD5 fails goes through whole, as one plain record; being binary, it is
    // turned away at the source with its reason rather than lost.
    assert_eq!(read.rejects.len(), 1);
    let reject = &read.rejects[0];
    assert_eq!(reject.stage, Stage::Source);
    assert_eq!(reject.reason, "record data is not UTF-8 text");
    assert_eq!(
        reject.meta.message_id,
        MessageId::Text(format!("{shard}/{}", puts[2].sequence_number))
    );
}

/// Reads each of `shards` to its end from its trim horizon; returns every body read.
async fn drain_closed(stream: &TestStream, puts: &[Put], shards: &[&str]) -> Vec<String> {
    let mut bodies = Vec::new();
    for shard in shards {
        let expected = puts_on(puts, shard).len();
        let read = read_shard(stream, shard, StartPosition::TrimHorizon, expected, true).await;
        assert!(read.rejects.is_empty(), "{:?}", read.rejects);
        let last = read.messages.last().map(|e| ack(e).sequence.clone());
        assert_eq!(
            read.end,
            ReadEnd::ShardEnded {
                last_read: last.clone(),
                end_delivered: last.is_some()
            },
            "{shard} ends without a next iterator"
        );
        if let Some(e) = read.messages.last() {
            assert!(ack(e).ends_shard, "the end rides on the last message");
        }
        bodies.extend(read.messages.into_iter().map(|e| e.body));
    }
    bodies
}

#[tokio::test]
async fn a_split_parent_is_read_to_its_end_and_its_children_take_the_new_records() {
    let stream = TestStream::new(1).await;
    let before = stream.put(&logins(20, "before")).await;
    let parent = before[0].shard_id.clone();
    stream.split(&parent).await;
    let after = stream.put(&logins(20, "after")).await;
    assert!(
        after.iter().all(|p| p.shard_id != parent),
        "records written after the split go to the children"
    );

    let graph: ShardGraph = list_shards(api(&stream).as_ref(), &stream_ref(&stream))
        .await
        .expect("ListShards");
    assert_eq!(graph.len(), 3);
    assert!(graph.get(&parent).expect("parent listed").closed);
    let children: Vec<&str> = graph
        .shards()
        .filter(|s| s.parents().any(|p| p == parent))
        .map(|s| s.shard_id.as_str())
        .collect();
    assert_eq!(children.len(), 2);
    assert_eq!(
        graph.readable(&HashSet::new()),
        [parent.as_str()],
        "children wait"
    );

    let from_parent = drain_closed(&stream, &before, &[&parent]).await;
    assert_eq!(from_parent.len(), 20);

    // Read again from its last record: the end comes on an empty page, with nothing to deliver.
    let last = seq(&before[19].sequence_number);
    let again = read_shard(
        &stream,
        &parent,
        StartPosition::AfterSequence(last.clone()),
        0,
        true,
    )
    .await;
    assert_eq!(
        again.end,
        ReadEnd::ShardEnded {
            last_read: Some(last),
            end_delivered: false
        }
    );

    let finished: HashSet<String> = [parent.clone()].into();
    let mut readable = graph.readable(&finished);
    readable.sort();
    let mut want = children.clone();
    want.sort();
    assert_eq!(readable, want);
    let mut from_children = Vec::new();
    for child in &children {
        let expected = puts_on(&after, child).len();
        let read = read_shard(&stream, child, StartPosition::TrimHorizon, expected, false).await;
        assert_eq!(read.end, ReadEnd::Stopped, "open children do not end");
        from_children.extend(read.messages.into_iter().map(|e| e.body));
    }
    from_children.sort();
    let mut want: Vec<String> = after
        .iter()
        .map(|p| String::from_utf8(p.data.clone()).expect("utf-8"))
        .collect();
    want.sort();
    assert_eq!(
        from_children, want,
        "every record written after the split, once"
    );
}

#[tokio::test]
async fn a_merged_child_is_readable_only_after_both_parents_end() {
    let stream = TestStream::new(2).await;
    let before = stream.put(&logins(30, "m")).await;
    let graph = list_shards(api(&stream).as_ref(), &stream_ref(&stream))
        .await
        .expect("ListShards");
    let parents: Vec<String> = graph.shards().map(|s| s.shard_id.clone()).collect();
    stream.merge(&parents[0], &parents[1]).await;
    let after = stream.put(&logins(10, "n")).await;

    let graph = list_shards(api(&stream).as_ref(), &stream_ref(&stream))
        .await
        .expect("ListShards");
    let child = graph
        .shards()
        .find(|s| s.parents().count() == 2)
        .expect("a merged child")
        .shard_id
        .clone();
    assert!(after.iter().all(|p| p.shard_id == child));
    let mut first = graph.readable(&HashSet::new());
    first.sort();
    assert_eq!(first, [parents[0].as_str(), parents[1].as_str()]);
    assert_eq!(
        graph.readable(&[parents[0].clone()].into()),
        [parents[1].as_str()],
        "one parent finished is not enough"
    );

    let parent_ids: Vec<&str> = parents.iter().map(String::as_str).collect();
    let bodies = drain_closed(&stream, &before, &parent_ids).await;
    assert_eq!(bodies.len(), 30);
    let finished: HashSet<String> = parents.iter().cloned().collect();
    assert_eq!(graph.readable(&finished), [child.as_str()]);
    let read = read_shard(&stream, &child, StartPosition::TrimHorizon, 10, false).await;
    assert_eq!(read.messages.len(), 10);
}
