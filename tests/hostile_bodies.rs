//! Hostile bodies through the real pipeline: each becomes one dead letter with a reason that says
//! exactly what is wrong, its neighbours load, and no batch fails on the way (a failed batch would
//! show as a retry or a dead letter of the `sink` stage, and a stored body the database refused
//! would stop the run).

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// One hostile body: how to find its dead letter among the stored bodies, and what the dead
/// letter must say.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    find: Find,
    stage: &'static [&'static str],
    reason: Reason,
}

/// A tag inside the stored body, or the whole body when it is too short to carry one.
enum Find {
    Tag(String),
    Whole(&'static str),
}

impl Find {
    fn matches(&self, body: &str) -> bool {
        match self {
            Find::Tag(tag) => body.contains(tag.as_str()),
            Find::Whole(whole) => body == *whole,
        }
    }
}

enum Reason {
    Exactly(String),
    StartsWith(&'static str),
    /// Every one of these, in any order (a size limit may be enforced by the source or the parser,
    /// each with its own words; both name the body's size).
    Mentions(Vec<String>),
}

impl Reason {
    fn check(&self, name: &str, reason: &str) {
        let ok = match self {
            Reason::Exactly(expected) => reason == expected,
            Reason::StartsWith(prefix) => reason.starts_with(prefix),
            Reason::Mentions(words) => words.iter().all(|w| reason.contains(w.as_str())),
        };
        assert!(
            ok,
            "{name}: the reason {reason:?} is not what was expected ({})",
            match self {
                Reason::Exactly(e) => format!("exactly {e:?}"),
                Reason::StartsWith(p) => format!("starting with {p:?}"),
                Reason::Mentions(w) => format!("mentioning {w:?}"),
            }
        );
    }
}

const PARSE: &[&str] = &["parse"];

fn login_fields(user: &str, ip: &str) -> String {
    format!(
        r#""user_id": "{user}", "app_version": "2.3.0", "device_type": "android", "ip": "{ip}", "device_id": "d-1""#
    )
}

fn case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    stage: &'static [&'static str],
    reason: Reason,
) -> Case {
    Case {
        name,
        body: body.into(),
        find: Find::Tag(format!("tag-{name}")),
        stage,
        reason,
    }
}

/// A login whose `user_id` is padded so that the whole body is exactly `bytes` long.
fn padded_login(tag: &str, bytes: usize) -> (Vec<u8>, usize) {
    let empty = format!("{{{}}}", login_fields(tag, "10.1.1.1"));
    let pad = bytes - empty.len();
    let user = format!("{tag}{}", "x".repeat(pad));
    let body = format!("{{{}}}", login_fields(&user, "10.1.1.1"));
    assert_eq!(body.len(), bytes);
    (body.into_bytes(), user.chars().count())
}

fn cases() -> Vec<Case> {
    let (big, big_user_chars) = padded_login("tag-256kib-", 256 * 1024);
    let huge = format!(
        r#"{{"user_id": "tag-2mib-{}"}}"#,
        "y".repeat(2 * 1024 * 1024 - 24)
    );
    assert_eq!(huge.len(), 2 * 1024 * 1024);
    let deep = format!(
        r#"{{{}, "extra": {}{}}}"#,
        login_fields("tag-deep", "10.1.1.2"),
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let mut raw_nul = format!("{{{}}}", login_fields("tag-raw-nul-X", "10.1.1.3")).into_bytes();
    let x = raw_nul.iter().position(|b| *b == b'X').expect("X");
    raw_nul[x] = 0;
    let mut bad_utf8 = format!("{{{}}}", login_fields("tag-bad-utf8-X", "10.1.1.4")).into_bytes();
    let x = bad_utf8.iter().position(|b| *b == b'X').expect("X");
    bad_utf8[x] = 0xff;
    vec![
        case(
            "256kib",
            big,
            PARSE,
            Reason::Exactly(format!(
                "field `user_id` is {big_user_chars} characters long, the column holds at most 128"
            )),
        ),
        case(
            "2mib",
            huge,
            &["parse", "source"],
            Reason::Mentions(vec!["2097152".into(), "bytes".into()]),
        ),
        case(
            "deep",
            deep,
            PARSE,
            Reason::Exactly("body is JSON nested deeper than 128 levels".into()),
        ),
        case(
            "bom",
            format!("\u{feff}{{{}}}", login_fields("tag-bom", "10.1.1.5")),
            PARSE,
            Reason::Exactly("body starts with a byte-order mark (U+FEFF), which JSON text must not".into()),
        ),
        case(
            "zone-id",
            format!("{{{}}}", login_fields("tag-zone-id", "fe80::1%eth0")),
            PARSE,
            Reason::Exactly(
                "field `ip` is not an IPv4 or IPv6 address: it carries a zone id (`%…`)".into(),
            ),
        ),
        case(
            "leading-zeros",
            format!("{{{}}}", login_fields("tag-leading-zeros", "010.001.002.003")),
            PARSE,
            Reason::Exactly(
                "field `ip` is not an IPv4 or IPv6 address: a part has a leading zero (octal or decimal?)"
                    .into(),
            ),
        ),
        case(
            "escaped-nul",
            format!("{{{}}}", login_fields("tag-escaped-nul-\\u0000", "10.1.1.6")),
            PARSE,
            Reason::Exactly(
                "field `user_id` contains a NUL character, which PostgreSQL text cannot hold".into(),
            ),
        ),
        case(
            "raw-nul",
            raw_nul,
            PARSE,
            Reason::StartsWith("invalid JSON: control character (\\u0000-\\u001F) found while parsing a string"),
        ),
        case(
            "bad-utf8",
            bad_utf8,
            &["source"],
            Reason::Exactly("body is not valid UTF-8".into()),
        ),
        case(
            "number-for-string",
            r#"{"user_id": "tag-number-for-string", "app_version": 2.3, "device_type": "android", "ip": "10.1.1.7", "device_id": "d"}"#,
            PARSE,
            Reason::Exactly("field `app_version` must be a string, found a number".into()),
        ),
        case(
            "ip-as-number",
            r#"{"user_id": "tag-ip-as-number", "app_version": "2.3", "device_type": "android", "ip": 167837953, "device_id": "d"}"#,
            PARSE,
            Reason::Exactly("field `ip` must be a string, found a number".into()),
        ),
        case(
            "string-for-number",
            r#"{"user_id": "tag-string-for-number", "app_version": "99999999999.1", "device_type": "android", "ip": "10.1.1.8", "device_id": "d"}"#,
            &["transform"],
            Reason::Exactly(
                "field `app_version` \"99999999999.1\": major part does not fit an integer column".into(),
            ),
        ),
        case(
            "duplicate-keys",
            format!(
                r#"{{{}, "user_id": "tag-duplicate-keys-2"}}"#,
                login_fields("tag-duplicate-keys", "10.1.1.9")
            ),
            PARSE,
            Reason::StartsWith("invalid JSON: duplicate field `user_id`"),
        ),
        Case {
            find: Find::Whole("{}"),
            ..case("empty-object", "{}", PARSE, Reason::Exactly("missing field `user_id`".into()))
        },
        case(
            "array",
            r#"["tag-array", {"user_id": "u"}]"#,
            PARSE,
            Reason::Exactly("body is not a JSON object (found an array)".into()),
        ),
    ]
}

/// Each case's dead letter is there once, from the stage and with the reason expected, and no
/// other dead letter exists.
async fn assert_dead_letters(schema: &TestSchema, cases: &[Case]) {
    let rejects = schema.rejects().await;
    for case in cases {
        let found: Vec<_> = rejects
            .iter()
            .filter(|(_, _, body)| case.find.matches(body))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: dead letters found: {found:?}",
            case.name
        );
        let (reason, stage, _) = found[0];
        assert!(
            case.stage.contains(&stage.as_str()),
            "{}: stage {stage} ({reason})",
            case.name
        );
        case.reason.check(case.name, reason);
    }
    assert_eq!(
        rejects.len(),
        cases.len(),
        "one dead letter per hostile body"
    );
}

fn assert_no_failed_batch(out: &Finished) {
    out.assert_success();
    for word in ["WARN", "ERROR", "retrying", "refused a row"] {
        assert!(
            !out.stderr.contains(word),
            "{word} in the log:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn hostile_lines_of_a_file_each_become_one_precise_dead_letter() {
    let schema = TestSchema::new().await;
    let cases = cases();
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("hostile.ndjson");
    let mut bytes = format!("{}\n", login("hostile-neighbour-1")).into_bytes();
    for case in &cases {
        assert!(!case.body.contains(&b'\n'), "{}", case.name);
        bytes.extend_from_slice(&case.body);
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(format!("{}\n", login("hostile-neighbour-2")).as_bytes());
    std::fs::write(&data, bytes).expect("write");
    let config = TestConfig::write(&file_config(&schema, path_str(&data), "", "", ""));
    let out = run_to_end(run_command(&config.path, None), LIMIT).await;
    assert_no_failed_batch(&out);
    assert_eq!(
        out.summary(),
        Summary {
            received: cases.len() as u64 + 2,
            loaded: 2,
            rejected: cases.len() as u64,
            duplicates: 0
        }
    );
    assert_eq!(schema.rows_loaded().await, 2);
    assert_dead_letters(&schema, &cases).await;
}

/// Through SQS, where a body's size is bounded by the queue: a body of exactly 256 KiB (the
/// queue's default limit), one with a byte-order mark, and one that is only white space (SQS
/// refuses a truly empty body).
#[tokio::test]
async fn hostile_messages_from_sqs_each_become_one_precise_dead_letter() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let all = cases();
    let mut cases: Vec<Case> = all
        .into_iter()
        .filter(|c| ["256kib", "bom", "deep", "escaped-nul"].contains(&c.name))
        .collect();
    cases.push(Case {
        find: Find::Whole(" "),
        ..case("blank", " ", PARSE, Reason::Exactly("body is empty".into()))
    });
    let mut bodies: Vec<String> = cases
        .iter()
        .map(|c| String::from_utf8(c.body.clone()).expect("SQS carries text"))
        .collect();
    bodies.push(login("hostile-sqs-neighbour"));
    // One at a time: a batch of ten bodies may not exceed the queue's size limit in total.
    for body in &bodies {
        queue.send(std::slice::from_ref(body)).await;
    }
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let out = run_until_idle(&config.path, 3).await;
    assert_no_failed_batch(&out);
    assert_eq!(
        out.summary(),
        Summary {
            received: bodies.len() as u64,
            loaded: 1,
            rejected: cases.len() as u64,
            duplicates: 0
        }
    );
    assert_dead_letters(&schema, &cases).await;
    assert_eq!(queue.depth().await, (0, 0), "every message acknowledged");
}
