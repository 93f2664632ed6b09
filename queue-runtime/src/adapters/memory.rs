//! `memory://`: the engine with payloads in process memory. Not durable: for tests.
//!
//! `memory://` opens a fresh store; `memory://NAME` opens the store of that name shared by
//! every handle in the process while any handle to it is alive.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use queue_core::clock::{Clock, Timestamp, millis};
use queue_core::{
    Adapter, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, Outcome, Outgoing,
    QueueError, RawDelivery, Receipt, StoredMessage, Subscription,
};

use crate::engine::{Cell, Engine};

/// A payload held in memory.
pub type MemoryPayload = Arc<[u8]>;

/// The in-memory adapter.
#[derive(Debug)]
pub struct MemoryAdapter {
    engine: Arc<Engine<MemoryPayload>>,
}

static NAMED: LazyLock<Mutex<HashMap<String, Weak<MemoryAdapter>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl MemoryAdapter {
    /// A fresh, empty store.
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(MemoryAdapter {
            engine: Arc::new(Engine::new(clock)),
        })
    }

    /// The store named `name` in this process, created if no handle to it is alive.
    pub fn named(name: &str, clock: Arc<dyn Clock>) -> Arc<Self> {
        let mut named = NAMED.lock();
        named.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = named.get(name).and_then(Weak::upgrade) {
            return existing;
        }
        let fresh = Self::new(clock);
        named.insert(name.to_string(), Arc::downgrade(&fresh));
        fresh
    }
}

struct MemorySubscription {
    engine: Arc<Engine<MemoryPayload>>,
    cell: Arc<Cell<MemoryPayload>>,
    channel: Arc<str>,
    consumer: u64,
}

impl Subscription for MemorySubscription {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        let engine = self.engine.clone();
        let cell = self.cell.clone();
        let channel = self.channel.clone();
        let consumer = self.consumer;
        async move {
            let held = engine.take(&cell, consumer, &|_, _| {}).await?;
            Ok(held.to_delivery(&channel, held.entry.payload.to_vec()))
        }
        .boxed()
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.engine.unsubscribe(&self.cell, self.consumer);
    }
}

fn due(now: Timestamp, delay: Duration) -> Timestamp {
    now.saturating_add(millis(delay))
}

impl Adapter for MemoryAdapter {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        async move {
            self.engine.check_open()?;
            let cell = self.engine.channel(spec);
            let now = self.engine.now();
            let mut receipts = Vec::with_capacity(batch.len());
            {
                let mut state = cell.lock();
                state.tick(now);
                for out in batch {
                    let key = out.dedup_key.filter(|_| spec.deduplicates());
                    if let Some(original) = key.and_then(|k| state.duplicate_of(k, now)) {
                        state.count_duplicate();
                        receipts.push(Receipt {
                            id: original,
                            duplicate: true,
                        });
                        continue;
                    }
                    let id = self.engine.next_id();
                    if let Some(key) = key {
                        state.remember(key, id, due(now, spec.dedup_window), 0);
                    }
                    state.insert(
                        entry(id, out.payload, out.priority, now),
                        due(now, out.delay),
                        now,
                    );
                    receipts.push(Receipt {
                        id,
                        duplicate: false,
                    });
                }
            }
            cell.wake();
            Ok(receipts)
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        async move {
            self.engine.check_open()?;
            let cell = self.engine.channel(spec);
            let consumer = self.engine.subscribe(&cell, max_parallel);
            Ok(Box::new(MemorySubscription {
                engine: self.engine.clone(),
                cell,
                channel: Arc::from(spec.name.as_ref()),
                consumer,
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            self.engine.check_open()?;
            self.engine.settle(lease, outcome).map(|_| ())
        }
        .boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        async move {
            self.engine.check_open()?;
            self.engine.extend(lease, by)
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        async move { Ok(self.engine.stats()) }.boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        async move {
            let cell = self.engine.existing(channel)?;
            self.engine.tick(&cell);
            let state = cell.lock();
            Ok(state
                .peek(limit)
                .into_iter()
                .map(|(e, state, due)| StoredMessage {
                    id: e.id,
                    payload: e.payload.to_vec(),
                    state,
                    attempts: e.attempts,
                    priority: e.priority,
                    produced_at: e.produced_at,
                    due,
                })
                .collect())
        }
        .boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        async move {
            let cell = self.engine.existing(channel)?;
            self.engine.tick(&cell);
            let state = cell.lock();
            Ok(state
                .dead_letters(limit)
                .map(|d| DeadLetter {
                    id: d.entry.id,
                    channel: channel.to_string(),
                    payload: d.entry.payload.to_vec(),
                    attempts: d.entry.attempts,
                    error: d.error.clone(),
                    produced_at: d.entry.produced_at,
                    dead_at: d.dead_at,
                })
                .collect())
        }
        .boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            self.engine.check_open()?;
            let cell = self.engine.existing(channel)?;
            let moved = cell.lock().redrive(ids).len() as u64;
            cell.wake();
            Ok(moved)
        }
        .boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            self.engine.check_open()?;
            let cell = self.engine.existing(channel)?;
            let purged = cell.lock().purge_dead(ids).len() as u64;
            Ok(purged)
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            self.engine.close();
            Ok(())
        }
        .boxed()
    }
}

fn entry(
    id: MessageId,
    payload: Vec<u8>,
    priority: u8,
    now: Timestamp,
) -> crate::engine::Entry<MemoryPayload> {
    crate::engine::Entry {
        id,
        payload: Arc::from(payload),
        attempts: 0,
        priority,
        produced_at: now,
    }
}
