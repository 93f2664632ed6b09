//! The broker protocol (version 1), shared by the server and the `queue://` client. Written
//! up in `docs/protocol.md`.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of one BSON
//! document. The client opens with [`Request::Hello`]; every request carries an id chosen by
//! the client, and its reply carries the same id, so requests can be pipelined and answered
//! out of order. Deliveries are pushed by the server as [`ServerFrame::Delivery`].
//!
//! BSON has no unsigned 64-bit integer: ids, tokens and dedup keys travel as `i64` with the
//! same bits.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use queue_core::{
    ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, MessageState, Outcome, Outgoing,
    Processing, QueueError, RawDelivery, Receipt, StoredMessage,
};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Version 2 added `settle_many`.
pub const VERSION: u32 = 2;

/// The default limit on one frame: a maximal payload plus room for its envelope.
pub const DEFAULT_MAX_FRAME: usize = queue_core::codec::MAX_PAYLOAD + 1024 * 1024;

/// Milliseconds, as BSON carries them.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn dur(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// Bytes as a BSON binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Blob(#[serde(with = "blob")] pub Vec<u8>);

mod blob {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let b = bson::Binary::deserialize(d)?;
        Ok(b.bytes)
    }
}

/// A channel's settings on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSpec {
    pub name: String,
    pub exactly_once: bool,
    pub dedup_ms: i64,
    pub lease_ms: i64,
    pub max_attempts: i64,
    pub backoff_ms: i64,
    pub max_backoff_ms: i64,
}

impl From<&ChannelSpec> for WireSpec {
    fn from(s: &ChannelSpec) -> Self {
        WireSpec {
            name: s.name.to_string(),
            exactly_once: s.processing == Processing::ExactlyOnce,
            dedup_ms: ms(s.dedup_window),
            lease_ms: ms(s.lease),
            max_attempts: i64::from(s.max_attempts),
            backoff_ms: ms(s.backoff),
            max_backoff_ms: ms(s.max_backoff),
        }
    }
}

impl WireSpec {
    /// Checks and converts.
    ///
    /// # Errors
    /// A protocol error for a name or value out of range.
    pub fn to_spec(&self) -> Result<ChannelSpec, QueueError> {
        let valid = !self.name.is_empty()
            && !self.name.starts_with('/')
            && !self.name.ends_with('/')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
        if !valid {
            return Err(QueueError::Protocol(format!(
                "invalid channel name `{}`",
                self.name
            )));
        }
        let max_attempts = u32::try_from(self.max_attempts)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| QueueError::Protocol("max_attempts must be at least 1".into()))?;
        if self.lease_ms <= 0 {
            return Err(QueueError::Protocol(
                "lease must be longer than zero".into(),
            ));
        }
        Ok(ChannelSpec {
            name: Cow::Owned(self.name.clone()),
            processing: if self.exactly_once {
                Processing::ExactlyOnce
            } else {
                Processing::AtLeastOnce
            },
            dedup_window: dur(self.dedup_ms),
            lease: dur(self.lease_ms),
            max_attempts,
            backoff: dur(self.backoff_ms),
            max_backoff: dur(self.max_backoff_ms),
        })
    }
}

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireOutgoing {
    pub payload: Blob,
    pub dedup_key: Option<i64>,
    pub delay_ms: i64,
    pub priority: i32,
}

impl From<Outgoing> for WireOutgoing {
    fn from(o: Outgoing) -> Self {
        WireOutgoing {
            payload: Blob(o.payload),
            dedup_key: o.dedup_key.map(|k| k as i64),
            delay_ms: ms(o.delay),
            priority: i32::from(o.priority),
        }
    }
}

impl WireOutgoing {
    /// Converts, refusing out-of-range values.
    ///
    /// # Errors
    /// A protocol error.
    pub fn into_outgoing(self) -> Result<Outgoing, QueueError> {
        Ok(Outgoing {
            payload: self.payload.0,
            dedup_key: self.dedup_key.map(|k| k as u64),
            delay: dur(self.delay_ms),
            priority: u8::try_from(self.priority)
                .map_err(|_| QueueError::Protocol("priority must be 0 to 255".into()))?,
        })
    }
}

/// A lease on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLease {
    pub channel: String,
    pub id: i64,
    pub token: i64,
}

impl From<&Lease> for WireLease {
    fn from(l: &Lease) -> Self {
        WireLease {
            channel: l.channel.clone(),
            id: l.id.0 as i64,
            token: l.token as i64,
        }
    }
}

impl From<WireLease> for Lease {
    fn from(l: WireLease) -> Self {
        Lease {
            channel: l.channel,
            id: MessageId(l.id as u64),
            token: l.token as u64,
        }
    }
}

/// How a delivery ends, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WireOutcome {
    Ack,
    Retry {
        after_ms: Option<i64>,
        error: String,
    },
    DeadLetter {
        error: String,
    },
    Release,
}

impl From<Outcome> for WireOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ack => WireOutcome::Ack,
            Outcome::Retry { after, error } => WireOutcome::Retry {
                after_ms: after.map(ms),
                error,
            },
            Outcome::DeadLetter { error } => WireOutcome::DeadLetter { error },
            Outcome::Release => WireOutcome::Release,
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Ack => Outcome::Ack,
            WireOutcome::Retry { after_ms, error } => Outcome::Retry {
                after: after_ms.map(dur),
                error,
            },
            WireOutcome::DeadLetter { error } => Outcome::DeadLetter { error },
            WireOutcome::Release => Outcome::Release,
        }
    }
}

/// A delivery on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelivery {
    pub lease: WireLease,
    pub payload: Blob,
    pub attempt: i64,
    pub priority: i32,
    pub produced_at: i64,
    pub deadline: i64,
}

impl From<RawDelivery> for WireDelivery {
    fn from(d: RawDelivery) -> Self {
        WireDelivery {
            lease: WireLease::from(&d.lease),
            payload: Blob(d.payload),
            attempt: i64::from(d.attempt),
            priority: i32::from(d.priority),
            produced_at: d.produced_at as i64,
            deadline: d.deadline as i64,
        }
    }
}

impl From<WireDelivery> for RawDelivery {
    fn from(d: WireDelivery) -> Self {
        RawDelivery {
            lease: d.lease.into(),
            payload: d.payload.0,
            attempt: d.attempt.max(0) as u32,
            priority: d.priority.clamp(0, 255) as u8,
            produced_at: d.produced_at.max(0) as u64,
            deadline: d.deadline.max(0) as u64,
        }
    }
}

/// A pending message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStored {
    pub id: i64,
    pub payload: Blob,
    pub state: String,
    pub attempts: i64,
    pub priority: i32,
    pub produced_at: i64,
    pub due: i64,
}

impl From<StoredMessage> for WireStored {
    fn from(m: StoredMessage) -> Self {
        WireStored {
            id: m.id.0 as i64,
            payload: Blob(m.payload),
            state: match m.state {
                MessageState::Ready => "ready",
                MessageState::Delayed => "delayed",
                MessageState::InFlight => "in_flight",
            }
            .into(),
            attempts: i64::from(m.attempts),
            priority: i32::from(m.priority),
            produced_at: m.produced_at as i64,
            due: m.due as i64,
        }
    }
}

impl From<WireStored> for StoredMessage {
    fn from(m: WireStored) -> Self {
        StoredMessage {
            id: MessageId(m.id as u64),
            payload: m.payload.0,
            state: match m.state.as_str() {
                "delayed" => MessageState::Delayed,
                "in_flight" => MessageState::InFlight,
                _ => MessageState::Ready,
            },
            attempts: m.attempts.max(0) as u32,
            priority: m.priority.clamp(0, 255) as u8,
            produced_at: m.produced_at.max(0) as u64,
            due: m.due.max(0) as u64,
        }
    }
}

/// A dead letter on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDead {
    pub id: i64,
    pub channel: String,
    pub payload: Blob,
    pub attempts: i64,
    pub error: String,
    pub produced_at: i64,
    pub dead_at: i64,
}

impl From<DeadLetter> for WireDead {
    fn from(d: DeadLetter) -> Self {
        WireDead {
            id: d.id.0 as i64,
            channel: d.channel,
            payload: Blob(d.payload),
            attempts: i64::from(d.attempts),
            error: d.error,
            produced_at: d.produced_at as i64,
            dead_at: d.dead_at as i64,
        }
    }
}

impl From<WireDead> for DeadLetter {
    fn from(d: WireDead) -> Self {
        DeadLetter {
            id: MessageId(d.id as u64),
            channel: d.channel,
            payload: d.payload.0,
            attempts: d.attempts.max(0) as u32,
            error: d.error,
            produced_at: d.produced_at.max(0) as u64,
            dead_at: d.dead_at.max(0) as u64,
        }
    }
}

/// Stats on the wire: the same fields, as `i64`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStats {
    pub channel: String,
    pub counters: Vec<i64>,
}

impl From<ChannelStats> for WireStats {
    fn from(s: ChannelStats) -> Self {
        WireStats {
            channel: s.channel,
            counters: [
                s.ready,
                s.delayed,
                s.in_flight,
                s.dead,
                s.produced,
                s.duplicates,
                s.acked,
                s.retried,
                s.dead_lettered,
                s.lease_expiries,
                s.consumers,
            ]
            .iter()
            .map(|v| *v as i64)
            .collect(),
        }
    }
}

impl From<WireStats> for ChannelStats {
    fn from(s: WireStats) -> Self {
        let c = |i: usize| s.counters.get(i).copied().unwrap_or(0).max(0) as u64;
        ChannelStats {
            channel: s.channel.clone(),
            ready: c(0),
            delayed: c(1),
            in_flight: c(2),
            dead: c(3),
            produced: c(4),
            duplicates: c(5),
            acked: c(6),
            retried: c(7),
            dead_lettered: c(8),
            lease_expiries: c(9),
            consumers: c(10),
        }
    }
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The first frame: protocol version and credentials.
    Hello {
        version: u32,
        token: Option<String>,
        client: String,
    },
    /// Stores messages. `key` makes a retry of the same request idempotent.
    Produce {
        spec: WireSpec,
        messages: Vec<WireOutgoing>,
        key: Option<String>,
    },
    /// Opens subscription `sub` (numbered by the client, unique on the connection);
    /// deliveries are pushed, at most `max_parallel` unsettled.
    Subscribe {
        sub: i64,
        spec: WireSpec,
        max_parallel: i64,
    },
    /// Stops a subscription from taking more messages; it keeps what it holds. The reply
    /// comes once no more deliveries will be pushed for it.
    Pause { sub: i64 },
    /// Closes a subscription, releasing what it holds.
    Unsubscribe { sub: i64 },
    /// Ends a delivery.
    Settle {
        lease: WireLease,
        outcome: WireOutcome,
    },
    /// Ends several deliveries; each succeeds or fails on its own.
    SettleMany { settles: Vec<WireSettle> },
    /// Extends a lease.
    Extend { lease: WireLease, by_ms: i64 },
    /// Stats of every channel.
    Stats,
    /// Pending messages of a channel.
    Peek { channel: String, limit: i64 },
    /// The dead-letter queue of a channel.
    DeadLetters { channel: String, limit: i64 },
    /// Moves dead letters back.
    Redrive {
        channel: String,
        ids: Option<Vec<i64>>,
    },
    /// Deletes dead letters.
    Purge {
        channel: String,
        ids: Option<Vec<i64>>,
    },
    /// Liveness.
    Ping,
}

/// One delivery to end, in `settle_many`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSettle {
    pub lease: WireLease,
    pub outcome: WireOutcome,
}

/// Why one item of a batch failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

/// A request with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: i64,
    #[serde(flatten)]
    pub request: Request,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Welcome {
        version: u32,
        server: String,
    },
    Receipts {
        receipts: Vec<(i64, bool)>,
    },
    Subscribed {
        sub: i64,
    },
    Done,
    Deadline {
        deadline: i64,
    },
    Stats {
        channels: Vec<WireStats>,
    },
    Peeked {
        messages: Vec<WireStored>,
    },
    DeadLetters {
        messages: Vec<WireDead>,
    },
    Count {
        count: i64,
    },
    Pong,
    /// One entry per settle of a `settle_many`, in order: null for done, or the error.
    Settled {
        errors: Vec<Option<WireError>>,
    },
}

/// Error codes.
pub mod code {
    pub const BAD_FRAME: &str = "bad_frame";
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
    pub const HANDSHAKE: &str = "handshake";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const VERSION: &str = "version";
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    pub const STALE_LEASE: &str = "stale_lease";
    pub const UNKNOWN_CHANNEL: &str = "unknown_channel";
    pub const INVALID: &str = "invalid";
    pub const TOO_LARGE: &str = "payload_too_large";
    pub const POISONED: &str = "poisoned";
    pub const CLOSED: &str = "closed";
    pub const INTERNAL: &str = "internal";
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The answer to request `id`.
    Reply { id: i64, reply: Reply },
    /// Request `id` failed (id 0: the connection failed and will be closed).
    Error {
        id: i64,
        code: String,
        message: String,
    },
    /// A pushed delivery for subscription `sub`.
    Delivery { sub: i64, delivery: WireDelivery },
}

/// Encodes a frame body.
///
/// # Errors
/// When the value cannot be BSON.
pub fn encode<T: Serialize>(frame: &T) -> Result<Bytes, QueueError> {
    bson::serialize_to_vec(frame)
        .map(Bytes::from)
        .map_err(|e| QueueError::Protocol(format!("cannot encode frame: {e}")))
}

/// Decodes a frame body.
///
/// # Errors
/// A protocol error naming what is wrong.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, QueueError> {
    bson::deserialize_from_slice(bytes)
        .map_err(|e| QueueError::Protocol(format!("malformed frame: {e}")))
}

/// The error code and text for a queue error.
pub fn error_code(e: &QueueError) -> &'static str {
    match e {
        QueueError::StaleLease { .. } => code::STALE_LEASE,
        QueueError::UnknownChannel(_) => code::UNKNOWN_CHANNEL,
        QueueError::PayloadTooLarge { .. } => code::TOO_LARGE,
        QueueError::Poisoned(_) => code::POISONED,
        QueueError::Closed => code::CLOSED,
        QueueError::InvalidRequest(_) | QueueError::Protocol(_) | QueueError::Encode(_) => {
            code::INVALID
        }
        QueueError::Unauthorized(_) => code::UNAUTHORIZED,
        _ => code::INTERNAL,
    }
}

/// The queue error for an error frame.
pub fn error_from(code: &str, message: String, id: Option<MessageId>) -> QueueError {
    match code {
        code::STALE_LEASE => QueueError::StaleLease {
            id: id.unwrap_or(MessageId(0)),
        },
        code::UNKNOWN_CHANNEL => QueueError::UnknownChannel(message),
        code::POISONED => QueueError::Poisoned(message),
        code::CLOSED => QueueError::Closed,
        code::UNAUTHORIZED => QueueError::Unauthorized(message),
        code::INVALID => QueueError::InvalidRequest(message),
        _ => QueueError::Protocol(format!("{code}: {message}")),
    }
}

/// Receipts on the wire.
pub fn receipts_to_wire(r: &[Receipt]) -> Vec<(i64, bool)> {
    r.iter().map(|r| (r.id.0 as i64, r.duplicate)).collect()
}

/// Receipts from the wire.
pub fn receipts_from_wire(r: Vec<(i64, bool)>) -> Vec<Receipt> {
    r.into_iter()
        .map(|(id, duplicate)| Receipt {
            id: MessageId(id as u64),
            duplicate,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_bson() {
        let spec = ChannelSpec::new("a/b").exactly_once(Duration::from_secs(1));
        let out = Outgoing {
            payload: vec![1, 2, 3],
            dedup_key: Some(u64::MAX - 5),
            delay: Duration::from_millis(7),
            priority: 9,
        };
        let frame = ClientFrame {
            id: 42,
            request: Request::Produce {
                spec: (&spec).into(),
                messages: vec![out.clone().into()],
                key: Some("k".into()),
            },
        };
        let back: ClientFrame = decode(&encode(&frame).unwrap()).unwrap();
        assert_eq!(back, frame);
        let Request::Produce {
            spec: s, messages, ..
        } = back.request
        else {
            panic!()
        };
        assert_eq!(s.to_spec().unwrap(), spec);
        assert_eq!(messages[0].clone().into_outgoing().unwrap(), out);

        let lease = Lease {
            channel: "a/b".into(),
            id: MessageId(3),
            token: (7 << 40) + 9,
        };
        let d = RawDelivery {
            lease,
            payload: vec![9; 300],
            attempt: 2,
            priority: 1,
            produced_at: 5,
            deadline: 6,
        };
        let f = ServerFrame::Delivery {
            sub: 1,
            delivery: d.clone().into(),
        };
        let back: ServerFrame = decode(&encode(&f).unwrap()).unwrap();
        let ServerFrame::Delivery { delivery, .. } = back else {
            panic!()
        };
        assert_eq!(RawDelivery::from(delivery), d);

        let many = ClientFrame {
            id: 43,
            request: Request::SettleMany {
                settles: vec![WireSettle {
                    lease: WireLease::from(&d.lease),
                    outcome: Outcome::Ack.into(),
                }],
            },
        };
        assert_eq!(
            decode::<ClientFrame>(&encode(&many).unwrap()).unwrap(),
            many
        );
        let settled = ServerFrame::Reply {
            id: 43,
            reply: Reply::Settled {
                errors: vec![
                    None,
                    Some(WireError {
                        code: code::STALE_LEASE.into(),
                        message: "m".into(),
                    }),
                ],
            },
        };
        assert_eq!(
            decode::<ServerFrame>(&encode(&settled).unwrap()).unwrap(),
            settled
        );
    }

    #[test]
    fn garbage_and_unknown_ops_are_protocol_errors() {
        assert!(matches!(
            decode::<ClientFrame>(b"\x05\x00\x00\x00\x00"),
            Err(QueueError::Protocol(_))
        ));
        assert!(matches!(
            decode::<ClientFrame>(b"nonsense"),
            Err(QueueError::Protocol(_))
        ));
        let unknown = bson::doc! { "id": 1_i64, "op": "explode" };
        let bytes = bson::serialize_to_vec(&unknown).unwrap();
        assert!(matches!(
            decode::<ClientFrame>(&bytes),
            Err(QueueError::Protocol(_))
        ));
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        let mut w = WireSpec::from(&ChannelSpec::new("ok"));
        w.name = "/bad".into();
        assert!(w.to_spec().is_err());
        let mut w = WireSpec::from(&ChannelSpec::new("ok"));
        w.max_attempts = 0;
        assert!(w.to_spec().is_err());
        let o = WireOutgoing {
            payload: Blob(vec![]),
            dedup_key: None,
            delay_ms: 0,
            priority: 300,
        };
        assert!(o.into_outgoing().is_err());
    }
}
