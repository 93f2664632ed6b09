//! `memory://`: the engine with payloads in process memory. Not durable: for tests.
//!
//! `memory://` opens a fresh store; `memory://NAME` opens the store of that name shared by
//! every handle in the process while any handle to it is alive.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;
use queue_core::QueueError;
use queue_core::clock::Clock;

use crate::engine::{Engine, Event, Gone, Journal, Then, Unrun};

/// A payload held in memory.
pub type MemoryPayload = Arc<[u8]>;

/// The journal of the in-memory store: keeps payloads, records nothing.
#[derive(Debug, Default)]
pub struct MemoryJournal;

impl Journal for MemoryJournal {
    type Payload = MemoryPayload;

    fn append<T: Then<MemoryPayload>>(
        &self,
        events: &[Event<'_>],
        _gone: Gone<MemoryPayload>,
        then: T,
    ) -> Unrun<T, MemoryPayload> {
        let payloads = events
            .iter()
            .filter_map(|e| match e {
                Event::Produced(p) => Some(Arc::from(p.payload)),
                _ => None,
            })
            .collect();
        Some((then, Ok(payloads)))
    }

    fn read(&self, payload: &MemoryPayload) -> Result<Vec<u8>, QueueError> {
        Ok(payload.to_vec())
    }
}

/// The in-memory adapter: the engine with [`MemoryJournal`].
pub type MemoryAdapter = Engine<MemoryJournal>;

static NAMED: LazyLock<Mutex<HashMap<String, Weak<MemoryAdapter>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Engine<MemoryJournal> {
    /// A fresh, empty in-memory store.
    pub fn in_memory(clock: Arc<dyn Clock>) -> Arc<Self> {
        Engine::new(clock, MemoryJournal, 1, 1)
    }

    /// The in-memory store named `name` in this process, created if no handle to it is alive.
    pub fn named(name: &str, clock: Arc<dyn Clock>) -> Arc<Self> {
        let mut named = NAMED.lock();
        named.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = named.get(name).and_then(Weak::upgrade) {
            return existing;
        }
        let fresh = Self::in_memory(clock);
        named.insert(name.to_string(), Arc::downgrade(&fresh));
        fresh
    }
}
