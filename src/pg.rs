//! Opening PostgreSQL connections the same way everywhere.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// Connects and drives the connection on its own task. `application_name` is set unless the URL
/// names one, so operators can find sluice's sessions in `pg_stat_activity`.
pub async fn connect(
    url: &str,
    application_name: &str,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.connect_timeout(timeout);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// An error with the server's detail and hint, which `Display` alone leaves out.
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
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}
