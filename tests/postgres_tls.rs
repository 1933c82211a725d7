//! TLS to PostgreSQL, against the real server (SSL on, with a self-signed certificate issued for
//! `localhost`): each `sslmode` gives the protection libpq gives it, a certificate that does not
//! prove what the mode asks fails with a clear error, and the daemon loads through TLS.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use sluice::error_chain::Chain;
use sluice::pg::Connector;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The test database's URL with `host` in place of its host and `sslmode` added.
fn url_with(host: Option<&str>, sslmode: &str) -> String {
    let mut url = url::Url::parse(&database_url()).expect("test database URL");
    if let Some(host) = host {
        url.set_host(Some(host)).expect("host");
    }
    url.query_pairs_mut().append_pair("sslmode", sslmode);
    url.to_string()
}

/// The server's own certificate, which, being self-signed, is also the CA that signed it.
async fn server_certificate() -> PathBuf {
    let client = pg().await;
    let ssl: String = client.query_one("SHOW ssl", &[]).await.expect("ssl").get(0);
    assert_eq!(
        ssl, "on",
        "the test server must have SSL on (see scripts/stack.sh)"
    );
    let cert: String = client
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .expect("ssl_cert_file")
        .get(0);
    let data_dir: String = client
        .query_one("SHOW data_directory", &[])
        .await
        .expect("data_directory")
        .get(0);
    PathBuf::from(data_dir).join(cert) // an absolute `cert` replaces the directory
}

/// Whether the session is encrypted, as the server sees it.
async fn encrypted(connector: &Connector) -> Result<bool, String> {
    let client = connector
        .connect("sluice-tls-test")
        .await
        .map_err(|e| Chain(&e).to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn each_sslmode_protects_as_libpq_does() {
    let ca = server_certificate().await;
    let plain = |mode: &str| Connector::new(url_with(None, mode), TIMEOUT);
    let with_ca = |host: Option<&str>, mode: &str| {
        Connector::new(url_with(host, mode), TIMEOUT).with_ca_file(Some(ca.clone()))
    };

    assert_eq!(encrypted(&plain("disable")).await, Ok(false));
    // `prefer` (also the default) tries TLS first, and the server offers it.
    assert_eq!(encrypted(&plain("prefer")).await, Ok(true));
    assert_eq!(
        encrypted(&Connector::new(database_url(), TIMEOUT)).await,
        Ok(true)
    );
    // `require` encrypts without a CA to check against.
    assert_eq!(encrypted(&plain("require")).await, Ok(true));
    // `verify-ca` accepts the certificate whatever host name was used to reach it.
    assert_eq!(encrypted(&with_ca(None, "verify-ca")).await, Ok(true));
    assert_eq!(
        encrypted(&with_ca(Some("localhost"), "verify-full")).await,
        Ok(true)
    );
}

#[tokio::test]
async fn a_certificate_that_proves_too_little_is_refused_clearly() {
    let ca = server_certificate().await;
    let host = url::Url::parse(&database_url())
        .expect("url")
        .host_str()
        .expect("host")
        .to_owned();
    assert_ne!(
        host, "localhost",
        "the test needs a host the certificate does not name"
    );

    // verify-full: the certificate names `localhost`, not the address connected to.
    let wrong_name =
        Connector::new(url_with(None, "verify-full"), TIMEOUT).with_ca_file(Some(ca.clone()));
    let err = encrypted(&wrong_name).await.expect_err("wrong host name");
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(
        err.contains(&format!("certificate not valid for name \"{host}\"")),
        "{err}"
    );

    // verify-ca against a CA that did not sign the certificate; require with a CA file checks the
    // chain too (libpq's rule).
    let dir = tempfile::tempdir().expect("dir");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, OTHER_CA).expect("write");
    for mode in ["verify-ca", "require"] {
        let wrong_ca =
            Connector::new(url_with(None, mode), TIMEOUT).with_ca_file(Some(other_ca.clone()));
        let err = encrypted(&wrong_ca).await.expect_err("wrong CA");
        assert!(
            err.contains("invalid peer certificate: UnknownIssuer"),
            "{mode}: {err}"
        );
    }

    // A missing CA file is named.
    let missing = Connector::new(url_with(None, "verify-ca"), TIMEOUT)
        .with_ca_file(Some("/nonexistent.pem".into()));
    let err = encrypted(&missing).await.expect_err("missing CA file");
    assert!(
        err.contains("cannot read the CA file /nonexistent.pem"),
        "{err}"
    );
}

/// The daemon's paths (`check`, `run`) go through the same TLS rules, the CA file named in the
/// config file or in `SLUICE_DATABASE_CA_FILE`.
#[tokio::test]
async fn the_daemon_loads_over_verified_tls() {
    let ca = server_certificate().await;
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("logins.ndjson");
    std::fs::write(&data, format!("{}\n{}\n", login("tls-1"), login("tls-2"))).expect("write");
    let config =
        |url: &str, ca_line: &str| file_config_at(&schema, path_str(&data), url, "", "", ca_line);

    let full = url_with(Some("localhost"), "verify-full");
    let in_file = TestConfig::write(&config(&full, &format!("ca_file = \"{}\"", path_str(&ca))));
    let run = run_to_end(run_command(&in_file.path, None), Duration::from_secs(60)).await;
    run.assert_success();
    assert_eq!(schema.rows_loaded().await, 2);

    let from_env = TestConfig::write(&config(&full, ""));
    let mut cmd = sluice(&["check", "--config", path_str(&from_env.path)]);
    cmd.env("SLUICE_DATABASE_CA_FILE", &ca);
    let out = run_to_end(cmd, Duration::from_secs(60)).await;
    assert!(
        out.stdout.contains("postgres    ok") && out.stdout.contains(", TLSv1."),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let plain = TestConfig::write(&config(&url_with(None, "disable"), ""));
    let out = run_to_end(
        sluice(&["check", "--config", path_str(&plain.path)]),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        out.stdout.contains("postgres    ok") && out.stdout.contains(", no TLS)"),
        "check must say the session is plain:\n{}",
        out.stdout
    );

    let wrong_name = TestConfig::write(&config(
        &url_with(None, "verify-full"),
        &format!("ca_file = \"{}\"", path_str(&ca)),
    ));
    let out = run_to_end(
        sluice(&["check", "--config", path_str(&wrong_name.path)]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("postgres    FAIL")
            && out.stdout.contains("certificate not valid for name"),
        "{}",
        out.stdout
    );

    let bad_ca = TestConfig::write(&config(&full, "ca_file = \"no-such-ca.pem\""));
    let out = run_to_end(run_command(&bad_ca.path, None), Duration::from_secs(60)).await;
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("`sink.postgres.ca_file`"),
        "{}",
        out.stderr
    );
}

/// A self-signed CA that signed nothing the test server presents.
const OTHER_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBsTCCAVegAwIBAgIUZXo4YPgEEZL5h8Bqso48avjBDGQwCgYIKoZIzj0EAwIw
LTErMCkGA1UEAwwic2x1aWNlIHRlc3QgQ0EgdGhhdCBzaWduZWQgbm90aGluZzAg
Fw0yNjExMjkxOTI5NTdaGA8yMTI2MTEwNTE5Mjk1N1owLTErMCkGA1UEAwwic2x1
aWNlIHRlc3QgQ0EgdGhhdCBzaWduZWQgbm90aGluZzBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABDieZ9PfWQR0gz/1avyAXj6cnLyMzIVYnv1nME2L+Ptq4oCoFjeA
MTZoF1Wr8IKZm4HBlvghLIOrwjdtigEtJSSjUzBRMB0GA1UdDgQWBBRRUjvdfCLQ
9vet6o0FAUnaJjgc4zAfBgNVHSMEGDAWgBRRUjvdfCLQ9vet6o0FAUnaJjgc4zAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIHYKdcRzor+0F942s4K3
Y4zgyr1R4V/3brLCInCEToVnAiEAwJQjTkYWO2W0iu+TINGAh0JSv2yrHcri31jQ
ukCvFds=
-----END CERTIFICATE-----
";
