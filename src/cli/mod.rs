//! The commands behind the `sluice` binary.

pub mod args;
pub mod check;
pub mod completions;
pub mod migrate;
pub mod output;
pub mod report;
pub mod run;
pub mod seed;
pub mod telemetry;
pub mod unmask;
