//! Recovery: replays every segment in order into the state the store had.
//!
//! A segment under its final name has a synced header (it is prepared and synced under a
//! temporary name first), and sealed segments were synced before the next one was created,
//! so a bad header, or any damage in a sealed segment, is corruption: opening fails with the
//! file and offset. Records count once the commit record that ends their group commit is
//! read. In the active segment, what follows the last commit record is a torn tail and is
//! cut, unless a complete commit record followed by another record lies after the damage:
//! then the damaged bytes were synced before, and that is corruption too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    /// The group's hash, for a grouped message.
    pub group: Option<u64>,
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
                        group: m.group,
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

/// Replays every segment in `dir`. Cuts the torn tail of the last segment: the bytes after
/// its last commit record, unless damage there is followed by a later commit.
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
        let scan = scan_segment(&bytes, n, last, |record, at, payload_at| {
            state.apply(record, n, at, payload_at);
        })
        .map_err(|d| corrupt(&path, d.offset, &d.what))?;
        if let Some(tail) = scan.tail {
            let cut = (tail.end - scan.end) as u64;
            tracing::warn!(file = %path.display(), offset = scan.end, bytes = cut, reason = %tail.what, "cutting off a torn tail");
            let f = storage.open(&path)?;
            storage.write_at(&f, &vec![0u8; tail.end - scan.end], scan.end as u64)?;
            storage.sync_data(&f)?;
            state.truncated += cut;
        }
        state.segments.push((n, scan.end as u64));
    }
    Ok(state)
}

/// Damage found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Its byte offset in the file.
    pub offset: usize,
    /// What is wrong.
    pub what: String,
}

/// A torn tail to cut: the bytes from [`Scan::end`] to `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// One past its last non-zero byte.
    pub end: usize,
    /// Why it is torn.
    pub what: String,
}

/// Where a segment's committed records end, and its torn tail.
#[derive(Debug)]
pub struct Scan {
    /// The end of the last commit record.
    pub end: usize,
    /// Bytes after the last commit that no later commit covers (last segment only).
    pub tail: Option<Tail>,
}

/// Reads segment `n` and hands each committed record to `apply` with its offset and its
/// payload's offset within the record. Records count once the commit record ending their
/// group commit is read: `apply` sees a group commit whole or not at all. In the `last`
/// segment, what follows the last commit record is a torn tail, unless
/// a complete commit record followed by another record lies after the damage: then the
/// damaged bytes were synced before.
///
/// # Errors
/// The first damage that is not a torn tail.
pub fn scan_segment<'a>(
    bytes: &'a [u8],
    n: u64,
    last: bool,
    mut apply: impl FnMut(Record<'a>, u64, usize),
) -> Result<Scan, Damage> {
    if let Err(e) = format::check_header(bytes, n) {
        return Err(Damage {
            offset: 0,
            what: e.to_string(),
        });
    }
    // The records of the group commit being read.
    let mut pending = Vec::new();
    let mut end = format::HEADER_LEN;
    let mut at = format::HEADER_LEN;
    let mut damage = None;
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
                let commit = matches!(record, Record::Commit { .. });
                pending.push((record, at as u64, payload_at));
                at += len;
                if commit {
                    for (record, at, payload_at) in pending.drain(..) {
                        apply(record, at, payload_at);
                    }
                    end = at;
                }
            }
            Read::Incomplete => {
                damage = Some((at, "record cut short"));
                break;
            }
            Read::Damaged(what) => {
                damage = Some((at, what));
                break;
            }
        }
    }
    let tail = match damage {
        Some((offset, what)) if !last || committed_after(bytes, offset) => {
            return Err(Damage {
                offset,
                what: what.to_string(),
            });
        }
        Some((_, what)) => Some(what),
        None if !pending.is_empty() => {
            if !last {
                return Err(Damage {
                    offset: end,
                    what: "records without a commit record in a sealed segment".into(),
                });
            }
            Some("records without a commit record")
        }
        None => None,
    };
    let tail = tail.map(|what| Tail {
        end: bytes.iter().rposition(|b| *b != 0).map_or(end, |p| p + 1),
        what: what.to_string(),
    });
    Ok(Scan { end, tail })
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

/// What [`check`] found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Damage that makes opening fail.
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// The damage.
        damage: Damage,
    },
    /// Bytes after the last commit of the newest segment, which opening cuts.
    TornTail {
        /// The segment file.
        path: PathBuf,
        /// Where the tail starts.
        offset: usize,
        /// Its length.
        bytes: usize,
        /// Why it is torn.
        what: String,
    },
}

/// Scans every segment in `dir` as opening would, writing nothing. Scanning a segment stops
/// at its first damage, so each damaged segment is reported once.
///
/// # Errors
/// I/O errors.
pub fn check(dir: &Path) -> Result<Vec<Finding>, QueueError> {
    let numbers = list_segments(dir, &super::writer::OsStorage)?;
    let mut findings = Vec::new();
    for (i, &n) in numbers.iter().enumerate() {
        let path = segment_path(dir, n);
        let bytes = std::fs::read(&path)?;
        match scan_segment(&bytes, n, i + 1 == numbers.len(), |_, _, _| {}) {
            Err(damage) => findings.push(Finding::Damaged { path, damage }),
            Ok(Scan {
                end,
                tail: Some(tail),
                ..
            }) => findings.push(Finding::TornTail {
                path,
                offset: end,
                bytes: tail.end - end,
                what: tail.what,
            }),
            Ok(_) => {}
        }
    }
    Ok(findings)
}
