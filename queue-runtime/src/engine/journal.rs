//! The journal: where the engine reports every state change, in the order the changes
//! happened, and how it learns that they are durable.
//!
//! The engine appends under the channel's lock, so a journal sees the changes of one channel
//! in order. [`Ticket`] completes once an append is durable; what the engine does then (make
//! produced messages visible, hand out deliveries) runs from the completion, not from the
//! caller's future, so a caller that gives up does not leave a change half applied.

use std::sync::Arc;

use parking_lot::Mutex;
use queue_core::clock::Timestamp;
use queue_core::{QueueError, Receipt};

use super::state::Change;

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

/// Where the engine's changes go. Payload handles are the journal's: the in-memory journal
/// keeps the bytes, the log keeps where they are on disk.
pub trait Journal: Send + Sync + Sized + 'static {
    /// Where a stored payload is.
    type Payload: Clone + Send + Sync + 'static;

    /// Appends `events` in order. The ticket completes once they are durable, with one
    /// payload handle per [`Event::Produced`], in order. `gone` are the payloads of messages
    /// these events remove (acked or purged): their space may be reused once the events are
    /// durable.
    fn append(&self, events: &[Event<'_>], gone: Vec<Self::Payload>) -> Ticket<Vec<Self::Payload>>;

    /// Reads a payload back.
    ///
    /// # Errors
    /// I/O errors, or [`QueueError::Corrupt`] when the payload is gone.
    fn read(&self, payload: &Self::Payload) -> Result<Vec<u8>, QueueError>;

    /// Fails once the journal refuses writes.
    ///
    /// # Errors
    /// [`QueueError::Poisoned`] after a failed write.
    fn check(&self) -> Result<(), QueueError> {
        Ok(())
    }

    /// Flushes what was appended and stops.
    ///
    /// # Errors
    /// What the last writes failed with.
    fn close(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

type Then<T> = Box<dyn FnOnce(Result<T, QueueError>) + Send>;

enum Slot<T> {
    Pending,
    Ready(Result<T, QueueError>),
    Then(Then<T>),
    Finished,
}

/// Completes once an append is durable. [`Ticket::then`] runs a step at completion on
/// whichever thread completes it; [`Ticket::wait`] awaits it.
pub struct Ticket<T>(Arc<Mutex<Slot<T>>>);

/// The side that completes a [`Ticket`]. Dropped without completing, it fails the ticket
/// with [`QueueError::Closed`].
pub struct Completer<T>(Option<Arc<Mutex<Slot<T>>>>);

impl<T> std::fmt::Debug for Ticket<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}

impl<T> std::fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completer")
    }
}

impl<T: Send + 'static> Ticket<T> {
    /// A pending ticket and its completer.
    pub fn pending() -> (Ticket<T>, Completer<T>) {
        let slot = Arc::new(Mutex::new(Slot::Pending));
        (Ticket(slot.clone()), Completer(Some(slot)))
    }

    /// A ticket complete already.
    pub fn ready(result: Result<T, QueueError>) -> Ticket<T> {
        Ticket(Arc::new(Mutex::new(Slot::Ready(result))))
    }

    /// Runs `step` with the result: now if it is there, else when it arrives.
    pub fn then(self, step: impl FnOnce(Result<T, QueueError>) + Send + 'static) {
        let mut slot = self.0.lock();
        match std::mem::replace(&mut *slot, Slot::Finished) {
            Slot::Ready(result) => {
                drop(slot);
                step(result);
            }
            Slot::Pending => *slot = Slot::Then(Box::new(step)),
            Slot::Then(_) | Slot::Finished => unreachable!("a ticket has one step"),
        }
    }

    /// Registers `step` to run when the result arrives, unless it is there already: then
    /// `step` is dropped unrun and the result returned, for the caller to apply where it
    /// stands (a step may take locks the caller holds).
    pub fn then_unless_ready(
        self,
        step: impl FnOnce(Result<T, QueueError>) + Send + 'static,
    ) -> Option<Result<T, QueueError>> {
        let mut slot = self.0.lock();
        match std::mem::replace(&mut *slot, Slot::Finished) {
            Slot::Ready(result) => Some(result),
            Slot::Pending => {
                *slot = Slot::Then(Box::new(step));
                None
            }
            Slot::Then(_) | Slot::Finished => unreachable!("a ticket has one step"),
        }
    }

    /// Waits for the result.
    ///
    /// # Errors
    /// What the append failed with.
    ///
    /// # Cancel safety
    /// Dropping the future does not undo the append.
    pub async fn wait(self) -> Result<T, QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.then(move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or(Err(QueueError::Closed))
    }
}

impl<T: Send + 'static> Completer<T> {
    /// Completes the ticket, running its step here if one is waiting.
    pub fn complete(mut self, result: Result<T, QueueError>) {
        if let Some(slot) = self.0.take() {
            finish(&slot, result);
        }
    }
}

fn finish<T>(slot: &Mutex<Slot<T>>, result: Result<T, QueueError>) {
    let mut guard = slot.lock();
    match std::mem::replace(&mut *guard, Slot::Finished) {
        Slot::Then(step) => {
            drop(guard);
            step(result);
        }
        Slot::Pending => *guard = Slot::Ready(result),
        Slot::Ready(_) | Slot::Finished => {}
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            finish(&slot, Err(QueueError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_runs_once_whether_it_comes_before_or_after_the_result() {
        let (ticket, done) = Ticket::<u32>::pending();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        ticket.then(move |r| s.lock().push(r.unwrap()));
        assert!(seen.lock().is_empty());
        done.complete(Ok(7));
        assert_eq!(*seen.lock(), vec![7]);

        let (ticket, done) = Ticket::<u32>::pending();
        done.complete(Ok(8));
        let s = seen.clone();
        ticket.then(move |r| s.lock().push(r.unwrap()));
        assert_eq!(*seen.lock(), vec![7, 8]);
    }

    #[test]
    fn a_dropped_completer_fails_the_ticket() {
        let (ticket, done) = Ticket::<u32>::pending();
        drop(done);
        let failed = Arc::new(Mutex::new(false));
        let f = failed.clone();
        ticket.then(move |r| *f.lock() = matches!(r, Err(QueueError::Closed)));
        assert!(*failed.lock());
    }
}
