//! Adapters: one module per backend.

pub mod file;
pub mod memory;
