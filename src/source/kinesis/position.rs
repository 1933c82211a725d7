//! Where reading a shard begins.
//!
//! A checkpoint always wins: the shard resumes right after the last committed record
//! (`AFTER_SEQUENCE_NUMBER`), so nothing committed is read twice and nothing after it is skipped.
//! Without one, the configured initial position applies, with one exception: a shard whose parent
//! this application has read to its end continues the parent's data, so it starts at its trim
//! horizon whatever the configuration says. Starting such a child at `LATEST` would silently skip
//! what was written to it between the reshard and the moment its reader started.

use super::sequence::SequenceNumber;

/// The configured start for shards the application has never read (`start_position`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitialPosition {
    /// The oldest record the stream still retains.
    #[default]
    TrimHorizon,
    /// Only records written after the reader starts.
    Latest,
    /// Records that arrived at or after this time (milliseconds since the Unix epoch).
    AtTimestamp { millis: i64 },
}

/// How a shard iterator is requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    TrimHorizon,
    Latest,
    AtTimestamp { millis: i64 },
    AfterSequence(SequenceNumber),
}

/// The start for a shard with `checkpoint` (its last committed sequence number, if any);
/// `parent_read_to_end` tells whether this application finished reading one of its parents.
pub fn start_position(
    checkpoint: Option<&SequenceNumber>,
    parent_read_to_end: bool,
    initial: InitialPosition,
) -> StartPosition {
    match (checkpoint, parent_read_to_end, initial) {
        (Some(sequence), _, _) => StartPosition::AfterSequence(sequence.clone()),
        (None, true, _) | (None, false, InitialPosition::TrimHorizon) => StartPosition::TrimHorizon,
        (None, false, InitialPosition::Latest) => StartPosition::Latest,
        (None, false, InitialPosition::AtTimestamp { millis }) => {
            StartPosition::AtTimestamp { millis }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).expect("valid")
    }

    #[test]
    fn a_checkpoint_resumes_after_itself_whatever_the_configuration() {
        for initial in [
            InitialPosition::TrimHorizon,
            InitialPosition::Latest,
            InitialPosition::AtTimestamp { millis: 5 },
        ] {
            for parent in [false, true] {
                assert_eq!(
                    start_position(Some(&seq("42")), parent, initial),
                    StartPosition::AfterSequence(seq("42"))
                );
            }
        }
    }

    #[test]
    fn without_a_checkpoint_the_configured_position_applies() {
        assert_eq!(
            start_position(None, false, InitialPosition::TrimHorizon),
            StartPosition::TrimHorizon
        );
        assert_eq!(
            start_position(None, false, InitialPosition::Latest),
            StartPosition::Latest
        );
        assert_eq!(
            start_position(None, false, InitialPosition::AtTimestamp { millis: 7 }),
            StartPosition::AtTimestamp { millis: 7 }
        );
    }

    #[test]
    fn a_child_of_a_shard_read_to_its_end_starts_at_its_trim_horizon() {
        for initial in [
            InitialPosition::TrimHorizon,
            InitialPosition::Latest,
            InitialPosition::AtTimestamp { millis: 7 },
        ] {
            assert_eq!(
                start_position(None, true, initial),
                StartPosition::TrimHorizon
            );
        }
    }
}
