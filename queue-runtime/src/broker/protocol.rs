//! The broker protocol (version 3), shared by the server and the `queue://` client. Written
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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use queue_core::{
    Cancelled, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, MessageState, Outcome,
    Outgoing, Processing, QueueError, Rate, RawDelivery, Receipt, Schedule, StoredMessage,
};
use serde::{Deserialize, Serialize};

pub mod hot;

use hot::{Value, fields};

/// The protocol version this build speaks. Version 2 added `settle_many`; version 3 sends
/// lease deadlines as durations, structured error fields, paginated listings, subscription
/// ends and heartbeats.
pub const VERSION: u32 = 3;

/// The default limit on one frame: a maximal payload plus room for its envelope.
pub const DEFAULT_MAX_FRAME: usize = queue_core::codec::MAX_PAYLOAD + 1024 * 1024;

/// The default limit on a frame before `hello` succeeds.
pub const DEFAULT_MAX_HELLO_FRAME: usize = 4 * 1024;

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
    /// 0 for no limit.
    #[serde(default)]
    pub concurrency: i64,
    #[serde(default = "one")]
    pub concurrency_per_group: i64,
    #[serde(default)]
    pub rate: Option<WireRate>,
    #[serde(default)]
    pub rate_per_group: Option<WireRate>,
    /// The period of an `every` schedule.
    #[serde(default)]
    pub every_ms: Option<i64>,
    /// The expression of a `cron` schedule.
    #[serde(default)]
    pub cron: Option<String>,
}

fn one() -> i64 {
    1
}

/// A rate limit on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRate {
    pub limit: i64,
    pub per_ms: i64,
}

impl From<Rate> for WireRate {
    fn from(r: Rate) -> Self {
        WireRate {
            limit: i64::from(r.limit),
            per_ms: ms(r.per),
        }
    }
}

impl WireRate {
    fn to_rate(self) -> Result<Rate, QueueError> {
        let limit = u32::try_from(self.limit)
            .map_err(|_| QueueError::Protocol("a rate's limit must be 0 to 2^32-1".into()))?;
        Ok(Rate {
            limit,
            per: dur(self.per_ms),
        })
    }
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
            concurrency: i64::from(s.concurrency),
            concurrency_per_group: i64::from(s.concurrency_per_group),
            rate: s.rate.map(WireRate::from),
            rate_per_group: s.rate_per_group.map(WireRate::from),
            every_ms: match &s.schedule {
                Some(Schedule::Every(d)) => Some(ms(*d)),
                _ => None,
            },
            cron: match &s.schedule {
                Some(Schedule::Cron(expr)) => Some(expr.to_string()),
                _ => None,
            },
        }
    }
}

impl WireSpec {
    /// Checks and converts.
    ///
    /// # Errors
    /// [`QueueError::InvalidRequest`] for a name outside `queue_core::limits`; a protocol
    /// error for a value out of range.
    pub fn to_spec(&self) -> Result<ChannelSpec, QueueError> {
        queue_core::limits::check_channel_name(&self.name)?;
        let max_attempts = u32::try_from(self.max_attempts)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| QueueError::Protocol("max_attempts must be at least 1".into()))?;
        if self.lease_ms <= 0 {
            return Err(QueueError::Protocol(
                "lease must be longer than zero".into(),
            ));
        }
        let count = |what: &str, v: i64| {
            u32::try_from(v)
                .map_err(|_| QueueError::Protocol(format!("{what} must be 0 to 2^32-1")))
        };
        let schedule = match (self.every_ms, &self.cron) {
            (Some(_), Some(_)) => {
                return Err(QueueError::Protocol(
                    "a channel has `every` or `cron`, not both".into(),
                ));
            }
            (Some(p), None) if p > 0 => Some(Schedule::Every(dur(p))),
            (Some(_), None) => {
                return Err(QueueError::Protocol(
                    "`every` must be longer than zero".into(),
                ));
            }
            (None, Some(expr)) => Some(Schedule::Cron(Cow::Owned(expr.clone()))),
            (None, None) => None,
        };
        let spec = ChannelSpec {
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
            concurrency: count("concurrency", self.concurrency)?,
            concurrency_per_group: count("concurrency_per_group", self.concurrency_per_group)?,
            rate: self.rate.map(WireRate::to_rate).transpose()?,
            rate_per_group: self.rate_per_group.map(WireRate::to_rate).transpose()?,
            schedule,
        };
        spec.check()?;
        Ok(spec)
    }
}

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireOutgoing {
    pub payload: Blob,
    pub dedup_key: Option<i64>,
    pub delay_ms: i64,
    pub priority: i32,
    #[serde(default)]
    pub group: Option<i64>,
}

impl From<Outgoing> for WireOutgoing {
    fn from(o: Outgoing) -> Self {
        WireOutgoing {
            payload: Blob(o.payload),
            dedup_key: o.dedup_key.map(|k| k as i64),
            delay_ms: ms(o.delay),
            priority: i32::from(o.priority),
            group: o.group.map(|g| g as i64),
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
            group: self.group.map(|g| g as u64),
        })
    }
}

/// A lease on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLease {
    pub channel: Arc<str>,
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

/// How a delivery ends, on the wire: `{ "outcome": "retry", "after_ms": .., "error": .. }`.
/// Read as one flat document, so decoding a batch of settles buffers nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", try_from = "FlatOutcome")]
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
    Snooze {
        after_ms: i64,
    },
}

/// [`WireOutcome`]'s fields as they arrive.
#[derive(Deserialize)]
struct FlatOutcome {
    outcome: String,
    #[serde(default)]
    after_ms: Option<i64>,
    #[serde(default)]
    error: Option<String>,
}

impl TryFrom<FlatOutcome> for WireOutcome {
    type Error = String;

    fn try_from(f: FlatOutcome) -> Result<Self, String> {
        let error = |o: &str| {
            f.error
                .clone()
                .ok_or_else(|| format!("`{o}` needs an `error`"))
        };
        Ok(match f.outcome.as_str() {
            "ack" => WireOutcome::Ack,
            "retry" => WireOutcome::Retry {
                after_ms: f.after_ms,
                error: error("retry")?,
            },
            "dead_letter" => WireOutcome::DeadLetter {
                error: error("dead_letter")?,
            },
            "release" => WireOutcome::Release,
            "snooze" => WireOutcome::Snooze {
                after_ms: f.after_ms.ok_or("`snooze` needs an `after_ms`")?,
            },
            other => return Err(format!("unknown outcome `{other}`")),
        })
    }
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
            Outcome::Snooze { after } => WireOutcome::Snooze {
                after_ms: ms(after),
            },
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
            WireOutcome::Snooze { after_ms } => Outcome::Snooze {
                after: dur(after_ms),
            },
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
    /// How long the lease stays valid, counted from when the broker sent the delivery.
    pub lease_ms: i64,
}

impl WireDelivery {
    /// A delivery whose lease is valid for `valid` from now.
    pub fn new(d: RawDelivery, valid: Duration) -> Self {
        WireDelivery {
            lease: WireLease::from(&d.lease),
            payload: Blob(d.payload),
            attempt: i64::from(d.attempt),
            priority: i32::from(d.priority),
            produced_at: d.produced_at as i64,
            lease_ms: ms(valid),
        }
    }

    /// The delivery, its deadline `lease_ms` after `now` on the receiver's clock.
    pub fn into_raw(self, now: queue_core::clock::Timestamp) -> RawDelivery {
        RawDelivery {
            lease: self.lease.into(),
            payload: self.payload.0,
            attempt: self.attempt.max(0) as u32,
            priority: self.priority.clamp(0, 255) as u8,
            produced_at: self.produced_at.max(0) as u64,
            deadline: now.saturating_add(self.lease_ms.max(0) as u64),
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
    pub ready: i64,
    pub delayed: i64,
    pub in_flight: i64,
    pub dead: i64,
    pub produced: i64,
    pub duplicates: i64,
    pub acked: i64,
    pub retried: i64,
    pub dead_lettered: i64,
    pub lease_expiries: i64,
    pub consumers: i64,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub counted_since: i64,
    #[serde(default)]
    pub next_due: Option<i64>,
}

impl From<ChannelStats> for WireStats {
    fn from(s: ChannelStats) -> Self {
        let w = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        WireStats {
            channel: s.channel,
            ready: w(s.ready),
            delayed: w(s.delayed),
            in_flight: w(s.in_flight),
            dead: w(s.dead),
            produced: w(s.produced),
            duplicates: w(s.duplicates),
            acked: w(s.acked),
            retried: w(s.retried),
            dead_lettered: w(s.dead_lettered),
            lease_expiries: w(s.lease_expiries),
            consumers: w(s.consumers),
            paused: s.paused,
            counted_since: w(s.counted_since),
            next_due: s.next_due.map(w),
        }
    }
}

impl From<WireStats> for ChannelStats {
    fn from(s: WireStats) -> Self {
        let c = |v: i64| v.max(0) as u64;
        ChannelStats {
            channel: s.channel,
            ready: c(s.ready),
            delayed: c(s.delayed),
            in_flight: c(s.in_flight),
            dead: c(s.dead),
            produced: c(s.produced),
            duplicates: c(s.duplicates),
            acked: c(s.acked),
            retried: c(s.retried),
            dead_lettered: c(s.dead_lettered),
            lease_expiries: c(s.lease_expiries),
            consumers: c(s.consumers),
            paused: s.paused,
            counted_since: c(s.counted_since),
            next_due: s.next_due.map(c),
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
    /// Pending messages of a channel: one page of at most `limit`, starting `offset` into
    /// the listing.
    Peek {
        channel: String,
        limit: i64,
        #[serde(default)]
        offset: i64,
    },
    /// The dead-letter queue of a channel, paged as `peek`.
    DeadLetters {
        channel: String,
        limit: i64,
        #[serde(default)]
        offset: i64,
    },
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
    /// Deletes the pending messages (ready and delayed) of a channel.
    PurgePending { channel: String },
    /// Pauses a channel (`paused`) or resumes it.
    PauseChannel { channel: String, paused: bool },
    /// Cancels a pending or in-flight message.
    Cancel { channel: String, message: i64 },
    /// Liveness: answered with `pong`. A client sends it when the connection is quiet.
    Ping,
}

/// One delivery to end, in `settle_many`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSettle {
    pub lease: WireLease,
    pub outcome: WireOutcome,
}

/// Why a request, one item of a batch, or a subscription failed: the code, the text, and
/// the fields of the [`QueueError`] variant, so the client rebuilds the same error.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    /// The variant's text field (or, for codes without one, a description).
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<i64>,
    /// A second text field (`InvalidUrl`'s reason, `Backend`'s cause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl WireError {
    /// An error with a code and a text only.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        WireError {
            code: code.into(),
            message: message.into(),
            ..WireError::default()
        }
    }
}

impl From<&QueueError> for WireError {
    fn from(e: &QueueError) -> Self {
        let text = |m: &String| WireError::new(e.code(), m.clone());
        match e {
            QueueError::Encode(m)
            | QueueError::Decode(m)
            | QueueError::InvalidRequest(m)
            | QueueError::Poisoned(m)
            | QueueError::Corrupt(m)
            | QueueError::Protocol(m)
            | QueueError::Unauthorized(m) => text(m),
            QueueError::PayloadTooLarge { size, max } => WireError {
                size: Some(*size as i64),
                max: Some(*max as i64),
                ..WireError::new(e.code(), e.to_string())
            },
            QueueError::StaleLease { id } | QueueError::Cancelled { id } => WireError {
                id: Some(id.0 as i64),
                ..WireError::new(e.code(), e.to_string())
            },
            QueueError::UnknownChannel(name) => WireError {
                channel: Some(name.clone()),
                ..WireError::new(e.code(), e.to_string())
            },
            QueueError::UnknownMessage { channel, id } => WireError {
                id: Some(id.0 as i64),
                channel: Some(channel.clone()),
                ..WireError::new(e.code(), e.to_string())
            },
            QueueError::InvalidUrl { url, reason } => WireError {
                detail: Some(reason.clone()),
                ..WireError::new(e.code(), url.clone())
            },
            QueueError::Unsupported(what) => WireError::new(e.code(), *what),
            QueueError::Timeout(d) => WireError {
                ms: Some(ms(*d)),
                ..WireError::new(e.code(), e.to_string())
            },
            QueueError::Backend { context, source } => WireError {
                detail: Some(source.to_string()),
                ..WireError::new(e.code(), context.clone())
            },
            QueueError::Io(io) => WireError::new(e.code(), io.to_string()),
            other => WireError::new(other.code(), other.to_string()),
        }
    }
}

impl WireError {
    /// The queue error this stands for: the same variant and fields as on the broker.
    /// Codes of the connection (`bad_frame`, `limit_exceeded`, …) become
    /// [`QueueError::Protocol`] or [`QueueError::InvalidRequest`] naming the code.
    pub fn into_error(self) -> QueueError {
        let id = MessageId(self.id.unwrap_or(0) as u64);
        let n = |v: Option<i64>| v.unwrap_or(0).max(0) as usize;
        match self.code.as_str() {
            "encode" => QueueError::Encode(self.message),
            "decode" => QueueError::Decode(self.message),
            code::TOO_LARGE => QueueError::PayloadTooLarge {
                size: n(self.size),
                max: n(self.max),
            },
            code::STALE_LEASE => QueueError::StaleLease { id },
            "cancelled" => QueueError::Cancelled { id },
            code::UNKNOWN_CHANNEL => {
                QueueError::UnknownChannel(self.channel.unwrap_or(self.message))
            }
            "unknown_message" => QueueError::UnknownMessage {
                channel: self.channel.unwrap_or_default(),
                id,
            },
            code::INVALID => QueueError::InvalidRequest(self.message),
            code::CLOSED => QueueError::Closed,
            code::POISONED => QueueError::Poisoned(self.message),
            "io" => QueueError::Io(std::io::Error::other(self.message)),
            "corrupt" => QueueError::Corrupt(self.message),
            "invalid_url" => QueueError::InvalidUrl {
                url: self.message,
                reason: self.detail.unwrap_or_default(),
            },
            "unsupported" => QueueError::Unsupported(intern(self.message)),
            "protocol" => QueueError::Protocol(self.message),
            code::UNAUTHORIZED => QueueError::Unauthorized(self.message),
            "timeout" => QueueError::Timeout(dur(self.ms.unwrap_or(0))),
            "backend" => QueueError::backend(self.message, self.detail.unwrap_or_default()),
            code::LIMIT => QueueError::InvalidRequest(format!("{}: {}", self.code, self.message)),
            other => QueueError::Protocol(format!("{other}: {}", self.message)),
        }
    }
}

/// `Unsupported` carries a `&'static str`: the few texts a broker sends are kept once.
fn intern(text: String) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = seen.iter().find(|s| **s == text) {
        return s;
    }
    if seen.len() >= 64 {
        return "unsupported by the broker";
    }
    let s: &'static str = Box::leak(text.into_boxed_str());
    seen.push(s);
    s
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
    /// The handshake succeeded. The broker drops a connection it hears nothing from for
    /// `idle_timeout_ms`, and accepts frames up to `max_frame` bytes.
    Welcome {
        version: u32,
        server: String,
        idle_timeout_ms: i64,
        max_frame: i64,
    },
    Receipts {
        receipts: Vec<(i64, bool)>,
    },
    Subscribed {
        sub: i64,
    },
    Done,
    /// The lease was extended: valid for `lease_ms` from when the broker sent this.
    Extended {
        lease_ms: i64,
    },
    Stats {
        channels: Vec<WireStats>,
    },
    /// One page: `next` is the offset of the next page, or null at the end.
    Peeked {
        messages: Vec<WireStored>,
        next: Option<i64>,
    },
    /// One page, as `peeked`.
    DeadLetters {
        messages: Vec<WireDead>,
        next: Option<i64>,
    },
    Count {
        count: i64,
    },
    /// Where a cancelled message was: `pending` or `in_flight`.
    Cancelled {
        was: Cancelled,
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
    /// A limit of the connection was hit (subscriptions, `max_parallel`).
    pub const LIMIT: &str = "limit_exceeded";
    /// Nothing came from the peer within the idle timeout, or it stopped reading.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// The broker is stopping.
    pub const SHUTDOWN: &str = "shutdown";
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The answer to request `id`.
    Reply { id: i64, reply: Reply },
    /// Request `id` failed (id 0: the connection failed and will be closed).
    Error { id: i64, error: WireError },
    /// A pushed delivery for subscription `sub`.
    Delivery { sub: i64, delivery: WireDelivery },
    /// Subscription `sub` ended on the broker, for `error`; it holds no more leases.
    Ended { sub: i64, error: WireError },
}

/// Encodes a frame body.
///
/// # Errors
/// When the value cannot be BSON.
pub fn encode<T: Serialize>(frame: &T) -> Result<Bytes, QueueError> {
    queue_core::codec::with_scratch(|buf| bson::serialize_to_buffer(frame, buf))
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

/// The tag of a tagged frame (or of its `inner` document), read without decoding the rest.
fn tag<'a>(bytes: &'a [u8], inner: Option<&str>, key: &str) -> Option<&'a str> {
    let find = |doc: &'a [u8], name: &str| {
        fields(doc)
            .ok()?
            .map_while(Result::ok)
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    };
    let doc = match inner {
        Some(field) => match find(bytes, field)? {
            Value::Document(d) => d,
            _ => return None,
        },
        None => bytes,
    };
    match find(doc, key)? {
        Value::Str(s) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

fn malformed(e: impl std::fmt::Display) -> QueueError {
    QueueError::Protocol(format!("malformed frame: {e}"))
}

/// An integer field, as serde reads an `i64`: BSON int64 or int32.
fn int(value: Value<'_>, field: &str) -> Result<i64, QueueError> {
    match value {
        Value::Int64(v) => Ok(v),
        Value::Int32(v) => Ok(i64::from(v)),
        _ => Err(malformed(format!("`{field}` must be an integer"))),
    }
}

/// An integer field, as serde reads an `i32`: BSON int32, or int64 in range.
fn int32(value: Value<'_>, field: &str) -> Result<i32, QueueError> {
    i32::try_from(int(value, field)?).map_err(|_| malformed(format!("`{field}` must be an i32")))
}

/// A binary field's bytes.
fn binary(value: Value<'_>, field: &str) -> Result<Vec<u8>, QueueError> {
    match value {
        Value::Binary(b) => Ok(b.to_vec()),
        _ => Err(malformed(format!("`{field}` must be binary"))),
    }
}

fn string<'a>(value: Value<'a>, field: &str) -> Result<&'a str, QueueError> {
    match value {
        Value::Str(s) => std::str::from_utf8(s).map_err(malformed),
        _ => Err(malformed(format!("`{field}` must be a string"))),
    }
}

fn document<'a>(value: Value<'a>, field: &str) -> Result<&'a [u8], QueueError> {
    match value {
        Value::Document(d) => Ok(d),
        _ => Err(malformed(format!("`{field}` must be a document"))),
    }
}

/// The values of an array field, in order.
fn items<'a>(
    value: Value<'a>,
    field: &str,
) -> Result<impl Iterator<Item = Result<Value<'a>, QueueError>>, QueueError> {
    match value {
        Value::Array(a) => Ok(fields(a)?.map(|element| element.map(|(_, v)| v))),
        _ => Err(malformed(format!("`{field}` must be an array"))),
    }
}

fn missing(field: &str) -> QueueError {
    malformed(format!("missing field `{field}`"))
}

/// Reads a `settle_many` frame straight from its bytes, each field visited once: the
/// request a busy consumer sends most.
fn decode_settle_many(bytes: &[u8]) -> Result<ClientFrame, QueueError> {
    let (mut id, mut list) = (None, None);
    for element in fields(bytes)? {
        let (key, value) = element?;
        match key {
            b"id" => id = Some(int(value, "id")?),
            b"settles" => list = Some(value),
            _ => {}
        }
    }
    let id = id.ok_or_else(|| missing("id"))?;
    let mut settles = Vec::new();
    for item in items(list.ok_or_else(|| missing("settles"))?, "settles")? {
        settles.push(read_settle(document(item?, "settles")?)?);
    }
    Ok(ClientFrame {
        id,
        request: Request::SettleMany { settles },
    })
}

/// A request as the broker reads it: a produce with its spec left as bytes, or any other.
#[derive(Debug)]
pub enum Incoming<'a> {
    Produce(ProduceFrame<'a>),
    Other(ClientFrame),
}

impl<'a> Incoming<'a> {
    /// Reads a request frame.
    ///
    /// # Errors
    /// A protocol error naming what is wrong.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, QueueError> {
        match tag(bytes, None, "op") {
            Some("produce") => ProduceFrame::decode(bytes).map(Incoming::Produce),
            op => ClientFrame::decode_op(bytes, op).map(Incoming::Other),
        }
    }
}

/// A produce request read straight from its bytes. Its spec is left as bytes: the broker
/// reads it only when it differs from the spec of the connection's last produce.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceFrame<'a> {
    pub id: i64,
    /// The spec document's bytes.
    pub spec: &'a [u8],
    pub messages: Vec<WireOutgoing>,
    pub key: Option<String>,
}

impl<'a> ProduceFrame<'a> {
    /// Reads a produce request, refusing what serde refuses for [`Request::Produce`]. The
    /// spec is checked to be a document only.
    ///
    /// # Errors
    /// A protocol error naming what is wrong.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, QueueError> {
        let (mut id, mut spec, mut list, mut key) = (None, None, None, None);
        for element in fields(bytes)? {
            let (name, value) = element?;
            match name {
                b"id" => id = Some(int(value, "id")?),
                b"spec" => spec = Some(document(value, "spec")?),
                b"messages" => list = Some(value),
                b"key" => {
                    key = match value {
                        Value::Null => None,
                        value => Some(string(value, "key")?.to_string()),
                    }
                }
                _ => {}
            }
        }
        let mut messages = Vec::new();
        for item in items(list.ok_or_else(|| missing("messages"))?, "messages")? {
            messages.push(read_outgoing(document(item?, "messages")?)?);
        }
        Ok(ProduceFrame {
            id: id.ok_or_else(|| missing("id"))?,
            spec: spec.ok_or_else(|| missing("spec"))?,
            messages,
            key,
        })
    }

    /// The spec, read from its bytes.
    ///
    /// # Errors
    /// A protocol error naming what is wrong.
    pub fn wire_spec(&self) -> Result<WireSpec, QueueError> {
        decode(self.spec)
    }
}

fn read_outgoing(doc: &[u8]) -> Result<WireOutgoing, QueueError> {
    let (mut payload, mut dedup_key, mut delay_ms, mut priority, mut group) =
        (None, None, None, None, None);
    for element in fields(doc)? {
        let (key, value) = element?;
        let optional = |field| match value {
            Value::Null => Ok(None),
            value => int(value, field).map(Some),
        };
        match key {
            b"payload" => payload = Some(binary(value, "payload")?),
            b"dedup_key" => dedup_key = optional("dedup_key")?,
            b"delay_ms" => delay_ms = Some(int(value, "delay_ms")?),
            b"priority" => priority = Some(int32(value, "priority")?),
            b"group" => group = optional("group")?,
            _ => {}
        }
    }
    Ok(WireOutgoing {
        payload: Blob(payload.ok_or_else(|| missing("payload"))?),
        dedup_key,
        delay_ms: delay_ms.ok_or_else(|| missing("delay_ms"))?,
        priority: priority.ok_or_else(|| missing("priority"))?,
        group,
    })
}

fn read_settle(doc: &[u8]) -> Result<WireSettle, QueueError> {
    let (mut lease, mut outcome) = (None, None);
    for element in fields(doc)? {
        let (key, value) = element?;
        match key {
            b"lease" => lease = Some(read_lease(document(value, "lease")?)?),
            b"outcome" => outcome = Some(read_outcome(document(value, "outcome")?)?),
            _ => {}
        }
    }
    Ok(WireSettle {
        lease: lease.ok_or_else(|| missing("lease"))?,
        outcome: outcome.ok_or_else(|| missing("outcome"))?,
    })
}

fn read_lease(doc: &[u8]) -> Result<WireLease, QueueError> {
    let (mut channel, mut id, mut token) = (None, None, None);
    for element in fields(doc)? {
        let (key, value) = element?;
        match key {
            b"channel" => channel = Some(Arc::from(string(value, "channel")?)),
            b"id" => id = Some(int(value, "id")?),
            b"token" => token = Some(int(value, "token")?),
            _ => {}
        }
    }
    Ok(WireLease {
        channel: channel.ok_or_else(|| missing("channel"))?,
        id: id.ok_or_else(|| missing("id"))?,
        token: token.ok_or_else(|| missing("token"))?,
    })
}

fn read_outcome(doc: &[u8]) -> Result<WireOutcome, QueueError> {
    let mut flat = FlatOutcome {
        outcome: String::new(),
        after_ms: None,
        error: None,
    };
    let mut named = false;
    for element in fields(doc)? {
        let (key, value) = element?;
        match (key, value) {
            (_, Value::Null) => {}
            (b"outcome", value) => {
                flat.outcome = string(value, "outcome")?.to_string();
                named = true;
            }
            (b"after_ms", value) => flat.after_ms = Some(int(value, "after_ms")?),
            (b"error", value) => flat.error = Some(string(value, "error")?.to_string()),
            _ => {}
        }
    }
    if !named {
        return Err(missing("outcome"));
    }
    WireOutcome::try_from(flat).map_err(malformed)
}

impl ClientFrame {
    /// Decodes a request. `settle_many` is read straight from the bytes; the other frequent
    /// ones (produce, settle, extend) as plain documents, without serde's buffering of
    /// tagged enums; the rest through [`decode`]. The broker reads produces through
    /// [`Incoming::decode`] instead.
    ///
    /// # Errors
    /// A protocol error naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<ClientFrame, QueueError> {
        Self::decode_op(bytes, tag(bytes, None, "op"))
    }

    /// [`ClientFrame::decode`] of a frame whose `op` was read already.
    fn decode_op(bytes: &[u8], op: Option<&str>) -> Result<ClientFrame, QueueError> {
        #[derive(Deserialize)]
        struct Produce {
            id: i64,
            spec: WireSpec,
            messages: Vec<WireOutgoing>,
            key: Option<String>,
        }
        #[derive(Deserialize)]
        struct Settle {
            id: i64,
            lease: WireLease,
            outcome: WireOutcome,
        }
        #[derive(Deserialize)]
        struct Extend {
            id: i64,
            lease: WireLease,
            by_ms: i64,
        }
        let frame = |id, request| ClientFrame { id, request };
        match op {
            Some("produce") => decode::<Produce>(bytes).map(|f| {
                let request = Request::Produce {
                    spec: f.spec,
                    messages: f.messages,
                    key: f.key,
                };
                frame(f.id, request)
            }),
            Some("settle_many") => decode_settle_many(bytes),
            Some("settle") => decode::<Settle>(bytes).map(|f| {
                let request = Request::Settle {
                    lease: f.lease,
                    outcome: f.outcome,
                };
                frame(f.id, request)
            }),
            Some("extend") => decode::<Extend>(bytes).map(|f| {
                let request = Request::Extend {
                    lease: f.lease,
                    by_ms: f.by_ms,
                };
                frame(f.id, request)
            }),
            _ => decode(bytes),
        }
    }
}

/// Reads a delivery frame straight from its bytes: the frame a consumer gets most.
fn read_delivery_frame(bytes: &[u8]) -> Result<ServerFrame, QueueError> {
    let (mut sub, mut delivery) = (None, None);
    for element in fields(bytes)? {
        let (key, value) = element?;
        match key {
            b"sub" => sub = Some(int(value, "sub")?),
            b"delivery" => delivery = Some(read_delivery(document(value, "delivery")?)?),
            _ => {}
        }
    }
    Ok(ServerFrame::Delivery {
        sub: sub.ok_or_else(|| missing("sub"))?,
        delivery: delivery.ok_or_else(|| missing("delivery"))?,
    })
}

fn read_delivery(doc: &[u8]) -> Result<WireDelivery, QueueError> {
    let (mut lease, mut payload, mut attempt, mut priority, mut produced_at, mut lease_ms) =
        (None, None, None, None, None, None);
    for element in fields(doc)? {
        let (key, value) = element?;
        match key {
            b"lease" => lease = Some(read_lease(document(value, "lease")?)?),
            b"payload" => payload = Some(binary(value, "payload")?),
            b"attempt" => attempt = Some(int(value, "attempt")?),
            b"priority" => priority = Some(int32(value, "priority")?),
            b"produced_at" => produced_at = Some(int(value, "produced_at")?),
            b"lease_ms" => lease_ms = Some(int(value, "lease_ms")?),
            _ => {}
        }
    }
    Ok(WireDelivery {
        lease: lease.ok_or_else(|| missing("lease"))?,
        payload: Blob(payload.ok_or_else(|| missing("payload"))?),
        attempt: attempt.ok_or_else(|| missing("attempt"))?,
        priority: priority.ok_or_else(|| missing("priority"))?,
        produced_at: produced_at.ok_or_else(|| missing("produced_at"))?,
        lease_ms: lease_ms.ok_or_else(|| missing("lease_ms"))?,
    })
}

/// Reads the answer to a produce straight from its bytes.
fn read_receipts_frame(bytes: &[u8]) -> Result<ServerFrame, QueueError> {
    let (mut id, mut list) = (None, None);
    for element in fields(bytes)? {
        let (key, value) = element?;
        match key {
            b"id" => id = Some(int(value, "id")?),
            b"reply" => {
                for element in fields(document(value, "reply")?)? {
                    let (key, value) = element?;
                    if key == b"receipts" {
                        list = Some(value);
                    }
                }
            }
            _ => {}
        }
    }
    let mut receipts = Vec::new();
    for item in items(list.ok_or_else(|| missing("receipts"))?, "receipts")? {
        let mut pair = items(item?, "receipts")?;
        let (Some(id), Some(duplicate), None) = (pair.next(), pair.next(), pair.next()) else {
            return Err(malformed("a receipt is an id and a flag"));
        };
        let Value::Bool(duplicate) = duplicate? else {
            return Err(malformed("a receipt's flag must be a boolean"));
        };
        receipts.push((int(id?, "receipts")?, duplicate));
    }
    Ok(ServerFrame::Reply {
        id: id.ok_or_else(|| missing("id"))?,
        reply: Reply::Receipts { receipts },
    })
}

impl ServerFrame {
    /// Decodes a server frame. Deliveries and receipts are read straight from the bytes;
    /// the other frequent replies (settled, done, extended) as plain documents, without
    /// serde's buffering of tagged enums; the rest through [`decode`].
    ///
    /// # Errors
    /// A protocol error naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<ServerFrame, QueueError> {
        #[derive(Deserialize)]
        struct Answer<R> {
            id: i64,
            reply: R,
        }
        #[derive(Deserialize)]
        struct Settled {
            errors: Vec<Option<WireError>>,
        }
        #[derive(Deserialize)]
        struct Extended {
            lease_ms: i64,
        }
        #[derive(Deserialize)]
        struct Id {
            id: i64,
        }
        let reply = |id, reply| ServerFrame::Reply { id, reply };
        match tag(bytes, None, "kind") {
            Some("delivery") => read_delivery_frame(bytes),
            Some("reply") => match tag(bytes, Some("reply"), "reply") {
                Some("receipts") => read_receipts_frame(bytes),
                Some("settled") => decode::<Answer<Settled>>(bytes).map(|f| {
                    let errors = f.reply.errors;
                    reply(f.id, Reply::Settled { errors })
                }),
                Some("extended") => decode::<Answer<Extended>>(bytes).map(|f| {
                    let lease_ms = f.reply.lease_ms;
                    reply(f.id, Reply::Extended { lease_ms })
                }),
                Some("done") => decode::<Id>(bytes).map(|f| reply(f.id, Reply::Done)),
                _ => decode(bytes),
            },
            _ => decode(bytes),
        }
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
        let spec = ChannelSpec::new("a/b")
            .exactly_once(Duration::from_secs(1))
            .concurrency(7)
            .concurrency_per_group(2)
            .rate(100, Duration::from_secs(1))
            .rate_per_group(5, Duration::from_secs(60));
        let out = Outgoing {
            payload: vec![1, 2, 3],
            dedup_key: Some(u64::MAX - 5),
            delay: Duration::from_millis(7),
            priority: 9,
            group: Some(u64::MAX - 1),
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
        for periodic in [
            ChannelSpec::new("p").every(Duration::from_secs(60)),
            ChannelSpec::new("p").cron("0 0 * * *", Duration::from_secs(86_400)),
        ] {
            let wire = WireSpec::from(&periodic);
            let back: WireSpec = decode(&encode(&wire).unwrap()).unwrap();
            assert_eq!(back.to_spec().unwrap(), periodic);
        }

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
            delivery: WireDelivery::new(d.clone(), Duration::from_millis(30_000)),
        };
        let back: ServerFrame = decode(&encode(&f).unwrap()).unwrap();
        let ServerFrame::Delivery { delivery, .. } = back else {
            panic!()
        };
        // The deadline is the lease's duration after now on the receiver's clock.
        assert_eq!(
            delivery.into_raw(1_000),
            RawDelivery {
                deadline: 31_000,
                ..d.clone()
            }
        );

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
                    Some(WireError::from(&QueueError::StaleLease {
                        id: MessageId(9),
                    })),
                ],
            },
        };
        assert_eq!(
            decode::<ServerFrame>(&encode(&settled).unwrap()).unwrap(),
            settled
        );
    }

    #[test]
    fn the_plain_decoders_read_what_the_tagged_ones_read() {
        let lease = WireLease {
            channel: "jobs/a".into(),
            id: 7,
            token: -3,
        };
        let outcomes = [
            WireOutcome::Ack,
            WireOutcome::Retry {
                after_ms: Some(250),
                error: "boom".into(),
            },
            WireOutcome::Retry {
                after_ms: None,
                error: "again".into(),
            },
            WireOutcome::DeadLetter {
                error: "poison".into(),
            },
            WireOutcome::Release,
        ];
        let mut requests = vec![
            Request::Produce {
                spec: WireSpec::from(&ChannelSpec::new("jobs/a")),
                messages: vec![WireOutgoing {
                    payload: Blob(vec![1, 2, 3]),
                    dedup_key: Some(-9),
                    delay_ms: 5,
                    priority: 4,
                    group: Some(-3),
                }],
                key: Some("k1".into()),
            },
            Request::SettleMany {
                settles: outcomes
                    .iter()
                    .map(|o| WireSettle {
                        lease: lease.clone(),
                        outcome: o.clone(),
                    })
                    .collect(),
            },
            Request::Extend {
                lease: lease.clone(),
                by_ms: 30_000,
            },
            Request::Stats,
        ];
        requests.extend(outcomes.iter().map(|o| Request::Settle {
            lease: lease.clone(),
            outcome: o.clone(),
        }));
        for (id, request) in requests.into_iter().enumerate() {
            let frame = ClientFrame {
                id: id as i64,
                request,
            };
            let bytes = encode(&frame).unwrap();
            assert_eq!(ClientFrame::decode(&bytes).unwrap(), frame);
            assert_eq!(decode::<ClientFrame>(&bytes).unwrap(), frame);
        }

        let replies = [
            Reply::Receipts {
                receipts: vec![(1, false), (2, true)],
            },
            Reply::Settled {
                errors: vec![None, Some(WireError::from(&QueueError::Closed))],
            },
            Reply::Extended { lease_ms: 1_500 },
            Reply::Done,
            Reply::Pong,
        ];
        let mut frames: Vec<ServerFrame> = replies
            .into_iter()
            .enumerate()
            .map(|(id, reply)| ServerFrame::Reply {
                id: id as i64,
                reply,
            })
            .collect();
        frames.push(ServerFrame::Delivery {
            sub: 3,
            delivery: WireDelivery {
                lease,
                payload: Blob(vec![9; 40]),
                attempt: 2,
                priority: 1,
                produced_at: 123,
                lease_ms: 30_000,
            },
        });
        for frame in frames {
            let bytes = encode(&frame).unwrap();
            assert_eq!(ServerFrame::decode(&bytes).unwrap(), frame);
            assert_eq!(decode::<ServerFrame>(&bytes).unwrap(), frame);
        }
    }

    fn binary(bytes: &[u8]) -> bson::Bson {
        bson::Bson::Binary(bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: bytes.to_vec(),
        })
    }

    /// A produce frame as the broker reads it, and as serde reads it.
    fn read_produce(
        messages: bson::Bson,
        key: bson::Bson,
    ) -> (
        Result<ClientFrame, QueueError>,
        Result<ClientFrame, QueueError>,
    ) {
        let spec = bson::serialize_to_document(&WireSpec::from(
            &ChannelSpec::new("jobs/a").exactly_once(Duration::from_secs(3)),
        ))
        .unwrap();
        let frame = bson::doc! {
            "key": key, "op": "produce", "extra": [1_i32, "x"], "messages": messages,
            "spec": spec, "id": 9_i32,
        };
        let bytes = bson::serialize_to_vec(&frame).unwrap();
        let plain = Incoming::decode(&bytes).and_then(|f| {
            let Incoming::Produce(p) = f else {
                panic!("a produce read as another request")
            };
            Ok(ClientFrame {
                id: p.id,
                request: Request::Produce {
                    spec: p.wire_spec()?,
                    messages: p.messages,
                    key: p.key,
                },
            })
        });
        (plain, decode::<ClientFrame>(&bytes))
    }

    #[test]
    fn produce_is_read_as_serde_reads_it_and_refused_where_serde_refuses() {
        let payload = binary(&[1, 2, 3]);
        let accepted = bson::bson!([
            { "payload": payload.clone(), "dedup_key": null, "delay_ms": 5_i32, "priority": 4_i64, "group": 7_i64, "other": "x" },
            { "priority": 0_i32, "delay_ms": 0_i64, "dedup_key": -3_i64, "payload": binary(&[]) },
        ]);
        for key in [bson::bson!("k-1"), bson::Bson::Null] {
            let (plain, tagged) = read_produce(accepted.clone(), key);
            let tagged = tagged.unwrap();
            assert_eq!(plain.unwrap(), tagged);
            let Request::Produce { messages, .. } = tagged.request else {
                panic!()
            };
            assert_eq!(messages.len(), 2);
        }
        for refused in [
            bson::bson!([{ "delay_ms": 5_i64, "priority": 4_i32 }]),
            bson::bson!([{ "payload": "text", "delay_ms": 5_i64, "priority": 4_i32 }]),
            bson::bson!([{ "payload": payload.clone(), "priority": 4_i32 }]),
            bson::bson!([{ "payload": payload.clone(), "delay_ms": 5_i64 }]),
            bson::bson!([{ "payload": payload.clone(), "delay_ms": 5_i64, "priority": 1_i64 << 40 }]),
            bson::bson!([{ "payload": payload.clone(), "delay_ms": 5_i64, "priority": 1_i32, "dedup_key": "x" }]),
            bson::bson!([{ "payload": payload.clone(), "delay_ms": 5.5, "priority": 1_i32 }]),
            bson::bson!(["not a message"]),
            bson::bson!({ "0": "not a list" }),
        ] {
            let (plain, tagged) = read_produce(refused.clone(), bson::Bson::Null);
            assert!(matches!(plain, Err(QueueError::Protocol(_))), "{refused}");
            assert!(tagged.is_err(), "{refused}");
        }
        let (plain, tagged) = read_produce(accepted, bson::bson!(5_i32));
        assert!(plain.is_err() && tagged.is_err(), "a key must be a string");
    }

    #[test]
    fn deliveries_and_receipts_are_read_as_serde_reads_them() {
        let d = WireDelivery::new(
            RawDelivery {
                lease: Lease {
                    channel: "jobs/x".into(),
                    id: MessageId(3),
                    token: 9,
                },
                payload: vec![5; 40],
                attempt: 2,
                priority: 7,
                produced_at: 11,
                deadline: 0,
            },
            Duration::from_millis(500),
        );
        let frames = [
            hot::delivery(3, &d),
            hot::receipts(
                4,
                &[
                    Receipt {
                        id: MessageId(1),
                        duplicate: false,
                    },
                    Receipt {
                        id: MessageId(u64::MAX),
                        duplicate: true,
                    },
                ],
            ),
            hot::receipts(5, &[]),
        ];
        for bytes in &frames {
            assert_eq!(
                ServerFrame::decode(bytes).unwrap(),
                decode::<ServerFrame>(bytes).unwrap()
            );
        }
        let lease = bson::doc! { "channel": "c", "id": 1_i64, "token": 2_i32 };
        let delivery = |body: bson::Document| {
            let frame = bson::doc! { "kind": "delivery", "sub": 1_i64, "delivery": body };
            bson::serialize_to_vec(&frame).unwrap()
        };
        let whole = bson::doc! {
            "lease": lease.clone(), "payload": binary(&[1]), "attempt": 1_i32, "priority": 2_i32,
            "produced_at": 3_i64, "lease_ms": 4_i64, "later": true,
        };
        let bytes = delivery(whole.clone());
        assert_eq!(
            ServerFrame::decode(&bytes).unwrap(),
            decode::<ServerFrame>(&bytes).unwrap()
        );
        for field in [
            "lease",
            "payload",
            "attempt",
            "priority",
            "produced_at",
            "lease_ms",
        ] {
            let mut body = whole.clone();
            body.remove(field);
            let bytes = delivery(body);
            assert!(ServerFrame::decode(&bytes).is_err(), "without {field}");
            assert!(decode::<ServerFrame>(&bytes).is_err(), "without {field}");
        }
        let mut body = whole;
        body.insert("priority", 1_i64 << 33);
        assert!(ServerFrame::decode(&delivery(body.clone())).is_err());
        assert!(decode::<ServerFrame>(&delivery(body)).is_err());
        for receipts in [
            bson::bson!([[1_i64, true, 3_i32]]),
            bson::bson!([[1_i64]]),
            bson::bson!([[1_i64, 1_i32]]),
            bson::bson!([["1", true]]),
            bson::bson!([1_i64]),
        ] {
            let frame = bson::doc! {
                "kind": "reply", "id": 1_i64,
                "reply": { "reply": "receipts", "receipts": receipts.clone() },
            };
            let bytes = bson::serialize_to_vec(&frame).unwrap();
            assert!(ServerFrame::decode(&bytes).is_err(), "{receipts}");
            assert!(decode::<ServerFrame>(&bytes).is_err(), "{receipts}");
        }
    }

    #[test]
    fn the_element_reader_steps_over_every_bson_type_and_never_reads_past_a_document() {
        let every = bson::doc! {
            "double": 1.5,
            "string": "s",
            "document": { "a": 1_i32 },
            "array": [1_i32, "two"],
            "binary": binary(&[1, 2]),
            "old binary": bson::Bson::Binary(bson::Binary {
                subtype: bson::spec::BinarySubtype::BinaryOld,
                bytes: vec![7, 8, 9],
            }),
            "undefined": bson::Bson::Undefined,
            "object id": bson::oid::ObjectId::from_bytes([3; 12]),
            "bool": true,
            "date": bson::DateTime::from_millis(5),
            "null": null,
            "regex": bson::Regex { pattern: bson::raw::CString::try_from("a+").unwrap(), options: bson::raw::CString::try_from("i").unwrap() },
            "code": bson::Bson::JavaScriptCode("f()".into()),
            "symbol": bson::Bson::Symbol("sym".into()),
            "code with scope": bson::Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope {
                code: "g()".into(),
                scope: bson::doc! { "x": 1_i32 },
            }),
            "int32": -4_i32,
            "timestamp": bson::Timestamp { time: 1, increment: 2 },
            "int64": -5_i64,
            "decimal": bson::Decimal128::from_bytes([1; 16]),
            "min": bson::Bson::MinKey,
            "max": bson::Bson::MaxKey,
            "last": "end",
        };
        let bytes = bson::serialize_to_vec(&every).unwrap();
        let read: Vec<(Vec<u8>, Value<'_>)> = fields(&bytes)
            .unwrap()
            .map(|e| e.map(|(k, v)| (k.to_vec(), v)).unwrap())
            .collect();
        let keys: Vec<&str> = every.keys().map(String::as_str).collect();
        let read_keys: Vec<&str> = read
            .iter()
            .map(|(k, _)| std::str::from_utf8(k).unwrap())
            .collect();
        assert_eq!(read_keys, keys);
        let value = |key: &str| read.iter().find(|(k, _)| k == key.as_bytes()).unwrap().1;
        assert_eq!(value("string"), Value::Str(b"s"));
        assert_eq!(value("binary"), Value::Binary(&[1, 2]));
        assert_eq!(value("old binary"), Value::Binary(&[7, 8, 9]));
        assert_eq!(value("bool"), Value::Bool(true));
        assert_eq!(value("null"), Value::Null);
        assert_eq!(value("int32"), Value::Int32(-4));
        assert_eq!(value("int64"), Value::Int64(-5));
        assert_eq!(value("last"), Value::Str(b"end"));
        assert!(matches!(value("document"), Value::Document(_)));
        assert!(matches!(value("array"), Value::Array(_)));

        // Cut short or with a byte changed, a frame is refused or read, never read past.
        let frame = hot::produce(
            1,
            &WireSpec::from(&ChannelSpec::new("a")),
            &[WireOutgoing {
                payload: Blob(vec![1; 8]),
                dedup_key: Some(2),
                delay_ms: 3,
                priority: 4,
                group: None,
            }],
            Some("k"),
        );
        for input in [&bytes[..], &frame[..]] {
            for cut in 0..input.len() {
                let _ = fields(&input[..cut]).map(|f| f.count());
                let _ = Incoming::decode(&input[..cut]);
            }
            for at in 0..input.len() {
                for byte in [0x00, 0x01, 0x05, 0x7F, 0xFF] {
                    let mut changed = input.to_vec();
                    changed[at] = byte;
                    if let Ok(f) = fields(&changed) {
                        f.for_each(drop);
                    }
                    let _ = Incoming::decode(&changed);
                    let _ = ServerFrame::decode(&changed);
                }
            }
        }
    }

    #[test]
    fn settle_many_is_read_as_serde_reads_it_and_refused_where_serde_refuses() {
        let lease = bson::doc! { "channel": "c", "id": 1_i32, "token": 2_i64, "extra": true };
        let read = |settles: bson::Bson| {
            let many = bson::doc! { "op": "settle_many", "settles": settles, "id": 9_i32 };
            let bytes = bson::serialize_to_vec(&many).unwrap();
            (ClientFrame::decode(&bytes), decode::<ClientFrame>(&bytes))
        };
        let accepted = bson::bson!([
            { "lease": lease.clone(), "outcome": { "outcome": "ack" } },
            { "outcome": { "outcome": "retry", "error": "e", "after_ms": null }, "lease": lease.clone() },
            { "lease": lease.clone(), "outcome": { "outcome": "snooze", "after_ms": 5_i32 } },
        ]);
        let (plain, tagged) = read(accepted);
        assert_eq!(plain.unwrap(), tagged.unwrap());
        for refused in [
            bson::bson!([{ "lease": lease.clone() }]),
            bson::bson!([{ "outcome": { "outcome": "ack" } }]),
            bson::bson!([{ "lease": { "channel": 1_i32, "id": 1_i64, "token": 1_i64 }, "outcome": { "outcome": "ack" } }]),
            bson::bson!([{ "lease": { "channel": "c", "id": "1", "token": 1_i64 }, "outcome": { "outcome": "ack" } }]),
            bson::bson!([{ "lease": lease.clone(), "outcome": { "outcome": "snooze" } }]),
            bson::bson!([{ "lease": lease.clone(), "outcome": "ack" }]),
            bson::bson!(["not a settle"]),
            bson::bson!("not a list"),
        ] {
            let (plain, tagged) = read(refused.clone());
            assert!(matches!(plain, Err(QueueError::Protocol(_))), "{refused}");
            assert!(tagged.is_err(), "{refused}");
        }
    }

    #[test]
    fn a_settle_without_its_error_or_with_an_unknown_outcome_is_refused() {
        let lease = bson::doc! { "channel": "c", "id": 1_i64, "token": 1_i64 };
        for outcome in [
            bson::doc! { "outcome": "retry" },
            bson::doc! { "outcome": "dead_letter" },
            bson::doc! { "outcome": "explode" },
        ] {
            let settle = bson::doc! {
                "id": 1_i64, "op": "settle", "lease": lease.clone(), "outcome": outcome.clone()
            };
            let bytes = bson::serialize_to_vec(&settle).unwrap();
            assert!(matches!(
                ClientFrame::decode(&bytes),
                Err(QueueError::Protocol(_))
            ));
            let mut one = bson::doc! { "lease": lease.clone() };
            one.extend(outcome);
            let many = bson::doc! { "id": 2_i64, "op": "settle_many", "settles": [one] };
            let bytes = bson::serialize_to_vec(&many).unwrap();
            assert!(matches!(
                ClientFrame::decode(&bytes),
                Err(QueueError::Protocol(_))
            ));
        }
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
        assert!(matches!(
            ClientFrame::decode(b"nonsense"),
            Err(QueueError::Protocol(_))
        ));
        assert!(matches!(
            ServerFrame::decode(b"\x05\x00\x00\x00\x00"),
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
            group: None,
        };
        assert!(o.into_outgoing().is_err());
    }
}
