//! A channel's state as every client rebuilds it: the engine's [`ChannelState`] fed the
//! channel's commands in stream order. Applying is deterministic (time, ids, tokens and
//! jitter come from the commands and the order), so every client that has applied the same
//! commands holds the same state, and the answer a client computes for its own command is
//! the answer every other client computes.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use queue_core::clock::{Timestamp, millis};
use queue_core::{Cancelled, ChannelSpec, MessageId, Outcome, QueueError, Receipt, limits};

use super::command::{Command, Op};
use crate::engine::{ChannelState, Entry, Held};

/// A payload, held in memory by every replica.
pub type Payload = Arc<[u8]>;

/// Bits of a message id that count the channel's messages; the bits above name the channel.
pub const ID_BITS: u32 = 36;

/// Deliveries one take hands out at most.
pub const TAKE_BATCH: u32 = 256;

/// What applying a command answers its sender.
#[derive(Debug)]
pub enum Answer {
    /// A produce's receipts.
    Receipts(Result<Vec<Receipt>, QueueError>),
    /// How many deliveries a take handed out, and when a take could next find something
    /// when it found nothing.
    Taken {
        count: usize,
        wakeup: Option<Timestamp>,
    },
    /// Each settle's result, in order.
    Settled(Vec<Result<(), QueueError>>),
    /// An extension's new deadline.
    Extended(Result<Timestamp, QueueError>),
    /// A cancel's result.
    Cancelled(Result<Cancelled, QueueError>),
    /// How many messages a redrive or purge changed.
    Count(u64),
    /// Done.
    Done,
    /// Not known: the client caught up from a snapshot that may hold the command.
    Lost,
}

/// Deliveries a take handed to a subscription.
pub type Handed = (u64, Vec<Held<Payload>>);

/// One channel's replica. Serialized whole, it is a snapshot of the channel.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Replica {
    /// The channel's messages and rules.
    pub state: ChannelState<Payload>,
    /// The channel's number, the high bits of its message ids.
    number: u64,
    /// The last message counted.
    counted: u64,
    /// The last fencing token given.
    token: u64,
    /// The time the last command was applied at.
    now: Timestamp,
    /// Bumped by every command that may let a take find something.
    pub version: u64,
}

impl Replica {
    /// The replica as bytes, for a snapshot.
    ///
    /// # Errors
    /// [`QueueError::Encode`].
    pub fn to_snapshot(&self) -> Result<Vec<u8>, QueueError> {
        postcard::to_stdvec(self).map_err(|e| QueueError::Encode(e.to_string()))
    }

    /// A replica from a snapshot.
    ///
    /// # Errors
    /// [`QueueError::Corrupt`].
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, QueueError> {
        postcard::from_bytes(bytes)
            .map_err(|e| QueueError::Corrupt(format!("a channel snapshot: {e}")))
    }
}

impl Replica {
    /// An empty channel with settings `spec`, numbered `number`.
    pub fn new(spec: ChannelSpec, number: u64) -> Self {
        Replica {
            state: ChannelState::new(spec),
            number,
            counted: 0,
            token: 0,
            now: 0,
            version: 0,
        }
    }

    /// The time the last command was applied at.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Whether a take by `consumer` at `now` could hand out anything, judged without
    /// changing the state (time's rules are applied when the take is).
    pub fn could_take(&self, consumer: u64, now: Timestamp) -> bool {
        // Time's rules may free a slot or make messages ready.
        if self.state.next_wakeup().is_some_and(|at| at <= now) {
            return true;
        }
        !self.state.paused()
            && self.state.capacity(consumer) > 0
            && !self.state.at_concurrency_limit()
            && self.state.has_ready()
    }

    /// Applies `command` and returns its answer, with the deliveries a take handed out.
    pub fn apply(&mut self, command: Command) -> (Answer, Option<Handed>) {
        let now = self.now.max(u64::try_from(command.at).unwrap_or(0));
        self.now = now;
        let mut changes = Vec::new();
        self.state.tick(now, &mut changes);
        let mut changed = !changes.is_empty();
        let mut handed = None;
        let answer = match command.op {
            Op::Produce { spec, batch } => {
                changed = true;
                Answer::Receipts(self.produce(spec, batch, now))
            }
            Op::Subscribe {
                spec,
                consumer,
                max_parallel,
            } => {
                if let Ok(spec) = spec.to_spec() {
                    self.state.set_spec(&spec);
                }
                let max = u32::try_from(max_parallel.max(1)).unwrap_or(u32::MAX);
                self.state.add_consumer(consumer as u64, max);
                changed = true;
                Answer::Done
            }
            Op::Unsubscribe { consumer } => {
                self.state.remove_consumer(consumer as u64, now);
                changed = true;
                Answer::Done
            }
            Op::Take { consumer, max } => {
                let consumer = consumer as u64;
                let taken = self.take(consumer, max, now, &mut changes);
                changed |= !taken.is_empty();
                let count = taken.len();
                let wakeup = if count == 0 {
                    self.state.next_wakeup()
                } else {
                    None
                };
                if count > 0 {
                    handed = Some((consumer, taken));
                }
                Answer::Taken { count, wakeup }
            }
            Op::Settle { items, unit } => {
                let unit = if unit.is_finite() {
                    unit.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let results: Vec<Result<(), QueueError>> = items
                    .into_iter()
                    .map(|(lease, outcome)| {
                        let outcome = limits::limit_outcome(Outcome::from(outcome));
                        self.state
                            .settle(
                                MessageId(lease.id as u64),
                                lease.token as u64,
                                outcome,
                                now,
                                unit,
                            )
                            .map(|_| ())
                    })
                    .collect();
                changed |= results.iter().any(Result::is_ok);
                Answer::Settled(results)
            }
            Op::Extend { lease, by_ms } => Answer::Extended(self.state.extend(
                MessageId(lease.id as u64),
                lease.token as u64,
                Duration::from_millis(by_ms.max(0) as u64),
                now,
            )),
            Op::Sync => Answer::Done,
            Op::Cancel { id } => {
                let result = self
                    .state
                    .cancel(MessageId(id as u64), now)
                    .map(|(_, _, where_)| where_);
                changed |= result.is_ok();
                Answer::Cancelled(result)
            }
            Op::Redrive { ids } => {
                let ids = ids.map(|ids| to_ids(&ids));
                let n = self.state.redrive(ids.as_deref(), now).len() as u64;
                changed |= n > 0;
                Answer::Count(n)
            }
            Op::PurgeDead { ids } => {
                let ids = ids.map(|ids| to_ids(&ids));
                let n = self.state.purge_dead(ids.as_deref()).0.len() as u64;
                changed |= n > 0;
                Answer::Count(n)
            }
            Op::Purge => {
                let n = self.state.purge_pending().0.len() as u64;
                changed |= n > 0;
                Answer::Count(n)
            }
            Op::Pause { paused } => {
                self.state.set_paused(paused);
                changed = true;
                Answer::Done
            }
        };
        if changed {
            self.version += 1;
        }
        (answer, handed)
    }

    /// Stores a batch, all of it or none.
    fn produce(
        &mut self,
        spec: crate::broker::protocol::WireSpec,
        batch: Vec<crate::broker::protocol::WireOutgoing>,
        now: Timestamp,
    ) -> Result<Vec<Receipt>, QueueError> {
        let spec = spec.to_spec()?;
        let batch = batch
            .into_iter()
            .map(crate::broker::protocol::WireOutgoing::into_outgoing)
            .collect::<Result<Vec<_>, _>>()?;
        limits::check_batch(&batch)?;
        self.state.set_spec(&spec);
        let expires = now.saturating_add(millis(spec.dedup_window));
        let mut receipts = Vec::with_capacity(batch.len());
        for out in batch {
            let dedup = out.dedup_key.filter(|_| spec.deduplicates());
            if let Some(k) = dedup
                && let Some(original) = self.state.duplicate_of(k, now)
            {
                self.state.count_duplicate();
                receipts.push(Receipt {
                    id: original,
                    duplicate: true,
                });
                continue;
            }
            self.counted += 1;
            let id = MessageId((self.number << ID_BITS) | (self.counted & ((1 << ID_BITS) - 1)));
            if let Some(k) = dedup {
                self.state.remember(k, id, expires, now);
            }
            let entry = Entry {
                id,
                payload: Arc::from(out.payload),
                attempts: 0,
                priority: out.priority,
                produced_at: now,
                group: None,
            };
            let due = now.saturating_add(millis(out.delay));
            self.state
                .insert(entry, out.group.and_then(NonZeroU64::new), due, now);
            receipts.push(Receipt {
                id,
                duplicate: false,
            });
        }
        Ok(receipts)
    }

    /// Leases what `consumer` may take now: at most `max`, and at most its fair share of what
    /// is ready, so that one subscription does not hold back what another could handle.
    fn take(
        &mut self,
        consumer: u64,
        max: i64,
        now: Timestamp,
        changes: &mut Vec<crate::engine::Change>,
    ) -> Vec<Held<Payload>> {
        let max = u32::try_from(max.max(1)).unwrap_or(u32::MAX);
        let room = (self.state.capacity(consumer).min(TAKE_BATCH).min(max) as usize).min(
            self.state
                .ready_len()
                .div_ceil(self.state.consumer_count().max(1))
                .max(1),
        );
        let mut taken = Vec::with_capacity(room);
        while taken.len() < room && self.state.has_ready() {
            self.token += 1;
            match self.state.take(consumer, self.token, now, changes) {
                Some(held) => taken.push(held),
                None => break,
            }
        }
        taken
    }
}

fn to_ids(ids: &[i64]) -> Vec<MessageId> {
    ids.iter().map(|&id| MessageId(id as u64)).collect()
}
