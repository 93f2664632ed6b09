//! The queue runtime.
#[doc(hidden)]
pub use queue_core as __core;
