//! Sorting database errors into what to do about them.
//!
//! The sink's whole error policy hangs on this: a transient error keeps the batch and retries, a data
//! error means some row in the batch can never be written (find it, dead-letter it, load the rest),
//! and anything else means the setup is wrong (missing table, lost privilege), which retrying cannot
//! fix and an operator must see.

/// What a failed commit means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection lost, server restarting, overloaded, deadlock: retry the same batch.
    Transient,
    /// A value the table refuses (constraint, invalid data): one row poisons the batch.
    Data,
    /// Schema or permission problem: stop without acknowledging.
    Fatal,
}

pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    if err.is_closed() {
        return ErrorClass::Transient;
    }
    let Some(code) = err.code() else {
        // No SQLSTATE: an I/O or protocol failure on the way.
        return ErrorClass::Transient;
    };
    classify_sqlstate(code.code())
}

/// By SQLSTATE class (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code.get(..2).unwrap_or_default() {
        // connection exception, insufficient resources, operator intervention (shutdown, cancel),
        // transaction rollback (serialization, deadlock), object in use / lock not available,
        // system error (I/O)
        "08" | "53" | "57" | "40" | "55" | "58" => ErrorClass::Transient,
        // The server ended the session because the transaction sat idle or ran too long (a
        // process that was paused): a fresh connection can try the transaction again.
        "25" if matches!(code, "25P03" | "25P04") => ErrorClass::Transient,
        // data exception, integrity constraint violation, check violation
        "22" | "23" => ErrorClass::Data,
        _ => ErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_sqlstate() {
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Transient); // admin_shutdown
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("25P03"), ErrorClass::Transient); // idle in transaction
        assert_eq!(classify_sqlstate("25P02"), ErrorClass::Fatal); // in failed transaction
        assert_eq!(classify_sqlstate("23514"), ErrorClass::Data); // check_violation
        assert_eq!(classify_sqlstate("22001"), ErrorClass::Data); // string too long
        assert_eq!(classify_sqlstate("42P01"), ErrorClass::Fatal); // undefined_table
        assert_eq!(classify_sqlstate("42501"), ErrorClass::Fatal); // insufficient_privilege
    }
}
