//! Showing an error with its causes.
//!
//! Library errors keep their cause as a typed `source` and say only their own part in `Display`,
//! so that text is made where the error is shown, once. This is the one way to show such an error
//! in a log line: the error and every cause, in order, each once (`a: b: c`), as the binary prints
//! the error it exits with.

use std::error::Error;
use std::fmt;

/// `Display`s an error followed by each of its causes, separated by `: `.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_is_shown_once_in_order() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "cannot start: disk on fire");
    }
}
