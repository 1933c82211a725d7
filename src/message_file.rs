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
//! text, found by a scanner that only tracks nesting and strings (so a malformed element, too, is
//! the parse stage's business).
//!
//! No message is held beyond a limit in bytes (`source.max_message_bytes`): a longer line or element
//! (a gzip bomb is one endless line) is read through without being kept, and handed on as
//! [`BadBody::TooLarge`] with its size and its first bytes, to become a dead letter. Memory stays
//! bounded whatever the input.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::Path;

/// One message read from a file.
pub struct FileMessage {
    /// 1-based line (NDJSON) or element (array) number.
    pub position: u64,
    /// The text, or why there is none.
    pub body: Result<String, BadBody>,
}

/// A message that cannot be handed on as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadBody {
    /// Its bytes are not UTF-8.
    NotUtf8(Vec<u8>),
    /// It is `bytes` long, more than `limit`; `head` is its start.
    TooLarge {
        bytes: u64,
        limit: usize,
        head: Vec<u8>,
    },
}

/// How much of a message over the limit is kept for its dead letter.
pub const TOO_LARGE_HEAD_BYTES: usize = 1024;

impl BadBody {
    /// What the dead letter keeps of the message.
    pub fn kept_bytes(&self) -> &[u8] {
        match self {
            BadBody::NotUtf8(bytes) => bytes,
            BadBody::TooLarge { head, .. } => head,
        }
    }
}

impl fmt::Display for BadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadBody::NotUtf8(_) => f.write_str("body is not valid UTF-8"),
            BadBody::TooLarge { bytes, limit, head } => write!(
                f,
                "message is {bytes} bytes, more than `source.max_message_bytes` ({limit}); its first {} bytes are kept",
                head.len()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MessageFileError {
    #[error("cannot open {path}")]
    Open { path: String, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("{path} is not a JSON array of messages: {problem}")]
    Array { path: String, problem: ArrayProblem },
}

/// Where a JSON array of messages stops making sense (a malformed element is not the array's
/// problem: it becomes a dead letter like any bad message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArrayProblem {
    #[error("it ends inside element {0}, before the closing `]`")]
    Unfinished(u64),
}

/// A file that fails half-way through: an I/O error, or an array that stops making sense.
enum ReadFailure {
    Io(io::Error),
    Array(ArrayProblem),
}

impl From<io::Error> for ReadFailure {
    fn from(e: io::Error) -> Self {
        ReadFailure::Io(e)
    }
}

/// The default of `source.max_message_bytes`: SQS's own largest message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

const READ_BUFFER: usize = 256 * 1024;

/// A file of messages, opened but not read yet. Opening is apart from reading so that a missing or
/// unreadable file fails before a run starts, while reading (which may block on standard input)
/// happens where blocking is allowed.
pub struct MessageReader {
    name: String,
    raw: Box<dyn Read + Send>,
    limit: usize,
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
        Ok(MessageReader {
            name,
            raw,
            limit: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    /// Messages longer than `limit` bytes are handed on as [`BadBody::TooLarge`], not read into
    /// memory.
    pub fn limit(mut self, limit: usize) -> MessageReader {
        self.limit = limit.max(1);
        self
    }

    /// Calls `each` for every message until the file ends or `each` breaks. Returns how many were
    /// read.
    pub fn for_each(
        self,
        mut each: impl FnMut(FileMessage) -> ControlFlow<()>,
    ) -> Result<u64, MessageFileError> {
        let MessageReader { name, raw, limit } = self;
        let read_err = |source| MessageFileError::Read {
            path: name.clone(),
            source,
        };
        let mut reader = decode(raw).map_err(read_err)?;
        let read = if starts_with_array(&mut reader).map_err(read_err)? {
            read_array(reader, limit, &mut each)
        } else {
            read_lines(reader, limit, &mut each).map_err(ReadFailure::Io)
        };
        read.map_err(|failure| match failure {
            ReadFailure::Io(source) => read_err(source),
            ReadFailure::Array(problem) => MessageFileError::Array {
                path: name.clone(),
                problem,
            },
        })
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
    limit: usize,
    each: &mut impl FnMut(FileMessage) -> ControlFlow<()>,
) -> io::Result<u64> {
    let (mut line_no, mut count) = (0u64, 0u64);
    // One reused buffer; each message then gets an allocation of exactly its size, since it lives
    // on in the pipeline until its batch is committed.
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        let Some(mut size) = read_line_bounded(&mut reader, &mut line, limit)? else {
            return Ok(count);
        };
        line_no += 1;
        if size == line.len() as u64 {
            while line.last().is_some_and(|b| *b == b'\r') {
                line.pop();
                size -= 1;
            }
        }
        if size <= limit as u64 && line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        count += 1;
        let body = checked_body(&line, size, limit);
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

/// Reads one line into `line` without its `\n`, keeping at most `limit + 1` bytes of it (enough to
/// tell it is too long); returns the line's full length, or `None` at the end of the input.
fn read_line_bounded(
    reader: &mut Box<dyn BufRead + Send>,
    line: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<u64>> {
    let mut size = 0u64;
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(size));
        }
        any = true;
        let newline = memchr::memchr(b'\n', buf);
        let part = &buf[..newline.unwrap_or(buf.len())];
        let room = (limit + 1).saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        size += part.len() as u64;
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(size));
        }
    }
}

/// The message of `size` bytes whose start is `kept`: its text, or why there is none.
fn checked_body(kept: &[u8], size: u64, limit: usize) -> Result<String, BadBody> {
    if size > limit as u64 {
        let head = kept[..kept.len().min(TOO_LARGE_HEAD_BYTES)].to_vec();
        return Err(BadBody::TooLarge {
            bytes: size,
            limit,
            head,
        });
    }
    String::from_utf8(kept.to_vec()).map_err(|e| BadBody::NotUtf8(e.into_bytes()))
}

/// Reads the elements of a JSON array whose `[` is next, each as its raw text (at most `limit`
/// bytes kept), until the closing `]`.
fn read_array(
    mut reader: Box<dyn BufRead + Send>,
    limit: usize,
    each: &mut impl FnMut(FileMessage) -> ControlFlow<()>,
) -> Result<u64, ReadFailure> {
    reader.consume(1);
    let mut count = 0u64;
    let mut element = Vec::with_capacity(4096);
    loop {
        element.clear();
        let (size, end) = read_element(&mut reader, &mut element, limit)?;
        let Some(end) = end else {
            return Err(ReadFailure::Array(ArrayProblem::Unfinished(count + 1)));
        };
        if size == 0 && end == b']' {
            // `[]`, or a trailing comma before the `]`.
            return Ok(count);
        }
        count += 1;
        let body = checked_body(&element, size, limit);
        if each(FileMessage {
            position: count,
            body,
        })
        .is_break()
        {
            return Ok(count);
        }
        if end == b']' {
            return Ok(count);
        }
    }
}

/// Scans one array element into `element` (trimmed, at most `limit + 1` bytes kept), up to the
/// `,` or `]` that ends it outside any string or nesting. Returns the element's size and that
/// byte, or no byte if the input ended first.
fn read_element(
    reader: &mut Box<dyn BufRead + Send>,
    element: &mut Vec<u8>,
    limit: usize,
) -> Result<(u64, Option<u8>), ReadFailure> {
    let mut scan = ElementScan::default();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if buf.is_empty() {
            return Ok((scan.size, None));
        }
        let mut used = buf.len();
        let mut end = None;
        for (i, &b) in buf.iter().enumerate() {
            if let Some(last) = scan.feed(b) {
                used = i + 1;
                end = Some(last);
                break;
            }
            if scan.started && element.len() <= limit {
                element.push(b);
            }
        }
        reader.consume(used);
        if let Some(end) = end {
            while element.last().is_some_and(u8::is_ascii_whitespace) {
                element.pop();
            }
            return Ok((scan.size, Some(end)));
        }
    }
}

/// The state of the scan through one element: nesting, strings, and how long it is.
#[derive(Default)]
struct ElementScan {
    started: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Bytes of the element from its first non-blank byte to its last.
    size: u64,
    /// Blank bytes seen since the last non-blank one (counted into `size` only if more follows).
    pending_space: u64,
}

impl ElementScan {
    /// Takes one byte; returns it when it ends the element (a `,` or `]` at the top level).
    fn feed(&mut self, b: u8) -> Option<u8> {
        if !self.started {
            if b.is_ascii_whitespace() {
                return None;
            }
            if b == b']' || b == b',' {
                return Some(b);
            }
            self.started = true;
        }
        if self.in_string {
            self.grow(b);
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return None;
        }
        match b {
            b',' | b']' if self.depth == 0 => return Some(b),
            b'[' | b'{' => self.depth += 1,
            b']' | b'}' => self.depth = self.depth.saturating_sub(1),
            b'"' => self.in_string = true,
            _ => {}
        }
        self.grow(b);
        None
    }

    fn grow(&mut self, b: u8) {
        if b.is_ascii_whitespace() && !self.in_string {
            self.pending_space += 1;
        } else {
            self.size += self.pending_space + 1;
            self.pending_space = 0;
        }
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
            .map(|m| (m.position, m.body.unwrap_or_else(|bad| format!("<{bad}>"))))
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

    /// Messages over the limit are read through, never held: what comes on is their size and
    /// their first bytes, and the messages after them are read as usual.
    #[test]
    fn messages_over_the_limit_keep_only_their_size_and_start() {
        let limit = 2048;
        let big = "x".repeat(5000);
        let lines = format!("{{\"a\":1}}\n{big}\n{}\r\n{{\"b\":2}}\n", "y".repeat(limit));
        let array = format!("[{{\"a\":1}}, \"{big}\" , {{\"s\": \"],{{\\\"\"}}]");
        for (name, content, n) in [("h.ndjson", &lines, 4), ("h.json", &array, 3)] {
            let path = temp(name, content.as_bytes());
            let mut all = Vec::new();
            MessageReader::open(&path)
                .expect("open")
                .limit(limit)
                .for_each(|m| {
                    all.push(m);
                    ControlFlow::Continue(())
                })
                .expect("readable");
            assert_eq!(all.len(), n, "{name}");
            let Err(BadBody::TooLarge { bytes, head, .. }) = &all[1].body else {
                panic!("{name}: expected too large, got {:?}", all[1].body);
            };
            let size = if name == "h.json" { 5002 } else { 5000 };
            assert_eq!((*bytes, head.len()), (size, TOO_LARGE_HEAD_BYTES), "{name}");
            assert_eq!(all[0].body.as_deref(), Ok("{\"a\":1}"), "{name}");
            if n == 4 {
                assert_eq!(
                    all[2].body.as_ref().map(String::len),
                    Ok(limit),
                    "at the limit"
                );
            } else {
                assert_eq!(all[2].body.as_deref(), Ok("{\"s\": \"],{\\\"\"}"), "{name}");
            }
        }
    }

    /// A gzip bomb (a few KiB inflating to 64 MiB with no line break) is one message over the
    /// limit, read through in constant memory.
    #[test]
    fn a_gzip_bomb_is_one_message_over_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b'0'; 1024 * 1024];
        for _ in 0..64 {
            gz.write_all(&zeros).expect("compress");
        }
        let bomb = gz.finish().expect("finish");
        assert!(bomb.len() < 256 * 1024, "{}", bomb.len());
        let path = temp("bomb.gz", &bomb);
        let mut all = Vec::new();
        MessageReader::open(&path)
            .expect("open")
            .for_each(|m| {
                all.push(m.body);
                ControlFlow::Continue(())
            })
            .expect("readable");
        assert_eq!(all.len(), 1);
        let Err(bad) = &all[0] else {
            panic!("kept whole")
        };
        assert_eq!(
            bad.to_string(),
            "message is 67108864 bytes, more than `source.max_message_bytes` (1048576); its first 1024 bytes are kept"
        );
    }

    #[test]
    fn arrays_empty_or_with_a_trailing_comma_end_cleanly() {
        assert!(bodies(&temp("i.json", b"[]")).is_empty());
        assert!(bodies(&temp("j.json", b" [ \n ] ")).is_empty());
        assert_eq!(bodies(&temp("k.json", b"[1,]")), [(1, "1".into())]);
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
