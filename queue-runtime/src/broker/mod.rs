//! The broker: the protocol, the server, and (in `adapters::remote`) its client.

pub mod protocol;
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;

pub use server::{Broker, BrokerConfig, BrokerCounters};
