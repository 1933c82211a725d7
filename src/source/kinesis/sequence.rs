//! Kinesis sequence numbers, ordered as the numbers they are.
//!
//! A sequence number is a decimal string of up to 129 digits (the API documents the pattern
//! `0|([1-9]\d{0,128})`). It is far wider than any machine integer, and comparing the strings would be
//! wrong whenever two numbers differ in length ("9" sorts after "10"). So the text is checked once when
//! it enters sluice and compared by length first, then digit by digit, which is numeric order for
//! canonical decimals. The text is kept as the service gave it (behind an `Arc`, because every message
//! of a record carries a copy) so it can be handed back to `GetShardIterator` and stored in
//! PostgreSQL's `numeric` unchanged.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest sequence number the API allows.
const MAX_DIGITS: usize = 129;

/// A validated Kinesis sequence number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Arc<str>);

/// Text that is not a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a Kinesis sequence number (a decimal of 1 to 129 digits without leading zeros)"
)]
pub struct InvalidSequenceNumber {
    pub text: String,
}

impl SequenceNumber {
    /// Checks `text` against the documented pattern.
    pub fn parse(text: &str) -> Result<SequenceNumber, InvalidSequenceNumber> {
        let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        let canonical = text == "0" || !text.starts_with('0');
        if digits_only && canonical && text.len() <= MAX_DIGITS {
            Ok(SequenceNumber(Arc::from(text)))
        } else {
            Err(InvalidSequenceNumber {
                text: text.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    /// Numeric order: canonical decimals compare by length, then digit by digit.
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.as_bytes().cmp(other.0.as_bytes()))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        SequenceNumber::parse(text)
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).expect("valid sequence number")
    }

    #[test]
    fn shorter_numbers_are_smaller_even_when_their_text_sorts_later() {
        assert!(seq("9") < seq("10"));
        assert!("9" > "10", "the string order this type must not use");
        assert!(
            seq("49590338271490256608559692538361571095921575989136588898")
                > seq("9223372036854775807")
        );
    }

    #[test]
    fn equal_lengths_compare_digit_by_digit() {
        let a = seq("49590338271490256608559692538361571095921575989136588898");
        let b = seq("49590338271490256608559692540925702759324208523137515618");
        assert!(a < b);
        assert_eq!(a.cmp(&a.clone()), Ordering::Equal);
        assert_eq!(seq("0").cmp(&seq("0")), Ordering::Equal);
        assert!(seq("0") < seq("1"));
    }

    #[test]
    fn the_widest_documented_number_is_accepted_and_ordered() {
        let widest = format!("1{}", "0".repeat(128));
        let below = "9".repeat(128);
        assert!(seq(&widest) > seq(&below));
        assert_eq!(seq(&widest).as_str(), widest);
    }

    #[test]
    fn anything_but_a_canonical_decimal_is_refused() {
        for bad in [
            "",
            "-1",
            "+1",
            "01",
            "00",
            "1.0",
            "1e5",
            " 1",
            "12a",
            "١٢",
            &format!("1{}", "0".repeat(129)),
        ] {
            assert!(SequenceNumber::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sorting_a_list_orders_it_numerically() {
        let mut list = [seq("100"), seq("99"), seq("1000"), seq("0"), seq("101")];
        list.sort();
        let texts: Vec<&str> = list.iter().map(SequenceNumber::as_str).collect();
        assert_eq!(texts, ["0", "99", "100", "101", "1000"]);
    }
}
