//! The PostgreSQL side: batching, encoding, committing, and the tables involved.

pub mod batch;
pub mod copy_encode;
pub mod dead_letter;
pub mod dead_letter_queue;
pub mod errors;
pub mod ledger;
pub mod postgres;
pub mod schema;
