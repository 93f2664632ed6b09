//! The [`Adapter`] trait: what a queue backend provides, and the plain data that crosses it.
//!
//! Every adapter (in-memory, embedded log, broker client, PostgreSQL) implements the same
//! contract, checked by one conformance suite:
//!
//! - `produce` returns only once every message of the batch is durable for that adapter
//!   (fsynced, committed); a receipt's id is unique within the store.
//! - A message is held by at most one subscription at a time. A held message carries a
//!   [`Lease`] whose fencing token is unique; `settle` and `extend` with any other token fail
//!   with [`QueueError::StaleLease`] and change nothing.
//! - A subscription is handed at most `max_parallel` unsettled deliveries at once.
//! - A delivery counts as an attempt, durably, before it is handed out. Dropping a
//!   [`Subscription`] releases every lease it holds, so the messages go to other subscribers
//!   at once; the attempt still counts, as it would for a crashed worker, and a message that
//!   has used its last attempt is dead-lettered ("worker lost on attempt N of M").
//!   [`Outcome::Release`] gives a delivery back without counting the attempt.
//! - A lease that is neither settled nor extended before its deadline lapses: the message
//!   becomes ready again, or dead if it had used its attempts.
//! - Ready messages of higher priority leave first; of equal priority, in the order they
//!   became ready.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::QueueError;
use crate::spec::ChannelSpec;

/// The id of a message, unique within its store. Use it as the idempotency key for effects
/// outside the queue.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// What `produce` answers for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The message id; for a duplicate, the id of the original.
    pub id: MessageId,
    /// The produce fell inside the dedup window of an equal message and was dropped.
    pub duplicate: bool,
}

/// A message on its way into the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The BSON payload.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
    /// The dedup key, set for channels that deduplicate.
    pub dedup_key: Option<u64>,
    /// How long to hold the message before it becomes ready.
    pub delay: Duration,
    /// Higher leaves first. Default 0.
    pub priority: u8,
    /// The message's group ([`GroupKey::group_hash`](crate::GroupKey::group_hash)): messages
    /// of one group leave in produce order, at most the channel's `concurrency_per_group` in
    /// flight at once.
    #[serde(default)]
    pub group: Option<u64>,
}

/// A held message: the proof a consumer shows to settle or extend it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The channel name.
    pub channel: Arc<str>,
    /// The message.
    pub id: MessageId,
    /// The fencing token of this delivery; any other token is stale.
    pub token: u64,
}

/// A delivery as an adapter hands it out, before decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawDelivery {
    /// The lease this delivery holds.
    pub lease: Lease,
    /// The BSON payload.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
    /// 1 for the first delivery, counting every delivery since.
    pub attempt: u32,
    /// The message's priority.
    pub priority: u8,
    /// When the message was produced.
    pub produced_at: Timestamp,
    /// When the lease lapses unless extended.
    pub deadline: Timestamp,
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done: the message is removed.
    Ack,
    /// Failed: deliver again after `after` (the channel's backoff when `None`), or move to the
    /// dead-letter queue when the attempts are used up.
    Retry {
        /// An explicit delay before the next attempt.
        after: Option<Duration>,
        /// What went wrong, kept with the message.
        error: String,
    },
    /// Move to the dead-letter queue now.
    DeadLetter {
        /// Why.
        error: String,
    },
    /// Give the message back unprocessed: it is ready again at once and the attempt does not
    /// count. Used on graceful shutdown.
    Release,
    /// Deliver again after `after`, and this attempt does not count (a handler told to come
    /// back later, say by an HTTP 429's `Retry-After`).
    Snooze {
        /// The delay before the next delivery.
        after: Duration,
    },
}

/// Counters and depths of one channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// The channel name.
    pub channel: String,
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages waiting for their due time (delayed or backing off).
    pub delayed: u64,
    /// Messages held under a lease.
    pub in_flight: u64,
    /// Messages in the dead-letter queue.
    pub dead: u64,
    /// Messages accepted (not counting duplicates).
    pub produced: u64,
    /// Produces dropped as duplicates.
    pub duplicates: u64,
    /// Messages acked.
    pub acked: u64,
    /// Deliveries that failed and were retried.
    pub retried: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Leases that lapsed.
    pub lease_expiries: u64,
    /// Subscriptions open now.
    pub consumers: u64,
    /// Paused: nothing is delivered until it is resumed.
    pub paused: bool,
    /// When the earliest delayed message is due (for a periodic channel, its next slot).
    #[serde(default)]
    pub next_due: Option<Timestamp>,
    /// When `produced`, `duplicates`, `acked`, `retried`, `dead_lettered` and
    /// `lease_expiries` started counting (milliseconds since the Unix epoch): when the
    /// embedded store (or the broker's) was created, as it keeps them across restarts (after
    /// a crash they are off by at most the last seconds' work; when its counters file was
    /// lost, they count from the open that found it so); when an in-memory queue was opened; 0 for PostgreSQL, whose
    /// counters are stored with the data.
    pub counted_since: crate::clock::Timestamp,
}

/// Where a cancelled message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cancelled {
    /// Ready or delayed: it will not be delivered.
    Pending,
    /// Delivered and not settled: its handler may still be running; it learns through
    /// [`Delivery::cancelled`](crate::Delivery::cancelled), and its settle is refused.
    InFlight,
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The message id.
    pub id: MessageId,
    /// The channel it died in.
    pub channel: String,
    /// The BSON payload.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
    /// Deliveries made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// When it moved to the dead-letter queue.
    pub dead_at: Timestamp,
}

/// Where a stored message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Ready for delivery.
    Ready,
    /// Waiting for its due time.
    Delayed,
    /// Held under a lease.
    InFlight,
}

/// A pending message as `peek` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message id.
    pub id: MessageId,
    /// The BSON payload.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
    /// Where it is.
    pub state: MessageState,
    /// Deliveries made so far.
    pub attempts: u32,
    /// Its priority.
    pub priority: u8,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// When it is (or was) due.
    pub due: Timestamp,
}

/// A stream of deliveries for one channel. Dropping it releases every lease it holds.
pub trait Subscription: Send + Sync {
    /// Waits for the next delivery.
    ///
    /// # Cancel safety
    /// Cancel safe: a delivery taken for a dropped call stays with the subscription and is
    /// handed out by the next call, or released when the subscription is stopped or dropped.
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>>;

    /// Stops taking messages ahead of `next` calls, giving back unprocessed (attempt not
    /// counted) any that were fetched ahead and not yet returned. Called before a graceful
    /// shutdown; subscriptions that only take on demand need not do anything.
    fn stop(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// Says that `next` will keep being called: the adapter may take deliveries ahead, up to
    /// `max_parallel` held, while earlier ones are being settled. The consumer loop calls it;
    /// a subscription polled by hand is only given what it asks for.
    fn take_ahead(&self) {}
}

/// A queue backend. Object safe: [`Queue`](crate::Queue) holds it as `Arc<dyn Adapter>`.
///
/// Every method documents its errors through [`QueueError`]; an adapter never loses a message
/// that a returned `Ok` confirmed.
pub trait Adapter: Send + Sync + 'static {
    /// Stores a batch of messages for `spec`'s channel and returns one receipt per message, in
    /// order. Returns once the batch is durable.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the batch is either not stored, or stored and delivered
    /// like any other; never stored and invisible. A duplicate is answered only once its
    /// original is durable.
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>>;

    /// Opens a subscription to `spec`'s channel holding at most `max_parallel` deliveries.
    ///
    /// # Cancel safety
    /// Dropped before it completes, no subscription is left open.
    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>>;

    /// Ends a delivery. Durable before it returns `Ok`.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the outcome is either applied or not; if not, the lease
    /// lapses as if the holder had died.
    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Settles several leases; each succeeds or fails on its own, and the results come in
    /// order. A store may apply them together, to share its commits.
    ///
    /// # Cancel safety
    /// As [`Adapter::settle`], for each.
    fn settle_many(
        &self,
        settles: Vec<(Lease, Outcome)>,
    ) -> BoxFuture<'_, Vec<Result<(), QueueError>>> {
        Box::pin(async move {
            let each = settles
                .iter()
                .map(|(lease, outcome)| self.settle(lease, outcome.clone()));
            futures_util::future::join_all(each).await
        })
    }

    /// Moves a lease's deadline to `by` from now and returns the new deadline.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the lease is extended or left as it was.
    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>>;

    /// Counters and depths of every channel the store knows.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>>;

    /// Pending messages of a channel in delivery order, ready first, at most `limit`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>>;

    /// The dead-letter queue of a channel, oldest first, at most `limit`; empty for a
    /// channel the store has never seen.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>>;

    /// Moves dead letters back into their channel with their attempts reset: the given ids,
    /// or all when `ids` is `None`. Returns how many moved (0 for a channel the store has
    /// never seen).
    ///
    /// # Cancel safety
    /// Dropped before it completes, the change is either made or not.
    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>>;

    /// Deletes dead letters: the given ids, or all when `ids` is `None`. Returns how many
    /// (0 for a channel the store has never seen).
    ///
    /// # Cancel safety
    /// Dropped before it completes, the change is either made or not.
    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>>;

    /// Deletes the pending messages of a channel, ready and delayed; messages in flight
    /// finish as usual. Returns how many (0 for a channel the store has never seen).
    ///
    /// # Cancel safety
    /// Dropped before it completes, the change is either made or not.
    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>>;

    /// Cancels a message that is pending (ready or delayed) or in flight: it is deleted, and
    /// the settle and lease extensions of a delivery holding it are refused with
    /// [`QueueError::Cancelled`].
    ///
    /// # Errors
    /// [`QueueError::UnknownMessage`] when the channel holds no such pending or in-flight
    /// message (never produced, settled already, or a dead letter).
    ///
    /// # Cancel safety
    /// Dropped before it completes, the change is either made or not.
    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: MessageId,
    ) -> BoxFuture<'a, Result<Cancelled, QueueError>>;

    /// Pauses a channel (`paused`) or resumes it, durably: while paused nothing is
    /// delivered; producers keep producing and deliveries in flight finish.
    ///
    /// # Errors
    /// [`QueueError::InvalidRequest`] for a channel the store has never seen.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the change is either made or not.
    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Flushes and closes the store. Later calls fail with [`QueueError::Closed`].
    ///
    /// # Cancel safety
    /// Once polled, the store closes whether or not the future is polled again.
    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>>;

    /// The concrete adapter, for capabilities only some adapters have (such as transactions
    /// on PostgreSQL): callers downcast it with `downcast_ref`. `None` unless the adapter
    /// offers such a capability.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Idempotent produce, where the adapter keeps produce keys (the local stores).
    fn keyed(&self) -> Option<&dyn KeyedProduce> {
        None
    }

    /// Delivery histories, where the adapter can keep them (the engine of the local stores
    /// and the broker, in process).
    fn histories(&self) -> Option<&dyn Histories> {
        None
    }
}

/// Each message's deliveries and their outcomes, kept in memory while enabled, for the
/// dashboard: a store restart forgets them, an ack or deletion drops a message's history,
/// and past [`HISTORIES_KEPT`] messages the oldest history is dropped.
pub trait Histories: Send + Sync {
    /// Starts keeping histories (off by default: it costs a map update per delivery).
    fn keep_histories(&self);

    /// What happened to message `id` of `channel` since histories were kept, in order.
    fn history(&self, channel: &str, id: MessageId) -> Vec<Step>;

    /// How long `channel`'s recent deliveries were held, from delivery to settle: the median
    /// and 95th percentile in milliseconds, over the last 1,024 settles.
    fn held(&self, channel: &str) -> Option<(u64, u64)>;
}

/// The most messages whose history is kept.
pub const HISTORIES_KEPT: usize = 10_000;

/// One step of a message's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// When.
    pub at: Timestamp,
    /// `delivered`, `acked`, `retried`, `released`, `snoozed`, `dead_lettered`, `lapsed`
    /// (its lease lapsed or its holder went away) or `redriven`.
    pub event: String,
    /// The attempt it concerns.
    pub attempt: u32,
    /// The delivery's fencing token, 0 where none applies.
    pub token: u64,
    /// The subscription that held it (a worker's consumer), 0 where none applies.
    pub consumer: u64,
    /// The error, for a retry or a dead letter.
    pub error: Option<String>,
}

/// Produce under a key the producer chose: the same key sent again within `window` of the
/// first produce is answered with the first produce's receipts, and nothing is stored again.
/// The embedded store keeps the keys durably, so the answer holds across a restart. The
/// broker uses it to make a produce retried after a lost connection store once.
pub trait KeyedProduce: Send + Sync {
    /// Like [`Adapter::produce`], under `key`. Concurrent produces under one key are the
    /// caller's to avoid.
    ///
    /// # Cancel safety
    /// As [`Adapter::produce`]; a retry under the same key is answered with the stored
    /// receipts.
    fn produce_keyed<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
        key: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>>;
}

/// Serde for payload bytes: a BSON binary or similar compact form where the format has one,
/// a byte sequence otherwise.
mod serde_bytes_compat {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}
