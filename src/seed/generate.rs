//! Realistic login events, deterministic for a given seed.
//!
//! Real traffic repeats itself: users log in again from the same device and address, several users
//! share an address behind a NAT, old app versions linger. The generator reproduces that (so masked
//! duplicates show up in the table as they would in production) along with the oddities the parser
//! must handle: `null` locales, two-part versions, IPv6, and, on request, messages of another type.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

/// The message of the wrong type that `--bad-every` interleaves.
pub const WRONG_TYPE_MESSAGE: &str = r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#;

const VERSIONS: &[&str] = &[
    "2.3.0", "2.3.0", "2.3.1", "2.4.0", "2.4.0", "3.0.0", "3.0.1", "0.96", "2.00", "6.4.8", "5.2",
    "4.1.12",
];
const LOCALES: &[&str] = &[
    "US", "US", "RU", "DE", "FR", "BR", "IN", "JP", "GB", "CA", "MX", "ES", "IT", "KR", "NL", "PL",
    "TR", "AU",
];

#[derive(Serialize)]
struct Login<'a> {
    user_id: &'a str,
    app_version: &'a str,
    device_type: &'a str,
    ip: &'a str,
    locale: Option<&'a str>,
    device_id: &'a str,
}

/// A user as the generator remembers them, to log them in again.
#[derive(Clone)]
struct User {
    id: String,
    device_type: &'static str,
    device_id: String,
    ip: String,
    locale: Option<&'static str>,
    version: &'static str,
}

pub struct LoginGenerator {
    rng: StdRng,
    bad_every: Option<u64>,
    produced: u64,
    known: Vec<User>,
}

impl LoginGenerator {
    pub fn new(seed: u64, bad_every: Option<u64>) -> LoginGenerator {
        LoginGenerator {
            rng: StdRng::seed_from_u64(seed),
            bad_every: bad_every.filter(|k| *k > 0),
            produced: 0,
            known: Vec::new(),
        }
    }

    /// The next message body.
    pub fn next_body(&mut self) -> String {
        self.produced += 1;
        if self
            .bad_every
            .is_some_and(|k| self.produced.is_multiple_of(k))
        {
            return WRONG_TYPE_MESSAGE.to_owned();
        }
        let user = self.next_user();
        let login = Login {
            user_id: &user.id,
            app_version: user.version,
            device_type: user.device_type,
            ip: &user.ip,
            locale: user.locale,
            device_id: &user.device_id,
        };
        serde_json::to_string(&login).unwrap_or_else(|_| unreachable!("plain strings serialize"))
    }

    fn next_user(&mut self) -> User {
        // A third of logins come from someone seen before, mostly unchanged.
        if !self.known.is_empty() && self.rng.random_bool(0.33) {
            let i = self.rng.random_range(0..self.known.len());
            let mut user = self.known[i].clone();
            if self.rng.random_bool(0.2) {
                user.ip = self.ip();
            }
            return user;
        }
        let user = User {
            id: uuid::Builder::from_random_bytes(self.rng.random())
                .into_uuid()
                .to_string(),
            device_type: if self.rng.random_bool(0.55) {
                "android"
            } else {
                "ios"
            },
            device_id: format!(
                "{:03}-{:02}-{:04}",
                self.rng.random_range(0..1000),
                self.rng.random_range(0..100),
                self.rng.random_range(0..10000)
            ),
            ip: self.shared_or_new_ip(),
            locale: if self.rng.random_bool(0.06) {
                None
            } else {
                LOCALES.choose(&mut self.rng).copied()
            },
            version: VERSIONS.choose(&mut self.rng).copied().unwrap_or("2.3.0"),
        };
        if self.known.len() < 50_000 {
            self.known.push(user.clone());
        }
        user
    }

    /// One in ten new users shares an address with an earlier one (a household, an office NAT).
    fn shared_or_new_ip(&mut self) -> String {
        if !self.known.is_empty() && self.rng.random_bool(0.1) {
            let i = self.rng.random_range(0..self.known.len());
            return self.known[i].ip.clone();
        }
        self.ip()
    }

    fn ip(&mut self) -> String {
        if self.rng.random_bool(0.05) {
            let groups: [u16; 4] = self.rng.random();
            format!(
                "2001:db8:{:x}:{:x}::{:x}:{:x}",
                groups[0], groups[1], groups[2], groups[3]
            )
        } else {
            let o: [u8; 4] = self.rng.random();
            format!("{}.{}.{}.{}", o[0].max(1), o[1], o[2], o[3].max(1))
        }
    }
}

impl Iterator for LoginGenerator {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        Some(self.next_body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, Meta};
    use crate::stage::parse::parse_login;

    #[test]
    fn the_same_seed_gives_the_same_messages() {
        let a: Vec<String> = LoginGenerator::new(7, None).take(50).collect();
        let b: Vec<String> = LoginGenerator::new(7, None).take(50).collect();
        let c: Vec<String> = LoginGenerator::new(8, None).take(50).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_generated_login_is_valid_and_bad_ones_come_every_k() {
        for (i, body) in LoginGenerator::new(1, Some(10)).take(1000).enumerate() {
            let envelope = Envelope {
                body: body.clone(),
                meta: Meta::at_position(i as u64, std::time::SystemTime::now()),
            };
            let valid = parse_login(envelope).is_ok();
            assert_eq!(valid, (i + 1) % 10 != 0, "message {i}: {body}");
        }
    }

    #[test]
    fn repeats_exist_so_masked_duplicates_show() {
        let bodies: Vec<String> = LoginGenerator::new(3, None).take(500).collect();
        let device_ids: std::collections::HashSet<String> = bodies
            .iter()
            .map(|b| {
                serde_json::from_str::<serde_json::Value>(b).expect("json")["device_id"].to_string()
            })
            .collect();
        assert!(
            device_ids.len() < 450,
            "expected repeated devices, got {}",
            device_ids.len()
        );
    }
}
