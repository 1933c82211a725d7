//! Rows to PostgreSQL's binary COPY format.
//!
//! tokio-postgres offers `BinaryCopyInWriter`, but it encodes row by row into a live COPY stream
//! through dynamic `ToSql` dispatch. Encoding into a plain buffer instead lets the sink prepare the
//! next batch while the current one commits, lets a benchmark measure encoding alone, and writes the
//! masks' hex straight into the buffer. The format itself is small and fixed: a header, per row a
//! field count and length-prefixed big-endian fields, a trailer
//! (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{Datelike, NaiveDate};

use crate::login_table;
use crate::stage::mask::{Masked, to_hex};
use crate::stage::transform::LoginRow;
use crate::table_name::TableName;

/// Fields per row: the columns of [`login_table::COLUMNS`], in that order.
const FIELD_COUNT: i16 = login_table::COLUMNS.len() as i16;

/// The statement that loads an [`encode_rows`] payload into `table`.
pub fn copy_statement(table: &TableName) -> String {
    format!(
        "COPY {table} ({}) FROM STDIN (FORMAT binary)",
        login_table::column_list()
    )
}

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Days from 0001-01-01 (chrono's day 1) to 2000-01-01, PostgreSQL's date epoch.
const PG_EPOCH_FROM_CE: i32 = 730_120;

/// Typical encoded size of a row, to size buffers once.
pub const TYPICAL_ROW_BYTES: usize = 240;

/// Builds one COPY payload.
pub struct CopyEncoder {
    buf: BytesMut,
}

impl CopyEncoder {
    pub fn with_capacity(rows: usize) -> CopyEncoder {
        CopyEncoder {
            buf: binary_copy_buffer(rows * TYPICAL_ROW_BYTES),
        }
    }

    pub fn push(&mut self, row: &LoginRow) {
        let e = &row.event;
        let buf = &mut self.buf;
        buf.put_i16(FIELD_COUNT);
        put_text(buf, e.user_id());
        put_text(buf, e.device_type());
        put_mask(buf, &row.masked_ip);
        put_mask(buf, &row.masked_device_id);
        match e.locale() {
            Some(locale) => put_text(buf, locale),
            None => buf.put_i32(-1),
        }
        buf.put_i32(4);
        buf.put_i32(row.app_version);
        buf.put_i32(4);
        buf.put_i32(pg_date(row.create_date));
    }

    pub fn finish(self) -> Bytes {
        finish_binary_copy(self.buf)
    }
}

/// A buffer for binary COPY data with its header written, with room for `body_bytes` of rows.
fn binary_copy_buffer(body_bytes: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(19 + body_bytes + 2);
    buf.put_slice(SIGNATURE);
    buf.put_i32(0); // flags: no OIDs
    buf.put_i32(0); // header extension length
    buf
}

/// Ends binary COPY data begun by [`binary_copy_buffer`].
fn finish_binary_copy(mut buf: BytesMut) -> Bytes {
    buf.put_i16(-1);
    buf.freeze()
}

/// Encodes `count` rows (the count sizes the buffer once).
pub fn encode_rows<'a>(count: usize, rows: impl IntoIterator<Item = &'a LoginRow>) -> Bytes {
    let mut encoder = CopyEncoder::with_capacity(count);
    for row in rows {
        encoder.push(row);
    }
    encoder.finish()
}

fn put_text(buf: &mut BytesMut, s: &str) {
    // Every text field is bounded by the parse stage (or is a mask of at most 256 bytes), far below
    // i32::MAX.
    buf.put_i32(s.len() as i32);
    buf.put_slice(s.as_bytes());
}

fn put_mask(buf: &mut BytesMut, mask: &Masked) {
    match mask {
        Masked::Digest(digest) => put_hex(buf, &to_hex(digest)),
        Masked::Sealed(text) => put_text(buf, text),
    }
}

fn put_hex(buf: &mut BytesMut, hex: &[u8; 64]) {
    buf.put_i32(64);
    buf.put_slice(hex);
}

/// A date as PostgreSQL's binary form: days since 2000-01-01.
pub fn pg_date(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - PG_EPOCH_FROM_CE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_the_postgres_epoch() {
        assert_eq!(
            pg_date(NaiveDate::from_ymd_opt(2000, 1, 1).expect("date")),
            0
        );
        assert_eq!(
            pg_date(NaiveDate::from_ymd_opt(2000, 1, 2).expect("date")),
            1
        );
        assert_eq!(
            pg_date(NaiveDate::from_ymd_opt(1999, 12, 31).expect("date")),
            -1
        );
        assert_eq!(
            pg_date(NaiveDate::from_ymd_opt(2024, 3, 1).expect("date")),
            8826
        );
    }

    #[test]
    fn empty_payload_is_header_and_trailer() {
        let bytes = encode_rows(0, std::iter::empty());
        assert_eq!(&bytes[..11], SIGNATURE);
        assert_eq!(bytes.len(), 11 + 4 + 4 + 2);
        assert_eq!(&bytes[19..], &[0xff, 0xff]);
    }
}
