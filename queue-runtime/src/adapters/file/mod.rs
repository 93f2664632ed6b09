//! `file://PATH`: the embedded durable store, the default adapter.
//!
//! The queue rules are the engine's; this module keeps them durable. Every state change is
//! encoded as a log record and queued to the group-commit writer while the channel's lock is
//! held, so the log has changes in the order they happened; the caller then waits for the
//! commit. A produce becomes visible only once it is durable. The engine holds, per message,
//! only where its payload is on disk; deliveries read payloads back with `pread`.
//!
//! The file format, commit protocol and recovery are written up in `docs/design.md`.

pub mod format;
mod recovery;
pub mod writer;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use queue_core::clock::{Clock, Timestamp, millis};
use queue_core::{
    Adapter, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, Outcome, Outgoing,
    QueueError, RawDelivery, Receipt, StoredMessage, Subscription,
};

use self::format::{MessageRecord, Record};
use self::writer::{OsStorage, Placed, Shared, Storage, Usage, Writer, WriterConfig, segment_path};
use crate::engine::{Cell, Change, Engine, Entry};

/// Where a payload is: segment, byte offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The segment number.
    pub segment: u32,
    /// The payload's offset in the segment.
    pub offset: u32,
    /// The payload's length.
    pub len: u32,
}

/// Settings of the embedded store.
#[derive(Clone)]
pub struct FileOptions {
    /// Roll to a new segment past this size (default 64 MiB).
    pub segment_size: u64,
    /// The file calls; replace to inject failures.
    pub storage: Arc<dyn Storage>,
    /// Reclaim acked space in the background (default on).
    pub background_compaction: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            segment_size: 64 << 20,
            storage: Arc::new(OsStorage),
            background_compaction: true,
        }
    }
}

impl std::fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOptions")
            .field("segment_size", &self.segment_size)
            .field("background_compaction", &self.background_compaction)
            .finish_non_exhaustive()
    }
}

/// What opening found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records replayed.
    pub records: u64,
    /// Messages pending or dead after recovery.
    pub messages: u64,
    /// Bytes cut from a torn tail.
    pub truncated: u64,
    /// Segments on disk.
    pub segments: u64,
}

/// The embedded durable store.
pub struct FileAdapter {
    dir: PathBuf,
    engine: Arc<Engine<Loc>>,
    writer: Writer,
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    compacting: tokio::sync::Mutex<()>,
    /// Live messages per sealed segment at the last [`FileAdapter::compact_settled`].
    seen_live: parking_lot::Mutex<BTreeMap<u64, u64>>,
    /// Produce keys within their window.
    produced: parking_lot::Mutex<ProducedKeys>,
    report: OpenReport,
    me: Weak<FileAdapter>,
    lock: parking_lot::Mutex<Option<File>>,
}

impl std::fmt::Debug for FileAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileAdapter")
            .field("dir", &self.dir)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

fn spec_named(name: &str) -> ChannelSpec {
    ChannelSpec {
        name: Cow::Owned(name.to_string()),
        ..ChannelSpec::new("")
    }
}

fn due_at(now: Timestamp, delay: Duration) -> Timestamp {
    now.saturating_add(millis(delay))
}

/// Produce keys kept at most; beyond it the oldest are forgotten first.
const MAX_PRODUCE_KEYS: usize = 1_000_000;

/// Produce keys within their window, with the segment holding each one's record.
struct ProducedKeys {
    /// Keys kept at most.
    cap: usize,
    by_key: HashMap<String, ProducedKey>,
    /// `(expires, key)` in insertion order, for forgetting expired keys.
    order: std::collections::VecDeque<(Timestamp, String)>,
}

struct ProducedKey {
    receipts: Vec<Receipt>,
    expires: Timestamp,
    home: u64,
}

impl ProducedKeys {
    fn new(cap: usize) -> Self {
        ProducedKeys {
            cap,
            by_key: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }

    fn get(&self, key: &str, now: Timestamp) -> Option<Vec<Receipt>> {
        self.by_key
            .get(key)
            .filter(|p| p.expires > now)
            .map(|p| p.receipts.clone())
    }

    fn insert(
        &mut self,
        key: String,
        receipts: Vec<Receipt>,
        expires: Timestamp,
        home: u64,
        now: Timestamp,
    ) {
        while let Some((at, _)) = self.order.front() {
            if *at > now && self.by_key.len() < self.cap {
                break;
            }
            let (at, old) = self.order.pop_front().expect("checked");
            if self.by_key.get(&old).is_some_and(|p| p.expires == at) {
                self.by_key.remove(&old);
            }
        }
        if expires <= now {
            return;
        }
        self.order.push_back((expires, key.clone()));
        self.by_key.insert(
            key,
            ProducedKey {
                receipts,
                expires,
                home,
            },
        );
    }
}

impl FileAdapter {
    /// Opens (creating if needed) the store in `dir`, recovering what is on disk.
    ///
    /// # Errors
    /// [`QueueError::Io`] when the directory cannot be used or another process has it open;
    /// [`QueueError::Corrupt`] for damage that is not a torn tail.
    pub fn open(
        dir: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
        options: FileOptions,
    ) -> Result<Arc<Self>, QueueError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(QueueError::Io(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "the store at {} is in use by another process",
                        dir.display()
                    ),
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let storage = options.storage.clone();
        let segment_size = options.segment_size.max(4096);
        recovery::remove_prepared(&dir)?;
        let state = recovery::recover(&dir, &*storage)?;
        let engine = Arc::new(Engine::new(clock));
        let now = engine.now();

        let (active, active_len) = match state.segments.last() {
            Some(&(n, len)) => (n, len),
            None => {
                let f = writer::prepare_segment(&dir, 1, segment_size, &*storage)?;
                let commit = Record::Commit {
                    next_id: state.next_id,
                    epoch: state.epoch + 1,
                };
                let len = writer::install_segment(&dir, 1, &f, &commit, &*storage)?;
                (1, len)
            }
        };
        let epoch = state.epoch + 1;
        let shared = writer::shared(state.next_id, epoch, active);
        engine.bump_counters(state.next_id, epoch << 40);
        {
            let mut segments = shared.segments.write();
            for &(n, _) in &state.segments {
                segments.insert(n, Arc::new(File::open(segment_path(&dir, n))?));
            }
            if state.segments.is_empty() {
                segments.insert(active, Arc::new(File::open(segment_path(&dir, active))?));
            }
        }

        let cells: Vec<Arc<Cell<Loc>>> = state
            .channels
            .iter()
            .map(|c| engine.channel(&spec_named(c)))
            .collect();
        let mut ids: Vec<u64> = state.messages.keys().copied().collect();
        ids.sort_unstable();
        let mut usage: HashMap<u64, Usage> = HashMap::new();
        for (&seg, &written) in &state.written {
            usage.entry(seg).or_default().written = written;
        }
        for id in ids {
            let m = &state.messages[&id];
            usage.entry(m.segment).or_default().live += 1;
            let entry = Entry {
                id: MessageId(id),
                payload: Loc {
                    segment: m.segment as u32,
                    offset: m.offset as u32,
                    len: m.len,
                },
                attempts: m.attempts,
                priority: m.priority,
                produced_at: m.produced_at,
            };
            cells[m.channel]
                .lock()
                .restore(entry, m.due, m.dead.clone(), now);
        }
        for d in state.dedup.values() {
            if d.expires > now {
                cells[d.channel]
                    .lock()
                    .remember(d.key, MessageId(d.id), d.expires, d.home as u32);
            }
        }
        shared.usage.lock().extend(usage);
        let mut produced = ProducedKeys::new(MAX_PRODUCE_KEYS);
        let mut keys: Vec<_> = state.produced.into_iter().collect();
        keys.sort_by_key(|(_, p)| p.expires);
        for (key, p) in keys {
            let receipts = p
                .receipts
                .iter()
                .map(|&(id, duplicate)| Receipt {
                    id: MessageId(id),
                    duplicate,
                })
                .collect();
            produced.insert(key, receipts, p.expires, p.home, now);
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(&dir, active))?;
        let writer = Writer::start(
            WriterConfig {
                dir: dir.clone(),
                file,
                len: active_len,
                segment: active,
                segment_size,
                storage: storage.clone(),
            },
            shared.clone(),
        )?;
        let report = OpenReport {
            records: state.records,
            messages: state.messages.len() as u64,
            truncated: state.truncated,
            segments: state.segments.len().max(1) as u64,
        };
        tracing::info!(dir = %dir.display(), records = report.records, messages = report.messages, truncated = report.truncated, "opened store");
        let adapter = Arc::new_cyclic(|me| FileAdapter {
            dir,
            engine,
            writer,
            shared,
            storage,
            compacting: tokio::sync::Mutex::new(()),
            seen_live: parking_lot::Mutex::default(),
            produced: parking_lot::Mutex::new(produced),
            report,
            me: me.clone(),
            lock: parking_lot::Mutex::new(Some(lock)),
        });
        if options.background_compaction
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(compact_in_background(Arc::downgrade(&adapter)));
        }
        Ok(adapter)
    }

    /// What opening found.
    pub fn open_report(&self) -> OpenReport {
        self.report
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Group commits made since open.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Segment numbers on disk now.
    pub fn segments(&self) -> Vec<u64> {
        self.shared.segments.read().keys().copied().collect()
    }

    /// Per segment: `(number, message records written, messages still stored)`.
    pub fn usage(&self) -> Vec<(u64, u64, u64)> {
        self.shared
            .usage
            .lock()
            .iter()
            .map(|(s, u)| (*s, u.written, u.live))
            .collect()
    }

    fn check(&self) -> Result<(), QueueError> {
        self.engine.check_open()?;
        self.shared.check()
    }

    fn read(&self, loc: Loc) -> Result<Vec<u8>, QueueError> {
        let file = self
            .shared
            .segments
            .read()
            .get(&u64::from(loc.segment))
            .cloned()
            .ok_or_else(|| {
                QueueError::Corrupt(format!(
                    "payload points into segment {} which is gone",
                    loc.segment
                ))
            })?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, u64::from(loc.offset))?;
        Ok(buf)
    }

    fn forget_live(&self, locs: impl IntoIterator<Item = Loc>) {
        let mut usage = self.shared.usage.lock();
        for loc in locs {
            if let Some(u) = usage.get_mut(&u64::from(loc.segment)) {
                u.live = u.live.saturating_sub(1);
            }
        }
    }

    /// Applies time rules to a channel and records what they changed.
    fn tick(&self, cell: &Cell<Loc>) {
        let now = self.engine.now();
        let mut state = cell.lock();
        let changes = state.tick(now);
        if !changes.is_empty() {
            let mut buf = Vec::new();
            encode_changes(&changes, &mut buf, now);
            self.writer.submit_quiet(buf);
            drop(state);
            cell.wake();
        }
    }

    /// Reclaims space: rewrites the live messages of mostly-acked old segments into the
    /// active one, then deletes every old segment that holds nothing live.
    ///
    /// # Errors
    /// Write errors; the store is poisoned by them.
    pub async fn compact(&self) -> Result<u64, QueueError> {
        self.compact_where(|_, _| true).await
    }

    /// Like [`FileAdapter::compact`], but relocates a segment only once its live messages
    /// are as many as at the previous call: a segment consumers are still draining is left
    /// alone, since rewriting messages about to be acked only adds writes. The background
    /// compaction runs this.
    ///
    /// # Errors
    /// Write errors; the store is poisoned by them.
    pub async fn compact_settled(&self) -> Result<u64, QueueError> {
        let seen = self.seen_live.lock().clone();
        let deleted = self
            .compact_where(|seg, live| seen.get(&seg) == Some(&live))
            .await;
        *self.seen_live.lock() = self
            .shared
            .usage
            .lock()
            .iter()
            .map(|(s, u)| (*s, u.live))
            .collect();
        deleted
    }

    async fn compact_where(&self, settled: impl Fn(u64, u64) -> bool) -> Result<u64, QueueError> {
        let _guard = self.compacting.lock().await;
        self.check()?;
        let active = self.shared.active.load(Ordering::Acquire);
        let sealed: Vec<(u64, Usage)> = self
            .shared
            .usage
            .lock()
            .iter()
            .filter(|(s, _)| **s < active)
            .map(|(s, u)| (*s, *u))
            .collect();
        let on_disk = self.segments();
        // Relocate the oldest segments while they are mostly dead.
        for &seg in on_disk.iter().take_while(|s| **s < active) {
            let u = sealed
                .iter()
                .find(|(s, _)| *s == seg)
                .map(|(_, u)| *u)
                .unwrap_or_default();
            if u.live == 0 {
                continue;
            }
            if u.live * 4 > u.written.max(1) || !settled(seg, u.live) {
                break;
            }
            self.relocate(seg).await?;
        }
        // Delete the prefix of sealed segments with nothing live.
        let usage = self.shared.usage.lock().clone();
        let doomed: Vec<u64> = on_disk
            .iter()
            .copied()
            .take_while(|s| *s < active && usage.get(s).is_none_or(|u| u.live == 0))
            .collect();
        let Some(&last) = doomed.last() else {
            return Ok(0);
        };
        self.rehome_dedup(last + 1).await?;
        self.rehome_produced(last + 1).await?;
        for seg in &doomed {
            self.shared.segments.write().remove(seg);
            self.shared.usage.lock().remove(seg);
            fs::remove_file(segment_path(&self.dir, *seg))?;
        }
        self.storage.sync_dir(&self.dir)?;
        tracing::debug!(segments = doomed.len(), "compaction deleted segments");
        Ok(doomed.len() as u64)
    }

    async fn relocate(&self, seg: u64) -> Result<(), QueueError> {
        let seg32 = seg as u32;
        for cell in self.engine.all() {
            // Payloads are read without the channel lock, so producers and consumers of the
            // channel are not held up by the reads.
            let located: Vec<(MessageId, Loc)> = cell
                .lock()
                .live_entries()
                .filter(|e| e.payload.segment == seg32)
                .map(|e| (e.id, e.payload))
                .collect();
            if located.is_empty() {
                continue;
            }
            let mut payloads = HashMap::with_capacity(located.len());
            for (id, loc) in located {
                payloads.insert(id, (loc, self.read(loc)?));
            }
            // Under the lock again: the message records take each message's state now, and
            // are submitted before any later change to those messages can be logged.
            let mut buf = Vec::new();
            let mut moved: Vec<(MessageId, Loc, usize)> = Vec::new();
            let pending = {
                let mut state = cell.lock();
                let channel = state.spec().name.to_string();
                state.relocate(
                    |e| {
                        payloads
                            .get(&e.id)
                            .is_some_and(|(loc, _)| *loc == e.payload)
                    },
                    |e, due, dead| {
                        let at = buf.len();
                        let rel = format::encode(
                            &Record::Message(MessageRecord {
                                channel: &channel,
                                id: e.id.0,
                                produced_at: e.produced_at,
                                due,
                                priority: e.priority,
                                attempts: e.attempts,
                                // Dedup entries are rewritten on their own.
                                dedup: None,
                                dead,
                                payload: &payloads[&e.id].1,
                            }),
                            &mut buf,
                        )
                        .expect("message records have payloads");
                        moved.push((e.id, e.payload, at + rel));
                        e.payload
                    },
                );
                if moved.is_empty() {
                    continue;
                }
                self.writer.submit(buf, moved.len() as u64)
            };
            let placed = Writer::wait(pending).await?;
            let new: HashMap<MessageId, (Loc, Loc)> = moved
                .iter()
                .map(|(id, old, at)| {
                    let loc = Loc {
                        segment: placed.segment as u32,
                        offset: (placed.offset + *at as u64) as u32,
                        len: old.len,
                    };
                    (*id, (*old, loc))
                })
                .collect();
            let mut updated = HashSet::with_capacity(new.len());
            cell.lock().relocate(
                |e| new.get(&e.id).is_some_and(|(old, _)| *old == e.payload),
                |e, _, _| {
                    updated.insert(e.id);
                    new[&e.id].1
                },
            );
            // Old copies of moved messages are dead; new copies of messages that went away
            // meanwhile are dead too.
            let gone: Vec<Loc> = new
                .iter()
                .filter(|(id, _)| !updated.contains(id))
                .map(|(_, (_, n))| *n)
                .collect();
            self.forget_live(updated.iter().map(|id| new[id].0).chain(gone));
        }
        Ok(())
    }

    /// Stores a batch; with a key, the key's record goes in the same commit.
    async fn produce_with(
        &self,
        spec: &ChannelSpec,
        batch: Vec<Outgoing>,
        key: Option<(&str, Duration)>,
    ) -> Result<Vec<Receipt>, QueueError> {
        self.check()?;
        let cell = self.engine.channel(spec);
        let now = self.engine.now();
        if let Some((key, _)) = key
            && let Some(receipts) = self.produced.lock().get(key, now)
        {
            return Ok(receipts);
        }
        let home = self.shared.active.load(Ordering::Acquire) as u32;
        let mut receipts = Vec::with_capacity(batch.len());
        let mut planned = Vec::with_capacity(batch.len());
        let mut buf = Vec::with_capacity(batch.iter().map(|o| o.payload.len() + 64).sum());
        {
            let mut state = cell.lock();
            for out in &batch {
                let dedup = out.dedup_key.filter(|_| spec.deduplicates());
                if let Some(key) = dedup
                    && let Some(original) = state.duplicate_of(key, now)
                {
                    state.count_duplicate();
                    receipts.push(Receipt {
                        id: original,
                        duplicate: true,
                    });
                    continue;
                }
                let id = self.engine.next_id();
                let expires = due_at(now, spec.dedup_window);
                if let Some(key) = dedup {
                    state.remember(key, id, expires, home);
                }
                let at = buf.len();
                let rel = format::encode(
                    &Record::Message(MessageRecord {
                        channel: &spec.name,
                        id: id.0,
                        produced_at: now,
                        due: due_at(now, out.delay),
                        priority: out.priority,
                        attempts: 0,
                        dedup: dedup.map(|k| (k, expires)),
                        dead: None,
                        payload: &out.payload,
                    }),
                    &mut buf,
                )
                .expect("message records have payloads");
                receipts.push(Receipt {
                    id,
                    duplicate: false,
                });
                planned.push(Planned {
                    id,
                    payload_at: at + rel,
                    len: out.payload.len() as u32,
                    priority: out.priority,
                    delay: out.delay,
                    dedup_key: dedup,
                });
            }
        }
        if let Some(last) = planned.last() {
            self.shared
                .next_id
                .fetch_max(last.id.0 + 1, Ordering::AcqRel);
        }
        // The key with the end of its window.
        let key = key.map(|(key, window)| (key, due_at(now, window)));
        if let Some((key, expires)) = key {
            format::encode(
                &Record::Produced {
                    key,
                    expires,
                    receipts: receipts.iter().map(|r| (r.id.0, r.duplicate)).collect(),
                },
                &mut buf,
            );
        }
        // Duplicates wait for a commit too, so that their original is durable.
        let pending = self.writer.submit(buf, planned.len() as u64);
        let placed: Placed = match Writer::wait(pending).await {
            Ok(p) => p,
            Err(e) => {
                let mut state = cell.lock();
                for p in &planned {
                    if let Some(key) = p.dedup_key {
                        state.forget(key, p.id);
                    }
                }
                return Err(e);
            }
        };
        if !planned.is_empty() {
            // Produce time and due time as the log has them; readiness against the clock now.
            let current = self.engine.now();
            let mut state = cell.lock();
            for p in planned {
                let entry = Entry {
                    id: p.id,
                    payload: Loc {
                        segment: placed.segment as u32,
                        offset: (placed.offset + p.payload_at as u64) as u32,
                        len: p.len,
                    },
                    attempts: 0,
                    priority: p.priority,
                    produced_at: now,
                };
                let due = due_at(now, p.delay);
                state.insert(entry, due, current);
            }
            drop(state);
            cell.wake();
        }
        if let Some((key, expires)) = key {
            self.produced.lock().insert(
                key.to_string(),
                receipts.clone(),
                expires,
                placed.segment,
                self.engine.now(),
            );
        }
        Ok(receipts)
    }

    /// Rewrites the unexpired produce keys whose record is in a segment below `below`.
    async fn rehome_produced(&self, below: u64) -> Result<(), QueueError> {
        let now = self.engine.now();
        let mut buf = Vec::new();
        let mut moved = Vec::new();
        {
            let produced = self.produced.lock();
            for (key, p) in &produced.by_key {
                if p.home < below && p.expires > now {
                    format::encode(
                        &Record::Produced {
                            key,
                            expires: p.expires,
                            receipts: p.receipts.iter().map(|r| (r.id.0, r.duplicate)).collect(),
                        },
                        &mut buf,
                    );
                    moved.push(key.clone());
                }
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        let placed = Writer::wait(self.writer.submit(buf, 0)).await?;
        let mut produced = self.produced.lock();
        for key in moved {
            if let Some(p) = produced.by_key.get_mut(&key) {
                p.home = placed.segment;
            }
        }
        Ok(())
    }

    async fn rehome_dedup(&self, below: u64) -> Result<(), QueueError> {
        let active = self.shared.active.load(Ordering::Acquire);
        let now = self.engine.now();
        for cell in self.engine.all() {
            let pending = {
                let mut state = cell.lock();
                let moved = state.rehome_dedup(below as u32, active as u32, now);
                if moved.is_empty() {
                    continue;
                }
                let channel = state.spec().name.to_string();
                let mut buf = Vec::new();
                for (key, id, expires) in moved {
                    format::encode(
                        &Record::Dedup {
                            channel: &channel,
                            key,
                            id: id.0,
                            expires,
                        },
                        &mut buf,
                    );
                }
                self.writer.submit(buf, 0)
            };
            Writer::wait(pending).await?;
        }
        Ok(())
    }
}

fn encode_changes(changes: &[Change], buf: &mut Vec<u8>, now: Timestamp) {
    for c in changes {
        let record = match c {
            Change::Requeued { id, attempts, due } => Record::Requeue {
                id: id.0,
                attempts: *attempts,
                due: *due,
            },
            Change::Died {
                id,
                attempts,
                error,
            } => Record::Dead {
                id: id.0,
                attempts: *attempts,
                dead_at: now,
                error,
            },
            Change::Acked { id } => Record::Ack { id: id.0 },
        };
        format::encode(&record, buf);
    }
}

async fn compact_in_background(adapter: Weak<FileAdapter>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(adapter) = adapter.upgrade() else {
            return;
        };
        if adapter.check().is_err() {
            return;
        }
        if let Err(e) = adapter.compact_settled().await {
            tracing::warn!(error = %e, "compaction failed");
        }
    }
}

struct FileSubscription {
    adapter: Arc<FileAdapter>,
    cell: Arc<Cell<Loc>>,
    channel: Arc<str>,
    consumer: u64,
}

impl Subscription for FileSubscription {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        let adapter = self.adapter.clone();
        let cell = self.cell.clone();
        let channel = self.channel.clone();
        let consumer = self.consumer;
        async move {
            adapter.shared.check()?;
            let now_writer = &adapter.writer;
            let engine = adapter.engine.clone();
            let held = engine
                .take(&cell, consumer, &|changes, held| {
                    let now = engine.now();
                    let mut buf = Vec::new();
                    encode_changes(changes, &mut buf, now);
                    if let Some(h) = held {
                        format::encode(
                            &Record::Lease {
                                id: h.entry.id.0,
                                attempts: h.entry.attempts,
                            },
                            &mut buf,
                        );
                    }
                    now_writer.submit_quiet(buf);
                })
                .await?;
            Ok(held.to_delivery(&channel, adapter.read(held.entry.payload)?))
        }
        .boxed()
    }
}

impl Drop for FileSubscription {
    fn drop(&mut self) {
        let changes = self.adapter.engine.unsubscribe(&self.cell, self.consumer);
        if !changes.is_empty() {
            let mut buf = Vec::new();
            encode_changes(&changes, &mut buf, self.adapter.engine.now());
            self.adapter.writer.submit_quiet(buf);
        }
    }
}

/// A produce that passed the dedup check and got an id.
struct Planned {
    id: MessageId,
    payload_at: usize,
    len: u32,
    priority: u8,
    delay: Duration,
    dedup_key: Option<u64>,
}

impl Adapter for FileAdapter {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        self.produce_with(spec, batch, None).boxed()
    }

    fn produce_keyed<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
        key: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        self.produce_with(spec, batch, Some((key, window))).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        async move {
            self.check()?;
            let this = self.me.upgrade().ok_or(QueueError::Closed)?;
            let cell = self.engine.channel(spec);
            let consumer = self.engine.subscribe(&cell, max_parallel);
            Ok(Box::new(FileSubscription {
                adapter: this,
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
            self.check()?;
            let cell = self
                .engine
                .existing(&lease.channel)
                .map_err(|_| QueueError::StaleLease { id: lease.id })?;
            let now = self.engine.now();
            let (pending, freed) = {
                let mut state = cell.lock();
                let mut changes = state.tick(now);
                let (change, freed) =
                    state.settle(lease.id, lease.token, outcome, now, fastrand::f64())?;
                changes.push(change);
                let mut buf = Vec::new();
                encode_changes(&changes, &mut buf, now);
                (self.writer.submit(buf, 0), freed)
            };
            cell.wake();
            self.forget_live(freed);
            Writer::wait(pending).await.map(|_| ())
        }
        .boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        async move {
            self.check()?;
            self.engine.extend(lease, by)
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        async move {
            Ok(self
                .engine
                .all()
                .iter()
                .map(|cell| {
                    self.tick(cell);
                    cell.lock().stats()
                })
                .collect())
        }
        .boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        async move {
            let cell = self.engine.existing(channel)?;
            self.tick(&cell);
            let listed: Vec<(Entry<Loc>, queue_core::MessageState, Timestamp)> = cell
                .lock()
                .peek(limit)
                .into_iter()
                .map(|(e, s, d)| (e.clone(), s, d))
                .collect();
            listed
                .into_iter()
                .map(|(e, state, due)| {
                    Ok(StoredMessage {
                        id: e.id,
                        payload: self.read(e.payload)?,
                        state,
                        attempts: e.attempts,
                        priority: e.priority,
                        produced_at: e.produced_at,
                        due,
                    })
                })
                .collect()
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
            self.tick(&cell);
            let listed: Vec<(Entry<Loc>, String, Timestamp)> = cell
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
                        payload: self.read(e.payload)?,
                        attempts: e.attempts,
                        error,
                        produced_at: e.produced_at,
                        dead_at,
                    })
                })
                .collect()
        }
        .boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            self.check()?;
            let cell = self.engine.existing(channel)?;
            let (pending, n) = {
                let mut state = cell.lock();
                let moved = state.redrive(ids);
                let mut buf = Vec::new();
                for id in &moved {
                    format::encode(&Record::Redrive { id: id.0 }, &mut buf);
                }
                (self.writer.submit(buf, 0), moved.len() as u64)
            };
            cell.wake();
            Writer::wait(pending).await?;
            Ok(n)
        }
        .boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            self.check()?;
            let cell = self.engine.existing(channel)?;
            let (pending, purged) = {
                let mut state = cell.lock();
                let purged = state.purge_dead(ids);
                let mut buf = Vec::new();
                for (id, _) in &purged {
                    format::encode(&Record::Purge { id: id.0 }, &mut buf);
                }
                (self.writer.submit(buf, 0), purged)
            };
            self.forget_live(purged.iter().map(|(_, loc)| *loc));
            Writer::wait(pending).await?;
            Ok(purged.len() as u64)
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            self.engine.close();
            self.writer.shutdown();
            // Another process may open the directory now.
            self.lock.lock().take();
            self.shared.check()
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(id: u64) -> Vec<Receipt> {
        vec![Receipt {
            id: MessageId(id),
            duplicate: false,
        }]
    }

    #[test]
    fn produce_keys_are_forgotten_after_their_window_or_beyond_the_cap() {
        let mut keys = ProducedKeys::new(3);
        keys.insert("a".into(), receipt(1), 100, 1, 0);
        keys.insert("b".into(), receipt(2), 200, 1, 0);
        assert_eq!(keys.get("a", 99), Some(receipt(1)));
        assert_eq!(keys.get("a", 100), None, "expired");
        keys.insert("c".into(), receipt(3), 300, 1, 150);
        assert!(!keys.by_key.contains_key("a"), "expired keys are dropped");
        keys.insert("d".into(), receipt(4), 400, 1, 150);
        keys.insert("e".into(), receipt(5), 500, 1, 150);
        assert_eq!(keys.by_key.len(), 3);
        assert_eq!(keys.get("b", 150), None, "the oldest goes beyond the cap");
        assert_eq!(keys.get("e", 150), Some(receipt(5)));
        keys.insert("f".into(), receipt(6), 10, 1, 150);
        assert_eq!(keys.get("f", 0), None, "born expired");
    }
}
