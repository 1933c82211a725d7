//! Mask and transform: a validated [`LoginEvent`] becomes a [`LoginRow`] shaped like `user_logins`.
//!
//! This stage holds everything that depends on configuration (mask key and mode, version encoding,
//! which date to use), so that the parse stage stays a pure function of the body. A version that does
//! not fit the configured integer encoding is rejected here, with the reason, never truncated.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::mpsc;

use crate::envelope::{Chunk, Reject, Stage};
use crate::stage::mask::{Masked, Masker};
use crate::stage::parse::LoginEvent;
use crate::stage::seal::PLAINTEXT_MAX;
use crate::stats::Stats;

/// How `app_version` becomes the integer column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppVersionMode {
    /// The major part: `"6.4.8"` → 6, `"0.96"` → 0.
    #[default]
    Major,
    /// `major·1_000_000 + minor·1_000 + patch`: order-preserving and reversible; a version with more
    /// than three parts, a minor or patch above 999, or a total beyond `integer` is rejected.
    Packed,
}

/// Where `create_date` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateDateMode {
    /// The body's `create_date` if it is a valid `YYYY-MM-DD`, else the UTC date on which the source
    /// accepted the message (SQS `SentTimestamp`), so replaying a backlog keeps each login's date.
    #[default]
    SentTime,
    /// The UTC date on which sluice processes the message.
    ProcessingTime,
}

/// One row of `user_logins`. The text columns are read from the event, which owns the body.
#[derive(Debug, Clone)]
pub struct LoginRow {
    pub event: LoginEvent,
    pub masked_ip: Masked,
    pub masked_device_id: Masked,
    pub app_version: i32,
    pub create_date: NaiveDate,
}

/// What the transform adds to an event to make its row.
struct Derived {
    masked_ip: Masked,
    masked_device_id: Masked,
    app_version: i32,
    create_date: NaiveDate,
}

impl Derived {
    #[inline]
    fn into_row(self, event: LoginEvent) -> LoginRow {
        LoginRow {
            event,
            masked_ip: self.masked_ip,
            masked_device_id: self.masked_device_id,
            app_version: self.app_version,
            create_date: self.create_date,
        }
    }
}

/// Why an event cannot become a row under the configured transform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    #[error("field `app_version` {0:?}: major part does not fit an integer column")]
    MajorTooLarge(String),
    #[error(
        "field `app_version` {0:?} does not fit the packed form (at most 3 parts, minor and patch 0-999, total at most 2147483647)"
    )]
    PackedDoesNotFit(String),
    #[error(
        "field `{field}` is {bytes} bytes long; sealed (mask.mode = \"aes-siv\") it would not fit its masked column, which holds values of at most {PLAINTEXT_MAX} bytes"
    )]
    TooLongToSeal { field: &'static str, bytes: usize },
}

/// Turns events into rows; cheap to clone, one per stage worker.
#[derive(Clone)]
pub struct Transformer {
    masker: Masker,
    app_version: AppVersionMode,
    create_date: CreateDateMode,
}

impl Transformer {
    pub fn new(masker: Masker, app_version: AppVersionMode, create_date: CreateDateMode) -> Self {
        Transformer {
            masker,
            app_version,
            create_date,
        }
    }

    /// `today` is passed in so a chunk reads the clock once.
    pub fn transform(
        &self,
        event: LoginEvent,
        today: NaiveDate,
    ) -> Result<LoginRow, Box<(LoginEvent, TransformError)>> {
        match self.derive(&event, today) {
            Ok(derived) => Ok(derived.into_row(event)),
            Err(e) => Err(Box::new((event, e))),
        }
    }

    /// What the row adds to `event`. Computed from a borrowed event so that the event itself is
    /// moved once, into its row, instead of in and out of this function as well.
    fn derive(&self, event: &LoginEvent, today: NaiveDate) -> Result<Derived, TransformError> {
        let app_version = encode_version(event.app_version(), self.app_version)?;
        let create_date = match self.create_date {
            CreateDateMode::ProcessingTime => today,
            CreateDateMode::SentTime => event
                .create_date()
                .and_then(parse_iso_date)
                .or_else(|| event.meta.sent_at_ms.and_then(utc_date_of_millis))
                .unwrap_or(today),
        };
        let masked_ip =
            self.masker
                .mask_ip(event.ip)
                .ok_or_else(|| TransformError::TooLongToSeal {
                    field: "ip",
                    bytes: event.ip.to_string().len(),
                })?;
        let masked_device_id = self
            .masker
            .mask(event.device_id().as_bytes())
            .ok_or_else(|| TransformError::TooLongToSeal {
                field: "device_id",
                bytes: event.device_id().len(),
            })?;
        Ok(Derived {
            masked_ip,
            masked_device_id,
            app_version,
            create_date,
        })
    }

    pub fn transform_chunk(&self, chunk: Chunk<LoginEvent>) -> Chunk<LoginRow> {
        let today = Utc::now().date_naive();
        let mut rows = Vec::with_capacity(chunk.items.len());
        let mut rejects = chunk.rejects;
        for event in chunk.items {
            match self.derive(&event, today) {
                Ok(derived) => rows.push(derived.into_row(event)),
                Err(e) => {
                    let (body, meta) = event.into_body_and_meta();
                    rejects.push(Reject {
                        body,
                        meta,
                        stage: Stage::Transform,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Chunk {
            items: rows,
            rejects,
        }
    }
}

/// Encodes a syntactically valid version (digits and dots, checked by the parse stage).
pub fn encode_version(version: &str, mode: AppVersionMode) -> Result<i32, TransformError> {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or_default();
    match mode {
        AppVersionMode::Major => major
            .parse::<i32>()
            .map_err(|_| TransformError::MajorTooLarge(version.to_owned())),
        AppVersionMode::Packed => {
            let does_not_fit = || TransformError::PackedDoesNotFit(version.to_owned());
            let part = |p: Option<&str>, max: i64| -> Result<i64, TransformError> {
                match p {
                    None => Ok(0),
                    Some(p) => p
                        .parse::<i64>()
                        .ok()
                        .filter(|v| *v <= max)
                        .ok_or_else(does_not_fit),
                }
            };
            let major = part(Some(major), i64::from(i32::MAX))?;
            let minor = part(parts.next(), 999)?;
            let patch = part(parts.next(), 999)?;
            if parts.next().is_some() {
                return Err(does_not_fit());
            }
            i32::try_from(major * 1_000_000 + minor * 1_000 + patch).map_err(|_| does_not_fit())
        }
    }
}

/// `YYYY-MM-DD` exactly (ten characters, a real calendar date).
pub fn parse_iso_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

fn utc_date_of_millis(ms: i64) -> Option<NaiveDate> {
    DateTime::from_timestamp_millis(ms).map(|t| t.date_naive())
}

/// The mask/transform stage as a task.
pub async fn run_transform_stage(
    transformer: Transformer,
    mut input: mpsc::Receiver<Chunk<LoginEvent>>,
    output: mpsc::Sender<Chunk<LoginRow>>,
    stats: Arc<Stats>,
) {
    while let Some(chunk) = input.recv().await {
        let rows = transformer.transform_chunk(chunk);
        stats.record_transformed(rows.items.len());
        if output.send(rows).await.is_err() {
            tracing::warn!("transform stage: downstream stage stopped; dropping out");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_mode_takes_the_first_part() {
        for (v, want) in [
            ("6.4.8", 6),
            ("0.96", 0),
            ("2.00", 2),
            ("12", 12),
            ("007.1", 7),
        ] {
            assert_eq!(encode_version(v, AppVersionMode::Major), Ok(want), "{v}");
        }
        assert!(encode_version("3000000000.1", AppVersionMode::Major).is_err());
    }

    #[test]
    fn packed_mode_is_order_preserving_and_rejects_what_does_not_fit() {
        for (v, want) in [
            ("6.4.8", 6_004_008),
            ("0.96", 96_000),
            ("2.00", 2_000_000),
            ("2", 2_000_000),
            ("2147.483.647", i32::MAX),
        ] {
            assert_eq!(encode_version(v, AppVersionMode::Packed), Ok(want), "{v}");
        }
        for v in [
            "1.1000",
            "1.2.1000",
            "1.2.3.4",
            "2147.483.648",
            "99999999999",
        ] {
            assert!(encode_version(v, AppVersionMode::Packed).is_err(), "{v}");
        }
        let a = encode_version("1.10.0", AppVersionMode::Packed).expect("fits");
        let b = encode_version("1.9.999", AppVersionMode::Packed).expect("fits");
        assert!(a > b);
    }

    #[test]
    fn iso_dates_are_strict() {
        assert_eq!(
            parse_iso_date("2024-02-29"),
            NaiveDate::from_ymd_opt(2024, 2, 29)
        );
        for bad in [
            "2023-02-29",
            "2024-2-29",
            "2024-02-29T00:00",
            "20240229",
            "",
            "yesterday",
        ] {
            assert_eq!(parse_iso_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn sent_time_is_read_in_utc() {
        // 2024-03-01T23:59:59.999Z and one millisecond later.
        assert_eq!(
            utc_date_of_millis(1_709_337_599_999),
            NaiveDate::from_ymd_opt(2024, 3, 1)
        );
        assert_eq!(
            utc_date_of_millis(1_709_337_600_000),
            NaiveDate::from_ymd_opt(2024, 3, 2)
        );
    }
}
