//! Adapters: one module per backend.

pub mod file;
pub mod memory;
pub mod remote;
