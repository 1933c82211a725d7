//! Reading message bodies from a file: NDJSON (one message per line) or one JSON array, gzip or not,
//! `-` for standard input.
//!
//! Gzip is recognized by its first two bytes, not by the name: a compressed stream piped to standard
//! input has no name, and a compressed file need not be called `.gz`. A UTF-8 byte-order mark, which
//! some editors and exporters put first, is dropped rather than taken as part of the first message.
//!
//! Files are streamed, never loaded whole, so a backfill of any size runs in constant memory. NDJSON
//! lines are passed on exactly as written (a malformed line is the parse stage's business, and gets a
//! dead-letter record like any other bad message); array elements are passed on as their raw JSON
//! text.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::Path;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// One message read from a file.
pub struct FileMessage {
    /// 1-based line (NDJSON) or element (array) number.
    pub position: u64,
    /// The text, or the raw bytes of a line that is not UTF-8.
    pub body: Result<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageFileError {
    #[error("cannot open {path}")]
    Open { path: String, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("{path} is not a JSON array of messages")]
    Array {
        path: String,
        source: serde_json::Error,
    },
}

const READ_BUFFER: usize = 256 * 1024;

/// A file of messages, opened but not read yet. Opening is apart from reading so that a missing or
/// unreadable file fails before a run starts, while reading (which may block on standard input)
/// happens where blocking is allowed.
pub struct MessageReader {
    name: String,
    raw: Box<dyn Read + Send>,
}

impl MessageReader {
    /// Opens `path` (`-`: standard input).
    pub fn open(path: &Path) -> Result<MessageReader, MessageFileError> {
        let name = path.display().to_string();
        let raw: Box<dyn Read + Send> = if path == Path::new("-") {
            Box::new(io::stdin())
        } else {
            let file = File::open(path).map_err(|source| MessageFileError::Open {
                path: name.clone(),
                source,
            })?;
            Box::new(file)
        };
        Ok(MessageReader { name, raw })
    }

    /// Calls `each` for every message until the file ends or `each` breaks. Returns how many were
    /// read.
    pub fn for_each(
        self,
        mut each: impl FnMut(FileMessage) -> ControlFlow<()>,
    ) -> Result<u64, MessageFileError> {
        let MessageReader { name, raw } = self;
        let read_err = |source| MessageFileError::Read {
            path: name.clone(),
            source,
        };
        let mut reader = decode(raw).map_err(read_err)?;
        if starts_with_array(&mut reader).map_err(read_err)? {
            read_array(reader, &mut each).map_err(|source| MessageFileError::Array {
                path: name.clone(),
                source,
            })
        } else {
            read_lines(reader, &mut each).map_err(read_err)
        }
    }
}

/// Calls `each` for every message until the file ends or `each` breaks. Returns how many were read.
pub fn for_each_message(
    path: &Path,
    each: impl FnMut(FileMessage) -> ControlFlow<()>,
) -> Result<u64, MessageFileError> {
    MessageReader::open(path)?.for_each(each)
}

/// Reads every message into memory; for small files such as seed data.
pub fn read_all(path: &Path) -> Result<Vec<FileMessage>, MessageFileError> {
    let mut all = Vec::new();
    for_each_message(path, |m| {
        all.push(m);
        ControlFlow::Continue(())
    })?;
    Ok(all)
}

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The UTF-8 encoding of U+FEFF, the byte-order mark.
const UTF8_BOM: [u8; 3] = [0xef, 0xbb, 0xbf];

/// The text of a file: gunzipped if it starts like gzip, without a leading byte-order mark.
fn decode(mut raw: Box<dyn Read + Send>) -> io::Result<Box<dyn BufRead + Send>> {
    let head = read_prefix(&mut raw, GZIP_MAGIC.len())?;
    let gzip = head == GZIP_MAGIC;
    let raw = put_back(head, raw);
    let mut text: Box<dyn Read + Send> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else {
        raw
    };
    let head = read_prefix(&mut text, UTF8_BOM.len())?;
    let text = if head == UTF8_BOM {
        text
    } else {
        put_back(head, text)
    };
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER, text)))
}

/// Up to `n` bytes from the start of `reader`: fewer only at its end (a pipe may deliver them one
/// at a time).
fn read_prefix(reader: &mut (dyn Read + Send), n: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    reader.take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// `reader` with `head` in front of it again.
fn put_back(head: Vec<u8>, reader: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
    Box::new(io::Cursor::new(head).chain(reader))
}

/// Skips leading whitespace and tells whether the content opens with `[`.
fn starts_with_array(reader: &mut Box<dyn BufRead + Send>) -> io::Result<bool> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        let skip = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if skip < buf.len() {
            let is_array = buf[skip] == b'[';
            reader.consume(skip);
            return Ok(is_array);
        }
        let n = buf.len();
        reader.consume(n);
    }
}

fn read_lines(
    mut reader: Box<dyn BufRead + Send>,
    each: &mut impl FnMut(FileMessage) -> ControlFlow<()>,
) -> io::Result<u64> {
    let (mut line_no, mut count) = (0u64, 0u64);
    // One reused buffer; each message then gets an allocation of exactly its size, since it lives
    // on in the pipeline until its batch is committed.
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(count);
        }
        line_no += 1;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        count += 1;
        let body = String::from_utf8(line.to_vec()).map_err(|e| e.into_bytes());
        if each(FileMessage {
            position: line_no,
            body,
        })
        .is_break()
        {
            return Ok(count);
        }
    }
}

fn read_array(
    reader: Box<dyn BufRead + Send>,
    each: &mut impl FnMut(FileMessage) -> ControlFlow<()>,
) -> Result<u64, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let count = de.deserialize_seq(ArrayVisitor { each })?;
    Ok(count)
}

struct ArrayVisitor<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(FileMessage) -> ControlFlow<()>> Visitor<'de> for ArrayVisitor<'_, F> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut count = 0;
        while let Some(element) = seq.next_element::<Box<RawValue>>()? {
            count += 1;
            let body = String::from(Box::<str>::from(element));
            if (self.each)(FileMessage {
                position: count,
                body: Ok(body),
            })
            .is_break()
            {
                break;
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str, content: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-mf-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }

    fn bodies(path: &Path) -> Vec<(u64, String)> {
        read_all(path)
            .expect("readable")
            .into_iter()
            .map(|m| {
                (
                    m.position,
                    m.body
                        .unwrap_or_else(|b| format!("<{} raw bytes>", b.len())),
                )
            })
            .collect()
    }

    /// NDJSON lines pass through verbatim (blank lines skipped, positions kept); array elements
    /// come as their raw JSON text.
    #[test]
    fn lines_and_array_elements_become_messages() {
        type Case<'a> = (&'a str, &'a [u8], [(u64, &'a str); 3]);
        let cases: [Case; 2] = [
            (
                "a.ndjson",
                b"{\"a\": 1}\r\n\n  \nnot json\n{\"b\":2}",
                [(1, "{\"a\": 1}"), (4, "not json"), (5, "{\"b\":2}")],
            ),
            (
                "b.json",
                b"  [ {\"a\": [1, 2]}, \"x\", null ]",
                [(1, "{\"a\": [1, 2]}"), (2, "\"x\""), (3, "null")],
            ),
        ];
        for (name, content, expected) in cases {
            let expected: Vec<(u64, String)> = expected
                .iter()
                .map(|(n, b)| (*n, (*b).to_owned()))
                .collect();
            assert_eq!(bodies(&temp(name, content)), expected, "{name}");
        }
    }

    fn gzip(content: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(content).expect("compress");
        gz.finish().expect("finish")
    }

    /// Hands out one byte per read, as a slow pipe may.
    struct Trickle(io::Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let end = buf.len().min(1);
            self.0.read(&mut buf[..end])
        }
    }

    fn decoded(content: &[u8]) -> Vec<u8> {
        let mut text = Vec::new();
        decode(Box::new(Trickle(io::Cursor::new(content.to_vec()))))
            .expect("decode")
            .read_to_end(&mut text)
            .expect("read");
        text
    }

    #[test]
    fn gzip_is_recognized_by_its_first_bytes_whatever_the_name() {
        let content = gzip(b"[{\"a\":1},{\"a\":2}]");
        assert_eq!(bodies(&temp("c.json.gz", &content)).len(), 2);
        assert_eq!(bodies(&temp("c.json", &content)).len(), 2);
        assert_eq!(decoded(&gzip(b"{}\n{}\n")), b"{}\n{}\n");
        assert_eq!(decoded(b"{}\n"), b"{}\n", "plain text is left as it is");
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        assert_eq!(decoded(b"\xef\xbb\xbf{}\n"), b"{}\n");
        assert_eq!(decoded(&gzip(b"\xef\xbb\xbf{}\n")), b"{}\n");
        assert_eq!(
            decoded(b"{}\n\xef\xbb\xbf"),
            b"{}\n\xef\xbb\xbf",
            "only at the start"
        );
        let p = temp("g.json", b"\xef\xbb\xbf [1, 2]");
        assert_eq!(bodies(&p), [(1, "1".into()), (2, "2".into())]);
    }

    #[test]
    fn short_and_empty_files_are_read_whole() {
        for content in [&b""[..], b"\x1f", b"\xef\xbb", b"1"] {
            assert_eq!(decoded(content), content);
        }
    }

    #[test]
    fn invalid_utf8_lines_are_kept_as_bytes() {
        let p = temp("d.ndjson", b"{\"a\":1}\n\xff\xfe\n");
        let all = read_all(&p).expect("readable");
        assert!(all[1].body.is_err());
    }

    #[test]
    fn broken_arrays_and_missing_files_are_errors() {
        let p = temp("e.json", b"[{\"a\":1}, {");
        assert!(matches!(read_all(&p), Err(MessageFileError::Array { .. })));
        assert!(matches!(
            read_all(Path::new("/nonexistent/x.json")),
            Err(MessageFileError::Open { .. })
        ));
    }

    #[test]
    fn reading_stops_when_asked() {
        let p = temp("f.ndjson", b"1\n2\n3\n");
        let mut seen = 0;
        for_each_message(&p, |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("readable");
        assert_eq!(seen, 2);
    }
}
