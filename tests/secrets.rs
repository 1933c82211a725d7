//! Secrets stay out of everything sluice prints: the database password in any spelling of the
//! connection string, the masking key, and the raw bodies the driver would log as statement
//! parameters. Each test runs the binary at `debug` level and searches all it wrote.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "pw-7c1e9a-never-printed";
const KEY: &str = "mask-key-4b2d8f-never-printed";
const BODY_MARKER: &str = "raw-body-5e0c3d-never-logged";

/// The test database's URL with a password put in the user part, in the query, or in libpq's
/// `key=value` form (the server trusts local connections, so any password is accepted).
fn with_password(form: &str, port: Option<u16>) -> String {
    let mut url = url::Url::parse(&database_url()).expect("test database URL");
    if let Some(port) = port {
        url.set_port(Some(port)).expect("port");
    }
    let host = url.host_str().expect("host").to_owned();
    let port = url.port().unwrap_or(5432);
    let user = url.username().to_owned();
    let db = url.path().trim_start_matches('/').to_owned();
    match form {
        "userinfo" => {
            url.set_password(Some(PASSWORD)).expect("password");
            url.to_string()
        }
        "query" => {
            url.query_pairs_mut().append_pair("password", PASSWORD);
            url.to_string()
        }
        "key=value" => {
            format!("host={host} port={port} user={user} password={PASSWORD} dbname={db}")
        }
        "key=value quoted" => {
            format!("host={host} port={port} user={user} password = '{PASSWORD}' dbname={db}")
        }
        other => unreachable!("{other}"),
    }
}

const FORMS: [&str; 4] = ["userinfo", "query", "key=value", "key=value quoted"];

fn at_debug(mut cmd: tokio::process::Command) -> tokio::process::Command {
    cmd.env("RUST_LOG", "debug").env("SLUICE_MASK_KEY", KEY);
    cmd
}

fn assert_says_nothing_of(out: &Finished, secrets: &[&str], what: &str) {
    for secret in secrets {
        for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !text.contains(secret),
                "{what}: {stream} shows {secret:?}:\n{text}"
            );
        }
    }
}

/// `check` names the server it reached (or could not reach) without its password, whichever way
/// the password is written, from the file or from `SLUICE_DATABASE_URL`.
#[tokio::test]
async fn check_never_prints_the_database_password() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("empty.ndjson");
    std::fs::write(&data, "").expect("write");
    for form in FORMS {
        for (port, expected) in [(None, "postgres    ok"), (Some(1), "postgres    FAIL")] {
            let url = with_password(form, port);
            let config =
                TestConfig::write(&file_config_at(&schema, path_str(&data), &url, "", "", ""));
            let out = run_to_end(
                at_debug(sluice(&["check", "--config", path_str(&config.path)])),
                LIMIT,
            )
            .await;
            assert!(
                out.stdout.contains(expected),
                "{form}: expected {expected:?}:\n{}\n{}",
                out.stdout,
                out.stderr
            );
            assert_says_nothing_of(&out, &[PASSWORD, KEY], &format!("check, {form}"));

            let mut cmd = at_debug(sluice(&["check", "--config", path_str(&config.path)]));
            cmd.env("SLUICE_DATABASE_URL", &url);
            let out = run_to_end(cmd, LIMIT).await;
            assert!(out.stdout.contains(expected), "{form}: {}", out.stdout);
            assert_says_nothing_of(&out, &[PASSWORD, KEY], &format!("check, env, {form}"));
        }
    }
}

/// A whole run at `debug` level, with a dead letter to store (its body is a statement parameter of
/// the dead-letter INSERT), prints neither the password, nor the key, nor the body.
#[tokio::test]
async fn a_debug_run_prints_no_password_key_or_body() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let reject = format!(r#"{{"user_id": "{BODY_MARKER}"}}"#);
    for (i, form) in FORMS.iter().enumerate() {
        // A file of its own per run: a file loaded to its end is not loaded again.
        let data = dir.path().join(format!("logins-{i}.ndjson"));
        std::fs::write(&data, format!("{}\n{reject}\n", login("secret-1"))).expect("write");
        let url = with_password(form, None);
        // Every other run logs JSON lines.
        let log = if i % 2 == 1 {
            "[log]\nformat = \"json\"\n"
        } else {
            ""
        };
        let config = TestConfig::write(&format!(
            "{}{log}",
            file_config_at(&schema, path_str(&data), &url, "", "", "")
        ));
        let out = run_to_end(at_debug(run_command(&config.path, None)), LIMIT).await;
        out.assert_success();
        assert!(
            out.stderr.contains("DEBUG"),
            "the run must log at debug level:\n{}",
            out.stderr
        );
        assert_says_nothing_of(&out, &[PASSWORD, KEY, BODY_MARKER], &format!("run, {form}"));
        for command in ["migrate", "report"] {
            let out = run_to_end(
                at_debug(sluice(&[command, "--config", path_str(&config.path)])),
                LIMIT,
            )
            .await;
            out.assert_success();
            assert_says_nothing_of(
                &out,
                &[PASSWORD, KEY, BODY_MARKER],
                &format!("{command}, {form}"),
            );
        }
    }
    assert_eq!(schema.rows_loaded().await, FORMS.len() as i64);
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), FORMS.len());
    assert!(rejects.iter().all(|(_, _, body)| body == &reject));
}
