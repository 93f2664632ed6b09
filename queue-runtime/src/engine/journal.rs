//! The journal: where the engine reports every state change, in the order the changes
//! happened, and how it learns that they are durable.
//!
//! The engine appends under the channel's lock, so a journal sees the changes of one channel
//! in order. What the engine does once an append is durable (make produced messages visible,
//! hand out deliveries) is a [`Then`] step the journal runs, not the caller's future, so a
//! caller that gives up does not leave a change half applied.

use queue_core::clock::Timestamp;
use queue_core::{QueueError, Receipt};
use smallvec::SmallVec;

use super::state::{Change, Tally};

/// A message as it enters the store.
#[derive(Debug, Clone, Copy)]
pub struct Produced<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The message id.
    pub id: u64,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// When it is due.
    pub due: Timestamp,
    /// Its priority.
    pub priority: u8,
    /// `(dedup key, window end)` on a channel that deduplicates.
    pub dedup: Option<(u64, Timestamp)>,
    /// Its group's hash, for a grouped message.
    pub group: Option<u64>,
    /// The BSON payload.
    pub payload: &'a [u8],
}

/// One change as the journal sees it.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A message was stored.
    Produced(Produced<'a>),
    /// A produce was made under a caller's key, answered with `receipts` until `expires`.
    Keyed {
        /// The caller's key.
        key: &'a str,
        /// When the key is forgotten.
        expires: Timestamp,
        /// The produce's receipts.
        receipts: &'a [Receipt],
    },
    /// A stored message changed state.
    Changed(&'a Change),
}

/// How an append ended: one payload handle per [`Event::Produced`], in order, once durable.
pub type Appended<P> = Result<Vec<P>, QueueError>;

/// Payloads of messages an append removes (most settle one).
pub type Gone<P> = SmallVec<[P; 1]>;

/// A step a journal done at once hands back unrun, with how the append ended.
pub type Unrun<T, P> = Option<(T, Appended<P>)>;

/// What runs once an append is durable, or has failed.
pub trait Then<P>: Send + 'static {
    /// Runs the step.
    fn then(self, result: Appended<P>);
}

impl<P, F: FnOnce(Appended<P>) + Send + 'static> Then<P> for F {
    fn then(self, result: Appended<P>) {
        self(result);
    }
}

/// Where the engine's changes go. Payload handles are the journal's: the in-memory journal
/// keeps the bytes, the log keeps where they are on disk.
pub trait Journal: Send + Sync + Sized + 'static {
    /// Where a stored payload is.
    type Payload: Clone + Send + Sync + 'static;

    /// Appends `events` in order; `then` runs once they are durable, on the journal's
    /// thread. A journal done at once returns `then` unrun with the result instead, for the
    /// caller to apply where it stands (it may hold locks `then` would take). `gone` are the
    /// payloads of messages these events remove (acked or purged): their space may be reused
    /// once the events are durable.
    fn append<T: Then<Self::Payload>>(
        &self,
        events: &[Event<'_>],
        gone: Gone<Self::Payload>,
        then: T,
    ) -> Unrun<T, Self::Payload>;

    /// Makes what was appended durable on the calling thread if the journal is idle, rather
    /// than waiting for it to be done elsewhere. Called by a producer after its append, with
    /// no channel locked.
    fn lead(&self) {}

    /// Reads a payload back.
    ///
    /// # Errors
    /// I/O errors, or [`QueueError::Corrupt`] when the payload is gone.
    fn read(&self, payload: &Self::Payload) -> Result<Vec<u8>, QueueError>;

    /// Records the names of the paused channels, replacing what was recorded; durable when
    /// it returns. Called with the engine's pause lock held, so calls do not overlap.
    ///
    /// # Errors
    /// The write's errors; the recorded set is then the old one.
    fn save_paused(&self, _paused: &[String]) -> Result<(), QueueError> {
        Ok(())
    }

    /// Fails once the journal refuses writes.
    ///
    /// # Errors
    /// [`QueueError::Poisoned`] after a failed write.
    fn check(&self) -> Result<(), QueueError> {
        Ok(())
    }

    /// Flushes what was appended and stops. A journal that keeps counters reads them from
    /// `tallies` once the last appends are applied.
    ///
    /// # Errors
    /// What the last writes failed with.
    fn close(&self, _tallies: &dyn Fn() -> Vec<(String, Tally)>) -> Result<(), QueueError> {
        Ok(())
    }
}

/// A step that does nothing: for changes whose durability nobody waits for.
pub fn unwatched<P>(_: Appended<P>) {}
