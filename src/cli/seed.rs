//! `sluice seed`: demo and test traffic onto the configured source.
//!
//! Every message gets a dedupe id (an SQS message attribute) derived from where it came from: the
//! file's name, its position and its content, or the generator's seed and position. Seeding the same
//! messages twice therefore loads them once, which keeps `make demo` repeatable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use sluice::config::{Config, SourceKind};
use sluice::message_file;
use sluice::seed::generate::LoginGenerator;
use sluice::seed::kinesis as seed_kinesis;
use sluice::seed::send::{self, SeedMessage};
use sluice::source::file_path;

use crate::cli::output::{self, errln};

pub enum What {
    File(PathBuf),
    Generate {
        count: u64,
        seed: Option<u64>,
        bad_every: Option<u64>,
    },
}

/// Where seeded messages go besides the configured source.
pub struct Target {
    /// Write to this file whatever the source is.
    pub out: Option<PathBuf>,
    /// Replace the file of a file source if it exists.
    pub force: bool,
}

pub async fn seed(
    config: &Config,
    what: What,
    target: Target,
    with_dedupe_ids: bool,
) -> anyhow::Result<ExitCode> {
    let (messages, total, origin): (Box<dyn Iterator<Item = SeedMessage> + Send>, u64, String) =
        match what {
            What::File(path) => {
                let messages = from_file(&path)?;
                let n = messages.len() as u64;
                (
                    Box::new(messages.into_iter()),
                    n,
                    path.display().to_string(),
                )
            }
            What::Generate {
                count,
                seed,
                bad_every,
            } => {
                let seed = seed.unwrap_or_else(rand::random);
                let generated = LoginGenerator::new(seed, bad_every)
                    .take(count as usize)
                    .enumerate()
                    .map(move |(i, body)| SeedMessage {
                        body,
                        dedupe_id: Some(format!("gen-{seed}-{i}")),
                    });
                (
                    Box::new(generated),
                    count,
                    format!("generator (seed {seed})"),
                )
            }
        };
    let messages: Box<dyn Iterator<Item = SeedMessage> + Send> = if with_dedupe_ids {
        messages
    } else {
        Box::new(messages.map(|m| SeedMessage {
            dedupe_id: None,
            ..m
        }))
    };
    let progress = progress_bar(total);
    let sent = match (&target.out, config.source.kind) {
        (Some(path), _) => write_file(path, Overwrite::Allowed, messages, &progress, &origin)?,
        (None, SourceKind::Sqs) => {
            let cfg = &config.source.sqs;
            let client = sluice::aws::sqs_client(cfg).await;
            let url = send::ensure_queue(&client, cfg).await?;
            let sent =
                send::send_to_queue(&client, &url, &cfg.dedupe_attribute, messages, &mut |n| {
                    progress.set_position(n)
                })
                .await?;
            progress.finish_and_clear();
            errln!("sluice: sent {sent} messages from {origin} to {url}");
            Some(sent)
        }
        (None, SourceKind::Kinesis) => {
            let cfg = &config.source.kinesis;
            let stream = sluice::source::kinesis::source::stream_ref(cfg);
            let client = sluice::source::kinesis::api::sdk_client(
                cfg.region.as_deref(),
                cfg.endpoint_url.as_deref(),
            )
            .await;
            seed_kinesis::ensure_stream(&client, &stream).await?;
            let sent = seed_kinesis::send_to_stream(&client, &stream, messages, &mut |n| {
                progress.set_position(n)
            })
            .await?;
            progress.finish_and_clear();
            errln!(
                "sluice: sent {sent} messages from {origin} to Kinesis stream {}",
                stream.name()
            );
            Some(sent)
        }
        (None, SourceKind::File) => {
            let path = file_path(config);
            let overwrite = if target.force {
                Overwrite::Allowed
            } else {
                Overwrite::Refused
            };
            write_file(&path, overwrite, messages, &progress, &origin)?
        }
    };
    if let Some(sent) = sent {
        anyhow::ensure!(sent == total, "only {sent} of {total} messages were sent");
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether seeding may replace an existing file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overwrite {
    /// The user named the file (`--out`) or said `--force`.
    Allowed,
    /// The file a file source reads is the user's data: never replaced unasked.
    Refused,
}

/// Writes the messages as NDJSON to `path` (`-`: standard output). Returns how many, or `None` when
/// the reader of standard output left before the end (`sluice seed … | head`): it took what it
/// wanted, which is not a failure.
fn write_file(
    path: &Path,
    overwrite: Overwrite,
    messages: impl Iterator<Item = SeedMessage>,
    progress: &ProgressBar,
    origin: &str,
) -> anyhow::Result<Option<u64>> {
    if path.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let written = send::write_lines_to(&mut stdout.lock(), messages, &mut |n| {
            progress.set_position(n)
        });
        progress.finish_and_clear();
        return match written {
            Ok(written) => {
                errln!("sluice: wrote {written} messages from {origin} to standard output");
                Ok(Some(written))
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                output::failed(e);
                Ok(None)
            }
            Err(e) => Err(e).context("cannot write to standard output"),
        };
    }
    anyhow::ensure!(
        overwrite == Overwrite::Allowed || !path.exists(),
        "{} already exists; seed never replaces a file unasked: pass --force to replace it, or --out PATH to write elsewhere",
        path.display()
    );
    let replace = overwrite == Overwrite::Allowed;
    let written = tokio::task::block_in_place(|| {
        send::write_file(path, replace, messages, &mut |n| progress.set_position(n))
    })?;
    progress.finish_and_clear();
    errln!(
        "sluice: wrote {written} messages from {origin} to {}",
        path.display()
    );
    Ok(Some(written))
}

/// Messages of a seed file, each with a dedupe id from the file's name, position and content.
fn from_file(path: &Path) -> anyhow::Result<Vec<SeedMessage>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let messages = message_file::read_all(path)?;
    messages
        .into_iter()
        .map(|m| {
            let body = m.body.map_err(|bad| {
                anyhow::anyhow!("{}: message #{}: {bad}", path.display(), m.position)
            })?;
            let mut hash = Sha256::new();
            hash.update(name.as_bytes());
            hash.update(m.position.to_be_bytes());
            hash.update(body.as_bytes());
            let dedupe_id = format!("seed-{}", &hex::encode(hash.finalize())[..32]);
            Ok(SeedMessage {
                body,
                dedupe_id: Some(dedupe_id),
            })
        })
        .collect()
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {pos}/{len} messages [{bar:40}] {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
