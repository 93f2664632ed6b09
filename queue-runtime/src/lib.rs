//! The queue runtime: the lease engine, the adapters, [`Worker`], and the `queue-broker` and
//! `queuectl` binaries.
//!
//! ```
//! use queue_runtime::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[channel("user/registered", exactly_once, dedup = "1s")]
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! pub struct UserRegistered {
//!     pub id: u64,
//!     pub username: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let queue = queue_runtime::connect("memory://").await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let consumer = UserRegistered::consume(&queue, move |user| {
//!     let tx = tx.clone();
//!     async move { tx.send(user.username).map_err(|e| e.to_string()) }
//! })
//! .await?;
//!
//! let user = UserRegistered { id: 1, username: "Peter".into() };
//! let first = UserRegistered::produce(&queue, user.clone()).await?;
//! let again = UserRegistered::produce(&queue, user).await?;
//! assert!(again.duplicate && again.id == first.id);
//! assert_eq!(rx.recv().await.as_deref(), Some("Peter"));
//! consumer.stop(std::time::Duration::from_secs(1)).await?;
//! # Ok(()) }
//! ```

pub mod adapters;
pub mod broker;
mod connect;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod engine;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
mod system;
mod worker;

#[doc(hidden)]
pub use queue_core as __core;

pub use connect::{
    ConnectOptions, DEFAULT_URL, QUEUE_URL_VAR, connect, connect_default, connect_with,
};
pub use queue_core::{
    Channel, ChannelSpec, ChannelStats, ConsumerHandle, DeadLetter, Delivery, Dep, MessageId,
    Processing, Producer, Queue, QueueError, Receipt, VirtualClock, channel, consumer,
};
pub use system::{SystemClock, TokioSpawner};
pub use worker::{RunningWorker, SetupProblem, Worker, WorkerError, shutdown_signal};

/// The names most programs need.
pub mod prelude {
    pub use queue_core::{
        Channel, ConsumerHandle, Delivery, Dep, Queue, QueueError, Receipt, channel, consumer,
    };

    pub use crate::{Worker, connect, connect_default};
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
