//! What the commands print, for people and for pipes.
//!
//! `println!` panics when standard output has gone away, which is how every `sluice report | head -1`
//! ended. A reader that leaves early has taken what it wanted; it is not a failure of the command.
//! So [`outln!`] stops writing once the reader is gone and says nothing about it, and the command
//! carries on to its own exit status (`run` still loads everything, `check` still says by its exit
//! status whether a finding failed). Any other write error (a full disk under a redirection) is
//! kept and reported by [`finish`] when the command ends, so output that was lost is never
//! mistaken for success.
//!
//! Standard error gets the same care through [`errln!`]: there is nowhere left to report a failure
//! to write there, so such a failure is ignored rather than turned into a panic.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The reader of standard output has gone: nothing more is written there.
static READER_GONE: AtomicBool = AtomicBool::new(false);
/// The first write error other than a reader that left.
static WRITE_ERROR: Mutex<Option<io::Error>> = Mutex::new(None);

/// Writes one line to standard output (see [`outln!`]).
pub fn line(text: fmt::Arguments<'_>) {
    if READER_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.write_all(b"\n")) {
        failed(e);
    }
}

/// Writes bytes as they are to standard output, like [`line`].
pub fn bytes(data: &[u8]) {
    if READER_GONE.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = io::stdout().lock().write_all(data) {
        failed(e);
    }
}

/// Records a failed write to standard output made by other means (such as a stream of seeded
/// messages). Returns whether it was only the reader going away.
pub fn failed(error: io::Error) -> bool {
    if error.kind() == io::ErrorKind::BrokenPipe {
        READER_GONE.store(true, Ordering::Relaxed);
        return true;
    }
    if let Ok(mut first) = WRITE_ERROR.lock() {
        first.get_or_insert(error);
    }
    false
}

/// Flushes standard output; the first write error that was not the reader going away.
pub fn finish() -> io::Result<()> {
    if !READER_GONE.load(Ordering::Relaxed)
        && let Err(e) = io::stdout().lock().flush()
    {
        failed(e);
    }
    match WRITE_ERROR.lock().ok().and_then(|mut first| first.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes one line to standard error, ignoring a failure: there is nowhere left to report it.
pub fn error_line(text: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.write_all(b"\n"));
}

/// `println!` for command output: quiet when the reader has gone (see the module's doc).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::output::error_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};
