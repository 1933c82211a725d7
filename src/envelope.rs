//! What flows between the pipeline's stages.
//!
//! Every message carries its [`Meta`] from the source to the sink untouched: the stages transform the
//! payload, never the acknowledgement data, so that acknowledging stays the source's business and the
//! sink can hand back exactly what it committed. Stages exchange [`Chunk`]s (one SQS receive, one file
//! slice) rather than single messages, so a channel hop is paid once per chunk.

use std::fmt;
use std::time::SystemTime;

/// How the message is acknowledged at its source once its row or dead-letter record is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckToken {
    /// Nothing to acknowledge (file and in-memory sources).
    None,
    /// An SQS message, deleted with its receipt handle.
    Sqs { receipt_handle: String },
    /// A Kinesis record's message, acknowledged by the shard checkpoint its batch commits.
    Kinesis(crate::source::kinesis::KinesisAck),
}

/// Identity, timing and acknowledgement data of one message, carried through every stage.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The source's own id.
    pub message_id: MessageId,
    /// A producer-chosen idempotency key (SQS message attribute); the dedupe ledger keys a loaded
    /// message on it when present, so a producer that sends the same event twice is deduplicated too.
    pub dedupe_key: Option<String>,
    /// When the source accepted the message (SQS `SentTimestamp`), in milliseconds since the Unix epoch.
    pub sent_at_ms: Option<i64>,
    /// When sluice received it.
    pub received_at: SystemTime,
    /// How many times the source has handed this message out (SQS `ApproximateReceiveCount`).
    pub receive_count: u32,
    pub ack: AckToken,
}

impl Meta {
    /// A message known by its position in a file or list, with nothing to acknowledge.
    pub fn at_position(position: u64, received_at: SystemTime) -> Meta {
        Meta {
            message_id: MessageId::Position(position),
            dedupe_key: None,
            sent_at_ms: None,
            received_at,
            receive_count: 1,
            ack: AckToken::None,
        }
    }
}

impl Meta {
    /// Where the message stands in its source's own order, for sources whose committed position
    /// covers everything before it: a file's line, a Kinesis record's place in its shard. `None`
    /// for sources without one (SQS). Compared only between messages of one chunk.
    pub fn source_order(&self) -> Option<SourceOrder<'_>> {
        match (&self.message_id, &self.ack) {
            (MessageId::Position(n), _) => Some(SourceOrder::Position(*n)),
            (_, AckToken::Kinesis(ack)) => {
                let (sequence, user_record) = ack.order();
                Some(SourceOrder::Shard(sequence, user_record))
            }
            _ => None,
        }
    }
}

/// A message's place in its source's order (see [`Meta::source_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceOrder<'a> {
    /// Its position in a file.
    Position(u64),
    /// A Kinesis record's sequence number, and the user record's index within a KPL aggregate.
    Shard(&'a crate::source::kinesis::sequence::SequenceNumber, usize),
}

/// A message's identity at its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageId {
    /// An id the source assigned (SQS `MessageId`).
    Text(String),
    /// The 1-based position in a file (line of NDJSON, element of a JSON array). Kept as a number so
    /// that reading a file formats nothing per message.
    Position(u64),
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageId::Text(id) => f.write_str(id),
            MessageId::Position(n) => write!(f, "#{n}"),
        }
    }
}

/// A raw message as the source delivered it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub body: String,
    pub meta: Meta,
}

/// The stage that turned a message away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Source,
    Parse,
    Transform,
    Sink,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Parse => "parse",
            Stage::Transform => "transform",
            Stage::Sink => "sink",
        }
    }
}

/// A message that cannot be loaded, on its way to the dead-letter table with the reason.
///
/// Rejects travel in the same chunk as the good rows, so the sink commits both in one transaction and
/// the acknowledgement rule (nothing leaves the source before it is committed) holds for both alike.
#[derive(Debug, Clone)]
pub struct Reject {
    pub body: String,
    pub meta: Meta,
    pub stage: Stage,
    pub reason: String,
}

/// A group of messages moving from one stage to the next, plus the rejects gathered so far.
#[derive(Debug)]
pub struct Chunk<T> {
    pub items: Vec<T>,
    pub rejects: Vec<Reject>,
}

impl<T> Chunk<T> {
    pub fn new(items: Vec<T>) -> Self {
        Chunk {
            items,
            rejects: Vec::new(),
        }
    }

    /// Messages in the chunk, good and rejected.
    pub fn len(&self) -> usize {
        self.items.len() + self.rejects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.rejects.is_empty()
    }
}
