//! Recovery: replays every segment in order into the state the store had.
//!
//! Sealed segments were synced before the next one was created, so any damage in them is
//! corruption and opening fails with the file and offset. In the active segment, damage is a
//! torn tail when no later group commit made it past it: the segment is truncated there. If
//! a complete commit record is followed by more records after the damage, the damaged bytes
//! were synced before, and that is corruption too.

use std::collections::HashMap;
use std::path::Path;

use queue_core::QueueError;
use queue_core::clock::Timestamp;

use super::format::{self, Read, Record};
use super::writer::{Storage, segment_path};

/// A message as recovered.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Index into [`State::channels`].
    pub channel: usize,
    /// Its segment.
    pub segment: u64,
    /// The payload's offset in the segment.
    pub offset: u64,
    /// The payload's length.
    pub len: u32,
    /// When it was produced.
    pub produced_at: Timestamp,
    /// When it is due.
    pub due: Timestamp,
    /// Its priority.
    pub priority: u8,
    /// Deliveries made.
    pub attempts: u32,
    /// `(dead_at, error)` for a dead letter.
    pub dead: Option<(Timestamp, String)>,
}

/// A recovered dedup entry.
#[derive(Debug, Clone, Copy)]
pub struct DedupEntry {
    /// Index into [`State::channels`].
    pub channel: usize,
    /// The key.
    pub key: u64,
    /// The original message.
    pub id: u64,
    /// The window end.
    pub expires: Timestamp,
    /// The segment that holds the entry.
    pub home: u64,
}

/// A recovered produce key.
#[derive(Debug, Clone)]
pub struct ProducedEntry {
    /// When the key is forgotten.
    pub expires: Timestamp,
    /// `(id, duplicate)` of each message of the produce.
    pub receipts: Vec<(u64, bool)>,
    /// The segment that holds the entry.
    pub home: u64,
}

/// What the log held.
#[derive(Debug, Default)]
pub struct State {
    /// Channel names.
    pub channels: Vec<String>,
    /// Stored messages by id.
    pub messages: HashMap<u64, Recovered>,
    /// Dedup entries, by `(channel, key)`.
    pub dedup: HashMap<(usize, u64), DedupEntry>,
    /// Produce keys, by key.
    pub produced: HashMap<String, ProducedEntry>,
    /// The segments, in order, with their lengths after recovery.
    pub segments: Vec<(u64, u64)>,
    /// Message records written into each segment.
    pub written: HashMap<u64, u64>,
    /// The next id to hand out.
    pub next_id: u64,
    /// The largest epoch seen.
    pub epoch: u64,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut from a torn tail.
    pub truncated: u64,
}

impl State {
    fn channel(&mut self, name: &str) -> usize {
        if let Some(i) = self.channels.iter().position(|c| c == name) {
            return i;
        }
        self.channels.push(name.to_string());
        self.channels.len() - 1
    }

    fn apply(&mut self, record: Record<'_>, segment: u64, record_offset: u64, payload_at: usize) {
        self.records += 1;
        match record {
            Record::Message(m) => {
                *self.written.entry(segment).or_default() += 1;
                let channel = self.channel(m.channel);
                self.next_id = self.next_id.max(m.id + 1);
                if let Some((key, expires)) = m.dedup {
                    self.dedup.insert(
                        (channel, key),
                        DedupEntry {
                            channel,
                            key,
                            id: m.id,
                            expires,
                            home: segment,
                        },
                    );
                }
                self.messages.insert(
                    m.id,
                    Recovered {
                        channel,
                        segment,
                        offset: record_offset + payload_at as u64,
                        len: m.payload.len() as u32,
                        produced_at: m.produced_at,
                        due: m.due,
                        priority: m.priority,
                        attempts: m.attempts,
                        dead: m.dead.map(|(at, e)| (at, e.to_string())),
                    },
                );
            }
            Record::Lease { id, attempts } => {
                self.next_id = self.next_id.max(id + 1);
                if let Some(m) = self.messages.get_mut(&id) {
                    m.attempts = attempts;
                }
            }
            Record::Ack { id } | Record::Purge { id } => {
                self.next_id = self.next_id.max(id + 1);
                self.messages.remove(&id);
            }
            Record::Requeue { id, attempts, due } => {
                if let Some(m) = self.messages.get_mut(&id) {
                    m.attempts = attempts;
                    m.due = due;
                    m.dead = None;
                }
            }
            Record::Dead {
                id,
                attempts,
                dead_at,
                error,
            } => {
                if let Some(m) = self.messages.get_mut(&id) {
                    m.attempts = attempts;
                    m.dead = Some((dead_at, error.to_string()));
                }
            }
            Record::Redrive { id } => {
                if let Some(m) = self.messages.get_mut(&id) {
                    m.attempts = 0;
                    m.due = 0;
                    m.dead = None;
                }
            }
            Record::Dedup {
                channel,
                key,
                id,
                expires,
            } => {
                let channel = self.channel(channel);
                self.dedup.insert(
                    (channel, key),
                    DedupEntry {
                        channel,
                        key,
                        id,
                        expires,
                        home: segment,
                    },
                );
            }
            Record::Produced {
                key,
                expires,
                receipts,
            } => {
                self.produced.insert(
                    key.to_string(),
                    ProducedEntry {
                        expires,
                        receipts,
                        home: segment,
                    },
                );
            }
            Record::Commit { next_id, epoch } => {
                self.next_id = self.next_id.max(next_id);
                self.epoch = self.epoch.max(epoch);
            }
        }
    }
}

/// The segment numbers in `dir`, sorted.
///
/// # Errors
/// When the directory cannot be read.
pub fn list_segments(dir: &Path, storage: &dyn Storage) -> Result<Vec<u64>, QueueError> {
    let mut numbers = Vec::new();
    for name in storage.list(dir)? {
        if let Some(n) = name
            .strip_suffix(".qlog")
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn corrupt(path: &Path, offset: usize, what: &str) -> QueueError {
    QueueError::Corrupt(format!("{} at offset {offset}: {what}", path.display()))
}

/// Replays every segment in `dir`. Truncates a torn tail of the last segment.
///
/// # Errors
/// [`QueueError::Corrupt`] naming the file and offset of damage that is not a torn tail;
/// I/O errors.
pub fn recover(dir: &Path, storage: &dyn Storage) -> Result<State, QueueError> {
    let numbers = list_segments(dir, storage)?;
    let mut state = State {
        next_id: 1,
        ..State::default()
    };
    for (i, &n) in numbers.iter().enumerate() {
        let last = i + 1 == numbers.len();
        let path = segment_path(dir, n);
        let bytes = storage.read(&path)?;
        if let Err(e) = format::check_header(&bytes, n) {
            if last && bytes.iter().take(format::HEADER_LEN).all(|b| *b == 0) {
                // Created but never synced whole: an empty segment.
                rewrite_header(&path, n, storage)?;
                state.segments.push((n, format::HEADER_LEN as u64));
                continue;
            }
            return Err(corrupt(&path, 0, &e.to_string()));
        }
        let mut at = format::HEADER_LEN;
        while at < bytes.len() {
            if bytes[at] == 0 && bytes[at..].iter().all(|b| *b == 0) {
                // The zeroed rest of a preallocated segment.
                break;
            }
            match format::decode(&bytes[at..]) {
                Read::Record(record, len) => {
                    let payload_at = match &record {
                        Record::Message(m) => len - m.payload.len(),
                        _ => 0,
                    };
                    state.apply(record, n, at as u64, payload_at);
                    at += len;
                }
                Read::Incomplete | Read::Damaged(_) => {
                    let what = match format::decode(&bytes[at..]) {
                        Read::Damaged(w) => w,
                        _ => "record cut short",
                    };
                    if !last || committed_after(&bytes, at) {
                        return Err(corrupt(&path, at, what));
                    }
                    let end = bytes.iter().rposition(|b| *b != 0).map_or(at, |p| p + 1);
                    let cut = (end - at) as u64;
                    tracing::warn!(file = %path.display(), offset = at, bytes = cut, reason = what, "cutting off a torn tail");
                    let f = storage.open(&path)?;
                    storage.write_at(&f, &vec![0u8; end - at], at as u64)?;
                    storage.sync_data(&f)?;
                    state.truncated += cut;
                    break;
                }
            }
        }
        state.segments.push((n, at as u64));
    }
    Ok(state)
}

/// Whether a complete commit record lies after `from` and is followed by another record:
/// then the batch holding `from` was synced, so damage there is not a torn write.
fn committed_after(bytes: &[u8], from: usize) -> bool {
    // A commit record is 8 bytes of frame, its kind and two u64s.
    const COMMIT_LEN: [u8; 4] = 17u32.to_le_bytes();
    let mut at = from + 1;
    while at + format::FRAME_LEN < bytes.len() {
        let candidate = bytes[at..at + 4] == COMMIT_LEN && bytes[at + format::FRAME_LEN] == 9;
        if !candidate {
            at += 1;
            continue;
        }
        if let Read::Record(Record::Commit { .. }, len) = format::decode(&bytes[at..])
            && matches!(format::decode(&bytes[at + len..]), Read::Record(..))
        {
            return true;
        }
        at += 1;
    }
    false
}

fn rewrite_header(path: &Path, n: u64, storage: &dyn Storage) -> Result<(), QueueError> {
    let f = storage.open(path)?;
    storage.write_at(&f, &format::header(n), 0)?;
    storage.sync_data(&f)?;
    Ok(())
}

/// Removes segments that were being prepared when the store last closed.
///
/// # Errors
/// I/O errors.
pub fn remove_prepared(dir: &Path, storage: &dyn Storage) -> Result<(), QueueError> {
    for name in storage.list(dir)? {
        if name.ends_with(".qlog.tmp") {
            storage.remove(&dir.join(name))?;
        }
    }
    Ok(())
}
