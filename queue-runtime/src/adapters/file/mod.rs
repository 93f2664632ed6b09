//! `file://PATH`: the embedded durable store, the default adapter.
//!
//! The queue rules are the engine's; this module is its journal: every change the engine
//! reports is encoded as a log record and queued to the group-commit writer under the
//! channel's lock, so the log has the changes in the order they happened. A produce becomes
//! visible, and a delivery is handed out, only once its record is durable. The engine holds,
//! per message, only where its payload is on disk; deliveries read payloads back with `pread`.
//!
//! The file format, commit protocol and recovery are written up in `docs/design.md`.

mod counters;
pub mod format;
mod paused;
mod recovery;
mod sidecar;
pub mod writer;

pub use recovery::{Damage, Finding, check};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use queue_core::clock::Clock;
use queue_core::{MessageId, QueueError, Receipt};
use smallvec::SmallVec;

use self::format::{MessageRecord, Record};
use self::writer::{
    Class, OsStorage, Placed, Shared, Storage, Usage, Writer, WriterConfig, segment_path,
};
use crate::engine::{Change, Engine, Entry, Event, Gone, Journal, Tally, Then, Unrun};

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

/// The largest `segment_size`. A segment grows past it by one group commit at most (4 MiB of
/// queued writes plus one append: a produce of at most `queue_core::limits::MAX_BATCH_BYTES`,
/// or the relocated messages of a segment that is at most a quarter live), so every offset
/// in it fits the 32-bit offsets of [`Loc`].
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// Settings of the embedded store.
#[derive(Clone)]
pub struct FileOptions {
    /// Roll to a new segment past this size (default 64 MiB, at most [`MAX_SEGMENT_SIZE`]).
    pub segment_size: u64,
    /// The file calls; replace to inject failures.
    pub storage: Arc<dyn Storage>,
    /// Reclaim acked space in the background (default on).
    pub background_compaction: bool,
    /// Let a producer on a multi-threaded runtime write and sync its commit on its own thread
    /// when the log is idle, rather than hand it to the writer thread (default on). Its call
    /// then blocks for that sync, and on a disk that hangs it waits the hang out (its timeout
    /// cannot fire meanwhile); the writer thread takes over once a sync has been slow.
    pub lead_commits: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            segment_size: 64 << 20,
            storage: Arc::new(OsStorage),
            background_compaction: true,
            lead_commits: true,
        }
    }
}

impl std::fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOptions")
            .field("segment_size", &self.segment_size)
            .field("background_compaction", &self.background_compaction)
            .field("lead_commits", &self.lead_commits)
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

/// A key whose record lives in a segment: rewritten forward when the segment is deleted
/// while its window lasts.
#[derive(Debug, Clone)]
enum KeyHome {
    Dedup { channel: Arc<str>, key: u64 },
    Produce(String),
}

/// Bytes a message record takes beside its payload, about: for compaction's estimates.
const RECORD_OVERHEAD: u64 = 64;

/// The embedded store's journal: the log.
pub struct FileJournal {
    dir: PathBuf,
    segment_size: u64,
    writer: Writer,
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    /// Keys written into each segment.
    key_homes: Arc<Mutex<BTreeMap<u64, Vec<KeyHome>>>>,
    compacting: tokio::sync::Mutex<()>,
    /// Live messages per sealed segment at the last [`FileAdapter::compact_settled`].
    seen_live: Mutex<BTreeMap<u64, u64>>,
    report: OpenReport,
    lock: Mutex<Option<File>>,
    /// When the counters began counting, and what was last saved of them.
    counted: Mutex<Counted>,
}

#[derive(Debug)]
struct Counted {
    kept: counters::Kept,
    /// Saved for the last time.
    closed: bool,
}

impl std::fmt::Debug for FileJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileJournal")
            .field("dir", &self.dir)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// The embedded durable store: the engine with the log as its journal.
pub type FileAdapter = Engine<FileJournal>;

fn encode_change(change: &Change, buf: &mut Vec<u8>) {
    let record = match change {
        Change::Leased { id, attempts } => Record::Lease {
            id: id.0,
            attempts: *attempts,
        },
        Change::Requeued { id, attempts, due } => Record::Requeue {
            id: id.0,
            attempts: *attempts,
            due: *due,
        },
        Change::Died {
            id,
            attempts,
            at,
            error,
        } => Record::Dead {
            id: id.0,
            attempts: *attempts,
            dead_at: *at,
            error,
        },
        Change::Acked { id } => Record::Ack { id: id.0 },
        Change::Redriven { id } => Record::Redrive { id: id.0 },
        Change::Purged { id } => Record::Purge { id: id.0 },
    };
    format::encode(&record, buf);
}

impl Journal for FileJournal {
    type Payload = Loc;

    fn append<T: Then<Loc>>(
        &self,
        events: &[Event<'_>],
        gone: Gone<Loc>,
        then: T,
    ) -> Unrun<T, Loc> {
        let size: usize = events
            .iter()
            .map(|e| match e {
                Event::Produced(p) => p.payload.len() + p.channel.len() + 64,
                _ => 32,
            })
            .sum();
        let mut buf = Vec::with_capacity(size);
        // Per produced message: where its payload starts in `buf`, and its length.
        let mut payloads: SmallVec<[(usize, u32); 4]> = SmallVec::new();
        let mut homes: Vec<KeyHome> = Vec::new();
        for event in events {
            match event {
                Event::Produced(p) => {
                    let at = buf.len();
                    let rel = format::encode(
                        &Record::Message(MessageRecord {
                            channel: p.channel,
                            id: p.id,
                            produced_at: p.produced_at,
                            due: p.due,
                            priority: p.priority,
                            attempts: 0,
                            dedup: p.dedup,
                            dead: None,
                            group: p.group,
                            payload: p.payload,
                        }),
                        &mut buf,
                    )
                    .expect("message records have payloads");
                    payloads.push((at + rel, p.payload.len() as u32));
                    if let Some((key, _)) = p.dedup {
                        homes.push(KeyHome::Dedup {
                            channel: Arc::from(p.channel),
                            key,
                        });
                    }
                }
                Event::Keyed {
                    key,
                    expires,
                    receipts,
                } => {
                    format::encode(
                        &Record::Produced {
                            key,
                            expires: *expires,
                            receipts: receipts.iter().map(|r| (r.id.0, r.duplicate)).collect(),
                        },
                        &mut buf,
                    );
                    homes.push(KeyHome::Produce((*key).to_string()));
                }
                Event::Changed(change) => encode_change(change, &mut buf),
            }
        }
        let shared = self.shared.clone();
        let key_homes = self.key_homes.clone();
        let class = if payloads.is_empty() {
            Class::Settle
        } else {
            Class::Growth
        };
        // New messages come from a producer, which leads their commit (`lead`).
        let submit = if class == Class::Growth {
            Writer::submit_led
        } else {
            Writer::submit_then
        };
        submit(
            &self.writer,
            buf,
            payloads.len() as u64,
            class,
            Box::new(move |placed: Result<Placed, QueueError>| {
                let result = placed.map(|placed| {
                    if !homes.is_empty() {
                        key_homes
                            .lock()
                            .entry(placed.segment)
                            .or_default()
                            .extend(homes);
                    }
                    forget_live(&shared, &gone);
                    add_live_bytes(
                        &shared,
                        placed.segment,
                        payloads.iter().map(|(_, len)| u64::from(*len)).sum(),
                    );
                    payloads
                        .into_iter()
                        .map(|(at, len)| Loc {
                            segment: placed.segment as u32,
                            offset: (placed.offset + at as u64) as u32,
                            len,
                        })
                        .collect()
                });
                then.then(result);
            }),
        );
        None
    }

    fn lead(&self) {
        self.writer.lead();
    }

    fn read(&self, loc: &Loc) -> Result<Vec<u8>, QueueError> {
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
        self.storage
            .read_at(&file, &mut buf, u64::from(loc.offset))?;
        Ok(buf)
    }

    fn check(&self) -> Result<(), QueueError> {
        self.shared.check()
    }

    fn save_paused(&self, names: &[String]) -> Result<(), QueueError> {
        self.shared.check()?;
        paused::save(&self.dir, &*self.storage, names)
    }

    fn close(&self, tallies: &dyn Fn() -> Vec<(String, Tally)>) -> Result<(), QueueError> {
        self.writer.shutdown();
        if let Err(e) = self.keep_counters(tallies, true) {
            tracing::warn!(error = %e, "saving the counters failed");
        }
        // Another process may open the directory now.
        self.lock.lock().take();
        self.shared.check()
    }
}

impl FileJournal {
    /// Saves the channels' counters unless they are what was saved last; `last` on close,
    /// after which nothing is saved.
    fn keep_counters(
        &self,
        tallies: &dyn Fn() -> Vec<(String, Tally)>,
        last: bool,
    ) -> Result<(), QueueError> {
        let mut counted = self.counted.lock();
        if counted.closed {
            return Ok(());
        }
        counted.closed = last;
        let mut channels = tallies();
        channels.retain(|(_, t)| *t != Tally::default());
        channels.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if counted.kept.channels == channels {
            return Ok(());
        }
        let next = counters::Kept {
            since: counted.kept.since,
            channels,
        };
        counters::save(&self.dir, &*self.storage, &next)?;
        counted.kept = next;
        Ok(())
    }
}

fn add_live_bytes(shared: &Shared, segment: u64, bytes: u64) {
    if bytes > 0 {
        shared.usage.lock().entry(segment).or_default().live_bytes += bytes;
    }
}

fn forget_live(shared: &Shared, locs: &[Loc]) {
    if locs.is_empty() {
        return;
    }
    let mut usage = shared.usage.lock();
    for loc in locs {
        if let Some(u) = usage.get_mut(&u64::from(loc.segment)) {
            u.live = u.live.saturating_sub(1);
            u.live_bytes = u.live_bytes.saturating_sub(u64::from(loc.len));
        }
    }
}

impl Engine<FileJournal> {
    /// Opens (creating if needed) the store in `dir`, recovering what is on disk. The run's
    /// epoch is durable before this returns, so no fencing token of an earlier run recurs.
    ///
    /// # Errors
    /// [`QueueError::Io`] when the directory cannot be used or another process has it open;
    /// [`QueueError::Corrupt`] for damage that is not a torn tail;
    /// [`QueueError::InvalidRequest`] for a `segment_size` over [`MAX_SEGMENT_SIZE`].
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
        if options.segment_size > MAX_SEGMENT_SIZE {
            return Err(QueueError::InvalidRequest(format!(
                "segment_size of {} bytes exceeds the limit of {MAX_SEGMENT_SIZE} bytes (payload offsets are 32-bit)",
                options.segment_size
            )));
        }
        let storage = options.storage.clone();
        let segment_size = options.segment_size.max(4096);
        recovery::remove_prepared(&dir, &*storage)?;
        let state = recovery::recover(&dir, &*storage)?;
        let paused = paused::load(&dir, &*storage)?;
        let kept = counters::load(&dir, &*storage)?.unwrap_or(counters::Kept {
            since: clock.now(),
            channels: Vec::new(),
        });
        let epoch = state.epoch + 1;

        let (active, active_len) = match state.segments.last() {
            Some(&(n, len)) => (n, len),
            None => {
                let f = writer::prepare_segment(&dir, 1, segment_size, &*storage)?;
                let commit = Record::Commit {
                    next_id: state.next_id,
                    epoch,
                };
                let len = writer::install_segment(&dir, 1, &f, &commit, &*storage)?;
                (1, len)
            }
        };
        let shared = writer::shared(state.next_id, epoch, active);
        {
            let mut segments = shared.segments.write();
            for &(n, _) in &state.segments {
                segments.insert(n, Arc::new(storage.open(&segment_path(&dir, n))?));
            }
            if state.segments.is_empty() {
                segments.insert(active, Arc::new(storage.open(&segment_path(&dir, active))?));
            }
        }
        let mut usage: BTreeMap<u64, Usage> = BTreeMap::new();
        for (&seg, &written) in &state.written {
            usage.entry(seg).or_default().written = written;
        }
        for m in state.messages.values() {
            let u = usage.entry(m.segment).or_default();
            u.live += 1;
            u.live_bytes += u64::from(m.len);
        }
        shared.usage.lock().extend(usage);
        let mut key_homes: BTreeMap<u64, Vec<KeyHome>> = BTreeMap::new();
        for d in state.dedup.values() {
            key_homes.entry(d.home).or_default().push(KeyHome::Dedup {
                channel: Arc::from(state.channels[d.channel].as_str()),
                key: d.key,
            });
        }
        for (key, p) in &state.produced {
            key_homes
                .entry(p.home)
                .or_default()
                .push(KeyHome::Produce(key.clone()));
        }

        let file = storage.open(&segment_path(&dir, active))?;
        let writer = Writer::start(
            WriterConfig {
                dir: dir.clone(),
                file,
                len: active_len,
                segment: active,
                segment_size,
                storage: storage.clone(),
                lead: options.lead_commits,
            },
            shared.clone(),
        )?;
        // The epoch is durable before the first token of this run is handed out.
        writer.commit_blocking()?;
        let report = OpenReport {
            records: state.records,
            messages: state.messages.len() as u64,
            truncated: state.truncated,
            segments: state.segments.len().max(1) as u64,
        };
        let journal = FileJournal {
            dir: dir.clone(),
            segment_size,
            writer,
            shared,
            storage,
            key_homes: Arc::new(Mutex::new(key_homes)),
            compacting: tokio::sync::Mutex::new(()),
            seen_live: Mutex::default(),
            report,
            lock: Mutex::new(Some(lock)),
            counted: Mutex::new(Counted {
                kept,
                closed: false,
            }),
        };
        let engine = Engine::new(clock, journal, state.next_id, epoch << 40);
        let now = engine.now();
        let cells: Vec<_> = state
            .channels
            .iter()
            .map(|c| engine.channel_named(c))
            .collect();
        let mut ids: Vec<u64> = state.messages.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let m = &state.messages[&id];
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
                group: None,
            };
            cells[m.channel].lock().restore(
                entry,
                m.group.and_then(std::num::NonZeroU64::new),
                m.due,
                m.dead.clone(),
                now,
            );
        }
        for d in state.dedup.values() {
            cells[d.channel]
                .lock()
                .remember(d.key, MessageId(d.id), d.expires, now);
        }
        for name in paused {
            engine.restore_paused(&name);
        }
        {
            let counted = engine.journal().counted.lock();
            engine.restore_tallies(counted.kept.since, &counted.kept.channels);
        }
        for (key, p) in state.produced {
            let receipts = p
                .receipts
                .iter()
                .map(|&(id, duplicate)| Receipt {
                    id: MessageId(id),
                    duplicate,
                })
                .collect();
            engine.restore_key(key, receipts, p.expires);
        }
        tracing::info!(dir = %dir.display(), records = report.records, messages = report.messages, truncated = report.truncated, "opened store");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(maintain_in_background(
                Arc::downgrade(&engine),
                options.background_compaction,
            ));
        }
        Ok(engine)
    }

    /// What opening found.
    pub fn open_report(&self) -> OpenReport {
        self.journal().report
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.journal().dir
    }

    /// Group commits made since open.
    pub fn commits(&self) -> u64 {
        self.journal().shared.commits.load(Ordering::Relaxed)
    }

    /// Segment numbers on disk now.
    pub fn segments(&self) -> Vec<u64> {
        self.journal()
            .shared
            .segments
            .read()
            .keys()
            .copied()
            .collect()
    }

    /// Per segment: `(number, message records written, messages still stored)`.
    pub fn usage(&self) -> Vec<(u64, u64, u64)> {
        self.journal()
            .shared
            .usage
            .lock()
            .iter()
            .map(|(s, u)| (*s, u.written, u.live))
            .collect()
    }

    /// Reclaims space: rewrites the live messages of old segments forward when they pin more
    /// dead space than their own size, then deletes every old segment that holds nothing
    /// live.
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
        let journal = self.journal();
        let seen = journal.seen_live.lock().clone();
        let deleted = self
            .compact_where(|seg, live| seen.get(&seg) == Some(&live))
            .await;
        *journal.seen_live.lock() = journal
            .shared
            .usage
            .lock()
            .iter()
            .map(|(s, u)| (*s, u.live))
            .collect();
        deleted
    }

    async fn compact_where(&self, settled: impl Fn(u64, u64) -> bool) -> Result<u64, QueueError> {
        let journal = self.journal();
        let _guard = journal.compacting.lock().await;
        self.check_open()?;
        let shared = &journal.shared;
        let active = shared.active.load(Ordering::Acquire);
        let sealed: BTreeMap<u64, Usage> = shared
            .usage
            .lock()
            .iter()
            .filter(|(s, _)| **s < active)
            .map(|(s, u)| (*s, *u))
            .collect();
        let on_disk = self.segments();
        // The oldest segment holding live messages keeps every later sealed segment on disk.
        // Its live messages move forward once they pin more dead space than their own size,
        // so the log stays within about twice its live data plus a few segments.
        let sealed_on_disk: Vec<u64> = on_disk.iter().copied().filter(|s| *s < active).collect();
        let dead_bytes = |seg: &u64| {
            let u = sealed.get(seg).copied().unwrap_or_default();
            journal.segment_size.saturating_sub(u.live_bytes)
        };
        for (i, seg) in sealed_on_disk.iter().enumerate() {
            let u = sealed.get(seg).copied().unwrap_or_default();
            if u.live == 0 {
                continue;
            }
            let pinned: u64 = sealed_on_disk[i..].iter().map(dead_bytes).sum();
            let own = u.live_bytes + u.live * RECORD_OVERHEAD;
            if own >= pinned || !settled(*seg, u.live) {
                break;
            }
            self.relocate(*seg).await?;
        }
        // Delete the prefix of sealed segments with nothing live.
        let usage = shared.usage.lock().clone();
        let doomed: Vec<u64> = on_disk
            .iter()
            .copied()
            .take_while(|s| *s < active && usage.get(s).is_none_or(|u| u.live == 0))
            .collect();
        let Some(&last) = doomed.last() else {
            return Ok(0);
        };
        self.rehome_keys(last + 1).await?;
        for seg in &doomed {
            shared.segments.write().remove(seg);
            shared.usage.lock().remove(seg);
            journal.storage.remove(&segment_path(&journal.dir, *seg))?;
        }
        journal.storage.sync_dir(&journal.dir)?;
        shared.space_freed();
        tracing::debug!(segments = doomed.len(), "compaction deleted segments");
        Ok(doomed.len() as u64)
    }

    /// Rewrites the keys still inside their window whose record is in a segment below
    /// `below`, and waits until they are durable.
    async fn rehome_keys(&self, below: u64) -> Result<(), QueueError> {
        let journal = self.journal();
        let homes: Vec<KeyHome> = {
            let mut key_homes = journal.key_homes.lock();
            let keep = key_homes.split_off(&below);
            std::mem::replace(&mut *key_homes, keep)
                .into_values()
                .flatten()
                .collect()
        };
        let now = self.now();
        let mut buf = Vec::new();
        let mut moved = Vec::new();
        for home in homes {
            match &home {
                KeyHome::Dedup { channel, key } => {
                    let Some((id, expires)) = self
                        .existing_cell(channel)
                        .and_then(|cell| cell.lock().dedup_entry(*key, now))
                    else {
                        continue;
                    };
                    format::encode(
                        &Record::Dedup {
                            channel,
                            key: *key,
                            id: id.0,
                            expires,
                        },
                        &mut buf,
                    );
                }
                KeyHome::Produce(key) => {
                    let Some((receipts, expires)) = self.produce_key(key) else {
                        continue;
                    };
                    format::encode(
                        &Record::Produced {
                            key,
                            expires,
                            receipts: receipts.iter().map(|r| (r.id.0, r.duplicate)).collect(),
                        },
                        &mut buf,
                    );
                }
            }
            moved.push(home);
        }
        if moved.is_empty() {
            return Ok(());
        }
        let placed = Writer::wait(journal.writer.submit(buf, 0)).await?;
        journal
            .key_homes
            .lock()
            .entry(placed.segment)
            .or_default()
            .extend(moved);
        Ok(())
    }

    async fn relocate(&self, seg: u64) -> Result<(), QueueError> {
        let journal = self.journal();
        let seg32 = seg as u32;
        for cell in self.all() {
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
                payloads.insert(id, (loc, journal.read(&loc)?));
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
                    |e, group, due, dead| {
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
                                group: group.map(std::num::NonZeroU64::get),
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
                journal.writer.submit(buf, moved.len() as u64)
            };
            let placed = Writer::wait(pending).await?;
            add_live_bytes(
                &journal.shared,
                placed.segment,
                moved.iter().map(|(_, old, _)| u64::from(old.len)).sum(),
            );
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
                |e, _, _, _| {
                    updated.insert(e.id);
                    new[&e.id].1
                },
            );
            // Old copies of moved messages are dead; new copies of messages that went away
            // meanwhile are dead too.
            let dead: Vec<Loc> = updated
                .iter()
                .map(|id| new[id].0)
                .chain(
                    new.iter()
                        .filter(|(id, _)| !updated.contains(id))
                        .map(|(_, (_, n))| *n),
                )
                .collect();
            forget_live(&journal.shared, &dead);
        }
        Ok(())
    }
}

/// Every 2 s: saves the counters when they changed, and compacts when `compact`.
async fn maintain_in_background(adapter: std::sync::Weak<FileAdapter>, compact: bool) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A save that keeps failing (a full disk) is reported once, and again once it passes.
    let mut saving_fails = false;
    loop {
        tick.tick().await;
        // Only the blocking save holds the store, and drops it on its own thread: a store
        // whose owner let go closes, and frees its lock, without waiting for this task to be
        // polled again (on a busy single-threaded runtime, that can take long).
        let Some(saving) = adapter.upgrade().filter(|a| a.check_open().is_ok()) else {
            return;
        };
        // File calls block: off the runtime's threads, so a hung disk stalls only this task.
        let saved = tokio::task::spawn_blocking(move || {
            saving.journal().keep_counters(&|| saving.tallies(), false)
        })
        .await
        .unwrap_or_else(|e| Err(QueueError::Poisoned(format!("saving the counters: {e}"))));
        match saved {
            Err(e) if !saving_fails => {
                saving_fails = true;
                tracing::warn!(error = %e, "saving the counters failed; retrying every 2 s");
            }
            Ok(()) if saving_fails => {
                saving_fails = false;
                tracing::info!("saving the counters works again");
            }
            _ => {}
        }
        if compact {
            let Some(adapter) = adapter.upgrade() else {
                return;
            };
            if let Err(e) = adapter.compact_settled().await {
                tracing::warn!(error = %e, "compaction failed");
            }
        }
    }
}
