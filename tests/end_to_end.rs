//! The pipeline end to end through the real binary, the real PostgreSQL and the SQS emulator:
//! rows, masks, every reject reason, and the demo's promise (a second run adds nothing).

mod common;

use std::time::Duration;

use common::*;

/// The demo data set: every valid message becomes a row, every invalid one a dead letter with its
/// reason, the queue ends empty, and seeding and running again adds nothing.
#[tokio::test]
async fn demo_messages_load_and_a_second_run_adds_nothing() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "pollers = 2", "", ""));
    let cfg = path_str(&config.path);
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/data/demo-logins.json");

    let migrated = migrate(&config.path).await;
    assert!(migrated.stdout.contains("created"), "{}", migrated.stdout);

    for round in 0..2 {
        run_to_end(
            sluice(&["seed", "--config", cfg, "--file", demo]),
            Duration::from_secs(60),
        )
        .await
        .assert_success();
        let run = run_until_idle(&config.path, 2).await;
        run.assert_success();
        // SQS delivers at least once (the emulator, like SQS, may hand a message to two pollers);
        // whatever arrives twice must be counted as a duplicate, never loaded twice.
        let s = run.summary();
        let (loaded, rejected, fresh) = if round == 0 { (90, 10, 100) } else { (0, 0, 0) };
        assert_eq!(
            (s.loaded, s.rejected),
            (loaded, rejected),
            "round {round}: {s:?}\n{}",
            run.stderr
        );
        assert_eq!(
            s.received,
            s.loaded + s.rejected + s.duplicates,
            "round {round}: {s:?}"
        );
        assert!(
            s.received >= 100 && s.duplicates >= 100 - fresh,
            "round {round}: {s:?}"
        );
        assert_eq!(schema.rows_loaded().await, 90);
        assert_eq!(schema.count(&schema.dead_letters()).await, 10);
        assert_eq!(
            queue.depth().await,
            (0, 0),
            "queue must be empty after round {round}"
        );
    }

    let mut reasons: Vec<String> = schema
        .rejects()
        .await
        .into_iter()
        .map(|(reason, _, _)| reason)
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "body is not a JSON object (found a string)",
            "field `app_version` is not dot-separated decimal numbers: \"v2.3\"",
            "field `device_type` is empty",
            "field `ip` is not an IPv4 or IPv6 address",
            "field `locale` is 47 characters long, the column holds at most 32",
            "field `user_id` must be a string, found a number",
            "missing field `device_id`",
            "missing field `user_id`",
            "missing field `user_id`",
            "missing field `user_id`",
        ]
    );
}

/// Masks are HMAC-SHA256 of the canonical value under the configured key, checked against
/// PostgreSQL's own pgcrypto implementation; equal values mask alike, different ones differently.
#[tokio::test]
async fn rows_carry_the_right_values_and_masks() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let bodies = [
        r#"{"user_id": "u1", "app_version": "2.3.0", "device_type": "android", "ip": "1.2.3.4", "locale": "RU", "device_id": "593-47-5928"}"#,
        r#"{"user_id": "u2", "app_version": "0.96", "device_type": "ios", "ip": "::ffff:1.2.3.4", "locale": null, "device_id": "593-47-5928"}"#,
        r#"{"user_id": "u3", "app_version": "2.00", "device_type": "ios", "ip": "2001:db8::1", "device_id": "d-2", "create_date": "2024-03-01"}"#,
        r#"{"user_id": "u4", "app_version": "6.4.8", "device_type": "android", "ip": "2001:0DB8:0:0:0:0:0:1", "locale": "DE", "device_id": "d-3", "create_date": "not a date"}"#,
        r#"{"user_id": "u5", "app_version": "12", "device_type": "android", "ip": "1.2.3.5", "locale": "FR", "device_id": "d-4", "extra": {"nested": [1, 2]}}"#,
    ]
    .map(String::from);
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(run.summary().loaded, 5, "{}", run.stderr);

    let c = &schema.client;
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        .await
        .expect("pgcrypto");
    let rows = c
        .query(
            &format!(
                "SELECT user_id, device_type, locale, app_version, create_date::text,
                        masked_ip, masked_device_id,
                        create_date = (now() AT TIME ZONE 'utc')::date AS sent_today
                 FROM {} ORDER BY user_id",
                schema.table()
            ),
            &[],
        )
        .await
        .expect("rows");
    let hmac = |value: &str| {
        let value = value.to_owned();
        async move {
            let row = pg()
                .await
                .query_one(
                    "SELECT encode(public.hmac($1::text, $2::text, 'sha256'), 'hex')",
                    &[&value, &MASK_KEY],
                )
                .await
                .expect("pgcrypto hmac");
            row.get::<_, String>(0)
        }
    };
    let get = |i: usize, col: &str| -> Option<String> { rows[i].get(col) };
    let version = |i: usize| -> i32 { rows[i].get("app_version") };

    assert_eq!(rows.len(), 5);
    assert_eq!(get(0, "user_id").as_deref(), Some("u1"));
    assert_eq!(get(0, "device_type").as_deref(), Some("android"));
    assert_eq!(get(0, "locale").as_deref(), Some("RU"));
    assert_eq!(get(1, "locale"), None, "null locale is NULL");
    assert_eq!(get(2, "locale"), None, "absent locale is NULL");
    assert_eq!(
        [version(0), version(1), version(2), version(3), version(4)],
        [2, 0, 2, 6, 12]
    );

    // The same address written two ways, and the same device id, mask alike.
    let ip_1234 = hmac("1.2.3.4").await;
    assert_eq!(get(0, "masked_ip"), Some(ip_1234.clone()));
    assert_eq!(get(1, "masked_ip"), Some(ip_1234.clone()));
    let ip_v6 = hmac("2001:db8::1").await;
    assert_eq!(get(2, "masked_ip"), Some(ip_v6.clone()));
    assert_eq!(get(3, "masked_ip"), Some(ip_v6));
    assert_eq!(get(4, "masked_ip"), Some(hmac("1.2.3.5").await));
    assert_ne!(get(4, "masked_ip"), Some(ip_1234));
    let device = hmac("593-47-5928").await;
    assert_eq!(get(0, "masked_device_id"), Some(device.clone()));
    assert_eq!(get(1, "masked_device_id"), Some(device));
    assert_ne!(get(2, "masked_device_id"), get(3, "masked_device_id"));

    // create_date: the body's if valid, else the day SQS accepted the message.
    assert_eq!(get(2, "create_date").as_deref(), Some("2024-03-01"));
    for i in [0, 1, 3, 4] {
        assert!(
            rows[i].get::<_, bool>("sent_today"),
            "row {i} should carry the sent date"
        );
    }
}

/// The compatibility mask and the packed version encoding, configured.
#[tokio::test]
async fn salted_masks_and_packed_versions_when_configured() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    queue
        .send(&[
            r#"{"user_id": "p1", "app_version": "6.4.8", "device_type": "ios", "ip": "8.8.8.8", "device_id": "dev-1"}"#.into(),
            r#"{"user_id": "p2", "app_version": "0.96", "device_type": "ios", "ip": "8.8.4.4", "device_id": "dev-2"}"#.into(),
            r#"{"user_id": "p3", "app_version": "1.1000", "device_type": "ios", "ip": "8.8.4.4", "device_id": "dev-2"}"#.into(),
        ])
        .await;
    let extra = "[mask]\nmode = \"salted-sha256\"\n\n[transform]\napp_version = \"packed\"\ncreate_date = \"processing_time\"\n";
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", extra));
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(run.summary().loaded, 2, "{}", run.stderr);
    assert_eq!(run.summary().rejected, 1);

    let check = schema
        .client
        .query(
            &format!(
                "SELECT user_id, app_version,
                        masked_ip = encode(sha256(convert_to($1 || CASE user_id WHEN 'p1' THEN '8.8.8.8' ELSE '8.8.4.4' END, 'UTF8')), 'hex'),
                        masked_device_id = encode(sha256(convert_to($1 || CASE user_id WHEN 'p1' THEN 'dev-1' ELSE 'dev-2' END, 'UTF8')), 'hex'),
                        create_date = (now() AT TIME ZONE 'utc')::date
                 FROM {} ORDER BY user_id",
                schema.table()
            ),
            &[&MASK_KEY],
        )
        .await
        .expect("rows");
    let got: Vec<(String, i32, bool, bool, bool)> = check
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        got,
        [
            ("p1".to_owned(), 6_004_008, true, true, true),
            ("p2".to_owned(), 96_000, true, true, true)
        ]
    );
    let rejects = schema.rejects().await;
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].1, "transform");
    assert!(
        rejects[0].0.contains("does not fit the packed form"),
        "{}",
        rejects[0].0
    );
}

/// Every kind of bad message gets a dead letter whose reason says which field and what is wrong.
#[tokio::test]
async fn every_reject_reason_is_recorded_with_its_body() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let ok = |field: &str, value: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&login("r")).expect("json");
        v[field] = serde_json::from_str(value).expect("json value");
        v.to_string()
    };
    let without = |field: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&login("r")).expect("json");
        v.as_object_mut().expect("object").remove(field);
        v.to_string()
    };
    let long = |n: usize| format!("\"{}\"", "x".repeat(n));
    let cases: Vec<(String, &str)> = vec![
        ("not json at all".into(), "invalid JSON: expected ident at line 1 column 2"),
        ("[1, 2]".into(), "body is not a JSON object (found an array)"),
        (r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#.into(), "missing field `user_id`"),
        (without("device_type"), "missing field `device_type`"),
        (without("ip"), "missing field `ip`"),
        (without("device_id"), "missing field `device_id`"),
        (without("app_version"), "missing field `app_version`"),
        (ok("user_id", "42"), "field `user_id` must be a string, found a number"),
        (ok("device_type", "null"), "field `device_type` must be a string, found null"),
        (ok("ip", "[1]"), "field `ip` must be a string, found an array"),
        (ok("device_id", "{}"), "field `device_id` must be a string, found an object"),
        (ok("app_version", "2.3"), "field `app_version` must be a string, found a number"),
        (ok("locale", "true"), "field `locale` must be a string, found a boolean"),
        (ok("user_id", "\"\""), "field `user_id` is empty"),
        (ok("user_id", &long(129)), "field `user_id` is 129 characters long, the column holds at most 128"),
        (ok("device_type", &long(33)), "field `device_type` is 33 characters long, the column holds at most 32"),
        (ok("ip", "\"1.2.3\""), "field `ip` is not an IPv4 or IPv6 address"),
        (ok("ip", "\"localhost\""), "field `ip` is not an IPv4 or IPv6 address"),
        (ok("app_version", "\"2.x\""), "field `app_version` is not dot-separated decimal numbers: \"2.x\""),
        (ok("user_id", "\"a\\u0000b\""), "field `user_id` contains a NUL character, which PostgreSQL text cannot hold"),
        (
            r#"{"user_id": "a", "user_id": "b", "app_version": "1", "device_type": "x", "ip": "1.1.1.1", "device_id": "d"}"#.into(),
            "invalid JSON: duplicate field `user_id` at line 1 column 26",
        ),
        (
            ok("app_version", "\"99999999999.1\""),
            "field `app_version` \"99999999999.1\": major part does not fit an integer column",
        ),
    ];
    let bodies: Vec<String> = cases.iter().map(|(b, _)| b.clone()).collect();
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", ""));
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(
        run.summary(),
        Summary {
            received: cases.len() as u64,
            loaded: 0,
            rejected: cases.len() as u64,
            duplicates: 0
        }
    );
    let stored: std::collections::HashMap<String, String> = schema
        .rejects()
        .await
        .into_iter()
        .map(|(reason, _, body)| (body, reason))
        .collect();
    for (body, reason) in &cases {
        assert_eq!(
            stored.get(body).map(String::as_str),
            Some(*reason),
            "body {body}"
        );
    }
    let stages = schema
        .client
        .query(
            &format!(
                "SELECT DISTINCT stage FROM {} ORDER BY 1",
                schema.dead_letters()
            ),
            &[],
        )
        .await
        .expect("stages");
    let stages: Vec<String> = stages.iter().map(|r| r.get(0)).collect();
    assert_eq!(stages, ["parse", "transform"]);
    assert_eq!(queue.depth().await, (0, 0));
}

/// With a dead-letter queue configured, rejects also go there, with the reason as an attribute.
#[tokio::test]
async fn rejects_are_forwarded_to_the_dead_letter_queue() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let dlq = TestQueue::new().await;
    queue
        .send(&[
            login("good-1"),
            "{}".into(),
            login("good-2"),
            r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#.into(),
        ])
        .await;
    let extra = format!("[dead_letter]\nsqs_queue_url = \"{}\"\n", dlq.url);
    // `sqs_config` already opens [dead_letter]; add the key to that section instead of a second one.
    let toml = sqs_config(&queue, &schema, "", "", "").replace("[dead_letter]\n", &extra);
    let config = TestConfig::write(&toml);
    let run = run_until_idle(&config.path, 2).await;
    run.assert_success();
    assert_eq!(run.summary().rejected, 2);

    let mut forwarded = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while forwarded.len() < 2 && std::time::Instant::now() < deadline {
        let out = dlq
            .client
            .receive_message()
            .queue_url(&dlq.url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        for m in out.messages.unwrap_or_default() {
            let reason = m
                .message_attributes
                .as_ref()
                .and_then(|a| a.get("sluice_reason"))
                .and_then(|v| v.string_value.clone())
                .unwrap_or_default();
            forwarded.push((m.body.unwrap_or_default(), reason));
        }
    }
    forwarded.sort();
    assert_eq!(
        forwarded,
        [
            (
                "{\"foo\": \"oops_wrong_msg_type\", \"bar\": \"123\"}".to_owned(),
                "missing field `user_id`".to_owned()
            ),
            ("{}".to_owned(), "missing field `user_id`".to_owned()),
        ]
    );
}

/// `/metrics` reports what the run did, `/healthz` answers, `/readyz` says ready while connected.
#[tokio::test]
async fn the_operations_endpoint_reports_counts_and_readiness() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    // Port 0: the daemon listens wherever it can and says where.
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", extra));
    let daemon = Watched::spawn(run_command(&config.path, None));
    let addr = daemon.metrics_address().await;
    queue.send(&[login("m-1"), login("m-2"), "{}".into()]).await;

    eventually(
        Duration::from_secs(30),
        "three messages acknowledged",
        || async {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(_) => http_get(&addr, "/metrics")
                    .await
                    .1
                    .contains("sluice_messages_acknowledged_total 3"),
                Err(_) => false,
            }
        },
    )
    .await;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "sluice_messages_received_total 3",
        "sluice_rows_loaded_total 2",
        "sluice_dead_letters_total 1",
        "sluice_duplicates_total 0",
        "sluice_postgres_connections 2",
        "sluice_commit_seconds_count",
        "sluice_end_to_end_seconds_count 3",
        "sluice_channel_capacity{channel=\"source_to_parse\"} 204",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    assert_eq!(http_get(&addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        http_get(&addr, "/readyz").await,
        (200, "ready\n".to_owned())
    );

    signal(&daemon.child, "TERM");
    daemon
        .finish(Duration::from_secs(30))
        .await
        .assert_success();
}
