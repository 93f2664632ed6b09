//! The lease engine: every queue rule of the contract, implemented once, and the one
//! [`Adapter`] implementation of the in-memory and embedded stores.
//!
//! [`state::ChannelState`] is the synchronous state machine; [`Engine`] holds one per channel
//! behind a lock, hands out ids and fencing tokens, and reports every change to its
//! [`Journal`] under that lock, so the journal has the changes in the order they happened. A
//! change that must be durable before anyone sees it (a produced message, a delivery) is
//! applied by the journal's completion, not by the caller's future: a caller that gives up
//! leaves the change either not made or made and visible. The in-memory store is the engine
//! with a journal that keeps payloads in memory; the embedded store's journal is the log.

mod history;
pub mod journal;
pub mod keys;
pub mod state;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use foldhash::HashMap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, select};
use parking_lot::{Mutex, RwLock};
use queue_core::clock::{Clock, Timestamp, millis};
use queue_core::limits;
use queue_core::{
    Adapter, Cancelled, ChannelSpec, ChannelStats, DeadLetter, KeyedProduce, Lease, MessageId,
    MessageState, Outcome, Outgoing, QueueError, RawDelivery, Receipt, StoredMessage, Subscription,
};
use smallvec::SmallVec;
use tokio::sync::Notify;

pub use journal::{Appended, Event, Gone, Journal, Produced, Then, Unrun, unwatched};
pub use keys::KeyWindow;
pub use state::{Change, ChannelState, Dead, Entry, Held, Tally};

/// Produce keys kept at most; beyond it the keys whose window ends first are forgotten.
pub const MAX_PRODUCE_KEYS: usize = 1_000_000;

/// Deliveries taken for one subscription in one journal append at most.
const TAKE_BATCH: u32 = 256;

/// One channel: its state and the waiters' wake-up.
#[derive(Debug)]
pub struct Cell<P> {
    /// The standard library's mutex, which waits on a futex after a short spin: under
    /// parking_lot's, whose waiters yield the CPU while spinning, two runtime threads acking
    /// on one channel spent a fifth of their system calls in `sched_yield`, and 16 embedded
    /// consumers drained about 9% slower.
    state: std::sync::Mutex<ChannelState<P>>,
    notify: Notify,
    /// The inbox of each open subscription, to refill when a settle frees its capacity.
    inboxes: Mutex<HashMap<u64, Weak<Mutex<Inbox<P>>>>>,
    /// Messages cancelled in flight so far. While it is 0, a delivery taken ahead into an
    /// inbox is handed out without checking that its lease still holds.
    cancels: AtomicU64,
}

impl<P: Clone> Cell<P> {
    /// Locks the channel's state.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState<P>> {
        // A panic under the lock leaves the state as parking_lot would: usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes every waiter of this channel to look again.
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }
}

/// The channels of one store, its journal, and the counters that make ids and tokens unique.
pub struct Engine<J: Journal> {
    channels: RwLock<HashMap<String, Arc<Cell<J::Payload>>>>,
    next_id: AtomicU64,
    next_token: AtomicU64,
    next_consumer: AtomicU64,
    closed: AtomicBool,
    clock: Arc<dyn Clock>,
    /// Keys of idempotent produces within their window, with the receipts they were given.
    keys: Mutex<KeyWindow<Arc<str>, Vec<Receipt>>>,
    /// Held while the paused channels are changed and recorded.
    pausing: Mutex<()>,
    /// When the counters started counting: when the engine started, or earlier when its
    /// journal kept counts from before.
    counted_since: AtomicU64,
    /// Delivery histories, kept once a dashboard asks.
    histories: history::Histories,
    journal: J,
    me: Weak<Engine<J>>,
}

impl<J: Journal> std::fmt::Debug for Engine<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("channels", &self.channels.read().len())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn due_at(now: Timestamp, delay: Duration) -> Timestamp {
    now.saturating_add(millis(delay))
}

impl<J: Journal> Engine<J> {
    /// An empty engine reading `clock` and reporting to `journal`. Message ids start at
    /// `next_id` and fencing tokens at `first_token`.
    pub fn new(clock: Arc<dyn Clock>, journal: J, next_id: u64, first_token: u64) -> Arc<Self> {
        let counted_since = AtomicU64::new(clock.now());
        Arc::new_cyclic(|me| Engine {
            channels: RwLock::new(HashMap::default()),
            next_id: AtomicU64::new(next_id.max(1)),
            next_token: AtomicU64::new(first_token.max(1)),
            next_consumer: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            clock,
            keys: Mutex::new(KeyWindow::new(MAX_PRODUCE_KEYS)),
            pausing: Mutex::new(()),
            counted_since,
            histories: history::Histories::default(),
            journal,
            me: me.clone(),
        })
    }

    /// The journal.
    pub fn journal(&self) -> &J {
        &self.journal
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn next_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::AcqRel))
    }

    fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    fn arc(&self) -> Arc<Self> {
        self.me
            .upgrade()
            .expect("an engine is used through its Arc")
    }

    /// Fails once the engine is closed or its journal refuses writes.
    ///
    /// # Errors
    /// [`QueueError::Closed`], [`QueueError::Poisoned`].
    pub fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        self.journal.check()
    }

    /// The channel for `spec`, created on first use; adopts `spec` as its settings.
    pub fn channel(&self, spec: &ChannelSpec) -> Arc<Cell<J::Payload>> {
        if let Some(cell) = self.channels.read().get(spec.name.as_ref()) {
            cell.lock().set_spec(spec);
            return cell.clone();
        }
        self.channels
            .write()
            .entry(spec.name.to_string())
            .or_insert_with(|| {
                Arc::new(Cell {
                    state: std::sync::Mutex::new(ChannelState::new(spec.clone())),
                    notify: Notify::new(),
                    inboxes: Mutex::new(HashMap::default()),
                    cancels: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// The channel named `name`, created with default settings if unknown.
    pub fn channel_named(&self, name: &str) -> Arc<Cell<J::Payload>> {
        if let Some(cell) = self.channels.read().get(name) {
            return cell.clone();
        }
        self.channel(&ChannelSpec {
            name: std::borrow::Cow::Owned(name.to_string()),
            ..ChannelSpec::new("")
        })
    }

    /// The channel named `name`, if known.
    pub fn existing_cell(&self, name: &str) -> Option<Arc<Cell<J::Payload>>> {
        self.channels.read().get(name).cloned()
    }

    /// Every channel, by name.
    pub fn all(&self) -> Vec<Arc<Cell<J::Payload>>> {
        let mut all: Vec<(String, Arc<Cell<J::Payload>>)> = self
            .channels
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// Remembers a produce key after recovery.
    pub fn restore_key(&self, key: String, receipts: Vec<Receipt>, expires: Timestamp) {
        self.keys
            .lock()
            .insert(key.into(), receipts, expires, self.now());
    }

    /// The receipts and window end of a produce key inside its window.
    pub fn produce_key(&self, key: &str) -> Option<(Vec<Receipt>, Timestamp)> {
        self.keys
            .lock()
            .entry(key, self.now())
            .map(|(r, end)| (r.clone(), end))
    }

    /// Applies time rules to a channel now and journals what they changed.
    pub fn tick(&self, cell: &Cell<J::Payload>) {
        let now = self.now();
        let mut state = cell.lock();
        let mut changes = Vec::new();
        state.tick(now, &mut changes);
        if !changes.is_empty() {
            self.record(&changes, Gone::new());
            drop(state);
            cell.wake();
        }
    }

    /// Journals `changes`; `then` runs once they are durable, or comes back unrun with the
    /// result (see [`Journal::append`]).
    fn append_changes<T: Then<J::Payload>>(
        &self,
        changes: &[Change],
        gone: Gone<J::Payload>,
        then: T,
    ) -> Unrun<T, J::Payload> {
        self.histories.with(|h| h.changed(changes, self.now()));
        let events: SmallVec<[Event<'_>; 4]> = changes.iter().map(Event::Changed).collect();
        self.journal.append(&events, gone, then)
    }

    /// Journals `changes` that nobody waits for.
    fn record(&self, changes: &[Change], gone: Gone<J::Payload>) {
        self.append_changes(changes, gone, unwatched);
    }

    /// Stores a batch, with an optional caller's key (see [`KeyedProduce`]).
    ///
    /// # Errors
    /// [`QueueError::Closed`], the journal's write errors.
    ///
    /// # Cancel safety
    /// Once polled, the batch is stored and becomes deliverable whether or not the future is
    /// polled again; dropped before its first poll, nothing is stored.
    async fn put(
        &self,
        spec: &ChannelSpec,
        batch: Vec<Outgoing>,
        key: Option<(&str, Duration)>,
    ) -> Result<Vec<Receipt>, QueueError> {
        self.check_open()?;
        spec.check()?;
        limits::check_batch(&batch)?;
        if let Some((key, _)) = key {
            limits::check_produce_key(key)?;
        }
        let cell = self.channel(spec);
        let now = self.now();
        if let Some((key, _)) = key
            && let Some(receipts) = self.keys.lock().get(key, now)
        {
            return Ok(receipts.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut state = cell.lock();
            let mut changes = Vec::new();
            state.tick(now, &mut changes);
            let mut receipts = Vec::with_capacity(batch.len());
            let mut fresh: SmallVec<[Fresh; 2]> = SmallVec::with_capacity(batch.len());
            let expires = due_at(now, spec.dedup_window);
            for (i, out) in batch.iter().enumerate() {
                let dedup = out.dedup_key.filter(|_| spec.deduplicates());
                if let Some(k) = dedup
                    && let Some(original) = state.duplicate_of(k, now)
                {
                    state.count_duplicate();
                    receipts.push(Receipt {
                        id: original,
                        duplicate: true,
                    });
                    continue;
                }
                let id = self.next_id();
                if let Some(k) = dedup {
                    state.remember(k, id, expires, now);
                }
                receipts.push(Receipt {
                    id,
                    duplicate: false,
                });
                fresh.push(Fresh {
                    index: i,
                    id,
                    due: due_at(now, out.delay),
                    priority: out.priority,
                    dedup,
                    group: out.group.and_then(std::num::NonZeroU64::new),
                });
            }
            let keyed = key.map(|(k, window)| (k, due_at(now, window)));
            // The key's record lists the receipts, which the step keeps too.
            let keyed_receipts = keyed.map(|_| receipts.clone());
            self.histories.with(|h| h.changed(&changes, now));
            let handed = self.lease_on_arrival(&mut state, &cell, &fresh, now);
            state.arriving(fresh.len() - handed.len());
            let leases: SmallVec<[Change; 1]> = handed
                .iter()
                .map(|h| Change::Leased {
                    id: fresh[h.index].id,
                    attempts: 1,
                })
                .collect();
            let mut events: SmallVec<[Event<'_>; 4]> = changes.iter().map(Event::Changed).collect();
            for f in &fresh {
                let out = &batch[f.index];
                events.push(Event::Produced(Produced {
                    channel: &spec.name,
                    id: f.id.0,
                    produced_at: now,
                    due: f.due,
                    priority: out.priority,
                    dedup: f.dedup.map(|k| (k, expires)),
                    group: f.group.map(std::num::NonZeroU64::get),
                    payload: &out.payload,
                }));
            }
            // After the messages they lease, so that a replay meets the message first.
            events.extend(leases.iter().map(Event::Changed));
            if let (Some((k, expires)), Some(receipts)) = (keyed, &keyed_receipts) {
                events.push(Event::Keyed {
                    key: k,
                    expires,
                    receipts,
                });
            }
            let done = ProduceDone {
                engine: self.me.clone(),
                cell: cell.clone(),
                fresh,
                handed,
                produced_at: now,
                receipts,
                keyed: keyed.map(|(k, expires)| (k.to_string(), expires)),
                reply: tx,
            };
            // Duplicates wait for a commit too: it follows their original's.
            let came_back = self.journal.append(&events, Gone::new(), done);
            drop(events);
            if let Some((done, result)) = came_back {
                done.finish(&mut state, result);
            }
        }
        self.journal.lead();
        rx.await.unwrap_or(Err(QueueError::Closed))
    }

    /// Leases messages being produced to subscriptions that take ahead and have room, so
    /// that each delivery is journaled in its produce's commit rather than in a second one.
    /// Only a leading run of `fresh` is leased, each to the subscription with the most room,
    /// and only when nothing ready, still arriving or of higher priority later in the batch
    /// would be overtaken; the rest joins the channel when durable, as always.
    fn lease_on_arrival(
        &self,
        state: &mut ChannelState<J::Payload>,
        cell: &Cell<J::Payload>,
        fresh: &[Fresh],
        now: Timestamp,
    ) -> SmallVec<[HandOff<J::Payload>; 1]> {
        let mut handed = SmallVec::new();
        // A later message of higher priority would leave first were both ready.
        let by_priority = fresh.windows(2).all(|w| w[0].priority >= w[1].priority);
        if state.consumer_count() == 0 || !state.leases_on_arrival() || !by_priority {
            return handed;
        }
        let mut open: SmallVec<[Open<J::Payload>; 4]> = cell
            .inboxes
            .lock()
            .iter()
            .filter_map(|(&consumer, inbox)| {
                let inbox = inbox.upgrade()?;
                let takes = {
                    let i = inbox.lock();
                    i.takes_ahead() && i.failed.is_none()
                };
                let room = state.capacity(consumer);
                (takes && room > 0).then_some((consumer, inbox, room))
            })
            .collect();
        for (index, f) in fresh.iter().enumerate() {
            if f.due > now || f.group.is_some() {
                break;
            }
            let Some((consumer, inbox, room)) = open
                .iter_mut()
                .filter(|(_, _, room)| *room > 0)
                .max_by_key(|(_, _, room)| *room)
            else {
                break;
            };
            if !state.reserve(*consumer) {
                break;
            }
            *room -= 1;
            inbox.lock().committing += 1;
            let token = self.next_token();
            self.histories
                .with(|h| h.delivered(f.id, 1, token, *consumer, now));
            handed.push(HandOff {
                index,
                consumer: *consumer,
                token,
                deadline: now.saturating_add(millis(state.spec().lease)),
                inbox: inbox.clone(),
            });
        }
        handed
    }

    /// Opens a subscription holding at most `max_parallel` deliveries.
    ///
    /// # Errors
    /// [`QueueError::Closed`].
    fn open_subscription(
        &self,
        spec: &ChannelSpec,
        max_parallel: u32,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        self.check_open()?;
        spec.check()?;
        let cell = self.channel(spec);
        let consumer = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        cell.lock().add_consumer(consumer, max_parallel);
        let inbox = Arc::new(Mutex::new(Inbox {
            ready: VecDeque::new(),
            committing: 0,
            failed: None,
            stopped: false,
            ahead: false,
        }));
        cell.inboxes.lock().insert(consumer, Arc::downgrade(&inbox));
        Ok(Box::new(EngineSubscription {
            engine: self.arc(),
            cell,
            channel: Arc::from(spec.name.as_ref()),
            consumer,
            inbox,
        }))
    }

    /// Takes what `consumer` may take now, journals the deliveries, and puts them in `inbox`
    /// once durable. Returns whether anything was taken and when to look again.
    fn take_into(
        &self,
        cell: &Arc<Cell<J::Payload>>,
        consumer: u64,
        inbox: &Arc<Mutex<Inbox<J::Payload>>>,
    ) -> (bool, Option<Timestamp>) {
        let mut state = cell.lock();
        let (took, requeued) = self.take_locked(&mut state, cell, consumer, inbox);
        let wakeup = state.next_wakeup();
        drop(state);
        if requeued {
            cell.wake();
        }
        (took, wakeup)
    }

    /// Takes what `consumer` may take now (at most its fair share of what is ready, so that
    /// one subscription taking ahead does not hold back messages another could handle now),
    /// recording the deliveries in `changes`.
    fn take_some(
        &self,
        state: &mut ChannelState<J::Payload>,
        consumer: u64,
        now: Timestamp,
        changes: &mut Vec<Change>,
    ) -> Taking<J::Payload> {
        let room = (state.capacity(consumer).min(TAKE_BATCH) as usize)
            .min(state.ready_len().div_ceil(state.consumer_count().max(1)));
        let mut taken = Taking::with_capacity(room);
        changes.reserve(room);
        while taken.len() < room && state.has_ready() {
            match state.take(consumer, self.next_token(), now, changes) {
                Some(held) => taken.push(held),
                None => break,
            }
        }
        self.histories.with(|h| {
            for held in &taken {
                h.delivered(
                    held.entry.id,
                    held.entry.attempts,
                    held.token,
                    consumer,
                    now,
                );
            }
        });
        taken
    }

    /// [`Engine::take_into`] under the channel's lock. Returns whether anything was taken and
    /// whether time requeued anything.
    fn take_locked(
        &self,
        state: &mut ChannelState<J::Payload>,
        cell: &Arc<Cell<J::Payload>>,
        consumer: u64,
        inbox: &Arc<Mutex<Inbox<J::Payload>>>,
    ) -> (bool, bool) {
        let now = self.now();
        let mut changes = Vec::new();
        state.tick(now, &mut changes);
        let taken = self.take_some(state, consumer, now, &mut changes);
        if changes.is_empty() {
            return (false, false);
        }
        let requeued = changes.iter().any(|c| matches!(c, Change::Requeued { .. }));
        if taken.is_empty() {
            self.record(&changes, Gone::new());
            return (false, requeued);
        }
        inbox.lock().committing += taken.len();
        let done = Taken {
            engine: self.me.clone(),
            cell: cell.clone(),
            inbox: inbox.clone(),
            taken,
        };
        if let Some((done, result)) = self.append_changes(&changes, Gone::new(), done) {
            let back = deliver(inbox, done.taken, result.map(|_| ()));
            self.release(state, &back);
            cell.wake();
        }
        (true, requeued)
    }

    /// Gives deliveries back unprocessed, without waiting for the journal.
    fn release(&self, state: &mut ChannelState<J::Payload>, taken: &[Held<J::Payload>]) {
        let now = self.now();
        let changes: Vec<Change> = taken
            .iter()
            .filter_map(|held| {
                state
                    .settle(
                        held.entry.id,
                        held.token,
                        Outcome::Release,
                        now,
                        fastrand::f64(),
                    )
                    .ok()
                    .map(|(change, _)| change)
            })
            .collect();
        if !changes.is_empty() {
            self.record(&changes, Gone::new());
        }
    }

    /// Ends a subscription: what it holds is ready again, or dead when its attempts are used.
    fn unsubscribe(&self, cell: &Cell<J::Payload>, consumer: u64) {
        cell.inboxes.lock().remove(&consumer);
        let now = self.now();
        let mut state = cell.lock();
        let changes = state.remove_consumer(consumer, now);
        if !changes.is_empty() {
            self.record(&changes, Gone::new());
        }
        drop(state);
        cell.wake();
    }

    /// Settles a lease.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`]; the journal's write errors.
    ///
    /// # Cancel safety
    /// The outcome is applied when the call is made and becomes durable whether or not the
    /// future is polled again.
    async fn settle_lease(&self, lease: &Lease, outcome: Outcome) -> Result<(), QueueError> {
        self.check_open()?;
        let cell = self
            .existing_cell(&lease.channel)
            .ok_or(QueueError::StaleLease { id: lease.id })?;
        let (mut applied, durable) = self.settle_on(&cell, [(lease, outcome)]);
        applied.pop().unwrap_or(Err(QueueError::Closed))?;
        match durable {
            Some(rx) => rx.await.unwrap_or(Err(QueueError::Closed)),
            None => Ok(()),
        }
    }

    /// Settles several leases, each on its own: the settles of one channel under one lock,
    /// in one journal append.
    ///
    /// # Cancel safety
    /// As [`Engine::settle_lease`], for each.
    async fn settle_batch(&self, settles: Vec<(Lease, Outcome)>) -> Vec<Result<(), QueueError>> {
        if let Err(e) = self.check_open() {
            return settles.iter().map(|_| Err(copy_error(&e))).collect();
        }
        let (leases, outcomes): (Vec<Lease>, Vec<Outcome>) = settles.into_iter().unzip();
        let mut outcomes: Vec<Option<Outcome>> = outcomes.into_iter().map(Some).collect();
        let mut results: Vec<Result<(), QueueError>> = leases.iter().map(|_| Ok(())).collect();
        let groups = by_channel(leases.iter());
        let mut waits = Vec::new();
        for (channel, members) in &groups {
            let Some(cell) = self.existing_cell(channel) else {
                for &i in members {
                    results[i] = Err(QueueError::StaleLease { id: leases[i].id });
                }
                continue;
            };
            let items = members
                .iter()
                .map(|&i| (&leases[i], outcomes[i].take().expect("each settle once")));
            let (applied, durable) = self.settle_on(&cell, items);
            for (&i, r) in members.iter().zip(applied) {
                results[i] = r;
            }
            if let Some(rx) = durable {
                waits.push((members, rx));
            }
        }
        for (members, rx) in waits {
            if let Err(e) = rx.await.unwrap_or(Err(QueueError::Closed)) {
                for &i in members {
                    if results[i].is_ok() {
                        results[i] = Err(copy_error(&e));
                    }
                }
            }
        }
        results
    }

    /// Settles leases of one channel under its lock, in one journal append. Returns each
    /// settle's result as applied (a stale lease fails here) and, when anything was
    /// settled, what completes once the append is durable.
    fn settle_on<'l>(
        &self,
        cell: &Arc<Cell<J::Payload>>,
        settles: impl IntoIterator<Item = (&'l Lease, Outcome)>,
    ) -> (SmallVec<[Result<(), QueueError>; 1]>, Option<Durable>) {
        let now = self.now();
        let mut applied = SmallVec::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (came_back, full) = {
            let mut state = cell.lock();
            let mut changes = Vec::new();
            state.tick(now, &mut changes);
            let mut settled: SmallVec<[Change; 1]> = SmallVec::new();
            let mut gone = Gone::new();
            // The subscriptions whose slots were freed. A release gives a message back: its
            // subscription is not refilled for it.
            let mut holders: SmallVec<[u64; 1]> = SmallVec::new();
            for (lease, outcome) in settles {
                let outcome = limits::limit_outcome(outcome);
                let holder = state
                    .holder_of(lease.id)
                    .filter(|_| outcome != Outcome::Release);
                let noted = self.histories.on().then(|| outcome.clone());
                match state.settle(lease.id, lease.token, outcome, now, fastrand::f64()) {
                    Ok((change, freed)) => {
                        if let Some(outcome) = noted {
                            self.histories.with(|h| {
                                h.settled(&lease.channel, lease.id, lease.token, &outcome, now)
                            });
                        }
                        settled.push(change);
                        gone.extend(freed);
                        if let Some(h) = holder
                            && !holders.contains(&h)
                        {
                            holders.push(h);
                        }
                        applied.push(Ok(()));
                    }
                    Err(e) => applied.push(Err(e)),
                }
            }
            if settled.is_empty() {
                if !changes.is_empty() {
                    self.record(&changes, Gone::new());
                }
                return (applied, None);
            }
            // A subscription that takes ahead is refilled for the slots this frees, in the
            // same journal append: its deliveries are in its inbox by the time the settles
            // are confirmed.
            let mut refilled = SmallVec::new();
            for consumer in holders {
                let Some(inbox) = cell.inboxes.lock().get(&consumer).and_then(Weak::upgrade) else {
                    continue;
                };
                if !inbox.lock().takes_ahead() {
                    continue;
                }
                let taken = self.take_some(&mut state, consumer, now, &mut changes);
                if !taken.is_empty() {
                    inbox.lock().committing += taken.len();
                    refilled.push(Taken {
                        engine: self.me.clone(),
                        cell: cell.clone(),
                        inbox,
                        taken,
                    });
                }
            }
            changes.extend(settled);
            let settled = Settled {
                refilled,
                reply: tx,
            };
            let full = state.at_concurrency_limit();
            (self.append_changes(&changes, gone, settled), full)
        };
        // At its concurrency limit (the freed slots refilled), no waiter could take anything.
        if !full {
            cell.wake();
        }
        // Done at once: applied here, with the channel's lock released.
        if let Some((settled, result)) = came_back {
            settled.then(result);
        }
        (applied, Some(rx))
    }

    /// Extends a lease.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`].
    fn extend_lease(&self, lease: &Lease, by: Duration) -> Result<Timestamp, QueueError> {
        self.check_open()?;
        let cell = self
            .existing_cell(&lease.channel)
            .ok_or(QueueError::StaleLease { id: lease.id })?;
        let now = self.now();
        let mut state = cell.lock();
        let mut changes = Vec::new();
        state.tick(now, &mut changes);
        if !changes.is_empty() {
            self.record(&changes, Gone::new());
        }
        state.extend(lease.id, lease.token, by, now)
    }

    /// Stats of every channel, after applying time rules.
    fn channel_stats(&self) -> Vec<ChannelStats> {
        self.all()
            .iter()
            .map(|cell| {
                self.tick(cell);
                ChannelStats {
                    counted_since: self.counted_since.load(Ordering::Relaxed),
                    ..cell.lock().stats()
                }
            })
            .collect()
    }

    /// Pending messages of a channel in delivery order.
    ///
    /// # Errors
    /// [`QueueError::UnknownChannel`]; read errors.
    fn pending(&self, channel: &str, limit: usize) -> Result<Vec<StoredMessage>, QueueError> {
        let cell = self
            .existing_cell(channel)
            .ok_or_else(|| QueueError::UnknownChannel(channel.to_string()))?;
        self.tick(&cell);
        let listed: Vec<(Entry<J::Payload>, MessageState, Timestamp)> = cell
            .lock()
            .peek(limit, self.now())
            .into_iter()
            .map(|(e, s, d)| (e.clone(), s, d))
            .collect();
        listed
            .into_iter()
            .map(|(e, state, due)| {
                Ok(StoredMessage {
                    id: e.id,
                    payload: self.journal.read(&e.payload)?,
                    state,
                    attempts: e.attempts,
                    priority: e.priority,
                    produced_at: e.produced_at,
                    due,
                })
            })
            .collect()
    }

    /// The dead-letter queue of a channel, oldest first; empty for a channel never seen.
    ///
    /// # Errors
    /// Read errors.
    fn dead_list(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let Some(cell) = self.existing_cell(channel) else {
            return Ok(Vec::new());
        };
        self.tick(&cell);
        let listed: Vec<(Entry<J::Payload>, String, Timestamp)> = cell
            .lock()
            .dead_letters(limit)
            .map(|d| (d.entry.clone(), d.error.clone(), d.dead_at))
            .collect();
        listed
            .into_iter()
            .map(|(e, error, dead_at)| {
                Ok(DeadLetter {
                    id: e.id,
                    channel: channel.to_string(),
                    payload: self.journal.read(&e.payload)?,
                    attempts: e.attempts,
                    error,
                    produced_at: e.produced_at,
                    dead_at,
                })
            })
            .collect()
    }

    /// Moves dead letters back to ready; 0 for a channel never seen.
    ///
    /// # Errors
    /// The journal's write errors.
    ///
    /// # Cancel safety
    /// Applied when the call is made; durable whether or not the future is polled again.
    async fn redrive_dead(
        &self,
        channel: &str,
        ids: Option<&[MessageId]>,
    ) -> Result<u64, QueueError> {
        self.change_stored(channel, |state| {
            (state.redrive(ids, self.now()), Gone::new())
        })
        .await
    }

    /// Deletes dead letters; 0 for a channel never seen.
    ///
    /// # Errors
    /// The journal's write errors.
    ///
    /// # Cancel safety
    /// Applied when the call is made; durable whether or not the future is polled again.
    async fn purge_dead_now(
        &self,
        channel: &str,
        ids: Option<&[MessageId]>,
    ) -> Result<u64, QueueError> {
        self.change_stored(channel, |state| {
            let (changes, gone) = state.purge_dead(ids);
            (changes, Gone::from_vec(gone))
        })
        .await
    }

    /// Cancels a pending or in-flight message and waits until the deletion is durable.
    ///
    /// # Errors
    /// [`QueueError::UnknownMessage`], also for a channel never seen; the journal's write
    /// errors.
    ///
    /// # Cancel safety
    /// Applied when the call is made; durable whether or not the future is polled again.
    async fn cancel_now(&self, channel: &str, id: MessageId) -> Result<Cancelled, QueueError> {
        self.check_open()?;
        let unknown = || QueueError::UnknownMessage {
            channel: channel.to_string(),
            id,
        };
        let cell = self.existing_cell(channel).ok_or_else(unknown)?;
        self.tick(&cell);
        let mut was = Err(unknown());
        self.change_stored(channel, |state| match state.cancel(id, self.now()) {
            Ok((change, payload, where_)) => {
                if where_ == Cancelled::InFlight {
                    cell.cancels.fetch_add(1, Ordering::AcqRel);
                }
                was = Ok(where_);
                (vec![change], Gone::from_vec(vec![payload]))
            }
            Err(e) => {
                was = Err(e);
                (Vec::new(), Gone::new())
            }
        })
        .await?;
        was
    }

    /// Pauses or resumes a channel and records the paused set in the journal. A recording
    /// that fails leaves the channel as it was.
    ///
    /// # Errors
    /// [`QueueError::InvalidRequest`] for a channel never seen; the journal's write errors.
    pub fn set_paused_now(&self, channel: &str, paused: bool) -> Result<(), QueueError> {
        self.check_open()?;
        let Some(cell) = self.existing_cell(channel) else {
            return Err(QueueError::InvalidRequest(format!(
                "no channel `{channel}` in this store"
            )));
        };
        let _pausing = self.pausing.lock();
        if cell.lock().paused() == paused {
            return Ok(());
        }
        let mut names: Vec<String> = self
            .all()
            .iter()
            .filter(|c| !Arc::ptr_eq(c, &cell))
            .filter_map(|c| {
                let state = c.lock();
                state.paused().then(|| state.spec().name.to_string())
            })
            .collect();
        if paused {
            names.push(channel.to_string());
            names.sort();
        }
        self.journal.save_paused(&names)?;
        cell.lock().set_paused(paused);
        cell.wake();
        Ok(())
    }

    /// Marks a channel paused as recovered from the journal.
    pub fn restore_paused(&self, channel: &str) {
        self.channel_named(channel).lock().set_paused(true);
    }

    /// Deletes the pending messages of a channel; 0 for a channel never seen.
    ///
    /// # Errors
    /// The journal's write errors.
    ///
    /// # Cancel safety
    /// Applied when the call is made; durable whether or not the future is polled again.
    async fn purge_now(&self, channel: &str) -> Result<u64, QueueError> {
        self.change_stored(channel, |state| {
            let (changes, gone) = state.purge_pending();
            (changes, Gone::from_vec(gone))
        })
        .await
    }

    /// Applies `change` to a channel's stored messages under its lock, journals what changed
    /// and waits until it is durable; returns how many messages changed, 0 for a channel
    /// never seen.
    async fn change_stored(
        &self,
        channel: &str,
        change: impl FnOnce(&mut ChannelState<J::Payload>) -> (Vec<Change>, Gone<J::Payload>),
    ) -> Result<u64, QueueError> {
        self.check_open()?;
        let Some(cell) = self.existing_cell(channel) else {
            return Ok(0);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (came_back, n) = {
            let mut state = cell.lock();
            let (changes, gone) = change(&mut state);
            let reply = move |r: Appended<J::Payload>| {
                let _ = tx.send(r);
            };
            (self.append_changes(&changes, gone, reply), changes.len())
        };
        cell.wake();
        match came_back {
            Some((_, result)) => result?,
            None => rx.await.unwrap_or(Err(QueueError::Closed))?,
        };
        Ok(n as u64)
    }

    /// Closes the engine: waiters end with [`QueueError::Closed`], and the journal flushes.
    ///
    /// # Errors
    /// What the journal's last writes failed with.
    fn shut_down(&self) -> Result<(), QueueError> {
        self.closed.store(true, Ordering::Release);
        for cell in self.channels.read().values() {
            cell.wake();
        }
        self.journal.close(&|| self.tallies())
    }

    /// The spec each channel is kept by: the one its producers and consumers declared last.
    pub fn channel_specs(&self) -> Vec<ChannelSpec> {
        self.all().iter().map(|c| c.lock().spec().clone()).collect()
    }

    /// Each channel's counters, by name.
    pub fn tallies(&self) -> Vec<(String, Tally)> {
        self.channels
            .read()
            .iter()
            .map(|(name, cell)| (name.to_string(), cell.lock().tally()))
            .collect()
    }

    /// Adds counts kept from before this run, counted since `since`.
    pub fn restore_tallies(&self, since: Timestamp, kept: &[(String, Tally)]) {
        self.counted_since.store(since, Ordering::Relaxed);
        for (name, tally) in kept {
            self.channel_named(name).lock().restore_tally(tally);
        }
    }
}

/// Deliveries taken in one go (a settle usually frees one slot).
type Taking<P> = SmallVec<[Held<P>; 1]>;

/// Deliveries taken for a subscription, waiting for their journal append.
struct Taken<J: Journal> {
    /// Weak: a completion must not keep a store open that its owner has dropped.
    engine: Weak<Engine<J>>,
    cell: Arc<Cell<J::Payload>>,
    inbox: Arc<Mutex<Inbox<J::Payload>>>,
    taken: Taking<J::Payload>,
}

impl<J: Journal> Taken<J> {
    /// Delivers what was taken once the append is durable; gives it back if it failed or the
    /// subscription stopped meanwhile.
    fn land(self, result: Result<(), QueueError>) {
        let back = deliver(&self.inbox, self.taken, result);
        if !back.is_empty()
            && let Some(engine) = self.engine.upgrade()
        {
            engine.release(&mut self.cell.lock(), &back);
        }
        self.cell.wake();
    }
}

impl<J: Journal> Then<J::Payload> for Taken<J> {
    fn then(self, result: Appended<J::Payload>) {
        self.land(result.map(|_| ()));
    }
}

/// Completes once a journal append is durable.
type Durable = tokio::sync::oneshot::Receiver<Result<(), QueueError>>;

/// A settle waiting for its journal append, with the deliveries that refill its subscription.
struct Settled<J: Journal> {
    refilled: SmallVec<[Taken<J>; 1]>,
    reply: tokio::sync::oneshot::Sender<Result<(), QueueError>>,
}

impl<J: Journal> Then<J::Payload> for Settled<J> {
    fn then(self, result: Appended<J::Payload>) {
        for refilled in self.refilled {
            refilled.land(result.as_ref().map(|_| ()).map_err(copy_error));
        }
        let _ = self.reply.send(result.map(|_| ()));
    }
}

/// Puts deliveries whose journal append is durable into their subscription's inbox; returns
/// those to give back instead: all of them if the subscription stopped taking meanwhile or
/// the append failed (not recorded, so not handed out).
fn deliver<P>(
    inbox: &Mutex<Inbox<P>>,
    taken: Taking<P>,
    result: Result<(), QueueError>,
) -> Taking<P> {
    let mut inbox = inbox.lock();
    inbox.committing -= taken.len();
    match result {
        Ok(()) if inbox.stopped => taken,
        Ok(()) => {
            inbox.ready.extend(taken);
            Taking::new()
        }
        Err(e) => {
            inbox.failed = Some(e);
            taken
        }
    }
}

/// The indices of `leases` by channel, channels in order of first appearance: a batch of
/// settles is applied one channel at a time.
pub(crate) fn by_channel<'a>(
    leases: impl Iterator<Item = &'a Lease>,
) -> Vec<(&'a str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, lease) in leases.enumerate() {
        match groups.iter_mut().find(|(c, _)| *c == &*lease.channel) {
            Some((_, members)) => members.push(i),
            None => groups.push((&lease.channel, vec![i])),
        }
    }
    groups
}

/// The same failure again, for a second party to report.
pub(crate) fn copy_error(e: &QueueError) -> QueueError {
    match e {
        QueueError::Io(io) => QueueError::Io(std::io::Error::new(io.kind(), io.to_string())),
        QueueError::Poisoned(reason) => QueueError::Poisoned(reason.clone()),
        QueueError::Closed => QueueError::Closed,
        other => QueueError::Poisoned(other.to_string()),
    }
}

/// A produced message waiting for durability.
#[derive(Debug, Clone, Copy)]
struct Fresh {
    index: usize,
    id: MessageId,
    due: Timestamp,
    priority: u8,
    dedup: Option<u64>,
    group: Option<std::num::NonZeroU64>,
}

/// A subscription that takes ahead, its inbox, and its free slots.
type Open<P> = (u64, Arc<Mutex<Inbox<P>>>, u32);

/// A message leased in its produce's commit (`fresh[index]`).
struct HandOff<P> {
    index: usize,
    consumer: u64,
    token: u64,
    deadline: Timestamp,
    inbox: Arc<Mutex<Inbox<P>>>,
}

/// What a produce does once its journal append is durable (or failed).
struct ProduceDone<J: Journal> {
    /// Weak: a completion must not keep a store open that its owner has dropped.
    engine: Weak<Engine<J>>,
    cell: Arc<Cell<J::Payload>>,
    fresh: SmallVec<[Fresh; 2]>,
    /// The leading messages of `fresh` leased on arrival.
    handed: SmallVec<[HandOff<J::Payload>; 1]>,
    produced_at: Timestamp,
    receipts: Vec<Receipt>,
    keyed: Option<(String, Timestamp)>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Receipt>, QueueError>>,
}

impl<J: Journal> ProduceDone<J> {
    fn finish(self, state: &mut ChannelState<J::Payload>, result: Appended<J::Payload>) {
        state.arrived(self.fresh.len() - self.handed.len());
        match result {
            Ok(payloads) => {
                let Some(engine) = self.engine.upgrade() else {
                    // Stored, but the store was closed meanwhile: a reopen delivers it.
                    let _ = self.reply.send(Err(QueueError::Closed));
                    return;
                };
                // Readiness against the clock now; produce and due times as journaled.
                let now = engine.now();
                let mut handed = self.handed.into_iter().peekable();
                for (index, (f, payload)) in self.fresh.into_iter().zip(payloads).enumerate() {
                    let mut entry = Entry {
                        id: f.id,
                        payload,
                        attempts: 0,
                        priority: f.priority,
                        produced_at: self.produced_at,
                        group: None,
                    };
                    let Some(h) = handed.next_if(|h| h.index == index) else {
                        state.insert(entry, f.group, f.due, now);
                        continue;
                    };
                    entry.attempts = 1;
                    let held = Held {
                        entry,
                        token: h.token,
                        deadline: h.deadline,
                        consumer: h.consumer,
                    };
                    state.insert_leased(held.clone());
                    // Given back at once if the subscription stopped meanwhile.
                    let back = deliver(&h.inbox, smallvec::smallvec![held], Ok(()));
                    engine.release(state, &back);
                }
                self.cell.wake();
                if let Some((key, expires)) = self.keyed {
                    engine
                        .keys
                        .lock()
                        .insert(key.into(), self.receipts.clone(), expires, now);
                }
                let _ = self.reply.send(Ok(self.receipts));
            }
            Err(e) => {
                for f in &self.fresh {
                    if let Some(key) = f.dedup {
                        state.forget(key, f.id);
                    }
                }
                for h in self.handed {
                    state.unreserve(h.consumer);
                    h.inbox.lock().committing -= 1;
                }
                self.cell.wake();
                let _ = self.reply.send(Err(e));
            }
        }
    }
}

impl<J: Journal> Then<J::Payload> for ProduceDone<J> {
    fn then(self, result: Appended<J::Payload>) {
        let cell = self.cell.clone();
        self.finish(&mut cell.lock(), result);
    }
}

/// Deliveries taken for a subscription.
struct Inbox<P> {
    /// Durable deliveries not yet handed out.
    ready: VecDeque<Held<P>>,
    /// Deliveries taken whose journal append is not yet durable.
    committing: usize,
    /// Why an append failed.
    failed: Option<QueueError>,
    /// Set by [`Subscription::stop`]: deliveries arriving later are given back.
    stopped: bool,
    /// Set by [`Subscription::take_ahead`]: a settle refills the subscription.
    ahead: bool,
}

impl<P> Inbox<P> {
    fn takes_ahead(&self) -> bool {
        self.ahead && !self.stopped
    }
}

struct EngineSubscription<J: Journal> {
    engine: Arc<Engine<J>>,
    cell: Arc<Cell<J::Payload>>,
    channel: Arc<str>,
    consumer: u64,
    inbox: Arc<Mutex<Inbox<J::Payload>>>,
}

impl<J: Journal> EngineSubscription<J> {
    async fn next_delivery(
        engine: Arc<Engine<J>>,
        cell: Arc<Cell<J::Payload>>,
        channel: Arc<str>,
        consumer: u64,
        inbox: Arc<Mutex<Inbox<J::Payload>>>,
    ) -> Result<RawDelivery, QueueError> {
        loop {
            engine.check_open()?;
            let notified = cell.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let committing = {
                let mut inbox = inbox.lock();
                if let Some(held) = inbox.ready.pop_front() {
                    drop(inbox);
                    // Taken ahead and cancelled since: its payload may be gone.
                    if cell.cancels.load(Ordering::Acquire) > 0
                        && !cell.lock().holds(held.entry.id, held.token)
                    {
                        continue;
                    }
                    let payload = engine.journal.read(&held.entry.payload)?;
                    return Ok(held.to_delivery(&channel, payload));
                }
                if let Some(e) = inbox.failed.take() {
                    return Err(e);
                }
                inbox.committing > 0
            };
            if committing {
                notified.await;
                continue;
            }
            let (took, wakeup) = engine.take_into(&cell, consumer, &inbox);
            if took {
                continue;
            }
            match wakeup {
                Some(at) => {
                    let sleep = engine.clock.sleep_until(at);
                    let _ = select(notified, sleep).await;
                }
                None => notified.await,
            }
        }
    }
}

impl<J: Journal> Subscription for EngineSubscription<J> {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        Self::next_delivery(
            self.engine.clone(),
            self.cell.clone(),
            self.channel.clone(),
            self.consumer,
            self.inbox.clone(),
        )
        .boxed()
    }

    fn take_ahead(&self) {
        self.inbox.lock().ahead = true;
    }

    fn stop(&self) -> BoxFuture<'static, ()> {
        let taken: Vec<Held<J::Payload>> = {
            let mut inbox = self.inbox.lock();
            inbox.stopped = true;
            inbox.ready.drain(..).collect()
        };
        if !taken.is_empty() {
            self.engine.release(&mut self.cell.lock(), &taken);
            self.cell.wake();
        }
        Box::pin(async {})
    }
}

impl<J: Journal> Drop for EngineSubscription<J> {
    fn drop(&mut self) {
        self.engine.unsubscribe(&self.cell, self.consumer);
    }
}

impl<J: Journal> Adapter for Engine<J> {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        Engine::put(self, spec, batch, None).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        let result = Engine::open_subscription(self, spec, max_parallel);
        async move { result }.boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Engine::settle_lease(self, lease, outcome).boxed()
    }

    fn settle_many(
        &self,
        settles: Vec<(Lease, Outcome)>,
    ) -> BoxFuture<'_, Vec<Result<(), QueueError>>> {
        Engine::settle_batch(self, settles).boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        let result = Engine::extend_lease(self, lease, by);
        async move { result }.boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        let result = Engine::channel_stats(self);
        async move { Ok(result) }.boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        let result = Engine::pending(self, channel, limit);
        async move { result }.boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        let result = Engine::dead_list(self, channel, limit);
        async move { result }.boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        Engine::redrive_dead(self, channel, ids).boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        Engine::purge_dead_now(self, channel, ids).boxed()
    }

    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
        Engine::purge_now(self, channel).boxed()
    }

    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: MessageId,
    ) -> BoxFuture<'a, Result<Cancelled, QueueError>> {
        Engine::cancel_now(self, channel, id).boxed()
    }

    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = Engine::set_paused_now(self, channel, paused);
        async move { result }.boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        let result = Engine::shut_down(self);
        async move { result }.boxed()
    }

    fn keyed(&self) -> Option<&dyn KeyedProduce> {
        Some(self)
    }

    fn histories(&self) -> Option<&dyn queue_core::Histories> {
        Some(self)
    }
}

impl<J: Journal> queue_core::Histories for Engine<J> {
    fn keep_histories(&self) {
        self.histories.turn_on();
    }

    fn history(&self, _channel: &str, id: MessageId) -> Vec<queue_core::Step> {
        self.histories.of(id)
    }

    fn held(&self, channel: &str) -> Option<(u64, u64)> {
        self.histories.held(channel)
    }
}

impl<J: Journal> KeyedProduce for Engine<J> {
    fn produce_keyed<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
        key: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        Engine::put(self, spec, batch, Some((key, window))).boxed()
    }
}
