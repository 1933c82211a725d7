//! `mask.key_source = "kms"` against the emulator's KMS: the data key decrypted at start masks
//! exactly as the same key given in the environment, for the keyed hash and for `aes-siv`; a data
//! key of another KMS key, or a KMS that does not answer, stops the start with exit 2.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn kms_client() -> aws_sdk_kms::Client {
    let creds = aws_sdk_kms::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_kms::config::Builder::new()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(aws_endpoint())
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

async fn create_kms_key(kms: &aws_sdk_kms::Client) -> String {
    kms.create_key()
        .send()
        .await
        .expect("the emulator's KMS creates a key")
        .key_metadata
        .expect("metadata")
        .key_id
}

/// `sluice keygen --kms-key-id KEY [--id ID]`: the printed `[ID:]CIPHERTEXT`.
async fn keygen(key_id: &str, id: Option<&str>) -> String {
    let mut args = vec!["keygen", "--kms-key-id", key_id];
    if let Some(id) = id {
        args.extend(["--id", id]);
    }
    let mut cmd = sluice(&args);
    cmd.env("SLUICE_KMS_ENDPOINT_URL", aws_endpoint());
    let out = run_to_end(cmd, LIMIT).await;
    out.assert_success();
    out.stdout.trim().to_owned()
}

async fn plaintext(kms: &aws_sdk_kms::Client, ciphertext: &str) -> Vec<u8> {
    let blob = STANDARD.decode(ciphertext).expect("base64");
    kms.decrypt()
        .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob))
        .send()
        .await
        .expect("decrypt")
        .plaintext
        .expect("plaintext")
        .into_inner()
}

fn kms_mask(mode: &str, key_id: &str, data_key: &str) -> String {
    format!(
        "[mask]\nmode = \"{mode}\"\nkey_source = \"kms\"\nkms_key_id = \"{key_id}\"\n\
         kms_data_keys = [\"{data_key}\"]\nkms_endpoint_url = \"{}\"\n",
        aws_endpoint()
    )
}

/// Loads `users` through a new queue into `schema` with `[mask]` as given; with `env_key`, that
/// key in SLUICE_MASK_KEY, else none.
async fn load(schema: &TestSchema, mask: &str, env_key: Option<&str>, users: &[&str]) -> Finished {
    let queue = TestQueue::new().await;
    let bodies: Vec<String> = users
        .iter()
        .map(|u| login_with(u, "203.0.113.7", &format!("dev-{u}")))
        .collect();
    queue.send(&bodies).await;
    let config = TestConfig::write(&sqs_config(&queue, schema, "", "", mask));
    let mut cmd = run_command(&config.path, Some(1));
    match env_key {
        Some(key) => cmd.env("SLUICE_MASK_KEY", key),
        None => cmd.env_remove("SLUICE_MASK_KEY"),
    };
    run_to_end(cmd, LIMIT).await
}

async fn masks(schema: &TestSchema) -> HashMap<String, (String, String)> {
    let sql = format!(
        "SELECT user_id, masked_ip, masked_device_id FROM {}",
        schema.table()
    );
    let rows = schema.client.query(&sql, &[]).await.expect("rows");
    rows.iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

#[tokio::test]
async fn a_key_from_kms_masks_as_the_same_key_from_the_environment() {
    let kms = kms_client();
    let key_id = create_kms_key(&kms).await;
    let users = ["kms-1", "kms-2", "kms-3"];

    // aes-siv: the keyring entry k1 from KMS, against the same key written out in the environment.
    let entry = keygen(&key_id, Some("k1")).await;
    let ciphertext = entry.strip_prefix("k1:").expect("an id prefix");
    let key = STANDARD.encode(plaintext(&kms, ciphertext).await);
    let from_kms = TestSchema::new().await;
    let run = load(
        &from_kms,
        &kms_mask("aes-siv", &key_id, &entry),
        None,
        &users,
    )
    .await;
    run.assert_success();
    assert_eq!(run.summary().loaded, 3);
    assert!(!run.stderr.contains(&key), "the plaintext key was logged");
    let from_env = TestSchema::new().await;
    let mask = "[mask]\nmode = \"aes-siv\"\n";
    let run = load(&from_env, mask, Some(&format!("k1:{key}")), &users).await;
    run.assert_success();
    let (kms_masks, env_masks) = (masks(&from_kms).await, masks(&from_env).await);
    assert_eq!(kms_masks.len(), 3);
    assert_eq!(kms_masks, env_masks);
    assert!(kms_masks.values().all(|(ip, _)| ip.starts_with("k1:")));

    // The keyed hash: the data key is the HMAC key; PostgreSQL's pgcrypto computes the same mask.
    let data_key = keygen(&key_id, None).await;
    let key_bytes = plaintext(&kms, &data_key).await;
    let hashed = TestSchema::new().await;
    let run = load(
        &hashed,
        &kms_mask("hmac-sha256", &key_id, &data_key),
        None,
        &users,
    )
    .await;
    run.assert_success();
    hashed
        .client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        .await
        .expect("pgcrypto");
    let expected: String = hashed
        .client
        .query_one(
            "SELECT encode(public.hmac(convert_to('203.0.113.7', 'UTF8'), $1::bytea, 'sha256'), 'hex')",
            &[&key_bytes],
        )
        .await
        .expect("pgcrypto hmac")
        .get(0);
    let hashed_masks = masks(&hashed).await;
    assert_eq!(hashed_masks.len(), 3);
    assert!(
        hashed_masks.values().all(|(ip, _)| ip == &expected),
        "{hashed_masks:?} vs {expected}"
    );
}

#[tokio::test]
async fn another_kms_key_or_no_kms_stops_the_start_with_exit_2() {
    let kms = kms_client();
    let (key_a, key_b) = (create_kms_key(&kms).await, create_kms_key(&kms).await);
    let data_key_of_b = keygen(&key_b, None).await;
    let schema = TestSchema::new().await;
    let out = load(
        &schema,
        &kms_mask("hmac-sha256", &key_a, &data_key_of_b),
        None,
        &["x"],
    )
    .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("KMS did not decrypt `mask.kms_data_keys` entry 1 under `mask.kms_key_id`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("AccessDenied"), "{}", out.stderr);

    let unreachable = kms_mask("hmac-sha256", &key_b, &data_key_of_b).replace(
        &format!("kms_endpoint_url = \"{}\"", aws_endpoint()),
        "kms_endpoint_url = \"http://127.0.0.1:9\"",
    );
    let out = load(&schema, &unreachable, None, &["x"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("KMS did not decrypt"), "{}", out.stderr);
    assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);
    assert_eq!(schema.rows_so_far().await, 0, "nothing loaded");
}
