//! Opening PostgreSQL connections the same way everywhere, and showing PostgreSQL's errors.
//!
//! Every command connects through one [`Connector`] built from `sink.postgres`, and every
//! connection through [`connect`]: the same timeout, the same TLS rules ([`tls`], chosen by the
//! connection string's `sslmode`), an `application_name` operators can find in
//! `pg_stat_activity`, and, when it fails, one error that names the server with its password
//! redacted ([`conn_string`]). [`PgError`] carries a driver error as a typed cause and describes it
//! (with the server's detail and hint) only when it is shown. A command that needs the database
//! from its first step waits a bounded time for one that is still starting
//! ([`Connector::connect_at_start`]), rather than failing at once beside a container coming up.

pub mod conn_string;
pub mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use crate::config::PostgresConfig;
pub use conn_string::{ConnString, ConnStringError, SslMode};
pub use tls::TlsError;

/// Connects as `target` says (TLS per its `sslmode`, CAs from `ca_file`) and drives the
/// connection on its own task. `application_name` is set unless the string names one, so
/// operators can find sluice's sessions in `pg_stat_activity`.
pub async fn connect(
    target: &ConnString,
    ca_file: Option<&Path>,
    application_name: &str,
    timeout: Duration,
) -> Result<Client, ConnectFailure> {
    let mut config = target.driver.clone();
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.connect_timeout(timeout);
    match tls::client_config(target.ssl_mode, ca_file)? {
        None => Ok(drive(config.connect(NoTls).await?)),
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            Ok(drive(config.connect(tls).await?))
        }
    }
}

/// Runs the connection's I/O on its own task and hands back the client. The server's notices
/// ("already exists, skipping", …) are logged at debug level: they say nothing an operator must act
/// on, and the driver would otherwise log each one at info level.
fn drive<S, T>((client, mut connection): (Client, Connection<S, T>)) -> Client
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(
                        severity = notice.severity(),
                        notice = notice.message(),
                        "PostgreSQL notice"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %PgError(e), "PostgreSQL connection ended");
                    break;
                }
            }
        }
    });
    client
}

/// Where and how sluice connects: the connection string (a secret: it may hold a password), the
/// CA file and the timeout.
#[derive(Clone)]
pub struct Connector {
    url: String,
    ca_file: Option<PathBuf>,
    timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("url", &self.redacted_url())
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Connector {
    pub fn new(url: impl Into<String>, timeout: Duration) -> Connector {
        Connector {
            url: url.into(),
            ca_file: None,
            timeout,
        }
    }

    /// Trusts the CAs in this PEM file (`sink.postgres.ca_file`) instead of the system's.
    pub fn with_ca_file(mut self, ca_file: Option<PathBuf>) -> Connector {
        self.ca_file = ca_file;
        self
    }

    /// `sink.postgres.url` (validation guarantees it is there), its CA file and connect timeout.
    pub fn from_config(config: &PostgresConfig) -> Connector {
        Connector::new(
            config.url.clone().unwrap_or_default(),
            Duration::from_secs(config.connect_timeout_seconds),
        )
        .with_ca_file(config.ca_file.clone())
    }

    /// The URL with its password replaced, for logs and reports.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// A connection driven on its own task, named `application_name` in `pg_stat_activity`.
    pub async fn connect(&self, application_name: &str) -> Result<Client, ConnectError> {
        let attempt = async {
            let target = ConnString::parse(&self.url)?;
            connect(
                &target,
                self.ca_file.as_deref(),
                application_name,
                self.timeout,
            )
            .await
        };
        attempt.await.map_err(|source| ConnectError {
            url: self.redacted_url(),
            source,
            gave_up: None,
        })
    }

    /// The first connection of a command that cannot work without the database, which may still be
    /// starting beside it (containers started together): a connection refused, unreachable or
    /// turned away while the server starts is retried with backoff for `patience`, each failure
    /// logged as a warning; settings or credentials that are wrong fail at once.
    pub async fn connect_at_start(
        &self,
        application_name: &str,
        patience: Duration,
    ) -> Result<Client, ConnectError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut delays = crate::retry::backoff();
        let mut attempts = 0_u32;
        loop {
            attempts += 1;
            let error = match self.connect(application_name).await {
                Ok(client) => return Ok(client),
                Err(error) if !error.may_pass() => return Err(error),
                Err(error) => error,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ConnectError {
                    gave_up: Some(GaveUp { patience, attempts }),
                    ..error
                });
            }
            let delay = delays.next().unwrap_or(left).min(left);
            tracing::warn!(
                attempt = attempts,
                retry_in_ms = delay.as_millis() as u64,
                error = %crate::error_chain::Chain(&error.source),
                "PostgreSQL is not reachable yet; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// A connection that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{}", headline(.url, .gave_up))]
pub struct ConnectError {
    /// Redacted.
    url: String,
    #[source]
    source: ConnectFailure,
    /// Set when start-up retried until its patience ran out.
    gave_up: Option<GaveUp>,
}

/// How long start-up waited for a database that did not answer.
#[derive(Debug, Clone, Copy)]
struct GaveUp {
    patience: Duration,
    attempts: u32,
}

fn headline(url: &str, gave_up: &Option<GaveUp>) -> String {
    match gave_up {
        None => format!("cannot connect to PostgreSQL at {url}"),
        Some(GaveUp { patience, attempts }) => format!(
            "PostgreSQL did not answer within {} s of start-up ({attempts} attempts; \
             `sink.postgres.connect_retry_seconds` sets how long to wait): cannot connect to \
             PostgreSQL at {url}",
            patience.as_secs()
        ),
    }
}

/// Why a connection could not be opened: its settings, TLS setup, or the driver (the network, the
/// server, the TLS handshake).
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error(transparent)]
    Settings(#[from] ConnStringError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Driver(#[from] PgError),
}

impl From<tokio_postgres::Error> for ConnectFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        ConnectFailure::Driver(PgError(e))
    }
}

impl ConnectError {
    /// Whether the failure may pass by itself (nothing listening yet, the server starting up), so
    /// that waiting is worth it; wrong settings or credentials never pass.
    fn may_pass(&self) -> bool {
        self.driver().is_some_and(|e| {
            crate::sink::errors::classify(e) == crate::sink::errors::ErrorClass::Transient
        })
    }

    /// The driver's error, to classify; `None` when the settings themselves are unusable.
    pub fn driver(&self) -> Option<&tokio_postgres::Error> {
        match &self.source {
            ConnectFailure::Driver(e) => Some(&e.0),
            ConnectFailure::Settings(_) | ConnectFailure::Tls(_) => None,
        }
    }
}

/// A driver error as a cause: shown as [`describe`] gives it. The description already holds the
/// driver error's own causes, so it reports none of its own, and a printed chain shows each once.
#[derive(Debug)]
pub struct PgError(pub tokio_postgres::Error);

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::error::Error for PgError {}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError(e)
    }
}

/// An error with what `Display` alone leaves out: the server's detail and hint, or the causes.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut text = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            if let Some(context) = db.where_() {
                text.push_str(&format!("; context: {context}"));
            }
            text
        }
        // The driver's `Display` names only the kind ("error performing TLS handshake"): the
        // cause (the certificate's problem, the refused connection) follows, each once.
        None => {
            let mut text = err.to_string();
            let mut cause = std::error::Error::source(err);
            while let Some(c) = cause {
                let said = c.to_string();
                if !text.contains(&said) {
                    text.push_str(": ");
                    text.push_str(&said);
                }
                cause = c.source();
            }
            text
        }
    }
}

/// A connection string with its password replaced, for logs and reports (see
/// [`conn_string::redact`]).
pub fn redact_url(url: &str) -> String {
    conn_string::redact(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert!(!redact_url("postgres://u@h/d?password=secret").contains("secret"));
        assert!(!redact_url("host=h user=u password=secret").contains("secret"));
        let connector = Connector::new("postgres://u:secret@h/d", Duration::from_secs(1));
        assert!(!format!("{connector:?}").contains("secret"));
    }
}
