//! Parse and validate: a message body becomes a [`LoginEvent`] or a precise reject reason.
//!
//! The body is parsed once, borrowing from it: a field without JSON escapes is remembered as a byte
//! range of the body, not copied, so a valid message costs no allocation here beyond the chunk's
//! vector. Every field is first read as "whatever JSON value it is", so the reason can say which field
//! is wrong and how, rather than repeating serde's type error.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::sync::mpsc;

use crate::envelope::{Chunk, Envelope, Meta, Reject, Stage};
use crate::stats::Stats;

/// Column limits of the fixed `user_logins` DDL, in characters.
pub use crate::login_table::{DEVICE_TYPE_MAX, LOCALE_MAX, USER_ID_MAX};

/// A validated login event. Its text fields point into the original body, which it owns, or, for the
/// rare value written with JSON escapes, into `decoded`.
#[derive(Debug, Clone)]
pub struct LoginEvent {
    body: String,
    pub meta: Meta,
    fields: Fields,
    /// Parsed here so that the mask stage works on the address, not on how it was written.
    pub ip: IpAddr,
}

impl LoginEvent {
    pub fn user_id(&self) -> &str {
        self.fields.user_id.get(&self.body, &self.fields.decoded)
    }
    pub fn device_type(&self) -> &str {
        self.fields
            .device_type
            .get(&self.body, &self.fields.decoded)
    }
    pub fn device_id(&self) -> &str {
        self.fields.device_id.get(&self.body, &self.fields.decoded)
    }
    pub fn locale(&self) -> Option<&str> {
        self.fields
            .locale
            .map(|t| t.get(&self.body, &self.fields.decoded))
    }
    /// Syntactically valid: dot-separated decimal parts. Whether it fits an integer is the transform's
    /// concern, since that depends on the configured encoding.
    pub fn app_version(&self) -> &str {
        self.fields
            .app_version
            .get(&self.body, &self.fields.decoded)
    }
    /// The body's own `create_date` string, if it had one (unvalidated: the transform decides).
    pub fn create_date(&self) -> Option<&str> {
        self.fields
            .create_date
            .map(|t| t.get(&self.body, &self.fields.decoded))
    }
    pub fn body(&self) -> &str {
        &self.body
    }
    /// Gives the body back, for a reject raised after parsing.
    pub fn into_body_and_meta(self) -> (String, Meta) {
        (self.body, self.meta)
    }
}

/// A string field as a byte range: of the body when the value had no escapes (nearly always), of the
/// event's decoded text when it had. Eight bytes, so events stay small as they move between stages.
#[derive(Debug, Clone, Copy)]
struct Text {
    /// Start offset; the top bit set means "in the decoded text".
    start: u32,
    end: u32,
}

const IN_DECODED: u32 = 1 << 31;

impl Text {
    fn get<'a>(self, body: &'a str, decoded: &'a str) -> &'a str {
        let (source, start) = if self.start & IN_DECODED == 0 {
            (body, self.start)
        } else {
            (decoded, self.start & !IN_DECODED)
        };
        // The range was taken on char boundaries of this very text when it was parsed.
        source
            .get(start as usize..self.end as usize)
            .unwrap_or_default()
    }

    /// Where `value` lives: serde_json hands out slices of the body for plain strings; decoded ones
    /// are appended to `decoded`. Bodies are far below 2 GiB, so offsets fit in 31 bits.
    fn locate(value: Cow<'_, str>, body: &str, decoded: &mut String) -> Text {
        if let Cow::Borrowed(s) = &value {
            let start = (s.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
            let end = start.wrapping_add(s.len());
            if end <= body.len() && end < IN_DECODED as usize {
                return Text {
                    start: start as u32,
                    end: end as u32,
                };
            }
        }
        let start = decoded.len();
        decoded.push_str(&value);
        Text {
            start: start as u32 | IN_DECODED,
            end: decoded.len() as u32,
        }
    }
}

/// Why a body is not a usable login event. The text is what lands in the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is empty")]
    EmptyBody,
    #[error("body is not a JSON object (found {0})")]
    NotAnObject(&'static str),
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` must be a string, found {found}")]
    WrongType {
        field: &'static str,
        found: &'static str,
    },
    #[error("field `{0}` is empty")]
    Empty(&'static str),
    #[error("field `{field}` is {chars} characters long, the column holds at most {max}")]
    TooLong {
        field: &'static str,
        chars: usize,
        max: usize,
    },
    #[error("field `{0}` contains a NUL character, which PostgreSQL text cannot hold")]
    NulCharacter(&'static str),
    #[error("field `ip` is not an IPv4 or IPv6 address")]
    InvalidIp,
    #[error("field `ip` is not an IPv4 or IPv6 address: it carries a zone id (`%…`)")]
    IpZoneId,
    #[error(
        "field `ip` is not an IPv4 or IPv6 address: a part has a leading zero (octal or decimal?)"
    )]
    IpLeadingZero,
    #[error("body starts with a byte-order mark (U+FEFF), which JSON text must not")]
    ByteOrderMark,
    #[error("body is JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("field `app_version` is not dot-separated decimal numbers: {0:?}")]
    InvalidVersion(String),
}

/// Bodies longer than this (SQS allows 256 KiB) are rejected before parsing.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Deepest nesting of arrays and objects accepted anywhere in a body. serde_json stops at 128
/// levels in the values it builds, but skips the fields sluice ignores without any limit: the
/// body is measured first, so a deep body is refused with this reason wherever the depth is.
pub const MAX_DEPTH: usize = 128;

/// Parses and validates one message body.
/// A failure hands the envelope back (boxed: the failure path is the rare one) for its dead letter.
pub fn parse_login(envelope: Envelope) -> Result<LoginEvent, Box<(Envelope, ParseError)>> {
    match validate(&envelope.body) {
        Ok((fields, ip)) => Ok(LoginEvent::new(envelope, fields, ip)),
        Err(e) => Err(Box::new((envelope, e))),
    }
}

impl LoginEvent {
    #[inline]
    fn new(envelope: Envelope, fields: Fields, ip: IpAddr) -> LoginEvent {
        LoginEvent {
            body: envelope.body,
            meta: envelope.meta,
            fields,
            ip,
        }
    }
}

/// The validated fields, as ranges of the body (or of `decoded`).
#[derive(Debug, Clone)]
struct Fields {
    /// Decoded values of escaped fields, one after another; empty (no allocation) for most events.
    decoded: String,
    user_id: Text,
    device_type: Text,
    device_id: Text,
    locale: Option<Text>,
    app_version: Text,
    create_date: Option<Text>,
}

fn validate(body: &str) -> Result<(Fields, IpAddr), ParseError> {
    if body.starts_with('\u{feff}') {
        return Err(ParseError::ByteOrderMark);
    }
    if nested_deeper_than(body.as_bytes(), MAX_DEPTH) {
        return Err(ParseError::TooDeep);
    }
    match body.trim_start().as_bytes().first() {
        None => return Err(ParseError::EmptyBody),
        Some(b'{') => {}
        Some(_) => {
            let found = serde_json::from_str::<JsonValue>(body)
                .map(|v| v.kind())
                .map_err(|e| ParseError::InvalidJson(e.to_string()))?;
            return Err(ParseError::NotAnObject(found));
        }
    }
    let raw: RawLogin<'_> =
        serde_json::from_str(body).map_err(|e| ParseError::InvalidJson(e.to_string()))?;

    let user_id = required(raw.user_id, "user_id", Some(USER_ID_MAX))?;
    let device_type = required(raw.device_type, "device_type", Some(DEVICE_TYPE_MAX))?;
    let ip_text = required(raw.ip, "ip", None)?;
    let device_id = required(raw.device_id, "device_id", None)?;
    let app_version = required(raw.app_version, "app_version", None)?;
    let locale = match raw.locale {
        JsonValue::Missing | JsonValue::Null => None,
        JsonValue::Str(s) => Some(checked(s, "locale", Some(LOCALE_MAX), true)?),
        other => return Err(wrong_type("locale", &other)),
    };
    let ip: IpAddr = ip_text.parse().map_err(|_| ip_problem(&ip_text))?;
    if !is_version(&app_version) {
        return Err(ParseError::InvalidVersion(app_version.into_owned()));
    }
    let mut decoded = String::new();
    let mut at = |value| Text::locate(value, body, &mut decoded);
    let create_date = match raw.create_date {
        JsonValue::Str(s) => Some(at(s)),
        _ => None,
    };
    let user_id = at(user_id);
    let device_type = at(device_type);
    let device_id = at(device_id);
    let locale = locale.map(&mut at);
    let app_version = at(app_version);
    let fields = Fields {
        decoded,
        user_id,
        device_type,
        device_id,
        locale,
        app_version,
        create_date,
    };
    Ok((fields, ip))
}

fn required<'a>(
    value: JsonValue<'a>,
    field: &'static str,
    max_chars: Option<usize>,
) -> Result<Cow<'a, str>, ParseError> {
    match value {
        JsonValue::Str(s) => checked(s, field, max_chars, false),
        JsonValue::Missing => Err(ParseError::Missing(field)),
        other => Err(wrong_type(field, &other)),
    }
}

fn checked<'a>(
    s: Cow<'a, str>,
    field: &'static str,
    max_chars: Option<usize>,
    empty_ok: bool,
) -> Result<Cow<'a, str>, ParseError> {
    if s.is_empty() && !empty_ok {
        return Err(ParseError::Empty(field));
    }
    if let Some(max) = max_chars {
        // Byte length bounds the character count from above: count only when it might matter.
        if s.len() > max {
            let chars = s.chars().count();
            if chars > max {
                return Err(ParseError::TooLong { field, chars, max });
            }
        }
    }
    // Raw JSON text cannot hold a NUL byte; only an escaped `\u0000` can produce one.
    if matches!(s, Cow::Owned(_)) && s.contains('\0') {
        return Err(ParseError::NulCharacter(field));
    }
    Ok(s)
}

/// Why a string is not an address, where a common near miss can be named: a zone id
/// (`fe80::1%eth0`, meaningful only on the host that wrote it) or an IPv4 part with a leading zero
/// (`010.0.0.1`, which some parsers read as octal and others as decimal).
fn ip_problem(text: &str) -> ParseError {
    if text.contains('%') {
        return ParseError::IpZoneId;
    }
    let dotted = text.rsplit(':').next().unwrap_or_default();
    let parts: Vec<&str> = dotted.split('.').collect();
    let decimal = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() == 4
        && parts.iter().all(decimal)
        && parts.iter().any(|p| p.len() > 1 && p.starts_with('0'))
    {
        return ParseError::IpLeadingZero;
    }
    ParseError::InvalidIp
}

/// Whether arrays and objects nest deeper than `max` anywhere in `body`, brackets inside strings
/// not counted. This runs for every message, before any parsing: a body with at most `max`
/// opening brackets in all (nearly every one) is cleared by a SIMD search that stops at the
/// `max + 1`th (a byte-by-byte count cost about 700 instructions per message), and only the rest
/// are walked with the string state.
fn nested_deeper_than(body: &[u8], max: usize) -> bool {
    if memchr::memchr2_iter(b'[', b'{', body).nth(max).is_none() {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn wrong_type(field: &'static str, value: &JsonValue<'_>) -> ParseError {
    ParseError::WrongType {
        field,
        found: value.kind(),
    }
}

/// `1`, `0.96`, `2.3.0`: one or more non-empty runs of ASCII digits joined by dots. One pass over the
/// bytes: this runs for every message.
fn is_version(s: &str) -> bool {
    let mut after_digit = false;
    for b in s.bytes() {
        match b {
            b'0'..=b'9' => after_digit = true,
            b'.' if after_digit => after_digit = false,
            _ => return false,
        }
    }
    after_digit
}

/// The fields sluice reads; everything else in the body is skipped without being built. A field
/// that is absent stays [`JsonValue::Missing`]; strings borrow from the body where they can.
#[derive(Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct RawLogin<'a> {
    user_id: JsonValue<'a>,
    device_type: JsonValue<'a>,
    ip: JsonValue<'a>,
    device_id: JsonValue<'a>,
    locale: JsonValue<'a>,
    app_version: JsonValue<'a>,
    create_date: JsonValue<'a>,
}

/// Any JSON value, reduced to what validation needs: the string itself, or just its kind.
#[derive(Default)]
enum JsonValue<'a> {
    #[default]
    Missing,
    Null,
    Str(Cow<'a, str>),
    Other(&'static str),
}

impl JsonValue<'_> {
    fn kind(&self) -> &'static str {
        match self {
            JsonValue::Missing => "nothing",
            JsonValue::Null => "null",
            JsonValue::Str(_) => "a string",
            JsonValue::Other(kind) => kind,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonValue<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonValueVisitor(std::marker::PhantomData))
    }
}

struct JsonValueVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for JsonValueVisitor<'a> {
    type Value = JsonValue<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(JsonValue::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(JsonValue::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(JsonValue::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(JsonValue::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(JsonValue::Null)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(JsonValue::Other("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(JsonValue::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(JsonValue::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(JsonValue::Other("a number"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(JsonValue::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(JsonValue::Other("an object"))
    }
}

/// Parses a whole chunk: good events go on, failures join the chunk's rejects.
pub fn parse_chunk(chunk: Chunk<Envelope>) -> Chunk<LoginEvent> {
    let mut events = Vec::with_capacity(chunk.items.len());
    let mut rejects = chunk.rejects;
    for envelope in chunk.items {
        if envelope.body.len() > MAX_BODY_BYTES {
            let reason = format!(
                "body is {} bytes, more than the {MAX_BODY_BYTES} accepted",
                envelope.body.len()
            );
            rejects.push(reject(envelope, reason));
            continue;
        }
        // Validated from a borrowed body, so the envelope is moved once, into its event.
        match validate(&envelope.body) {
            Ok((fields, ip)) => events.push(LoginEvent::new(envelope, fields, ip)),
            Err(e) => rejects.push(reject(envelope, e.to_string())),
        }
    }
    Chunk {
        items: events,
        rejects,
    }
}

fn reject(envelope: Envelope, reason: String) -> Reject {
    Reject {
        body: envelope.body,
        meta: envelope.meta,
        stage: Stage::Parse,
        reason,
    }
}

/// The parse stage as a task: runs until its input closes, then closes its output.
pub async fn run_parse_stage(
    mut input: mpsc::Receiver<Chunk<Envelope>>,
    output: mpsc::Sender<Chunk<LoginEvent>>,
    stats: std::sync::Arc<Stats>,
) {
    while let Some(chunk) = input.recv().await {
        let parsed = parse_chunk(chunk);
        stats.record_parsed(parsed.items.len(), parsed.rejects.len());
        if output.send(parsed).await.is_err() {
            tracing::warn!("parse stage: downstream stage stopped; dropping out");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn envelope(body: &str) -> Envelope {
        Envelope {
            body: body.to_owned(),
            meta: Meta::at_position(1, SystemTime::now()),
        }
    }

    fn parse(body: &str) -> Result<LoginEvent, ParseError> {
        parse_login(envelope(body)).map_err(|failed| failed.1)
    }

    const GOOD: &str = r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#;

    #[test]
    fn accepts_the_documented_example() {
        let e = parse(GOOD).expect("valid");
        assert_eq!(e.user_id(), "424cdd21-063a-43a7-b91b-7ca1a833afae");
        assert_eq!(e.device_type(), "android");
        assert_eq!(e.device_id(), "593-47-5928");
        assert_eq!(e.locale(), Some("RU"));
        assert_eq!(e.app_version(), "2.3.0");
        assert_eq!(e.ip.to_string(), "199.172.111.135");
        assert_eq!(e.create_date(), None);
    }

    /// An empty string is a value the producer sent, kept as sent: only `null` or absence mean
    /// "no locale" (NULL).
    #[test]
    fn an_empty_locale_is_kept_as_an_empty_string() {
        let e = parse(r#"{"user_id":"u","device_type":"ios","ip":"::1","device_id":"d","app_version":"1","locale":""}"#).expect("valid");
        assert_eq!(e.locale(), Some(""));
    }

    #[test]
    fn null_or_absent_locale_is_none_and_extra_fields_are_ignored() {
        let e = parse(r#"{"user_id":"u","device_type":"ios","ip":"::1","device_id":"d","app_version":"0.96","locale":null,"extra":{"a":[1,2]}}"#).expect("valid");
        assert_eq!(e.locale(), None);
        let e = parse(r#"{"user_id":"u","device_type":"ios","ip":"::1","device_id":"d","app_version":"2.00"}"#).expect("valid");
        assert_eq!(e.locale(), None);
        assert_eq!(e.app_version(), "2.00");
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let e = parse(r#"{"user_id":"a\"b\u00e9","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}"#).expect("valid");
        assert_eq!(e.user_id(), "a\"bé");
    }

    #[test]
    fn escaped_and_plain_fields_mix() {
        let e = parse(r#"{"user_id":"\u0075-1","device_type":"ios","ip":"1.2.3.4","device_id":"d\/2","app_version":"1.0","locale":"R\u0055"}"#).expect("valid");
        assert_eq!(
            (
                e.user_id(),
                e.device_type(),
                e.device_id(),
                e.app_version(),
                e.locale()
            ),
            ("u-1", "ios", "d/2", "1.0", Some("RU"))
        );
    }

    #[test]
    fn wrong_message_type_names_the_first_missing_field() {
        assert_eq!(
            parse(r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#).unwrap_err(),
            ParseError::Missing("user_id")
        );
    }

    #[test]
    fn every_reason_is_precise() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::EmptyBody),
            ("  ", ParseError::EmptyBody),
            ("[1,2]", ParseError::NotAnObject("an array")),
            ("\"text\"", ParseError::NotAnObject("a string")),
            ("42", ParseError::NotAnObject("a number")),
            (
                r#"{"user_id":5,"device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}"#,
                ParseError::WrongType {
                    field: "user_id",
                    found: "a number",
                },
            ),
            (
                r#"{"user_id":"u","device_type":null,"ip":"1.2.3.4","device_id":"d","app_version":"1"}"#,
                ParseError::WrongType {
                    field: "device_type",
                    found: "null",
                },
            ),
            (
                r#"{"user_id":"","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}"#,
                ParseError::Empty("user_id"),
            ),
            (
                r#"{"user_id":"u","device_type":"ios","ip":"999.1.1.1","device_id":"d","app_version":"1"}"#,
                ParseError::InvalidIp,
            ),
            (
                r#"{"user_id":"u","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1.x"}"#,
                ParseError::InvalidVersion("1.x".into()),
            ),
            (
                r#"{"user_id":"u","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1..2"}"#,
                ParseError::InvalidVersion("1..2".into()),
            ),
            (
                r#"{"user_id":"u","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1","locale":7}"#,
                ParseError::WrongType {
                    field: "locale",
                    found: "a number",
                },
            ),
            (
                r#"{"user_id":"u\u0000","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}"#,
                ParseError::NulCharacter("user_id"),
            ),
            (
                r#"{"user_id":"u","device_type":"ios","ip":"1.2.3.4","app_version":"1"}"#,
                ParseError::Missing("device_id"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(&parse(body).unwrap_err(), want, "body {body}");
        }
    }

    /// Near misses of an address are named; valid forms of the same addresses still parse.
    #[test]
    fn addresses_near_misses_are_named() {
        let with_ip = |ip: &str| {
            format!(
                r#"{{"user_id":"u","device_type":"ios","ip":"{ip}","device_id":"d","app_version":"1"}}"#
            )
        };
        for (ip, want) in [
            ("fe80::1%eth0", Some(ParseError::IpZoneId)),
            ("10.0.0.1%1", Some(ParseError::IpZoneId)),
            ("010.0.0.1", Some(ParseError::IpLeadingZero)),
            ("10.0.0.01", Some(ParseError::IpLeadingZero)),
            ("::ffff:10.00.0.1", Some(ParseError::IpLeadingZero)),
            ("10.0.0.1.5", Some(ParseError::InvalidIp)),
            ("10.0.0.0", None),
            ("fe80::1", None),
            ("::ffff:10.0.0.1", None),
        ] {
            assert_eq!(parse(&with_ip(ip)).err(), want, "{ip}");
        }
    }

    /// Depth is measured before parsing, brackets inside strings not counted, so a deep value in a
    /// field sluice ignores is refused too; a body at the limit parses.
    #[test]
    fn depth_is_bounded_wherever_the_nesting_is() {
        let fields =
            r#""user_id":"u","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1""#;
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let at_limit = format!("{{{fields},\"x\":{}}}", nested(MAX_DEPTH - 1));
        assert!(parse(&at_limit).is_ok());
        let too_deep = format!("{{{fields},\"x\":{}}}", nested(MAX_DEPTH));
        assert_eq!(parse(&too_deep).unwrap_err(), ParseError::TooDeep);
        assert_eq!(parse(&nested(10_000)).unwrap_err(), ParseError::TooDeep);
        let brackets_in_a_string = format!("{{{fields},\"x\":\"{}\\\"\"}}", "[".repeat(10_000));
        assert!(parse(&brackets_in_a_string).is_ok());
        let bom = format!("\u{feff}{{{fields}}}");
        assert_eq!(parse(&bom).unwrap_err(), ParseError::ByteOrderMark);
    }

    #[test]
    fn lengths_are_counted_in_characters_and_never_truncated() {
        let ok = "é".repeat(USER_ID_MAX); // 256 bytes, 128 characters
        let body = format!(
            r#"{{"user_id":"{ok}","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}}"#
        );
        assert_eq!(parse(&body).expect("fits").user_id(), ok);
        let long = "x".repeat(LOCALE_MAX + 1);
        let body = format!(
            r#"{{"user_id":"u","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1","locale":"{long}"}}"#
        );
        assert_eq!(
            parse(&body).unwrap_err(),
            ParseError::TooLong {
                field: "locale",
                chars: 33,
                max: LOCALE_MAX
            }
        );
    }

    #[test]
    fn broken_json_and_duplicates_are_invalid_json() {
        assert!(matches!(
            parse(r#"{"user_id": "#).unwrap_err(),
            ParseError::InvalidJson(_)
        ));
        let dup = r#"{"user_id":"u","user_id":"v","device_type":"ios","ip":"1.2.3.4","device_id":"d","app_version":"1"}"#;
        match parse(dup).unwrap_err() {
            ParseError::InvalidJson(msg) => {
                assert!(msg.contains("duplicate field `user_id`"), "{msg}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn versions_are_digit_runs_joined_by_dots() {
        for ok in ["1", "0.96", "2.00", "2.3.0", "10.20.30.40"] {
            assert!(is_version(ok), "{ok}");
        }
        for bad in ["", ".", "1.", ".1", "1..2", "1.x", "v1", "1 .2", "１"] {
            assert!(!is_version(bad), "{bad}");
        }
    }

    #[test]
    fn parse_chunk_keeps_every_message() {
        let chunk = Chunk::new(vec![envelope(GOOD), envelope("{}"), envelope(GOOD)]);
        let out = parse_chunk(chunk);
        assert_eq!(out.items.len(), 2);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].reason, "missing field `user_id`");
        assert_eq!(out.rejects[0].stage, Stage::Parse);
    }
}
