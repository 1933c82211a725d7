//! sluice: a streaming ETL daemon that moves login events from SQS (or files) into PostgreSQL,
//! validated, with their PII masked, and with every unusable message kept with its reason.
//!
//! The crate is a library so that tests and benchmarks drive the same stages the binary runs; the
//! binary (`src/main.rs`) only parses the command line and reports.

pub mod aws;
pub mod background;
pub mod config;
pub mod envelope;
pub mod error_chain;
pub mod kms;
pub mod login_table;
pub mod message_file;
pub mod metrics;
pub mod pg;
pub mod pipeline;
pub mod progress;
pub mod retry;
pub mod seed;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod stage;
pub mod stats;
pub mod table_name;
