//! `mask.mode = "aes-siv"`: every value a run seals is recovered by `sluice unmask` with the
//! keyring; after a rotation, rows sealed under the old and the new key both open; a wrong key or
//! an altered value is refused. The longest values the validator lets through fit the columns.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(60);
/// The longest device id that still seals into `varchar(256)`, in bytes (two-byte characters).
const LONGEST_DEVICE_ID_BYTES: usize = 169;

async fn keygen(id: &str) -> String {
    let out = run_to_end(sluice(&["keygen", "--id", id]), LIMIT).await;
    out.assert_success();
    out.stdout.trim().to_owned()
}

/// `sluice unmask --key-file RING`, the values on stdin.
async fn unmask(ring: &Path, values: &[String]) -> Finished {
    let mut cmd = sluice(&["unmask", "--key-file", path_str(ring)]);
    cmd.env_remove("SLUICE_MASK_KEY").stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn sluice unmask");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all((values.join("\n") + "\n").as_bytes())
        .await
        .expect("write values");
    drop(stdin);
    finish(child, LIMIT).await
}

/// Runs sluice over what the queue holds, sealing with the keyring in `ring`.
async fn run_sealed(config: &Path) -> Finished {
    let mut cmd = run_command(config, Some(1));
    cmd.env_remove("SLUICE_MASK_KEY");
    let out = run_to_end(cmd, LIMIT).await;
    out.assert_success();
    out
}

/// user_id → (masked_ip, masked_device_id) of every row.
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

/// Unmasks every masked value of `masks` and checks it against `expected` (user → (ip, device)).
async fn assert_every_value_opens(
    ring: &Path,
    masks: &HashMap<String, (String, String)>,
    expected: &HashMap<String, (String, String)>,
) {
    let users: Vec<&String> = masks.keys().collect();
    let values: Vec<String> = users
        .iter()
        .flat_map(|u| [masks[*u].0.clone(), masks[*u].1.clone()])
        .collect();
    let out = unmask(ring, &values).await;
    out.assert_success();
    let opened: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(opened.len(), values.len(), "{out:?}");
    for (i, user) in users.iter().enumerate() {
        let (ip, device) = &expected[*user];
        assert_eq!(
            (opened[2 * i], opened[2 * i + 1]),
            (ip.as_str(), device.as_str()),
            "{user}"
        );
    }
}

#[tokio::test]
async fn sealed_masks_open_rotate_and_refuse_wrong_keys_and_alterations() {
    let schema = TestSchema::new().await;
    let queue = TestQueue::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let ring = dir.path().join("keyring");
    let first_key = keygen("k1").await;
    std::fs::write(&ring, format!("{first_key}\n")).expect("write keyring");
    let extra = format!(
        "[mask]\nmode = \"aes-siv\"\nkey_file = \"{}\"\n",
        path_str(&ring)
    );
    let config = TestConfig::write(&sqs_config(&queue, &schema, "", "", &extra));

    let longest_device = "é".repeat(LONGEST_DEVICE_ID_BYTES / 2) + "x";
    assert_eq!(longest_device.len(), LONGEST_DEVICE_ID_BYTES);
    let longest_v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    // user → (ip as sent, ip as unmasked (canonical), device id)
    let cases = [
        ("u-v4", "199.172.111.135", "199.172.111.135", "593-47-5928"),
        (
            "u-same-ip",
            "199.172.111.135",
            "199.172.111.135",
            "other-device",
        ),
        ("u-mapped", "::FFFF:10.0.0.1", "10.0.0.1", "d-2"),
        ("u-v6", longest_v6, longest_v6, longest_device.as_str()),
        ("u-abbrev", "2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1", "x"),
    ];
    let bodies: Vec<String> = cases
        .iter()
        .map(|(user, ip, _, device)| login_with(user, ip, device))
        .chain([login_with(
            "u-too-long",
            "1.2.3.4",
            &format!("{longest_device}y"),
        )])
        .collect();
    queue.send(&bodies).await;
    let first = run_sealed(&config.path).await;
    assert_eq!((first.summary().loaded, first.summary().rejected), (5, 1));
    let rejects = schema.rejects().await;
    assert!(
        rejects[0].0.contains("field `device_id` is 170 bytes long") && rejects[0].1 == "transform",
        "{rejects:?}"
    );

    let mut expected: HashMap<String, (String, String)> = cases
        .iter()
        .map(|(u, _, ip, d)| (u.to_string(), (ip.to_string(), d.to_string())))
        .collect();
    let before = masks(&schema).await;
    assert!(
        before
            .values()
            .all(|(ip, d)| ip.starts_with("k1:") && d.starts_with("k1:"))
    );
    assert!(
        before
            .values()
            .all(|(ip, d)| ip.len() <= 256 && d.len() <= 256)
    );
    assert_eq!(
        before["u-v4"].0, before["u-same-ip"].0,
        "equal values stay equal"
    );
    assert_ne!(before["u-v4"].1, before["u-same-ip"].1);
    assert_every_value_opens(&ring, &before, &expected).await;

    // Rotation: k2 becomes current, k1 stays to read the old rows.
    let second_key = keygen("k2").await;
    std::fs::write(&ring, format!("{first_key}\n{second_key}\n")).expect("rotate");
    queue
        .send(&[login_with("u-after", "199.172.111.135", "593-47-5928")])
        .await;
    let second = run_sealed(&config.path).await;
    assert_eq!(second.summary().loaded, 1);
    expected.insert(
        "u-after".into(),
        ("199.172.111.135".into(), "593-47-5928".into()),
    );
    let after = masks(&schema).await;
    assert!(after["u-after"].0.starts_with("k2:"), "{after:?}");
    assert_eq!(after["u-v4"], before["u-v4"], "old rows are untouched");
    assert_every_value_opens(&ring, &after, &expected).await;

    // Only k1: the new row's key is not there.
    let old_ring = dir.path().join("old-keyring");
    std::fs::write(&old_ring, &first_key).expect("write");
    let out = unmask(&old_ring, &[after["u-after"].0.clone()]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("sealed under key \"k2\", which is not in the keyring"),
        "{}",
        out.stderr
    );

    // Another key under the same id, and an altered value: refused, nothing printed.
    let wrong_ring = dir.path().join("wrong-keyring");
    std::fs::write(&wrong_ring, keygen("k1").await).expect("write");
    let out = unmask(&wrong_ring, &[before["u-v4"].0.clone()]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("does not authenticate under key \"k1\""),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
    let mut altered = before["u-v4"].1.clone();
    let middle = altered.len() / 2;
    let flipped = if &altered[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    altered.replace_range(middle..=middle, flipped);
    let out = unmask(&ring, &[altered]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("the key is wrong or the value was altered"),
        "{}",
        out.stderr
    );
}
