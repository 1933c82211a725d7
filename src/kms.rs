//! Masking keys kept in AWS KMS (`mask.key_source = "kms"`).
//!
//! Operators on AWS keep keys where key policies decide who may use them, not in files. The
//! configuration then holds only *data keys encrypted under a KMS key* (GenerateDataKey's
//! ciphertext, base64): harmless to store, useless without `kms:Decrypt` on that key. sluice
//! decrypts them once at start; the plaintext lives in memory only, inside the [`MaskKey`], and is
//! never printed or logged. It serves both modes: for the keyed hash the last data key is the key;
//! for `aes-siv` each entry `ID:CIPHERTEXT` becomes the keyring entry `ID` (64-byte data keys).
//! A ciphertext KMS will not decrypt (another key's, or no permission) or a KMS that does not
//! answer stops the start with an error naming the entry: nothing is masked with a key that is
//! not the one configured.

use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::aws::{self, AwsError};
use crate::config::MaskConfig;
use crate::stage::mask::{MaskKey, MaskMode};
use crate::stage::seal::KEY_BYTES;

/// How long one KMS call may take, retries included, before the start gives up.
const CALL_LIMIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum KmsKeyError {
    #[error("`mask.kms_data_keys` is empty: give the base64 ciphertext of a data key")]
    NoDataKeys,
    #[error("`mask.kms_data_keys` entry {position} is not base64")]
    NotBase64 { position: usize },
    #[error(
        "`mask.kms_data_keys` entry {position} needs an id (`ID:CIPHERTEXT`) for mask.mode = \"aes-siv\""
    )]
    NoId { position: usize },
    #[error(
        "KMS did not decrypt `mask.kms_data_keys` entry {position} under `mask.kms_key_id` (a data key of another KMS key, no kms:Decrypt permission, or KMS unreachable)"
    )]
    Decrypt {
        position: usize,
        #[source]
        source: AwsError,
    },
    #[error("KMS returned no plaintext for `mask.kms_data_keys` entry {position}")]
    NoPlaintext { position: usize },
    #[error(
        "`mask.kms_data_keys` entry {position} decrypts to {len} bytes; mask.mode = \"aes-siv\" needs {KEY_BYTES} (sluice keygen --kms-key-id makes such keys)"
    )]
    WrongLength { position: usize, len: usize },
    #[error("KMS did not generate a data key under {key_id}")]
    Generate {
        key_id: String,
        #[source]
        source: AwsError,
    },
    #[error("KMS returned no ciphertext")]
    NoCiphertext,
}

/// A KMS client: `endpoint` for an emulator, region and credentials from the standard chain.
pub async fn client(endpoint: Option<&str>) -> aws_sdk_kms::Client {
    let shared = aws::shared_config_for(None, endpoint.is_some()).await;
    let mut builder = aws_sdk_kms::config::Builder::from(&shared).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(CALL_LIMIT)
            .build(),
    );
    if let Some(url) = endpoint {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_kms::Client::from_conf(builder.build())
}

/// Decrypts the configured data keys into the masking key for `mode`.
pub async fn mask_key(
    client: &aws_sdk_kms::Client,
    config: &MaskConfig,
) -> Result<MaskKey, KmsKeyError> {
    if config.kms_data_keys.is_empty() {
        return Err(KmsKeyError::NoDataKeys);
    }
    let mut entries = Vec::with_capacity(config.kms_data_keys.len());
    for (i, entry) in config.kms_data_keys.iter().enumerate() {
        let position = i + 1;
        let (id, ciphertext) = match entry.split_once(':') {
            Some((id, ciphertext)) => (Some(id), ciphertext),
            None => (None, entry.as_str()),
        };
        let plaintext = decrypt(client, config, ciphertext.trim(), position).await?;
        entries.push((id, position, plaintext));
    }
    match config.mode {
        MaskMode::AesSiv => {
            let mut ring = String::new();
            for (id, position, plaintext) in entries {
                let id = id.ok_or(KmsKeyError::NoId { position })?;
                if plaintext.len() != KEY_BYTES {
                    let len = plaintext.len();
                    return Err(KmsKeyError::WrongLength { position, len });
                }
                ring.push_str(&format!("{id}:{}\n", STANDARD.encode(&plaintext)));
            }
            Ok(MaskKey::from_bytes(ring.as_bytes()))
        }
        MaskMode::HmacSha256 | MaskMode::SaltedSha256 => {
            // The last entry is the current key, as in a keyring.
            let (_, _, plaintext) = entries.pop().ok_or(KmsKeyError::NoDataKeys)?;
            Ok(MaskKey::from_bytes(&plaintext))
        }
    }
}

/// Decrypts one data key, naming the configured KMS key so that KMS refuses another key's.
async fn decrypt(
    client: &aws_sdk_kms::Client,
    config: &MaskConfig,
    ciphertext: &str,
    position: usize,
) -> Result<Vec<u8>, KmsKeyError> {
    let blob = STANDARD
        .decode(ciphertext)
        .map_err(|_| KmsKeyError::NotBase64 { position })?;
    let out = client
        .decrypt()
        .set_key_id(config.kms_key_id.clone())
        .ciphertext_blob(Blob::new(blob))
        .send()
        .await
        .map_err(|e| KmsKeyError::Decrypt {
            position,
            source: AwsError::from(e),
        })?;
    out.plaintext
        .map(Blob::into_inner)
        .ok_or(KmsKeyError::NoPlaintext { position })
}

/// A new 64-byte data key under `key_id`: its ciphertext, base64. The plaintext is dropped unseen.
pub async fn generate_data_key(
    client: &aws_sdk_kms::Client,
    key_id: &str,
) -> Result<String, KmsKeyError> {
    let out = client
        .generate_data_key()
        .key_id(key_id)
        .number_of_bytes(KEY_BYTES as i32)
        .send()
        .await
        .map_err(|e| KmsKeyError::Generate {
            key_id: key_id.to_owned(),
            source: AwsError::from(e),
        })?;
    let ciphertext = out.ciphertext_blob.ok_or(KmsKeyError::NoCiphertext)?;
    Ok(STANDARD.encode(ciphertext.as_ref()))
}
