//! The CPU-bound stages between source and sink.

pub mod mask;
pub mod parse;
pub mod seal;
pub mod transform;
