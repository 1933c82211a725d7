//! Test and demo traffic: realistic login events, and getting them onto the configured source.

pub mod generate;
pub mod kinesis;
pub mod send;
