//! Inputs shared by the benchmarks: realistic message bodies, their envelopes, parsed events and
//! transformed rows, built the same way for every benchmark so that their numbers can be compared.
//!
//! The bodies come from the seed generator (repeat users and devices, shared addresses, `null`
//! locales, two-part versions, IPv6, and a message of the wrong type every [`BAD_EVERY`]), with a
//! hand-made odd body every [`ODD_EVERY`] messages: some valid but unusual, some rejects. About 2.4%
//! of the messages are rejects, which is what the parse stage sees in practice.

#![allow(dead_code)] // each bench target uses part of this module

use std::time::{Duration, SystemTime};

use sluice::envelope::{Chunk, Envelope, Meta};
use sluice::seed::generate::LoginGenerator;
use sluice::stage::mask::{MaskKey, MaskMode, Masker};
use sluice::stage::parse::{LoginEvent, parse_chunk};
use sluice::stage::transform::{AppVersionMode, CreateDateMode, LoginRow, Transformer};

/// The key the benchmarks mask with (any key of 16+ bytes costs the same).
pub const BENCH_KEY: &[u8] = b"capacity-bench-mask-key-0123456789";

/// A message of the wrong type every this many generated messages (as `sluice seed --bad-every`).
pub const BAD_EVERY: u64 = 50;

/// A hand-made body every this many messages (a prime, so it does not line up with [`BAD_EVERY`]).
pub const ODD_EVERY: usize = 97;

/// Unusual bodies: the first three are valid, the last two are rejected by the parse stage.
pub const ODD_BODIES: &[&str] = &[
    // null locale
    r#"{"user_id": "0f3e1c52-1a7d-4c1e-9d55-3b2f6a1e9c10", "app_version": "2.3.0", "device_type": "android", "ip": "10.11.12.13", "locale": null, "device_id": "123-45-6789"}"#,
    // two-part version with a leading zero major
    r#"{"user_id": "6b1d9f0a-8c44-4e0b-a3f2-1d2e3f405162", "app_version": "0.96", "device_type": "ios", "ip": "172.16.254.1", "locale": "DE", "device_id": "987-65-4321"}"#,
    // IPv6, written in upper case and unabbreviated
    r#"{"user_id": "a7c3e5f1-2b4d-4f60-8e9a-0b1c2d3e4f50", "app_version": "6.4.8", "device_type": "android", "ip": "2001:0DB8:0000:0000:0000:FF00:0042:8329", "locale": "JP", "device_id": "555-12-3456"}"#,
    // not an address: rejected
    r#"{"user_id": "c1d2e3f4-a5b6-4c7d-8e9f-a0b1c2d3e4f5", "app_version": "3.0.1", "device_type": "ios", "ip": "999.1.2.3", "locale": "US", "device_id": "111-22-3333"}"#,
    // locale longer than its column: rejected
    r#"{"user_id": "d4e5f6a7-b8c9-4dae-bf01-23456789abcd", "app_version": "2.4.0", "device_type": "android", "ip": "198.51.100.7", "locale": "en-US-x-a-very-long-private-use-subtag", "device_id": "222-33-4444"}"#,
];

/// `n` message bodies, deterministic for `seed`.
pub fn bodies(n: usize, seed: u64) -> Vec<String> {
    let mut generator = LoginGenerator::new(seed, Some(BAD_EVERY));
    (0..n)
        .map(|i| {
            if (i + 1) % ODD_EVERY == 0 {
                ODD_BODIES[(i / ODD_EVERY) % ODD_BODIES.len()].to_owned()
            } else {
                generator.next_body()
            }
        })
        .collect()
}

/// A sent timestamp like SQS's `SentTimestamp` (2024-11-19, UTC), so the transform takes the row's
/// date from the message as it does for live traffic.
pub const SENT_AT_MS: i64 = 1_732_000_000_000;

/// The envelope a file or memory source would build for the message at `position` (1-based).
pub fn envelope(body: String, position: u64, received_at: SystemTime) -> Envelope {
    let mut meta = Meta::at_position(position, received_at);
    meta.sent_at_ms = Some(SENT_AT_MS + position as i64);
    Envelope { body, meta }
}

pub fn envelopes(bodies: &[String]) -> Vec<Envelope> {
    let now = SystemTime::now();
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| envelope(b.clone(), i as u64 + 1, now))
        .collect()
}

/// The default transformer (major version, date from the sent time) with the given mask mode.
pub fn transformer(mode: MaskMode) -> Transformer {
    Transformer::new(
        Masker::new(mode, &MaskKey::from_bytes(BENCH_KEY)).expect("a hash key"),
        AppVersionMode::Major,
        CreateDateMode::SentTime,
    )
}

/// The valid events among `bodies`, and how many bodies were rejected.
pub fn events(bodies: &[String]) -> (Vec<LoginEvent>, usize) {
    let parsed = parse_chunk(Chunk::new(envelopes(bodies)));
    (parsed.items, parsed.rejects.len())
}

/// The rows the pipeline would load for `bodies` (HMAC-SHA256 masks).
pub fn rows(bodies: &[String]) -> Vec<LoginRow> {
    let (events, _) = events(bodies);
    transformer(MaskMode::HmacSha256)
        .transform_chunk(Chunk::new(events))
        .items
}

/// Splits a vector into chunks of `size` (the last one may be shorter).
pub fn into_chunks<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut chunks = Vec::with_capacity(items.len().div_ceil(size.max(1)));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size.max(1)).collect());
    }
    chunks
}

/// Reads a duration in seconds from the environment (for shortening or lengthening a run), else
/// the default.
pub fn seconds_from_env(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}
