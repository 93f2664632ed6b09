//! The state of one channel and every queue rule, as a synchronous state machine that reads
//! time only from the `now` it is given.
//!
//! A message is in exactly one of four places: `ready` (by priority, then the order it became
//! ready), `delayed` (by due time), `leased` (held by one consumer under a fencing token until
//! a deadline), or `dead`. Acked messages are gone. The dedup window maps keys to the first
//! message produced with them until the window closes. Every change is returned as a
//! [`Change`] for the journal.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::{NonZeroU32, NonZeroU64};

use super::keys::KeyWindow;
use std::time::Duration;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use queue_core::clock::{Timestamp, millis};
use queue_core::texts;
use queue_core::{
    Cancelled, ChannelSpec, ChannelStats, MessageId, MessageState, Outcome, QueueError,
};

/// A stored message as the engine tracks it; `P` is where its payload lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: Deserialize<'de>"))]
pub struct Entry<P> {
    /// The message id.
    pub id: MessageId,
    /// The payload, or where to find it.
    pub payload: P,
    /// Deliveries made so far.
    pub attempts: u32,
    /// Higher leaves first.
    pub priority: u8,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// Its group in the channel, for grouped messages: set by the channel, which maps it to
    /// the group's hash (4 bytes here rather than 8 keeps an entry at 40 bytes).
    pub group: Option<GroupRef>,
}

/// A channel's name for one of its groups while the group has messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupRef(NonZeroU32);

/// A message held under a lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: Deserialize<'de>"))]
pub struct Held<P> {
    /// The message.
    pub entry: Entry<P>,
    /// The fencing token of this delivery.
    pub token: u64,
    /// When the lease lapses.
    pub deadline: Timestamp,
    /// The subscription holding it.
    pub consumer: u64,
}

impl<P> Held<P> {
    /// The delivery of this lease on `channel`, with the payload read from wherever `P` says.
    pub fn to_delivery(
        &self,
        channel: &std::sync::Arc<str>,
        payload: Vec<u8>,
    ) -> queue_core::RawDelivery {
        queue_core::RawDelivery {
            lease: queue_core::Lease {
                channel: channel.clone(),
                id: self.entry.id,
                token: self.token,
            },
            payload,
            attempt: self.entry.attempts,
            priority: self.entry.priority,
            produced_at: self.entry.produced_at,
            deadline: self.deadline,
        }
    }
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: Deserialize<'de>"))]
pub struct Dead<P> {
    /// The message (no longer in a group).
    pub entry: Entry<P>,
    /// The hash of the group it was in, which a redrive puts it back into.
    pub group: Option<NonZeroU64>,
    /// The last error.
    pub error: String,
    /// When it died.
    pub dead_at: Timestamp,
}

/// What a state change did, for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A message was handed out: it has used `attempts` deliveries.
    Leased {
        /// The message.
        id: MessageId,
        /// Its attempts now.
        attempts: u32,
    },
    /// A message went back to ready or delayed with `attempts` deliveries made.
    Requeued {
        /// The message.
        id: MessageId,
        /// Its attempts now.
        attempts: u32,
        /// When it is due.
        due: Timestamp,
    },
    /// A message moved to the dead-letter queue.
    Died {
        /// The message.
        id: MessageId,
        /// Its attempts.
        attempts: u32,
        /// When.
        at: Timestamp,
        /// Why.
        error: String,
    },
    /// A message was acked and is gone.
    Acked {
        /// The message.
        id: MessageId,
    },
    /// A dead letter went back to ready with its attempts reset.
    Redriven {
        /// The message.
        id: MessageId,
    },
    /// A dead letter or a pending message was deleted.
    Purged {
        /// The message.
        id: MessageId,
    },
}

/// The most cancelled leases a channel remembers; past it the oldest are forgotten and their
/// settles are refused as stale instead.
const MAX_CANCELLED: usize = 100_000;

/// Why a message whose holder went away without settling is not handed out again.
pub fn lost_text(attempts: u32, max_attempts: u32) -> String {
    texts::WORKER_LOST.format(attempts, max_attempts)
}

/// A channel's counters: what [`ChannelStats`] reports beside the depths.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Messages accepted.
    pub produced: u64,
    /// Produces dropped as duplicates.
    pub duplicates: u64,
    /// Messages acked.
    pub acked: u64,
    /// Deliveries failed and retried.
    pub retried: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Leases that lapsed.
    pub lease_expiries: u64,
}

impl Tally {
    /// Adds `other` to each counter.
    pub fn add(&mut self, other: &Tally) {
        self.produced += other.produced;
        self.duplicates += other.duplicates;
        self.acked += other.acked;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.lease_expiries += other.lease_expiries;
    }
}

/// The messages of one group that the channel knows.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: Deserialize<'de>"))]
struct Group<P> {
    /// The group's hash.
    hash: NonZeroU64,
    /// Messages of the group that may be delivered: ready, delayed (backing off included) or
    /// held. At most the channel's `concurrency_per_group`, and always the oldest.
    live: u32,
    /// The group's later messages, by id (produce order), with their due times.
    parked: BTreeMap<MessageId, (Entry<P>, Timestamp)>,
}

/// Deliveries started in the current window of a rate limit.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Window {
    start: Timestamp,
    used: u32,
}

impl Window {
    /// Whether `rate` allows one more delivery at `now`; moves to `now`'s window first.
    fn allows(&mut self, rate: queue_core::Rate, now: Timestamp) -> bool {
        let (start, _) = rate.window(now);
        if self.start != start {
            *self = Window { start, used: 0 };
        }
        self.used < rate.limit
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ConsumerSlot {
    max_parallel: u32,
    held: u32,
}

/// One channel's messages and rules.
/// Serializable whole, for the snapshots of `nats://` replicas.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: Deserialize<'de>"))]
pub struct ChannelState<P> {
    spec: ChannelSpec,
    ready: BTreeMap<Reverse<u8>, VecDeque<Entry<P>>>,
    ready_len: usize,
    delayed: BTreeMap<(Timestamp, MessageId), Entry<P>>,
    leased: HashMap<MessageId, Held<P>>,
    deadlines: BTreeSet<(Timestamp, MessageId)>,
    dead: BTreeMap<MessageId, Dead<P>>,
    dedup: KeyWindow<u64, MessageId>,
    consumers: HashMap<u64, ConsumerSlot>,
    counters: Tally,
    paused: bool,
    /// Leases of cancelled messages, until their deadlines.
    cancelled: KeyWindow<(MessageId, u64), ()>,
    /// Groups with messages.
    groups: HashMap<GroupRef, Group<P>>,
    /// The group of each hash, while it has messages.
    group_refs: HashMap<NonZeroU64, GroupRef>,
    /// Group names free for reuse, and the next new one.
    free_refs: Vec<GroupRef>,
    next_ref: u32,
    /// Messages parked behind an earlier one of their group.
    parked_len: usize,
    /// The channel's rate window.
    rate: Window,
    /// Each group's rate window, while it is current.
    group_rates: HashMap<NonZeroU64, Window>,
    /// The start of the group windows `group_rates` holds: older ones are dropped when it
    /// turns.
    group_window: Timestamp,
    /// When the channel's rate allows deliveries again, while it holds ready messages back.
    rate_blocked: Option<Timestamp>,
    /// Produced messages whose commit is pending and that will join the channel when it is
    /// durable (not leased in it): a later message must not be leased ahead of them.
    #[serde(skip)]
    arriving: usize,
}

impl<P: Clone> ChannelState<P> {
    /// An empty channel.
    pub fn new(spec: ChannelSpec) -> Self {
        ChannelState {
            spec,
            ready: BTreeMap::new(),
            ready_len: 0,
            delayed: BTreeMap::new(),
            leased: HashMap::default(),
            deadlines: BTreeSet::new(),
            dead: BTreeMap::new(),
            dedup: KeyWindow::new(usize::MAX),
            consumers: HashMap::default(),
            counters: Tally::default(),
            paused: false,
            cancelled: KeyWindow::new(MAX_CANCELLED),
            groups: HashMap::default(),
            group_refs: HashMap::default(),
            free_refs: Vec::new(),
            next_ref: 0,
            parked_len: 0,
            rate: Window::default(),
            group_rates: HashMap::default(),
            group_window: 0,
            rate_blocked: None,
            arriving: 0,
        }
    }

    /// The channel's settings.
    pub fn spec(&self) -> &ChannelSpec {
        &self.spec
    }

    /// Whether the channel is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Pauses the channel (nothing is taken) or resumes it.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Adopts newer settings (the latest declaration a producer or consumer brings).
    pub fn set_spec(&mut self, spec: &ChannelSpec) {
        if &self.spec != spec {
            self.spec = spec.clone();
        }
    }

    /// Applies every rule that time triggers: lapsed leases, due delayed messages, closed
    /// dedup windows. Appends the changes to `changes`.
    pub fn tick(&mut self, now: Timestamp, changes: &mut Vec<Change>) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(held) = self.leased.remove(&id) else {
                continue;
            };
            self.counters.lease_expiries += 1;
            self.release_slot(held.consumer);
            changes.push(self.give_back(held.entry, now, |attempts, max| {
                texts::LEASE_EXPIRED.format(attempts, max)
            }));
        }
        while let Some((&(due, _), _)) = self.delayed.first_key_value() {
            if due > now {
                break;
            }
            let (_, entry) = self.delayed.pop_first().expect("checked non-empty");
            self.push_ready_back(entry);
        }
        self.dedup.expire(now);
        self.cancelled.expire(now);
        if self.rate_blocked.is_some_and(|at| at <= now) {
            self.rate_blocked = None;
        }
        if let Some(rate) = self.spec.rate_per_group {
            let (start, _) = rate.window(now);
            if self.group_window != start {
                self.group_window = start;
                self.group_rates.retain(|_, w| w.start == start);
            }
        }
    }

    /// The earliest time a lease lapses, a delayed message becomes due, or the channel's rate
    /// allows the ready messages it holds back.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        let lease = self.deadlines.first().map(|(t, _)| *t);
        let delayed = self.delayed.first_key_value().map(|((t, _), _)| *t);
        [lease, delayed, self.rate_blocked]
            .into_iter()
            .flatten()
            .min()
    }

    /// The original message for a dedup key inside its window.
    pub fn duplicate_of(&self, key: u64, now: Timestamp) -> Option<MessageId> {
        self.dedup.get(&key, now).copied()
    }

    /// The original message for a dedup key and the end of its window, inside the window.
    pub fn dedup_entry(&self, key: u64, now: Timestamp) -> Option<(MessageId, Timestamp)> {
        self.dedup.entry(&key, now).map(|(id, end)| (*id, end))
    }

    /// Counts a produce dropped as a duplicate.
    pub fn count_duplicate(&mut self) {
        self.counters.duplicates += 1;
    }

    /// Remembers `key` for `id` until `expires`. The window is fixed at the first produce.
    pub fn remember(&mut self, key: u64, id: MessageId, expires: Timestamp, now: Timestamp) {
        self.dedup.insert(key, id, expires, now);
    }

    /// Forgets a dedup key (a produce that failed to become durable).
    pub fn forget(&mut self, key: u64, id: MessageId) {
        self.dedup.remove_if(&key, |owner| *owner != id);
    }

    /// Adds a message of group `group` (a hash), ready at `due` (at once when `due <= now`).
    pub fn insert(
        &mut self,
        entry: Entry<P>,
        group: Option<NonZeroU64>,
        due: Timestamp,
        now: Timestamp,
    ) {
        self.counters.produced += 1;
        self.arrive(entry, group, due, now);
    }

    /// A message joins the channel: placed by `due`, or parked behind the earlier messages
    /// of its group while they fill the group's `concurrency_per_group`.
    fn arrive(
        &mut self,
        mut entry: Entry<P>,
        group: Option<NonZeroU64>,
        due: Timestamp,
        now: Timestamp,
    ) {
        let Some(hash) = group else {
            entry.group = None;
            return self.place(entry, due, now);
        };
        let group = self.group_ref(hash);
        entry.group = Some(group);
        let g = self.groups.get_mut(&group).expect("named above");
        g.parked.insert(entry.id, (entry, due));
        self.parked_len += 1;
        self.admit(group, now);
    }

    /// The group of `hash`, made when it has no messages yet.
    fn group_ref(&mut self, hash: NonZeroU64) -> GroupRef {
        if let Some(group) = self.group_refs.get(&hash) {
            return *group;
        }
        let group = self.free_refs.pop().unwrap_or_else(|| {
            self.next_ref += 1;
            GroupRef(NonZeroU32::new(self.next_ref).expect("counted from 1"))
        });
        self.group_refs.insert(hash, group);
        self.groups.insert(
            group,
            Group {
                hash,
                live: 0,
                parked: BTreeMap::new(),
            },
        );
        group
    }

    /// Forgets a group once it has no messages.
    fn drop_if_empty(&mut self, group: GroupRef) {
        if let Some(g) = self.groups.get(&group)
            && g.live == 0
            && g.parked.is_empty()
        {
            self.group_refs.remove(&g.hash);
            self.groups.remove(&group);
            self.free_refs.push(group);
        }
    }

    /// The hash of a message's group.
    pub fn group_hash(&self, group: Option<GroupRef>) -> Option<NonZeroU64> {
        self.groups.get(&group?).map(|g| g.hash)
    }

    /// Lets a group's oldest parked messages in while it has room.
    fn admit(&mut self, group: GroupRef, now: Timestamp) {
        let limit = self.spec.concurrency_per_group.max(1);
        while let Some(g) = self.groups.get_mut(&group)
            && g.live < limit
            && let Some((_, (entry, due))) = g.parked.pop_first()
        {
            g.live += 1;
            self.parked_len -= 1;
            self.place(entry, due, now);
        }
    }

    /// A delivered, dead or deleted message leaves its group, and lets the next one in.
    fn depart(&mut self, group: Option<GroupRef>, now: Timestamp) {
        let Some(group) = group else { return };
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        g.live = g.live.saturating_sub(1);
        self.admit(group, now);
        self.drop_if_empty(group);
    }

    fn place(&mut self, entry: Entry<P>, due: Timestamp, now: Timestamp) {
        if due <= now {
            self.push_ready_back(entry);
        } else {
            self.delayed.insert((due, entry.id), entry);
        }
    }

    fn push_ready_back(&mut self, entry: Entry<P>) {
        self.ready
            .entry(Reverse(entry.priority))
            .or_default()
            .push_back(entry);
        self.ready_len += 1;
    }

    fn push_ready_front(&mut self, entry: Entry<P>) {
        self.ready
            .entry(Reverse(entry.priority))
            .or_default()
            .push_front(entry);
        self.ready_len += 1;
    }

    fn pop_ready(&mut self) -> Option<Entry<P>> {
        let mut slot = self.ready.first_entry()?;
        let entry = slot
            .get_mut()
            .pop_front()
            .expect("ready queues are never empty");
        if slot.get().is_empty() {
            slot.remove();
        }
        self.ready_len -= 1;
        Some(entry)
    }

    /// A message whose holder is gone without settling it: first in line again, or dead
    /// with `why(attempts, max_attempts)` once its attempts are used.
    fn give_back(
        &mut self,
        entry: Entry<P>,
        now: Timestamp,
        why: impl FnOnce(u32, u32) -> String,
    ) -> Change {
        let attempts = entry.attempts;
        if attempts >= self.spec.max_attempts {
            let error = why(attempts, self.spec.max_attempts);
            return self.bury(entry, error, now);
        }
        let id = entry.id;
        self.push_ready_front(entry);
        Change::Requeued {
            id,
            attempts,
            due: now,
        }
    }

    fn bury(&mut self, mut entry: Entry<P>, error: String, now: Timestamp) -> Change {
        self.counters.dead_lettered += 1;
        let group = self.group_hash(entry.group);
        self.depart(entry.group.take(), now);
        let change = Change::Died {
            id: entry.id,
            attempts: entry.attempts,
            at: now,
            error: error.clone(),
        };
        self.dead.insert(
            entry.id,
            Dead {
                entry,
                group,
                error,
                dead_at: now,
            },
        );
        change
    }

    fn release_slot(&mut self, consumer: u64) {
        if let Some(slot) = self.consumers.get_mut(&consumer) {
            slot.held = slot.held.saturating_sub(1);
        }
    }

    /// Registers a subscription.
    pub fn add_consumer(&mut self, consumer: u64, max_parallel: u32) {
        self.consumers.insert(
            consumer,
            ConsumerSlot {
                max_parallel: max_parallel.max(1),
                held: 0,
            },
        );
    }

    /// How many more deliveries `consumer` may take.
    pub fn capacity(&self, consumer: u64) -> u32 {
        self.consumers
            .get(&consumer)
            .map_or(0, |s| s.max_parallel.saturating_sub(s.held))
    }

    /// Whether the channel's deliveries in flight fill its `concurrency`.
    pub fn at_concurrency_limit(&self) -> bool {
        let limit = self.spec.concurrency as usize;
        limit > 0 && self.leased.len() >= limit
    }

    /// Messages ready now.
    pub fn ready_len(&self) -> usize {
        self.ready_len
    }

    /// Subscriptions open now.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Whether anything is ready.
    pub fn has_ready(&self) -> bool {
        self.ready_len > 0
    }

    /// Leases the next ready message to `consumer` under `token` until `now + lease`, and
    /// records the delivery in `changes`. A ready message that has used its attempts already
    /// (its holder went away without settling, as after a crash) is dead-lettered instead.
    pub fn take(
        &mut self,
        consumer: u64,
        token: u64,
        now: Timestamp,
        changes: &mut Vec<Change>,
    ) -> Option<Held<P>> {
        if self.paused || self.capacity(consumer) == 0 {
            return None;
        }
        if self.at_concurrency_limit() {
            return None;
        }
        if let Some(rate) = self.spec.rate
            && !self.rate.allows(rate, now)
        {
            if self.has_ready() {
                self.rate_blocked = Some(rate.window(now).1);
            }
            return None;
        }
        let mut entry = loop {
            let entry = self.pop_ready()?;
            if entry.attempts >= self.spec.max_attempts {
                let error = lost_text(entry.attempts, self.spec.max_attempts);
                changes.push(self.bury(entry, error, now));
                continue;
            }
            if let (Some(rate), Some(group)) =
                (self.spec.rate_per_group, self.group_hash(entry.group))
            {
                let window = self.group_rates.entry(group).or_default();
                if !window.allows(rate, now) {
                    // Ready again when its group's window turns; nothing durable changes.
                    self.delayed.insert((rate.window(now).1, entry.id), entry);
                    continue;
                }
                window.used += 1;
            }
            break entry;
        };
        if self.spec.rate.is_some() {
            self.rate.used += 1;
        }
        entry.attempts = entry.attempts.saturating_add(1);
        let deadline = now.saturating_add(millis(self.spec.lease));
        changes.push(Change::Leased {
            id: entry.id,
            attempts: entry.attempts,
        });
        let held = Held {
            entry,
            token,
            deadline,
            consumer,
        };
        self.deadlines.insert((deadline, held.entry.id));
        self.leased.insert(held.entry.id, held.clone());
        if let Some(s) = self.consumers.get_mut(&consumer) {
            s.held += 1;
        }
        Some(held)
    }

    /// Whether a message produced now may be leased in its produce's commit: nothing is ready
    /// or on its way that it would overtake, and no rule applies that [`Self::take`] would
    /// weigh (pause, rates, the channel's concurrency, attempts).
    pub fn leases_on_arrival(&self) -> bool {
        !self.paused
            && self.ready_len == 0
            && self.arriving == 0
            && self.spec.rate.is_none()
            && self.spec.rate_per_group.is_none()
            && self.spec.concurrency == 0
            && self.spec.max_attempts > 0
    }

    /// Counts `n` produced messages whose commit is pending and that will join the channel.
    pub fn arriving(&mut self, n: usize) {
        self.arriving += n;
    }

    /// Uncounts `n` messages counted by [`Self::arriving`] that joined or failed.
    pub fn arrived(&mut self, n: usize) {
        self.arriving = self.arriving.saturating_sub(n);
    }

    /// Reserves one of `consumer`'s slots for a message leased on arrival; false when it has
    /// none free.
    pub fn reserve(&mut self, consumer: u64) -> bool {
        match self.consumers.get_mut(&consumer) {
            Some(s) if s.held < s.max_parallel => {
                s.held += 1;
                true
            }
            _ => false,
        }
    }

    /// Frees a slot reserved by [`Self::reserve`] whose message did not become durable.
    pub fn unreserve(&mut self, consumer: u64) {
        self.release_slot(consumer);
    }

    /// Adds a produced message leased on arrival under a slot [`Self::reserve`]d for its
    /// holder; its lease was journaled with it.
    pub fn insert_leased(&mut self, held: Held<P>) {
        self.counters.produced += 1;
        self.deadlines.insert((held.deadline, held.entry.id));
        self.leased.insert(held.entry.id, held);
    }

    /// The subscription holding `id`, if it is leased.
    pub fn holder_of(&self, id: MessageId) -> Option<u64> {
        self.leased.get(&id).map(|h| h.consumer)
    }

    /// Whether `token` still holds `id`.
    pub fn holds(&self, id: MessageId, token: u64) -> bool {
        self.leased.get(&id).is_some_and(|h| h.token == token)
    }

    fn holder(&self, id: MessageId, token: u64) -> Result<&Held<P>, QueueError> {
        match self.leased.get(&id) {
            Some(h) if h.token == token => Ok(h),
            // Time already forgot the cancelled leases past their deadline (`tick`).
            _ if self.cancelled.get(&(id, token), 0).is_some() => Err(QueueError::Cancelled { id }),
            _ => Err(QueueError::StaleLease { id }),
        }
    }

    /// Deletes a pending or in-flight message. A lease on it is remembered until its
    /// deadline, so that its settle and extensions are refused as cancelled. Returns the
    /// change, the payload now gone, and where the message was.
    ///
    /// # Errors
    /// [`QueueError::UnknownMessage`] when no pending or in-flight message has this id.
    pub fn cancel(
        &mut self,
        id: MessageId,
        now: Timestamp,
    ) -> Result<(Change, P, Cancelled), QueueError> {
        if let Some(held) = self.leased.remove(&id) {
            self.deadlines.remove(&(held.deadline, id));
            self.release_slot(held.consumer);
            let until = held.deadline.max(now.saturating_add(1));
            self.cancelled.insert((id, held.token), (), until, now);
            self.depart(held.entry.group, now);
            return Ok((
                Change::Purged { id },
                held.entry.payload,
                Cancelled::InFlight,
            ));
        }
        let mut found = None;
        for (priority, queue) in &mut self.ready {
            if let Some(at) = queue.iter().position(|e| e.id == id) {
                found = Some((*priority, queue.remove(at).expect("found")));
                break;
            }
        }
        if let Some((priority, entry)) = found {
            if self.ready.get(&priority).is_some_and(VecDeque::is_empty) {
                self.ready.remove(&priority);
            }
            self.ready_len -= 1;
            self.depart(entry.group, now);
            return Ok((Change::Purged { id }, entry.payload, Cancelled::Pending));
        }
        let due = self.delayed.keys().find(|(_, d)| *d == id).copied();
        if let Some(key) = due {
            let entry = self.delayed.remove(&key).expect("found");
            self.depart(entry.group, now);
            return Ok((Change::Purged { id }, entry.payload, Cancelled::Pending));
        }
        let parked = self
            .groups
            .iter()
            .find(|(_, g)| g.parked.contains_key(&id))
            .map(|(group, _)| *group);
        if let Some(group) = parked {
            let g = self.groups.get_mut(&group).expect("found");
            let (entry, _) = g.parked.remove(&id).expect("found");
            self.drop_if_empty(group);
            self.parked_len -= 1;
            return Ok((Change::Purged { id }, entry.payload, Cancelled::Pending));
        }
        Err(QueueError::UnknownMessage {
            channel: self.spec.name.to_string(),
            id,
        })
    }

    /// Moves a lease's deadline to `now + by`.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] for a token that does not hold the message.
    pub fn extend(
        &mut self,
        id: MessageId,
        token: u64,
        by: Duration,
        now: Timestamp,
    ) -> Result<Timestamp, QueueError> {
        let old = self.holder(id, token)?.deadline;
        let deadline = now.saturating_add(millis(by));
        self.deadlines.remove(&(old, id));
        self.deadlines.insert((deadline, id));
        self.leased.get_mut(&id).expect("checked").deadline = deadline;
        Ok(deadline)
    }

    /// Ends a delivery. `unit` is a uniform draw from `[0, 1)` for backoff jitter. Returns
    /// the change and, for an ack, the payload of the message now gone.
    ///
    /// # Errors
    /// [`QueueError::StaleLease`] for a token that does not hold the message.
    pub fn settle(
        &mut self,
        id: MessageId,
        token: u64,
        outcome: Outcome,
        now: Timestamp,
        unit: f64,
    ) -> Result<(Change, Option<P>), QueueError> {
        self.holder(id, token)?;
        let held = self.leased.remove(&id).expect("checked");
        self.deadlines.remove(&(held.deadline, id));
        self.release_slot(held.consumer);
        let mut entry = held.entry;
        let attempts = entry.attempts;
        let change = match outcome {
            Outcome::Ack => {
                self.counters.acked += 1;
                self.depart(entry.group, now);
                return Ok((Change::Acked { id }, Some(entry.payload)));
            }
            Outcome::Retry { after, error } => {
                if attempts >= self.spec.max_attempts {
                    let used = texts::ATTEMPTS_USED.format(attempts, self.spec.max_attempts);
                    let error = format!("{error}{used}");
                    self.bury(entry, error, now)
                } else {
                    self.counters.retried += 1;
                    let delay = after.unwrap_or_else(|| self.spec.retry_delay(attempts, unit));
                    let due = now.saturating_add(millis(delay));
                    self.place(entry, due, now);
                    Change::Requeued { id, attempts, due }
                }
            }
            Outcome::DeadLetter { error } => self.bury(entry, error, now),
            Outcome::Release => {
                entry.attempts = entry.attempts.saturating_sub(1);
                let attempts = entry.attempts;
                self.push_ready_front(entry);
                Change::Requeued {
                    id,
                    attempts,
                    due: now,
                }
            }
            Outcome::Snooze { after } => {
                entry.attempts = entry.attempts.saturating_sub(1);
                let attempts = entry.attempts;
                let due = now.saturating_add(millis(after));
                self.place(entry, due, now);
                Change::Requeued { id, attempts, due }
            }
        };
        Ok((change, None))
    }

    /// Drops a subscription: every message it holds is ready again at once with the attempt
    /// counted, or dead-lettered when that was its last attempt.
    pub fn remove_consumer(&mut self, consumer: u64, now: Timestamp) -> Vec<Change> {
        self.consumers.remove(&consumer);
        let mut ids: Vec<(u64, MessageId)> = self
            .leased
            .values()
            .filter(|h| h.consumer == consumer)
            .map(|h| (h.token, h.entry.id))
            .collect();
        // Newest first, so that pushing each to the front restores the original order.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut changes = Vec::with_capacity(ids.len());
        for (_, id) in ids {
            let held = self.leased.remove(&id).expect("listed above");
            self.deadlines.remove(&(held.deadline, id));
            changes.push(self.give_back(held.entry, now, lost_text));
        }
        changes
    }

    /// Moves dead letters back to ready with attempts reset.
    pub fn redrive(&mut self, ids: Option<&[MessageId]>, now: Timestamp) -> Vec<Change> {
        let chosen: Vec<MessageId> = match ids {
            Some(ids) => ids
                .iter()
                .copied()
                .filter(|id| self.dead.contains_key(id))
                .collect(),
            None => self.dead.keys().copied().collect(),
        };
        chosen
            .into_iter()
            .map(|id| {
                let dead = self.dead.remove(&id).expect("filtered");
                let mut entry = dead.entry;
                entry.attempts = 0;
                self.arrive(entry, dead.group, now, now);
                Change::Redriven { id }
            })
            .collect()
    }

    /// Deletes dead letters; returns the changes and the payloads now gone.
    pub fn purge_dead(&mut self, ids: Option<&[MessageId]>) -> (Vec<Change>, Vec<P>) {
        let gone: Vec<Dead<P>> = match ids {
            Some(ids) => ids.iter().filter_map(|id| self.dead.remove(id)).collect(),
            None => std::mem::take(&mut self.dead).into_values().collect(),
        };
        gone.into_iter()
            .map(|d| (Change::Purged { id: d.entry.id }, d.entry.payload))
            .unzip()
    }

    /// Deletes the messages waiting for delivery, ready and delayed; returns the changes and
    /// the payloads now gone. Messages in flight stay.
    pub fn purge_pending(&mut self) -> (Vec<Change>, Vec<P>) {
        let ready = std::mem::take(&mut self.ready).into_values().flatten();
        let delayed = std::mem::take(&mut self.delayed).into_values();
        let parked: Vec<Entry<P>> = self
            .groups
            .values_mut()
            .flat_map(|g| std::mem::take(&mut g.parked).into_values().map(|(e, _)| e))
            .collect();
        self.ready_len = 0;
        self.parked_len = 0;
        let gone: (Vec<Change>, Vec<P>) = ready
            .chain(delayed)
            .chain(parked)
            .map(|e| (Change::Purged { id: e.id }, e.payload))
            .unzip();
        // What stays of each group: its messages in flight.
        for g in self.groups.values_mut() {
            g.live = 0;
        }
        for held in self.leased.values() {
            if let Some(g) = held.entry.group.and_then(|r| self.groups.get_mut(&r)) {
                g.live += 1;
            }
        }
        let groups: Vec<GroupRef> = self.groups.keys().copied().collect();
        for group in groups {
            self.drop_if_empty(group);
        }
        gone
    }

    /// Restores a message after recovery: ready or delayed by `due`, or dead with its error.
    pub fn restore(
        &mut self,
        entry: Entry<P>,
        group: Option<NonZeroU64>,
        due: Timestamp,
        dead: Option<(Timestamp, String)>,
        now: Timestamp,
    ) {
        match dead {
            Some((dead_at, error)) => {
                self.dead.insert(
                    entry.id,
                    Dead {
                        entry: Entry {
                            group: None,
                            ..entry
                        },
                        group,
                        error,
                        dead_at,
                    },
                );
            }
            None => self.arrive(entry, group, due, now),
        }
    }

    /// Visits the stored messages `pick` chooses with their group's hash and state (`due`, 0
    /// for ready and held messages; `(dead_at, error)` for dead letters) and replaces their
    /// payload handle with what `relocate` returns.
    pub fn relocate(
        &mut self,
        mut pick: impl FnMut(&Entry<P>) -> bool,
        mut relocate: impl FnMut(
            &Entry<P>,
            Option<NonZeroU64>,
            Timestamp,
            Option<(Timestamp, &str)>,
        ) -> P,
    ) {
        let hashes: HashMap<GroupRef, NonZeroU64> =
            self.groups.iter().map(|(r, g)| (*r, g.hash)).collect();
        let hash = |e: &Entry<P>| e.group.and_then(|r| hashes.get(&r).copied());
        for e in self.ready.values_mut().flat_map(|q| q.iter_mut()) {
            if pick(e) {
                e.payload = relocate(e, hash(e), 0, None);
            }
        }
        for ((due, _), e) in &mut self.delayed {
            if pick(e) {
                e.payload = relocate(e, hash(e), *due, None);
            }
        }
        for h in self.leased.values_mut() {
            if pick(&h.entry) {
                h.entry.payload = relocate(&h.entry, hash(&h.entry), 0, None);
            }
        }
        for g in self.groups.values_mut() {
            for (e, due) in g.parked.values_mut() {
                if pick(e) {
                    e.payload = relocate(e, Some(g.hash), *due, None);
                }
            }
        }
        for d in self.dead.values_mut() {
            if pick(&d.entry) {
                d.entry.payload = relocate(&d.entry, d.group, 0, Some((d.dead_at, &d.error)));
            }
        }
    }

    /// The dead-letter queue, oldest first.
    pub fn dead_letters(&self, limit: usize) -> impl Iterator<Item = &Dead<P>> {
        self.dead.values().take(limit)
    }

    /// Pending messages in delivery order: ready, then delayed, then those waiting for an
    /// earlier message of their group, then in flight.
    pub fn peek(&self, limit: usize, now: Timestamp) -> Vec<(&Entry<P>, MessageState, Timestamp)> {
        let ready = self
            .ready
            .values()
            .flat_map(|q| q.iter())
            .map(|e| (e, MessageState::Ready, 0));
        let delayed = self
            .delayed
            .iter()
            .map(|((due, _), e)| (e, MessageState::Delayed, *due));
        let mut parked: Vec<(&Entry<P>, Timestamp)> = self
            .groups
            .values()
            .flat_map(|g| g.parked.values().map(|(e, due)| (e, *due)))
            .collect();
        parked.sort_unstable_by_key(|(e, _)| e.id);
        let parked = parked.into_iter().map(|(e, due)| {
            if due <= now {
                (e, MessageState::Ready, 0)
            } else {
                (e, MessageState::Delayed, due)
            }
        });
        let mut held: Vec<&Held<P>> = self.leased.values().collect();
        held.sort_unstable_by_key(|h| h.token);
        let held = held
            .into_iter()
            .map(|h| (&h.entry, MessageState::InFlight, h.deadline));
        ready
            .chain(delayed)
            .chain(parked)
            .chain(held)
            .take(limit)
            .collect()
    }

    /// The counters.
    pub fn tally(&self) -> Tally {
        self.counters
    }

    /// Adds counts kept from before this run.
    pub fn restore_tally(&mut self, kept: &Tally) {
        self.counters.add(kept);
    }

    /// Counters and depths.
    pub fn stats(&self) -> ChannelStats {
        let c = &self.counters;
        ChannelStats {
            channel: self.spec.name.to_string(),
            ready: (self.ready_len + self.parked_len) as u64,
            delayed: self.delayed.len() as u64,
            in_flight: self.leased.len() as u64,
            dead: self.dead.len() as u64,
            produced: c.produced,
            duplicates: c.duplicates,
            acked: c.acked,
            retried: c.retried,
            dead_lettered: c.dead_lettered,
            lease_expiries: c.lease_expiries,
            consumers: self.consumers.len() as u64,
            paused: self.paused,
            counted_since: 0,
            next_due: self.delayed.first_key_value().map(|((due, _), _)| *due),
        }
    }

    /// Every stored message: ready, delayed, held and dead.
    pub fn live_entries(&self) -> impl Iterator<Item = &Entry<P>> {
        self.ready
            .values()
            .flat_map(|q| q.iter())
            .chain(self.delayed.values())
            .chain(self.leased.values().map(|h| &h.entry))
            .chain(self.dead.values().map(|d| &d.entry))
            .chain(
                self.groups
                    .values()
                    .flat_map(|g| g.parked.values().map(|(e, _)| e)),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, priority: u8) -> Entry<()> {
        Entry {
            id: MessageId(id),
            payload: (),
            attempts: 0,
            priority,
            produced_at: 0,
            group: None,
        }
    }

    fn spec() -> ChannelSpec {
        ChannelSpec::new("t")
            .lease(Duration::from_secs(10))
            .max_attempts(3)
            .backoff(Duration::from_secs(1))
    }

    #[test]
    fn take_follows_priority_then_readiness_order() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        s.insert(entry(1, 0), None, 0, 0);
        s.insert(entry(2, 5), None, 0, 0);
        s.insert(entry(3, 0), None, 0, 0);
        s.insert(entry(4, 5), None, 0, 0);
        let order: Vec<u64> = (0..4)
            .map(|t| s.take(1, t, 0, &mut Vec::new()).unwrap().entry.id.0)
            .collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        assert!(s.take(1, 9, 0, &mut Vec::new()).is_none());
    }

    #[test]
    fn a_lapsed_lease_requeues_at_the_front_and_counts_the_attempt() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        s.insert(entry(1, 0), None, 0, 0);
        s.insert(entry(2, 0), None, 0, 0);
        let h = s.take(1, 7, 0, &mut Vec::new()).unwrap();
        assert_eq!(h.deadline, 10_000);
        let mut changes = Vec::new();
        s.tick(9_999, &mut changes);
        assert!(changes.is_empty());
        s.tick(10_000, &mut changes);
        assert_eq!(
            changes,
            vec![Change::Requeued {
                id: MessageId(1),
                attempts: 1,
                due: 10_000
            }]
        );
        let again = s.take(1, 8, 10_000, &mut Vec::new()).unwrap();
        assert_eq!((again.entry.id.0, again.entry.attempts), (1, 2));
        assert!(matches!(
            s.settle(MessageId(1), 7, Outcome::Ack, 10_000, 0.0),
            Err(QueueError::StaleLease { .. })
        ));
    }

    #[test]
    fn the_last_failed_attempt_dead_letters_with_the_error() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        s.insert(entry(1, 0), None, 0, 0);
        let mut now = 0;
        for attempt in 1..=3u64 {
            let h = s.take(1, attempt, now, &mut Vec::new()).expect("ready");
            let (change, _) = s
                .settle(
                    h.entry.id,
                    attempt,
                    Outcome::Retry {
                        after: None,
                        error: "boom".into(),
                    },
                    now,
                    1.0,
                )
                .unwrap();
            if attempt < 3 {
                let Change::Requeued { due, .. } = change else {
                    panic!("{change:?}")
                };
                assert_eq!(due - now, 1_000 << (attempt - 1));
                now = due;
                s.tick(now, &mut Vec::new());
            } else {
                assert!(
                    matches!(change, Change::Died { attempts: 3, .. }),
                    "{change:?}"
                );
            }
        }
        let dead: Vec<_> = s.dead_letters(10).collect();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].error.starts_with("boom"), "{}", dead[0].error);
    }

    #[test]
    fn capacity_bounds_what_one_consumer_holds() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 2);
        for i in 0..3 {
            s.insert(entry(i, 0), None, 0, 0);
        }
        assert!(s.take(1, 1, 0, &mut Vec::new()).is_some());
        assert!(s.take(1, 2, 0, &mut Vec::new()).is_some());
        assert!(s.take(1, 3, 0, &mut Vec::new()).is_none());
        s.settle(MessageId(0), 1, Outcome::Ack, 0, 0.0).unwrap();
        assert!(s.take(1, 3, 0, &mut Vec::new()).is_some());
    }

    #[test]
    fn a_removed_consumer_gives_its_messages_back_in_order() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        s.add_consumer(2, 10);
        for i in 0..3 {
            s.insert(entry(i, 0), None, 0, 0);
        }
        s.take(1, 1, 0, &mut Vec::new());
        s.take(1, 2, 0, &mut Vec::new());
        assert_eq!(s.remove_consumer(1, 0).len(), 2);
        let order: Vec<u64> = (10..13)
            .map(|t| s.take(2, t, 0, &mut Vec::new()).unwrap().entry.id.0)
            .collect();
        assert_eq!(order, vec![0, 1, 2]);
    }

    #[test]
    fn a_dedup_key_expires_at_the_end_of_its_window() {
        let mut s = ChannelState::<()>::new(spec());
        s.remember(42, MessageId(1), 1_000, 0);
        assert_eq!(s.duplicate_of(42, 999), Some(MessageId(1)));
        assert_eq!(s.duplicate_of(42, 1_000), None);
        s.tick(1_000, &mut Vec::new());
        assert!(s.dedup.is_empty());
    }

    #[test]
    fn a_holder_lost_on_the_last_attempt_dead_letters_the_message() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        s.add_consumer(2, 10);
        s.insert(entry(1, 0), None, 0, 0);
        for attempt in 1..=2u64 {
            s.take(1, attempt, 0, &mut Vec::new()).unwrap();
            let changes = s.remove_consumer(1, 0);
            assert!(
                matches!(changes[..], [Change::Requeued { attempts, .. }] if u64::from(attempts) == attempt)
            );
            s.add_consumer(1, 10);
        }
        s.take(1, 3, 0, &mut Vec::new()).unwrap();
        let changes = s.remove_consumer(1, 5);
        let [
            Change::Died {
                attempts: 3,
                at: 5,
                ref error,
                ..
            },
        ] = changes[..]
        else {
            panic!("{changes:?}")
        };
        assert_eq!(error, "worker lost on attempt 3 of 3");
        assert!(s.take(2, 4, 5, &mut Vec::new()).is_none());
        assert_eq!(s.stats().dead, 1);
    }

    /// Inserts message `id` in group `group` (0: none), ready now.
    fn put(s: &mut ChannelState<()>, id: u64, group: u64) {
        s.insert(entry(id, 0), NonZeroU64::new(group), 0, 0);
    }

    fn take_all(s: &mut ChannelState<()>, token: &mut u64, now: Timestamp) -> Vec<u64> {
        let mut ids = Vec::new();
        loop {
            *token += 1;
            match s.take(1, *token, now, &mut Vec::new()) {
                Some(h) => ids.push(h.entry.id.0),
                None => return ids,
            }
        }
    }

    #[test]
    fn a_group_hands_out_its_oldest_message_only_until_it_leaves() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 100);
        for (id, g) in [(1, 7), (2, 7), (3, 8), (4, 7), (5, 0)] {
            put(&mut s, id, g);
        }
        assert_eq!(s.stats().ready, 5, "parked messages count as ready");
        let mut token = 0;
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1, 3, 5]);
        // A retry keeps the group; its backoff holds the next one back.
        let retry = Outcome::Retry {
            after: None,
            error: "x".into(),
        };
        s.settle(MessageId(1), 1, retry, 0, 0.0).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 0), Vec::<u64>::new());
        s.tick(1_000, &mut Vec::new());
        let again = take_all(&mut s, &mut token, 1_000);
        assert_eq!(again, vec![1]);
        s.settle(MessageId(1), token - 1, Outcome::Ack, 1_000, 0.0)
            .unwrap();
        assert_eq!(take_all(&mut s, &mut token, 1_000), vec![2]);
        // Cancelling the head in flight lets the next in.
        s.cancel(MessageId(2), 1_000).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 1_000), vec![4]);
        s.settle(MessageId(4), token - 1, Outcome::Ack, 1_000, 0.0)
            .unwrap();
        assert!(!s.group_refs.contains_key(&NonZeroU64::new(7).unwrap()));
        assert_eq!(s.groups.len(), 1, "group 8 holds message 3");
    }

    #[test]
    fn a_dead_letter_releases_its_group_and_a_redrive_queues_behind_the_live_head() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 100);
        for id in 1..=3 {
            put(&mut s, id, 7);
        }
        let mut token = 0;
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1]);
        let dead = Outcome::DeadLetter { error: "x".into() };
        s.settle(MessageId(1), 1, dead, 0, 0.0).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 0), vec![2]);
        let held = token - 1;
        s.redrive(None, 0);
        // Redriven, the oldest id waits for the group's message in flight.
        assert_eq!(take_all(&mut s, &mut token, 0), Vec::<u64>::new());
        s.settle(MessageId(2), held, Outcome::Ack, 0, 0.0).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1]);
    }

    #[test]
    fn purging_pending_messages_keeps_the_group_of_one_in_flight() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 100);
        for id in 1..=3 {
            put(&mut s, id, 7);
        }
        let mut token = 0;
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1]);
        let cancelled = s.cancel(MessageId(3), 0).unwrap();
        assert_eq!(cancelled.2, Cancelled::Pending);
        let (changes, _) = s.purge_pending();
        assert_eq!(changes, vec![Change::Purged { id: MessageId(2) }]);
        put(&mut s, 4, 7);
        assert_eq!(take_all(&mut s, &mut token, 0), Vec::<u64>::new());
        s.settle(MessageId(1), 1, Outcome::Ack, 0, 0.0).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 0), vec![4]);
    }

    #[test]
    fn limits_bound_what_leaves_and_rates_turn_with_their_window() {
        let mut s = ChannelState::new(spec().concurrency(2).rate(3, Duration::from_secs(1)));
        s.add_consumer(1, 100);
        for id in 1..=10 {
            s.insert(entry(id, 0), None, 0, 0);
        }
        let mut token = 0;
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1, 2]);
        s.settle(MessageId(1), 1, Outcome::Ack, 0, 0.0).unwrap();
        assert_eq!(take_all(&mut s, &mut token, 10), vec![3]);
        s.settle(MessageId(2), 2, Outcome::Ack, 10, 0.0).unwrap();
        // The window's budget of 3 is spent; the wake-up is its end.
        assert_eq!(take_all(&mut s, &mut token, 20), Vec::<u64>::new());
        assert_eq!(s.next_wakeup(), Some(1_000));
        s.tick(1_000, &mut Vec::new());
        assert_eq!(take_all(&mut s, &mut token, 1_000), vec![4]);
    }

    #[test]
    fn a_group_over_its_rate_waits_for_its_window_without_holding_others() {
        let mut s = ChannelState::new(
            spec()
                .concurrency_per_group(10)
                .rate_per_group(1, Duration::from_secs(1)),
        );
        s.add_consumer(1, 100);
        for (id, g) in [(1, 7), (2, 7), (3, 8), (4, 8)] {
            put(&mut s, id, g);
        }
        let mut token = 0;
        assert_eq!(take_all(&mut s, &mut token, 0), vec![1, 3]);
        assert_eq!(s.next_wakeup(), Some(1_000));
        s.tick(1_000, &mut Vec::new());
        assert_eq!(take_all(&mut s, &mut token, 1_000), vec![2, 4]);
    }

    #[test]
    fn a_ready_message_whose_attempts_are_used_dies_instead_of_being_handed_out() {
        let mut s = ChannelState::new(spec());
        s.add_consumer(1, 10);
        let mut recovered = entry(1, 0);
        recovered.attempts = 3;
        s.restore(recovered, None, 0, None, 0);
        s.insert(entry(2, 0), None, 0, 0);
        let mut changes = Vec::new();
        let held = s.take(1, 9, 7, &mut changes).unwrap();
        assert_eq!(held.entry.id, MessageId(2));
        assert!(
            matches!(&changes[..], [Change::Died { id: MessageId(1), error, .. }, Change::Leased { id: MessageId(2), attempts: 1 }] if error == "worker lost on attempt 3 of 3"),
            "{changes:?}"
        );
    }
}
