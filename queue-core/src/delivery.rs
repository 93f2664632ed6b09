//! [`Delivery`]: a decoded message together with the lease that holds it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::adapter::{Lease, MessageId, Outcome, RawDelivery};
use crate::clock::Timestamp;
use crate::error::QueueError;
use crate::queue::{Cancellation, Queue};
use crate::spec::Message;

/// A message with its delivery metadata and the means to settle it by hand.
///
/// A handler that takes `Delivery<T>` may end the delivery itself with [`Delivery::ack`],
/// [`Delivery::retry_after`] or [`Delivery::dead_letter`]; if it does not, its return value
/// decides as usual (`Ok` acks, `Err` retries).
pub struct Delivery<T> {
    message: T,
    lease: Lease,
    attempt: u32,
    priority: u8,
    produced_at: Timestamp,
    queue: Queue,
    settled: Arc<AtomicBool>,
    cancelled: Cancellation,
}

impl<T: fmt::Debug> fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("lease", &self.lease)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<T: Message> Delivery<T> {
    pub(crate) fn new(
        message: T,
        raw: &RawDelivery,
        queue: Queue,
        settled: Arc<AtomicBool>,
        cancelled: Cancellation,
    ) -> Self {
        Delivery {
            message,
            lease: raw.lease.clone(),
            attempt: raw.attempt,
            priority: raw.priority,
            produced_at: raw.produced_at,
            queue,
            settled,
            cancelled,
        }
    }

    /// Resolves once the message is cancelled ([`Queue::cancel`]) while this handler runs,
    /// and never otherwise. A cancel made through a handle of the same queue in this process
    /// tells it at once; one made elsewhere, when the worker next extends the lease (within a
    /// third of the channel's lease). Race it against the work to stop early; the
    /// settle of a cancelled delivery is refused with [`QueueError::Cancelled`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&self) {
        self.cancelled.cancelled().await;
    }

    /// The message id, stable across redeliveries.
    pub fn id(&self) -> MessageId {
        self.lease.id
    }

    /// 1 for the first delivery, counting every delivery since.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The fencing token of this delivery. A later delivery of the same message carries a
    /// larger one; pass it to systems that can reject writes from a stale holder.
    pub fn fencing_token(&self) -> u64 {
        self.lease.token
    }

    /// The message's priority.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// When the message was produced (milliseconds since the Unix epoch).
    pub fn produced_at(&self) -> Timestamp {
        self.produced_at
    }

    /// The message.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// Takes the message out of the delivery.
    pub fn into_message(self) -> T {
        self.message
    }

    /// Extends the lease to `by` from now. The worker does this on its own while a handler
    /// runs; call it to ask for a longer stretch at once.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] when the lease was lost.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the lease is extended or left as it was.
    pub async fn extend_lease(&self, by: Duration) -> Result<Timestamp, QueueError> {
        self.queue.adapter().extend(&self.lease, by).await
    }

    async fn settle(self, outcome: Outcome) -> Result<(), QueueError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(QueueError::StaleLease { id: self.lease.id });
        }
        self.queue.adapter().settle(&self.lease, outcome).await
    }

    /// Acks now.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] when the lease was lost or the delivery was settled.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the outcome is either applied or not; if not, the lease
    /// lapses and the message is delivered again.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle(Outcome::Ack).await
    }

    /// Fails this attempt and asks for the next one after `delay` instead of the channel's
    /// backoff. Counts as an attempt: the message is dead-lettered when its attempts are used.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] when the lease was lost or the delivery was settled.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the outcome is either applied or not; if not, the lease
    /// lapses and the message is delivered again.
    pub async fn retry_after(self, delay: Duration) -> Result<(), QueueError> {
        self.settle(Outcome::Retry {
            after: Some(delay),
            error: "retry requested by the handler".into(),
        })
        .await
    }

    /// Puts the message back to be delivered again after `delay`, without counting this
    /// attempt: for a handler told to come back later (an HTTP 429's `Retry-After`). Not a
    /// failure: nothing is recorded as an error, and `max_attempts` is not used up.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] when the lease was lost or the delivery was settled.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the outcome is either applied or not; if not, the lease
    /// lapses and the message is delivered again.
    pub async fn snooze(self, delay: Duration) -> Result<(), QueueError> {
        self.settle(Outcome::Snooze { after: delay }).await
    }

    /// Moves the message to the dead-letter queue now, with `reason` as its error.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] when the lease was lost or the delivery was settled.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the outcome is either applied or not; if not, the lease
    /// lapses and the message is delivered again.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<(), QueueError> {
        self.settle(Outcome::DeadLetter {
            error: reason.into(),
        })
        .await
    }
}
