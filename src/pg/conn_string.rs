//! The connection string as operators write it, a `postgres://` URL or libpq's `key=value` form,
//! read once.
//!
//! The driver parses everything it understands; this module takes out first what it does not
//! (`sslmode=verify-ca` and `verify-full`, which sluice implements itself, see [`super::tls`]), so
//! one string carries the same settings `psql` would read. The printable form is built from parsed
//! values, never by patching the text, so no spelling of a password (`user:pw@`, `?password=`,
//! `password=` or `password='…'`) reaches a log or a report.

use std::fmt;

/// How the connection is protected, as libpq names it (`sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plain otherwise.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked only against a configured CA file.
    Require,
    /// TLS with a certificate signed by a trusted CA, whatever name it carries.
    VerifyCa,
    /// TLS with a trusted certificate issued for the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, ConnStringError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ConnStringError::SslMode(other.to_owned())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the driver is told: it knows only whether TLS is off, optional or required.
    fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection string that cannot be used. No variant holds the string itself: it may hold a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum ConnStringError {
    #[error("sslmode {0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error(
        "`{0}` is not read from the connection string: name the CA file in `sink.postgres.ca_file` (or SLUICE_DATABASE_CA_FILE); client certificates are not supported"
    )]
    FileOption(String),
    #[error("a quoted value is not closed")]
    Unterminated,
    /// The word itself is not shown: it is most likely a value that lost its key, a password say.
    #[error("a word without `=`: every setting is key=value")]
    BareWord,
    #[error("not a PostgreSQL connection string")]
    Driver(#[source] tokio_postgres::Error),
}

/// Options that name files: the CA file has its own config key, client certificates are not
/// supported. Refused by name rather than left to the driver's "unknown option".
const FILE_OPTIONS: [&str; 4] = ["sslrootcert", "sslcert", "sslkey", "sslcrl"];

/// A parsed connection string: the driver's settings and the TLS mode sluice enforces.
#[derive(Clone)]
pub struct ConnString {
    pub driver: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    /// The printable form, computed once.
    redacted: String,
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl ConnString {
    pub fn parse(text: &str) -> Result<ConnString, ConnStringError> {
        let (rest, ssl_mode) = if is_url(text) {
            without_url_options(text)?
        } else {
            without_key_value_options(text)?
        };
        let mut driver: tokio_postgres::Config = rest.parse().map_err(ConnStringError::Driver)?;
        driver.ssl_mode(ssl_mode.driver_mode());
        let redacted = redact_parsed(text, &driver, ssl_mode);
        Ok(ConnString {
            driver,
            ssl_mode,
            redacted,
        })
    }

    /// The string with its password replaced, for logs and reports.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// A connection string with any password replaced; one that does not parse is not shown at all
/// (it may hold a password in a spelling the parsers could not find).
pub fn redact(text: &str) -> String {
    match ConnString::parse(text) {
        Ok(parsed) => parsed.redacted,
        Err(_) => "(a connection string that does not parse)".to_owned(),
    }
}

fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// The URL without the query options the driver does not take, and the TLS mode they set.
fn without_url_options(text: &str) -> Result<(String, SslMode), ConnStringError> {
    let Some((base, query)) = text.split_once('?') else {
        return Ok((text.to_owned(), SslMode::default()));
    };
    let mut mode = SslMode::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = decode_pair(pair);
        match key.as_str() {
            "sslmode" => mode = SslMode::parse(&value)?,
            key if FILE_OPTIONS.contains(&key) => {
                return Err(ConnStringError::FileOption(key.to_owned()));
            }
            // Kept as written: the driver decodes its own options.
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode))
}

/// One `key=value` of a URL query, percent-decoded.
fn decode_pair(pair: &str) -> (String, String) {
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .unwrap_or_default()
}

/// The `key=value` string without the options the driver does not take, and the TLS mode.
fn without_key_value_options(text: &str) -> Result<(String, SslMode), ConnStringError> {
    let mut mode = SslMode::default();
    let mut kept = Vec::new();
    for (key, value) in key_value_pairs(text)? {
        match key.as_str() {
            "sslmode" => mode = SslMode::parse(&value)?,
            key if FILE_OPTIONS.contains(&key) => {
                return Err(ConnStringError::FileOption(key.to_owned()));
            }
            _ => kept.push(format!("{key}='{}'", quote(&value))),
        }
    }
    Ok((kept.join(" "), mode))
}

/// libpq's `key = value` list: values bare or in single quotes, `\` escaping the next character.
/// Only splits: the driver judges keys and values.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, ConnStringError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace() && *c != '=')).collect();
        if key.is_empty() {
            // End of text, or a stray `=` the driver reports better than we would.
            let rest: String = chars.collect();
            if !rest.is_empty() {
                pairs.push((rest, String::new()));
            }
            return Ok(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(ConnStringError::BareWord);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        let mut closed = !quoted;
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c if !quoted && c.is_whitespace() => break,
                c => value.push(c),
            }
        }
        if !closed {
            return Err(ConnStringError::Unterminated);
        }
        pairs.push((key, value));
    }
}

/// A value inside single quotes, as the driver reads it back.
fn quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The printable form. A URL stays a URL with its password (in the user part or the query)
/// replaced; the `key=value` form, or a URL the `url` crate cannot read (several hosts), is
/// rebuilt from the driver's parsed values.
fn redact_parsed(text: &str, driver: &tokio_postgres::Config, mode: SslMode) -> String {
    if is_url(text)
        && let Ok(mut url) = url::Url::parse(text)
    {
        if url.password().is_some() && url.set_password(Some("***")).is_err() {
            return describe(driver, mode);
        }
        if let Some(query) = url.query() {
            let redacted: Vec<String> = query
                .split('&')
                .map(|pair| match decode_pair(pair).0.as_str() {
                    "password" => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            url.set_query(Some(&redacted.join("&")));
        }
        return url.to_string();
    }
    describe(driver, mode)
}

/// `host=… port=… user=… dbname=…` from parsed values; a password only as `***`.
fn describe(driver: &tokio_postgres::Config, mode: SslMode) -> String {
    use tokio_postgres::config::Host;
    let mut parts = Vec::new();
    let hosts: Vec<String> = driver
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    let ports: Vec<String> = driver.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = driver.get_user() {
        parts.push(format!("user={user}"));
    }
    if driver.get_password().is_some() {
        parts.push("password=***".to_owned());
    }
    if let Some(db) = driver.get_dbname() {
        parts.push(format!("dbname={db}"));
    }
    parts.push(format!("sslmode={mode}"));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-pw";

    #[test]
    fn no_spelling_of_a_password_is_printed() {
        for text in [
            "postgres://u:s3cr3t-pw@h:5432/d",
            "postgres://u@h:5432/d?password=s3cr3t-pw",
            "postgresql://u@h/d?sslmode=require&password=s3cr3t%2Dpw",
            "postgres://u:s3cr3t-pw@h1:5432,h2:5433/d",
            "host=h user=u password=s3cr3t-pw dbname=d",
            "host=h user=u password = 's3cr3t-pw' dbname=d",
            "host=h user=u password='s3cr3t\\-pw' dbname=d",
        ] {
            let parsed = ConnString::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let shown = parsed.redacted();
            assert!(!shown.contains(SECRET), "{text} → {shown}");
            assert!(!format!("{parsed:?}").contains(SECRET), "{text}");
            assert!(shown.contains("***"), "{text} → {shown}");
            assert_eq!(
                parsed.driver.get_password(),
                Some(SECRET.as_bytes()),
                "{text}: the driver still gets the password"
            );
        }
        assert_eq!(
            redact("postgres://u:pw@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact("host=h user=u password=pw dbname=d"),
            "host=h user=u password=*** dbname=d sslmode=prefer"
        );
        assert!(!redact("host=h password='pw").contains("pw"));
    }

    #[test]
    fn sslmode_is_read_in_both_forms() {
        let cases = [
            ("postgres://u@h/d", SslMode::Prefer),
            ("postgres://u@h/d?sslmode=disable", SslMode::Disable),
            (
                "postgres://u@h/d?sslmode=verify-full&application_name=x",
                SslMode::VerifyFull,
            ),
            ("host=h sslmode=verify-ca user=u", SslMode::VerifyCa),
            ("host=h sslmode='require'", SslMode::Require),
        ];
        for (text, mode) in cases {
            let parsed = ConnString::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.ssl_mode, mode, "{text}");
        }
        let parsed = ConnString::parse("postgres://u@h/d?sslmode=verify-full&application_name=x")
            .expect("valid");
        assert_eq!(parsed.driver.get_application_name(), Some("x"));
        assert_eq!(
            parsed.driver.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn unusable_options_are_named() {
        let err = ConnString::parse("postgres://u@h/d?sslmode=verify").unwrap_err();
        assert!(err.to_string().contains("\"verify\""), "{err}");
        let err = ConnString::parse("host=h sslrootcert=/x.pem").unwrap_err();
        assert!(err.to_string().contains("sink.postgres.ca_file"), "{err}");
        let err = ConnString::parse("host=h password='open").unwrap_err();
        assert!(!err.to_string().contains("open"), "{err}");
        let err = ConnString::parse("host=h password pw-lost-its-key").unwrap_err();
        let text = crate::error_chain::Chain(&err).to_string();
        assert!(!text.contains("pw-lost"), "{text}");
    }
}
