//! The command line's promises: a bad configuration fails at start naming the key, `check` tells
//! the truth about the services, `migrate` never alters what exists, `seed` is deterministic, and the
//! file source runs a backfill to its end.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

async fn run_with_config(toml: &str, args: &[&str]) -> Finished {
    let config = TestConfig::write(toml);
    let mut all = vec![args[0], "--config", path_str(&config.path)];
    all.extend(&args[1..]);
    run_to_end(sluice(&all), LIMIT).await
}

#[tokio::test]
async fn bad_configuration_fails_at_start_naming_the_key() {
    let cases = [
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\npolers = 3\n[sink.postgres]\nurl = \"postgres://x@y/z\"\n",
            "unknown field `polers`",
        ),
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\nmax_messages = 11\n[sink.postgres]\nurl = \"postgres://x@y/z\"\n",
            "`source.sqs.max_messages` (line 5): must be between 1 and 10, got 11",
        ),
        (
            "[source]\nkind = \"sqs\"\n[sink.postgres]\nurl = \"postgres://x@y/z\"\n",
            "`source.sqs.queue_url`: one of",
        ),
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\n",
            "`sink.postgres.url`: required",
        ),
        ("[source]\nkind = \"kafka\"\n", "unknown variant `kafka`"),
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\n[sink.postgres]\nurl = \"postgres://x@y/z\"\nbatch_rows = \"many\"\n",
            "batch_rows",
        ),
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\n[sink.postgres]\nurl = \"postgres://x@y/z\"\ntable = \"user logins\"\n",
            "`sink.postgres.table`",
        ),
        (
            "[source]\nkind = \"sqs\"\n[source.sqs]\nqueue_name = \"q\"\n[sink.postgres]\nurl = \"postgres://x@y/z\"\n[mask]\nmode = \"md5\"\n",
            "unknown variant `md5`",
        ),
    ];
    for (toml, expected) in cases {
        let out = run_with_config(toml, &["run", "--summary", "json"]).await;
        assert_eq!(
            out.code,
            Some(2),
            "config:\n{toml}\nstderr:\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn a_missing_mask_key_stops_the_daemon_before_it_touches_anything() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    queue.send(&[login("kept")]).await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let mut cmd = run_command(&config.path, None);
    cmd.env_remove("SLUICE_MASK_KEY");
    let out = run_to_end(cmd, LIMIT).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("SLUICE_MASK_KEY"), "{}", out.stderr);
    assert_eq!(
        queue.depth().await,
        (1, 0),
        "the message must stay in the queue"
    );
}

#[tokio::test]
async fn check_reports_reachable_services_and_fails_on_unreachable_ones() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let good = run_with_config(&sqs_config(&queue, &schema, "", "", ""), &["check"]).await;
    assert_eq!(good.code, Some(0), "{}\n{}", good.stdout, good.stderr);
    for line in [
        "config      ok",
        "mask key    ok",
        "sqs         ok",
        "postgres    ok",
        "tables      WARN",
    ] {
        assert!(
            good.stdout.contains(line),
            "expected {line:?} in:\n{}",
            good.stdout
        );
    }

    let missing_queue = sqs_config(&queue, &schema, "", "", "")
        .replace(&queue.url, &format!("{}-absent", queue.url));
    let bad = run_with_config(&missing_queue, &["check"]).await;
    assert_eq!(bad.code, Some(1), "{}", bad.stdout);
    assert!(bad.stdout.contains("sqs         FAIL"), "{}", bad.stdout);

    let no_db = sqs_config(&queue, &schema, "", "", "")
        .replace(&database_url(), "postgres://postgres@127.0.0.1:1/postgres");
    let bad = run_with_config(&no_db, &["check"]).await;
    assert_eq!(bad.code, Some(1), "{}", bad.stdout);
    assert!(bad.stdout.contains("postgres    FAIL"), "{}", bad.stdout);
}

#[tokio::test]
async fn migrate_creates_missing_tables_and_never_alters_existing_ones() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let toml = sqs_config(&queue, &schema, "", "", "");
    let first = run_with_config(&toml, &["migrate"]).await;
    first.assert_success();
    assert_eq!(
        first.stdout.matches("created").count(),
        3,
        "{}",
        first.stdout
    );
    let again = run_with_config(&toml, &["migrate"]).await;
    again.assert_success();
    assert_eq!(
        again.stdout.matches("exists, left unchanged").count(),
        3,
        "{}",
        again.stdout
    );

    // A table made by someone else, with a type binary COPY cannot write: reported, left alone.
    let other = TestSchema::new().await;
    other
        .client
        .batch_execute(&format!(
            "CREATE TABLE {}(user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
             masked_device_id varchar(256), locale varchar(32), app_version bigint, create_date date)",
            other.table()
        ))
        .await
        .expect("create");
    let toml = sqs_config(&queue, &other, "", "", "");
    let out = run_with_config(&toml, &["migrate"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("column `app_version` is `bigint`"),
        "{}",
        out.stderr
    );
    let run = run_with_config(&toml, &["run", "--summary", "json"]).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("column `app_version` is `bigint`"),
        "{}",
        run.stderr
    );
    let ty: String = other
        .client
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'app_version'",
            &[&other.table()],
        )
        .await
        .expect("type")
        .get(0);
    assert_eq!(ty, "bigint", "the existing table must not be altered");
}

const BATCHING: &str = "batch_rows = 500\nlinger_ms = 50";

fn file_config(schema: &TestSchema, path: &str) -> String {
    common::file_config(schema, path, "", "", BATCHING)
}

/// `seed --count` writes the file a file source reads, the same for the same seed; `run` loads it
/// and exits by itself at the end of the file.
#[tokio::test]
async fn seeded_files_are_deterministic_and_the_file_source_runs_to_the_end() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut contents = Vec::new();
    for name in ["a.ndjson.gz", "b.ndjson.gz"] {
        let data = dir.path().join(name);
        let config = TestConfig::write(&file_config(&schema, path_str(&data)));
        let out = run_to_end(
            sluice(&[
                "seed",
                "--config",
                path_str(&config.path),
                "--count",
                "2000",
                "--seed",
                "42",
                "--bad-every",
                "100",
            ]),
            LIMIT,
        )
        .await;
        out.assert_success();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(&data).expect("open")),
            &mut text,
        )
        .expect("gunzip");
        contents.push(text);
    }
    assert_eq!(contents[0], contents[1], "same seed, same messages");
    assert_eq!(contents[0].lines().count(), 2000);

    let config = TestConfig::write(&file_config(
        &schema,
        path_str(&dir.path().join("a.ndjson.gz")),
    ));
    let run = run_to_end(run_command(&config.path, None), LIMIT).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 2000,
            loaded: 1980,
            rejected: 20,
            duplicates: 0
        }
    );
    assert_eq!(schema.rows_loaded().await, 1980);
    let reasons = schema.rejects().await;
    assert!(
        reasons
            .iter()
            .all(|(reason, stage, _)| reason == "missing field `user_id`" && stage == "parse")
    );
}

/// The summary is one text line by default, and one JSON object with `--summary json`.
#[tokio::test]
async fn the_summary_is_text_by_default_and_json_on_request() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("two.ndjson");
    std::fs::write(&data, format!("{}\n{{}}\n", login("s-1"))).expect("write");
    let schema = TestSchema::new().await;
    let text = run_with_config(&file_config(&schema, path_str(&data)), &["run"]).await;
    text.assert_success();
    assert_eq!(
        text.stdout,
        "sluice: received=2 loaded=1 rejected=1 duplicates=0\n"
    );
    let other = TestSchema::new().await;
    let json = run_with_config(
        &file_config(&other, path_str(&data)),
        &["run", "--summary", "json"],
    )
    .await;
    json.assert_success();
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON object");
    assert_eq!(
        value,
        serde_json::json!({"received": 2, "loaded": 1, "rejected": 1, "duplicates": 0,
            "released": 0, "acknowledged": 2, "batches_committed": 1, "stopped_before_end": false})
    );
}

/// A file source reads a JSON array too, and a line that is not UTF-8 becomes a dead letter.
#[tokio::test]
async fn file_source_handles_arrays_and_bad_bytes() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let ndjson = dir.path().join("mixed.ndjson");
    let mut bytes = format!("{}\n\n{}\n", login("f-1"), login("f-2")).into_bytes();
    bytes.extend_from_slice(b"{\"user_id\": \"\xff\xfe\"}\n");
    std::fs::write(&ndjson, bytes).expect("write");
    let run = run_with_config(
        &file_config(&schema, path_str(&ndjson)),
        &["run", "--summary", "json"],
    )
    .await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 3,
            loaded: 2,
            rejected: 1,
            duplicates: 0
        }
    );
    let rejects = schema.rejects().await;
    assert_eq!(
        (rejects[0].0.as_str(), rejects[0].1.as_str()),
        ("body is not valid UTF-8", "source")
    );

    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/data/demo-logins.json");
    let other = TestSchema::new().await;
    let run = run_with_config(&file_config(&other, demo), &["run", "--summary", "json"]).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: 100,
            loaded: 90,
            rejected: 10,
            duplicates: 0
        }
    );
}

/// `seed` on a file source never replaces a file that exists unless asked to (`--force`), writes
/// elsewhere with `--out`, and with `path = "-"` writes to standard output, not to a file named `-`.
#[tokio::test]
async fn seed_never_overwrites_an_existing_file_unless_asked() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("precious.ndjson");
    let precious = format!("{}\n{}\n", login("keep-1"), login("keep-2"));
    std::fs::write(&data, &precious).expect("write");
    let config = TestConfig::write(&file_config(&schema, path_str(&data)));
    let seed = |extra: &[&str]| {
        let mut args = vec!["seed", "--config", path_str(&config.path), "--count", "3"];
        args.extend_from_slice(extra);
        run_to_end(sluice(&args), LIMIT)
    };

    let refused = seed(&[]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("already exists") && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read_to_string(&data).expect("read"), precious);

    let other = dir.path().join("other.ndjson");
    seed(&["--out", path_str(&other)]).await.assert_success();
    assert_eq!(
        std::fs::read_to_string(&other)
            .expect("read")
            .lines()
            .count(),
        3
    );
    assert_eq!(std::fs::read_to_string(&data).expect("read"), precious);

    seed(&["--force"]).await.assert_success();
    assert_eq!(
        std::fs::read_to_string(&data)
            .expect("read")
            .lines()
            .count(),
        3
    );

    let stdin_config = TestConfig::write(&file_config(&schema, "-"));
    let mut to_stdout = sluice(&[
        "seed",
        "--config",
        path_str(&stdin_config.path),
        "--count",
        "4",
    ]);
    to_stdout.current_dir(dir.path());
    let out = run_to_end(to_stdout, LIMIT).await;
    out.assert_success();
    assert_eq!(out.stdout.lines().count(), 4, "{}", out.stdout);
    assert!(!dir.path().join("-").exists(), "wrote a file named `-`");
    assert!(
        !stdin_config.dir.path().join("-").exists(),
        "wrote a file named `-`"
    );
}

/// Values too large for the clock or the in-flight bound are refused with a message, not a panic.
#[tokio::test]
async fn huge_numbers_are_refused_not_a_crash() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let idle = run_to_end(
        sluice(&[
            "run",
            "--config",
            path_str(&config.path),
            "--exit-when-idle",
            "1e20",
        ]),
        LIMIT,
    )
    .await;
    assert_eq!(idle.code, Some(2), "{idle:?}");
    assert!(idle.stderr.contains("--exit-when-idle"), "{}", idle.stderr);

    let huge = sqs_config(
        &queue,
        &schema,
        "max_in_flight = 18446744073709551615",
        "",
        "",
    );
    let run = run_with_config(&huge, &["run", "--summary", "json"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("source.sqs.max_in_flight"),
        "{}",
        run.stderr
    );
}

/// An error is printed with each of its causes once, in order: a cause is not repeated by the
/// error that wraps it.
#[tokio::test]
async fn errors_show_each_cause_once() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let mut no_key = run_command(&config.path, None);
    no_key.env_remove("SLUICE_MASK_KEY");
    let out = run_to_end(no_key, LIMIT).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "cannot start the pipeline: masking key: no masking key: set SLUICE_MASK_KEY"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("no masking key").count(),
        1,
        "{}",
        out.stderr
    );

    let missing = config.dir.path().join("missing.json");
    let out = run_to_end(
        sluice(&[
            "seed",
            "--config",
            path_str(&config.path),
            "--file",
            path_str(&missing),
        ]),
        LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("cannot open {}: ", missing.display())),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        out.stderr
    );
}

/// A ledger table of an earlier version (unscoped text keys) is never altered: `migrate` and `run`
/// refuse it, saying what to do, and leave it exactly as it was.
#[tokio::test]
async fn an_old_text_keyed_ledger_is_left_unchanged_and_refused() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    schema
        .client
        .batch_execute(&format!(
            "CREATE TABLE {}(message_key text PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {} (message_key) VALUES ('old-key')",
            schema.ledger(),
            schema.ledger()
        ))
        .await
        .expect("an old ledger");
    let toml = sqs_config(&queue, &schema, "", "", "");
    for command in ["migrate", "run"] {
        let out = run_with_config(&toml, &[command]).await;
        assert_eq!(out.code, Some(1), "{command}: {}", out.stderr);
        assert!(
            out.stderr.contains("dedupe ledger of an earlier sluice")
                && out.stderr.contains("sink.postgres.ledger_table"),
            "{command}: {}",
            out.stderr
        );
    }
    let columns: Vec<String> = schema
        .client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 ORDER BY attnum",
            &[&schema.ledger()],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(columns, ["message_key", "seen_at"]);
    assert_eq!(schema.count(&schema.ledger()).await, 1);
}

/// A reader that leaves early (`sluice report | head -1`) ends the output, not the command: no
/// panic, no message, and the exit status is the command's own.
#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    migrate(&config.path).await;
    let cfg = path_str(&config.path);

    for args in [["report", "--config", cfg], ["check", "--config", cfg]] {
        let out = run_with_stdout_closed(sluice(&args), LIMIT).await;
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
        assert_quiet_about_the_pipe(&out);
    }

    // The user's way: a reader that takes one line and goes.
    let mut child = sluice(&["report", "--config", cfg]).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = lines
        .next_line()
        .await
        .expect("read")
        .expect("a first line");
    assert!(first.contains("rows"), "{first}");
    drop(lines);
    let out = finish(child, LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_quiet_about_the_pipe(&out);

    // `run` loads everything whoever reads its summary.
    queue.send(&[login("piped-1"), login("piped-2")]).await;
    let out = run_with_stdout_closed(run_command(&config.path, Some(1)), LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_quiet_about_the_pipe(&out);
    assert_eq!(schema.rows_loaded().await, 2);

    // Seeding to standard output stops when nobody reads it.
    let stdin_config = TestConfig::write(&file_config(&schema, "-"));
    let seed = sluice(&[
        "seed",
        "--config",
        path_str(&stdin_config.path),
        "--count",
        "100000",
    ]);
    let out = run_with_stdout_closed(seed, LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_quiet_about_the_pipe(&out);
}

/// An environment with no AWS region, no AWS credentials and empty AWS config files, whose instance
/// metadata endpoint is `imds`: a local listener that records any attempt to reach it.
fn without_aws_settings(cmd: &mut tokio::process::Command, dir: &std::path::Path, imds: &str) {
    for name in [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_EC2_METADATA_DISABLED",
    ] {
        cmd.env_remove(name);
    }
    let (config, credentials) = (dir.join("aws-config"), dir.join("aws-credentials"));
    std::fs::write(&config, "").expect("write");
    std::fs::write(&credentials, "").expect("write");
    cmd.env("AWS_CONFIG_FILE", config)
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds);
}

/// A listener standing in for the instance metadata service; it never answers.
struct MetadataProbe(std::net::TcpListener);

impl MetadataProbe {
    fn new() -> MetadataProbe {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        MetadataProbe(listener)
    }
    fn url(&self) -> String {
        format!("http://{}", self.0.local_addr().expect("address"))
    }
    fn was_reached(&self) -> bool {
        self.0.accept().is_ok()
    }
}

/// With an emulator endpoint, a missing region is no reason for noise and instance metadata is
/// never probed; missing credentials are named as such, with what to set.
#[tokio::test]
async fn aws_settings_missing_against_an_emulator_are_quiet_or_explained() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let toml = sqs_config(&queue, &schema, "", "", "").replace("region = \"us-east-1\"\n", "");
    assert!(!toml.contains("region"), "{toml}");
    let config = TestConfig::write(&toml);
    let imds = MetadataProbe::new();

    let mut no_region = sluice(&["check", "--config", path_str(&config.path)]);
    without_aws_settings(&mut no_region, dir.path(), &imds.url());
    no_region
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    let out = run_to_end(no_region, LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("sqs         ok"), "{}", out.stdout);
    assert!(
        !out.stderr.to_lowercase().contains("imds") && !out.stderr.contains("WARN"),
        "{}",
        out.stderr
    );

    let mut no_credentials = sluice(&["check", "--config", path_str(&config.path)]);
    without_aws_settings(&mut no_credentials, dir.path(), &imds.url());
    let out = run_to_end(no_credentials, LIMIT).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let finding = out
        .stdout
        .lines()
        .find(|l| l.starts_with("sqs         FAIL"))
        .unwrap_or_else(|| panic!("no sqs finding in:\n{}", out.stdout));
    for expected in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"] {
        assert!(finding.contains(expected), "{finding}");
    }
    for noise in ["IMDS", "DispatchFailure", "{"] {
        assert!(!finding.contains(noise), "{finding}");
    }

    let mut run = run_command(&config.path, Some(1));
    without_aws_settings(&mut run, dir.path(), &imds.url());
    let out = run_to_end(run, LIMIT).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("AWS_ACCESS_KEY_ID"), "{}", out.stderr);

    assert!(
        !imds.was_reached(),
        "instance metadata was probed although an endpoint is configured"
    );
}

/// A run that cannot start (its input is missing, its metrics port is taken) prints no summary:
/// there was no run to sum up. With JSON logs its fatal line is JSON too.
#[tokio::test]
async fn a_run_that_cannot_start_prints_no_summary() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("absent.ndjson");
    let out = run_with_config(
        &file_config(&schema, path_str(&missing)),
        &["run", "--summary", "json"],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(!out.stdout.contains("received"), "{}", out.stdout);
    assert!(out.stderr.contains("absent.ndjson"), "{}", out.stderr);

    let data = dir.path().join("one.ndjson");
    std::fs::write(&data, login("port-taken")).expect("write");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let toml = format!(
        "{}\n[metrics]\nlisten = \"{address}\"\n",
        file_config(&schema, path_str(&data))
    );
    let out = run_with_config(&toml, &["run", "--summary", "json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(!out.stdout.contains("received"), "{}", out.stdout);
    assert!(out.stderr.contains(&address), "{}", out.stderr);
    assert_eq!(schema.rows_so_far().await, 0);

    let toml = format!(
        "{}\n[log]\nformat = \"json\"\n",
        file_config(&schema, path_str(&missing))
    );
    let out = run_with_config(&toml, &["run", "--summary", "json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let fatal = lines.last().expect("a fatal line");
    assert_eq!(fatal["level"], "ERROR", "{fatal}");
    assert!(
        fatal["message"]
            .as_str()
            .is_some_and(|m| m.contains("absent.ndjson")),
        "{fatal}"
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).expect("compress");
    gz.finish().expect("finish")
}

/// Files as other tools write them: gzip is recognized by its first bytes (on standard input, or
/// under any name), a UTF-8 byte-order mark is not part of the first message, and an empty
/// `locale` is kept as the empty string it is.
#[tokio::test]
async fn files_are_read_as_other_tools_write_them() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let lines = format!("{}\n{}\n{}\n", login("gz-1"), login("gz-2"), login("gz-3"));

    let stdin_config = TestConfig::write(&file_config(&schema, "-"));
    let mut cmd = run_command(&stdin_config.path, None);
    cmd.stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &gzip(lines.as_bytes()))
        .await
        .expect("write stdin");
    drop(stdin);
    let out = finish(child, LIMIT).await;
    out.assert_success();
    assert_eq!(out.summary().loaded, 3, "{out:?}");

    let unnamed = dir.path().join("logins.ndjson");
    std::fs::write(&unnamed, gzip(lines.as_bytes())).expect("write");
    let out = run_with_config(
        &file_config(&schema, path_str(&unnamed)),
        &["run", "--summary", "json"],
    )
    .await;
    out.assert_success();
    assert_eq!(out.summary().loaded, 3, "{out:?}");

    let empty_locale = login("bom-2").replace("\"locale\": \"RU\"", "\"locale\": \"\"");
    assert!(empty_locale.contains("\"locale\": \"\""), "{empty_locale}");
    let with_bom = dir.path().join("bom.ndjson");
    std::fs::write(
        &with_bom,
        format!("\u{feff}{}\n{empty_locale}\n", login("bom-1")),
    )
    .expect("write");
    let array_with_bom = dir.path().join("bom.json");
    std::fs::write(&array_with_bom, format!("\u{feff}[{}]", login("bom-3"))).expect("write");
    for path in [&with_bom, &array_with_bom] {
        let out = run_with_config(
            &file_config(&schema, path_str(path)),
            &["run", "--summary", "json"],
        )
        .await;
        out.assert_success();
        assert_eq!(
            out.summary().rejected,
            0,
            "{path:?}: {:?}",
            schema.rejects().await
        );
    }
    let locale: Option<String> = schema
        .client
        .query_one(
            &format!(
                "SELECT locale FROM {} WHERE user_id = 'bom-2'",
                schema.table()
            ),
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(
        locale.as_deref(),
        Some(""),
        "an empty locale stays empty, not NULL"
    );
}

/// The configuration is found by `--config`, `-c` or `SLUICE_CONFIG`; `--help` says which
/// environment variables count and what the exit codes mean; `completions` prints a script for
/// each shell.
#[tokio::test]
async fn the_config_is_found_and_the_help_tells_the_rest() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("in.ndjson");
    std::fs::write(&data, login("found")).expect("write");
    let config = TestConfig::write(&file_config(&schema, path_str(&data)));
    let cfg = path_str(&config.path);

    let short = run_to_end(sluice(&["check", "-c", cfg]), LIMIT).await;
    assert_eq!(short.code, Some(0), "{short:?}");
    assert!(short.stdout.contains("config      ok"), "{}", short.stdout);

    let mut from_env = sluice(&["check"]);
    from_env.env("SLUICE_CONFIG", cfg);
    let out = run_to_end(from_env, LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("config      ok"), "{}", out.stdout);

    let mut flag_wins = sluice(&["check", "--config", cfg]);
    flag_wins.env("SLUICE_CONFIG", dir.path().join("absent.toml"));
    let out = run_to_end(flag_wins, LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    let neither = run_to_end(sluice(&["check"]), LIMIT).await;
    assert_eq!(neither.code, Some(2), "{neither:?}");
    assert!(neither.stderr.contains("--config"), "{}", neither.stderr);

    for args in [&["--help"][..], &["run", "--help"], &["seed", "--help"]] {
        let help = run_to_end(sluice(args), LIMIT).await;
        assert_eq!(help.code, Some(0), "{help:?}");
        for expected in [
            "SLUICE_CONFIG",
            "SLUICE_DATABASE_URL",
            "SLUICE_SQS_QUEUE_URL",
            "SLUICE_SQS_ENDPOINT_URL",
            "SLUICE_MASK_KEY",
            "RUST_LOG",
            "AWS_ACCESS_KEY_ID",
            "Exit codes",
            "130",
        ] {
            assert!(
                help.stdout.contains(expected),
                "{args:?}: {expected} in\n{}",
                help.stdout
            );
        }
    }
    let help = run_to_end(sluice(&["check", "--help"]), LIMIT).await;
    assert!(
        help.stdout.contains("-c, --config <FILE>"),
        "{}",
        help.stdout
    );

    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_to_end(sluice(&["completions", shell]), LIMIT).await;
        assert_eq!(out.code, Some(0), "{shell}: {out:?}");
        assert!(
            out.stdout.contains("config") && out.stdout.contains("exit-when-idle"),
            "{shell}: {}",
            out.stdout
        );
    }
    let out = run_with_stdout_closed(sluice(&["completions", "bash"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_quiet_about_the_pipe(&out);
}

/// A file with several problems of every kind (unknown keys, values of the wrong type or outside
/// their enum, out-of-range numbers, a log filter that would silence everything) is reported whole in
/// one run, each problem by its key and line.
#[tokio::test]
async fn a_bad_configuration_is_reported_whole_in_one_run() {
    let toml = r#"[source]
kind = "sqs"
[source.sqs]
queue_name = "q"
polers = 3
max_messages = 11
[pipeline]
channel_capacity = 1
[sink.postgres]
url = "postgres://x@y/z"
batch_rows = "many"
conections = 2
[mask]
mode = "md5"
[log]
level = "loud"
"#;
    for command in ["run", "check"] {
        let out = run_with_config(toml, &[command]).await;
        assert_eq!(out.code, Some(2), "{command}: {out:?}");
        for expected in [
            "has 7 problem(s)",
            "`source.sqs.polers` (line 5): unknown field `polers`",
            "`source.sqs.max_messages` (line 6): must be between 1 and 10, got 11",
            "`pipeline.channel_capacity` (line 8): must be between 2 and",
            "`sink.postgres.batch_rows` (line 11): invalid type: string \"many\"",
            "`sink.postgres.conections` (line 12): unknown field `conections`",
            "`mask.mode` (line 14): unknown variant `md5`",
            "`log.level` (line 16): ",
        ] {
            assert!(
                out.stderr.contains(expected),
                "{command}: expected {expected:?} in:\n{}",
                out.stderr
            );
        }
    }

    // A source kind that does not exist leaves nothing to check the source's keys against; the
    // rest of the file is still checked.
    let toml = "[source]\nkind = \"kafka\"\n[pipeline]\nchanel_capacity = 3\n";
    let out = run_with_config(toml, &["run"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("has 2 problem(s)"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("`source.kind` (line 2): unknown variant `kafka`"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("`pipeline.chanel_capacity` (line 4): unknown field"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("missing field"), "{}", out.stderr);
}

/// A bad value from an environment override is blamed on the variable, not on the file.
#[tokio::test]
async fn a_bad_environment_override_names_the_variable() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    for (variable, value) in [
        ("SLUICE_DATABASE_URL", "postgres://x@y/z?sslmode=sometimes"),
        ("SLUICE_SQS_QUEUE_URL", "ftp://queue"),
        ("SLUICE_SQS_ENDPOINT_URL", "localhost:4566"),
    ] {
        let mut cmd = run_command(&config.path, None);
        cmd.env(variable, value);
        let out = run_to_end(cmd, LIMIT).await;
        assert_eq!(out.code, Some(2), "{variable}: {out:?}");
        assert!(
            out.stderr.contains(&format!("(from {variable})")),
            "{variable}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("config file"),
            "{variable}: the file is not to blame:\n{}",
            out.stderr
        );
    }
}

/// Every problem with the masking key (none, too short, a file that cannot be read) is a
/// configuration problem: exit 2, as for any other unusable setting, before anything is touched.
#[tokio::test]
async fn mask_key_problems_are_configuration_problems() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    queue.send(&[login("kept")]).await;
    let no_file = format!(
        "{}\n[mask]\nkey_file = \"absent.key\"\n",
        sqs_config(&queue, &schema, "", "", "")
    );
    let config = TestConfig::write(&no_file);
    let cases: [(Option<&str>, &str); 3] = [
        (None, "absent.key"),
        (Some("short"), "SLUICE_MASK_KEY is 5 bytes"),
        (Some(""), "absent.key"),
    ];
    for (key, expected) in cases {
        for command in ["run", "check"] {
            let mut cmd = sluice(&[command, "--config", path_str(&config.path)]);
            match key {
                Some(key) => cmd.env("SLUICE_MASK_KEY", key),
                None => cmd.env_remove("SLUICE_MASK_KEY"),
            };
            let out = run_to_end(cmd, LIMIT).await;
            assert_eq!(out.code, Some(2), "{command} {key:?}: {out:?}");
            assert!(
                out.stderr.contains(expected) || out.stdout.contains(expected),
                "{command} {key:?}: expected {expected:?} in {out:?}"
            );
        }
    }
    assert_eq!(queue.depth().await, (1, 0), "the message must stay queued");
}
/// `migrate` on a table that does not fit reports every column that is off, with the types it
/// accepts, before it creates anything; a repeated `migrate` is quiet on stderr; `report` before
/// `migrate` says to run it.
#[tokio::test]
async fn migrate_reports_every_mismatch_before_changing_anything() {
    let queue = TestQueue::new().await;
    let schema = TestSchema::new().await;
    let toml = sqs_config(&queue, &schema, "", "", "");

    let report = run_with_config(&toml, &["report"]).await;
    assert_eq!(report.code, Some(1), "{report:?}");
    assert!(
        report.stderr.contains("sluice migrate"),
        "{}",
        report.stderr
    );
    assert!(!report.stderr.contains("SQLSTATE"), "{}", report.stderr);

    for attempt in ["first", "second"] {
        let out = run_with_config(&toml, &["migrate"]).await;
        out.assert_success();
        assert!(
            !out.stderr.contains("NOTICE"),
            "{attempt} migrate: {}",
            out.stderr
        );
    }

    let other = TestSchema::new().await;
    other
        .client
        .batch_execute(&format!(
            "CREATE TABLE {}(user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
             locale varchar(32), app_version bigint, create_date text)",
            other.table()
        ))
        .await
        .expect("create");
    let toml = sqs_config(&queue, &other, "", "", "");
    let out = run_with_config(&toml, &["migrate"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    for expected in [
        "column `masked_device_id` is missing",
        "column `app_version` is `bigint`, accepted: `integer`",
        "column `create_date` is `text`, accepted: `date`",
    ] {
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            out.stderr
        );
    }
    assert!(
        !out.stdout.contains("exists, left unchanged"),
        "{}",
        out.stdout
    );
    let created: bool = other
        .client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&other.dead_letters()],
        )
        .await
        .expect("query")
        .get(0);
    assert!(!created, "nothing may be created while a table is off");
}
/// A free port on the loopback interface, with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn config_with_database(schema: &TestSchema, data: &std::path::Path, url: &str) -> String {
    file_config_at(schema, path_str(data), url, "", "", BATCHING)
}

/// Start-up against a database that does not answer retries the first connection, saying so
/// each time, for `sink.postgres.connect_retry_seconds`, then fails with a clear error.
#[tokio::test]
async fn start_up_retries_a_database_that_does_not_answer_then_gives_up() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("one.ndjson");
    std::fs::write(&data, login("late")).expect("write");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let toml = config_with_database(&schema, &data, &url).replace(
        "linger_ms = 50",
        "linger_ms = 50\nconnect_retry_seconds = 3",
    );
    let started = std::time::Instant::now();
    let out = run_with_config(&toml, &["run"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "gave up after {:?}",
        started.elapsed()
    );
    let retries = out
        .stderr
        .lines()
        .filter(|l| l.contains("PostgreSQL is not reachable yet"))
        .count();
    assert!(retries >= 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("PostgreSQL did not answer within 3 s of start-up"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("error connecting to server: Connection refused"),
        "the reason is part of the error:\n{}",
        out.stderr
    );
    assert!(!out.stdout.contains("received="), "{}", out.stdout);
}

/// A database that comes up while sluice waits for it is used as soon as it answers.
#[tokio::test]
async fn start_up_waits_for_a_database_that_comes_up_late() {
    let schema = TestSchema::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("one.ndjson");
    std::fs::write(&data, login("late")).expect("write");
    let port = closed_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let config = TestConfig::write(&config_with_database(&schema, &data, &url));
    let watched = Watched::spawn(run_command(&config.path, None));
    watched
        .line_containing("PostgreSQL is not reachable yet", LIMIT)
        .await;
    // The database "comes up": a listener on the port, forwarding to the real server.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the late port");
    let real = database_url();
    let target = real
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the test database URL")
        .to_owned();
    let forwarder = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let out = watched.finish(LIMIT).await;
    forwarder.abort();
    out.assert_success();
    assert_eq!(out.summary().loaded, 1, "{out:?}");
    assert_eq!(schema.rows_loaded().await, 1);
}

/// The README's synopsis of the command line names, for each command, exactly the options its
/// `--help` lists; the combinations it shows as alternatives or as belonging to another option are
/// refused, each with a message that names the options.
#[tokio::test]
async fn the_command_line_is_the_one_the_readme_shows() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## The command line")
        .nth(1)
        .expect("a command-line section");
    let synopsis = section.split("```").nth(1).expect("a synopsis block");
    let mut commands: Vec<(String, String)> = Vec::new();
    for line in synopsis.lines().filter(|l| !l.trim().is_empty()) {
        match line.strip_prefix("sluice ") {
            Some(rest) => {
                let (name, options) = rest.split_once(' ').unwrap_or((rest, ""));
                commands.push((name.to_owned(), options.to_owned()));
            }
            None => {
                let (_, options) = commands.last_mut().expect("a command before");
                options.push_str(line);
            }
        }
    }
    let long_options = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| c.is_whitespace() || "[]()|,".contains(c))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect()
    };
    let top = run_to_end(sluice(&["--help"]), LIMIT).await;
    let listed: Vec<&str> = top
        .stdout
        .split("Commands:")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    let named: Vec<&str> = commands.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(named, listed, "README synopsis vs `sluice --help`");
    for (name, options) in &commands {
        let help = run_to_end(sluice(&[name, "--help"]), LIMIT).await;
        assert_eq!(help.code, Some(0), "{name}: {help:?}");
        // Short help lists one option per line, long help (options with possible values) a
        // block per option: the options are the lines that start with one.
        let options_part = help.stdout.split("Options:").nth(1).unwrap_or_default();
        let options_part = options_part
            .split("Environment:")
            .next()
            .unwrap_or_default();
        let listed: std::collections::BTreeSet<String> = options_part
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let l = l.strip_prefix("-c, ").unwrap_or(l);
                l.split_whitespace().next().map(str::to_owned)
            })
            .filter(|o| o.starts_with("--") && o != "--help")
            .collect();
        assert_eq!(
            long_options(options),
            listed,
            "`sluice {name}`: README synopsis vs --help"
        );
    }

    let version = run_to_end(sluice(&["--version"]), LIMIT).await;
    assert_eq!(version.code, Some(0), "{version:?}");
    assert_eq!(
        version.stdout.trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );

    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("in.ndjson");
    std::fs::write(&data, login("grammar")).expect("write");
    let cfg = dir.path().join("c.toml");
    let cfg = path_str(&cfg);
    let file = path_str(&data);
    for (args, expected) in [
        (&["seed", "-c", cfg][..], "--file"),
        (
            &["seed", "-c", cfg, "--file", file, "--seed", "3"],
            "--seed",
        ),
        (
            &["seed", "-c", cfg, "--file", file, "--bad-every", "3"],
            "--bad-every",
        ),
        (
            &["seed", "-c", cfg, "--count", "1", "--out", file, "--force"],
            "--force",
        ),
    ] {
        let out = run_to_end(sluice(args), LIMIT).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.starts_with("error:") && out.stderr.contains(expected),
            "{args:?}: {}",
            out.stderr
        );
        if args.len() == 3 {
            assert!(out.stderr.contains("--count"), "{}", out.stderr);
        }
    }
    assert_eq!(
        std::fs::read_to_string(&data).expect("read"),
        login("grammar"),
        "a refused command line touches nothing"
    );
}
