//! The lease engine: every queue rule of the contract, implemented once.
//!
//! [`state::ChannelState`] is the synchronous state machine; [`Engine`] holds one per channel
//! behind a lock, hands out ids and fencing tokens, and lets subscribers wait for work: a
//! waiter sleeps until something changes in its channel or until the next lease deadline or
//! due time on the queue's clock, whichever comes first. Adapters that store messages
//! elsewhere (a log on disk) use the engine for the rules and keep only payload locations in
//! it.

pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::{Either, select};
use parking_lot::{Mutex, MutexGuard, RwLock};
use queue_core::clock::{Clock, Timestamp};
use queue_core::{ChannelSpec, ChannelStats, Lease, MessageId, Outcome, QueueError};
use tokio::sync::Notify;

pub use state::{Change, ChannelState, Dead, Entry, Held};

/// Sees state changes and granted leases under the channel's lock.
pub type Journal<'a, P> = dyn Fn(&[Change], Option<&Held<P>>) + Send + Sync + 'a;

/// One channel: its state and the waiters' wake-up.
#[derive(Debug)]
pub struct Cell<P> {
    state: Mutex<ChannelState<P>>,
    notify: Notify,
}

impl<P: Clone> Cell<P> {
    /// Locks the channel's state.
    pub fn lock(&self) -> MutexGuard<'_, ChannelState<P>> {
        self.state.lock()
    }

    /// Wakes every waiter of this channel to look again.
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }
}

/// The channels of one store, with the counters that make ids and tokens unique.
pub struct Engine<P> {
    channels: RwLock<HashMap<String, Arc<Cell<P>>>>,
    next_id: AtomicU64,
    next_token: AtomicU64,
    next_consumer: AtomicU64,
    closed: AtomicBool,
    clock: Arc<dyn Clock>,
}

impl<P> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("channels", &self.channels.read().len())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<P: Clone + Send + 'static> Engine<P> {
    /// An empty engine reading `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Engine {
            channels: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            next_consumer: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            clock,
        }
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// A fresh message id.
    pub fn next_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Makes later ids and tokens at least the ones given (after recovery).
    pub fn bump_counters(&self, next_id: u64, next_token: u64) {
        self.next_id.fetch_max(next_id, Ordering::Relaxed);
        self.next_token.fetch_max(next_token, Ordering::Relaxed);
    }

    fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Fails once the engine is closed.
    ///
    /// # Errors
    /// [`QueueError::Closed`].
    pub fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Acquire) {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }

    /// Closes the engine: waiters end with [`QueueError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for cell in self.channels.read().values() {
            cell.wake();
        }
    }

    /// The channel for `spec`, created on first use; adopts `spec` as its settings.
    pub fn channel(&self, spec: &ChannelSpec) -> Arc<Cell<P>> {
        if let Some(cell) = self.channels.read().get(spec.name.as_ref()) {
            cell.lock().set_spec(spec);
            return cell.clone();
        }
        self.channels
            .write()
            .entry(spec.name.to_string())
            .or_insert_with(|| {
                Arc::new(Cell {
                    state: Mutex::new(ChannelState::new(spec.clone())),
                    notify: Notify::new(),
                })
            })
            .clone()
    }

    /// An existing channel.
    ///
    /// # Errors
    /// [`QueueError::UnknownChannel`].
    pub fn existing(&self, name: &str) -> Result<Arc<Cell<P>>, QueueError> {
        self.channels
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| QueueError::UnknownChannel(name.to_string()))
    }

    /// Every channel, by name.
    pub fn all(&self) -> Vec<Arc<Cell<P>>> {
        let mut all: Vec<(String, Arc<Cell<P>>)> = self
            .channels
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// Registers a subscription and returns its id.
    pub fn subscribe(&self, cell: &Cell<P>, max_parallel: u32) -> u64 {
        let id = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        cell.lock().add_consumer(id, max_parallel);
        id
    }

    /// Ends a subscription, releasing what it holds.
    pub fn unsubscribe(&self, cell: &Cell<P>, consumer: u64) -> Vec<Change> {
        let changes = cell.lock().remove_consumer(consumer);
        cell.wake();
        changes
    }

    /// Takes the next ready message for `consumer` now, if any. `journal` sees what time
    /// changed and the lease granted, under the channel's lock, so that a store records them
    /// in the order they happened. Returns the delivery, whether anything changed, and when
    /// to look again.
    pub fn try_take(
        &self,
        cell: &Cell<P>,
        consumer: u64,
        journal: &Journal<'_, P>,
    ) -> (Option<Held<P>>, bool, Option<Timestamp>) {
        let now = self.now();
        let mut state = cell.lock();
        let changes = state.tick(now);
        let held = if state.has_ready() {
            state.take(consumer, self.next_token(), now)
        } else {
            None
        };
        if !changes.is_empty() || held.is_some() {
            journal(&changes, held.as_ref());
        }
        let wakeup = state.next_wakeup();
        (held, !changes.is_empty(), wakeup)
    }

    /// Waits until a message can be leased to `consumer` and leases it. `journal` sees every
    /// change time caused on the way (lapsed leases), for stores that record them.
    ///
    /// # Errors
    /// [`QueueError::Closed`] when the engine closes.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is taken and returned in the same poll.
    pub async fn take(
        &self,
        cell: &Cell<P>,
        consumer: u64,
        journal: &Journal<'_, P>,
    ) -> Result<Held<P>, QueueError> {
        loop {
            self.check_open()?;
            let notified = cell.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (held, changed, wakeup) = self.try_take(cell, consumer, journal);
            if changed {
                cell.wake();
            }
            if let Some(held) = held {
                return Ok(held);
            }
            match wakeup {
                Some(at) => {
                    let sleep = self.clock.sleep_until(at);
                    match select(notified, sleep).await {
                        Either::Left(_) | Either::Right(_) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Applies time rules to a channel now and returns the changes.
    pub fn tick(&self, cell: &Cell<P>) -> Vec<Change> {
        let now = self.now();
        let changes = cell.lock().tick(now);
        if !changes.is_empty() {
            cell.wake();
        }
        changes
    }

    /// Settles a lease.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`], [`QueueError::UnknownChannel`].
    pub fn settle(
        &self,
        lease: &Lease,
        outcome: Outcome,
    ) -> Result<(Change, Option<P>), QueueError> {
        let cell = self
            .existing(&lease.channel)
            .map_err(|_| QueueError::StaleLease { id: lease.id })?;
        let now = self.now();
        let change = {
            let mut state = cell.lock();
            state.tick(now);
            state.settle(lease.id, lease.token, outcome, now, fastrand::f64())?
        };
        cell.wake();
        Ok(change)
    }

    /// Extends a lease.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`].
    pub fn extend(&self, lease: &Lease, by: Duration) -> Result<Timestamp, QueueError> {
        let cell = self
            .existing(&lease.channel)
            .map_err(|_| QueueError::StaleLease { id: lease.id })?;
        let now = self.now();
        let mut state = cell.lock();
        state.tick(now);
        state.extend(lease.id, lease.token, by, now)
    }

    /// Stats of every channel, after applying time rules.
    pub fn stats(&self) -> Vec<ChannelStats> {
        self.all()
            .iter()
            .map(|cell| {
                self.tick(cell);
                cell.lock().stats()
            })
            .collect()
    }
}
