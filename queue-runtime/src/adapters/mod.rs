//! Adapters: one module per backend.

pub mod memory;
