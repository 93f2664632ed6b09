//! The commands of a channel's stream: every change to a channel is one BSON document
//! appended to its stream, and every client applies them in stream order.

use serde::{Deserialize, Serialize};

use crate::broker::protocol::{WireLease, WireOutcome, WireOutgoing, WireSpec};
use queue_core::QueueError;

/// One command, as stored in the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    /// The client that sent it (random per connection).
    pub from: i64,
    /// The client's number for it, to answer the caller waiting for it.
    pub nonce: i64,
    /// The sender's clock, in milliseconds since the Unix epoch. Replicas apply a command at
    /// the latest time any earlier command carried, or this, whichever is later.
    pub at: i64,
    /// What it does.
    pub op: Op,
}

/// What a command does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Op {
    /// Stores a batch.
    Produce {
        spec: WireSpec,
        batch: Vec<WireOutgoing>,
    },
    /// Opens a subscription.
    Subscribe {
        spec: WireSpec,
        consumer: i64,
        max_parallel: i64,
    },
    /// Ends a subscription: what it holds is given back, its attempt counted.
    Unsubscribe { consumer: i64 },
    /// Leases up to `max` ready messages to a subscription.
    Take { consumer: i64, max: i64 },
    /// Ends deliveries; `unit` is the backoff jitter's uniform draw.
    Settle {
        items: Vec<(WireLease, WireOutcome)>,
        unit: f64,
    },
    /// Moves a lease's deadline.
    Extend { lease: WireLease, by_ms: i64 },
    /// Changes nothing but time: a read that follows it sees every earlier command.
    Sync,
    /// Deletes a pending or in-flight message.
    Cancel { id: i64 },
    /// Moves dead letters back to ready.
    Redrive { ids: Option<Vec<i64>> },
    /// Deletes dead letters.
    PurgeDead { ids: Option<Vec<i64>> },
    /// Deletes the pending messages.
    Purge,
    /// Pauses or resumes the channel.
    Pause { paused: bool },
}

/// Encodes a command.
///
/// # Errors
/// [`QueueError::Encode`].
pub fn encode(command: &Command) -> Result<Vec<u8>, QueueError> {
    bson::serialize_to_vec(command).map_err(|e| QueueError::Encode(e.to_string()))
}

/// Decodes a command.
///
/// # Errors
/// [`QueueError::Corrupt`] for bytes that are no command.
pub fn decode(bytes: &[u8]) -> Result<Command, QueueError> {
    bson::deserialize_from_slice(bytes).map_err(|e| QueueError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_core::{ChannelSpec, Outcome, Outgoing};
    use std::time::Duration;

    #[test]
    fn a_command_survives_its_encoding() {
        let spec = ChannelSpec::new("a/b");
        let command = Command {
            from: 7,
            nonce: 9,
            at: 1_000,
            op: Op::Produce {
                spec: WireSpec::from(&spec),
                batch: vec![WireOutgoing::from(Outgoing {
                    payload: vec![1, 2, 3],
                    dedup_key: Some(u64::MAX - 1),
                    delay: Duration::from_millis(5),
                    priority: 3,
                    group: None,
                })],
            },
        };
        let back = decode(&encode(&command).unwrap()).unwrap();
        let Op::Produce { spec: s, batch } = back.op else {
            panic!("not a produce")
        };
        assert_eq!(s.to_spec().unwrap(), spec);
        let out = batch.into_iter().next().unwrap().into_outgoing().unwrap();
        assert_eq!(out.dedup_key, Some(u64::MAX - 1));
        assert_eq!(out.payload, vec![1, 2, 3]);
        let settle = Command {
            from: 1,
            nonce: 2,
            at: 3,
            op: Op::Settle {
                items: vec![(
                    WireLease {
                        channel: "a/b".into(),
                        id: 4,
                        token: 5,
                    },
                    WireOutcome::from(Outcome::Retry {
                        after: None,
                        error: "boom".into(),
                    }),
                )],
                unit: 0.25,
            },
        };
        let back = decode(&encode(&settle).unwrap()).unwrap();
        assert!(matches!(back.op, Op::Settle { unit, .. } if unit == 0.25));
        assert!(decode(b"not bson").is_err());
    }
}
