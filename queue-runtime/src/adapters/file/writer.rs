//! Group commit: one thread owns the active segment. It takes every write waiting, appends
//! them with a commit record in one `write`, calls `fdatasync` once, and answers all of them.
//! A lone writer is written at once; no timer holds it back. After any failed write or sync
//! the store is poisoned: the failed batch and every later one fail, and the sync is never
//! retried (the kernel may have dropped the dirty pages it could not write).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use queue_core::QueueError;
use tokio::sync::oneshot;

use super::format::{self, Record};

/// The file-system calls the log makes, replaceable to inject failures in tests.
pub trait Storage: Send + Sync + 'static {
    /// Writes bytes into a segment at `offset`.
    ///
    /// # Errors
    /// The write error.
    fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(bytes, offset)
    }

    /// Makes a file's data durable (`fdatasync`).
    ///
    /// # Errors
    /// The sync error.
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    /// Makes a directory's entries durable, after a file was created, renamed or removed.
    ///
    /// # Errors
    /// The sync error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The operating system's file calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsStorage;

impl Storage for OsStorage {}

/// The path of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.qlog"))
}

/// Where segment `n` is prepared before it is renamed into place.
pub fn prepared_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.qlog.tmp"))
}

/// Creates segment `n`'s file under its temporary name, filled with zeros to `size` and
/// synced. Writing into blocks that already exist lets `fdatasync` skip the file-size and
/// extent updates that appends need, which makes each sync cheaper.
///
/// # Errors
/// I/O errors.
pub fn prepare_segment(dir: &Path, n: u64, size: u64, storage: &dyn Storage) -> io::Result<File> {
    prepare(dir, n, size, storage, Duration::ZERO)
}

/// [`prepare_segment`] in the background: synced every 4 MiB with a pause after each, so the
/// zeros never queue a long write-back in front of the commits that share the disk.
fn prepare_gently(dir: &Path, n: u64, size: u64, storage: &dyn Storage) -> io::Result<File> {
    prepare(dir, n, size, storage, Duration::from_millis(3))
}

fn prepare(
    dir: &Path,
    n: u64,
    size: u64,
    storage: &dyn Storage,
    pause: Duration,
) -> io::Result<File> {
    const CHUNK: u64 = 1 << 20;
    let path = prepared_path(dir, n);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let zeros = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(CHUNK) as usize;
        storage.write_at(&file, &zeros[..n], at)?;
        at += n as u64;
        if !pause.is_zero() && at % (4 * CHUNK) == 0 {
            storage.sync_data(&file)?;
            std::thread::sleep(pause);
        }
    }
    storage.sync_data(&file)?;
    Ok(file)
}

/// Moves a prepared segment into place, writes its header and a commit record, and syncs
/// it and the directory.
///
/// # Errors
/// I/O errors.
pub fn install_segment(
    dir: &Path,
    n: u64,
    file: &File,
    commit: &Record<'_>,
    storage: &dyn Storage,
) -> io::Result<u64> {
    let mut head = format::header(n).to_vec();
    format::encode(commit, &mut head);
    storage.write_at(file, &head, 0)?;
    storage.sync_data(file)?;
    std::fs::rename(prepared_path(dir, n), segment_path(dir, n))?;
    storage.sync_dir(dir)?;
    Ok(head.len() as u64)
}

/// Where a write landed: its segment and the offset of its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// The segment number.
    pub segment: u64,
    /// The byte offset in the segment.
    pub offset: u64,
}

/// What runs once a submitted write is durable (or failed), on the store's completion thread.
pub type Done = Box<dyn FnOnce(Result<Placed, QueueError>) + Send>;

type Completions = Vec<(Result<Placed, QueueError>, Done)>;

struct Job {
    bytes: Vec<u8>,
    messages: u64,
    done: Option<Done>,
}

/// Per segment: message records written, and those whose message is still stored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Message records written into the segment.
    pub written: u64,
    /// Stored messages whose payload is in the segment.
    pub live: u64,
    /// Payload bytes of those messages.
    pub live_bytes: u64,
}

/// State shared between the writer thread and readers.
pub struct Shared {
    /// Read handles of every segment, by number.
    pub segments: RwLock<BTreeMap<u64, Arc<File>>>,
    /// The active segment's number.
    pub active: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
    /// The next message id, written in every commit record.
    pub next_id: AtomicU64,
    /// This run's epoch, written in every commit record.
    pub epoch: u64,
    /// Bytes written since open, for compaction heuristics and stats.
    pub written: AtomicU64,
    /// Group commits made.
    pub commits: AtomicU64,
    /// Usage of each segment; the writer counts messages in as it writes them.
    pub usage: Mutex<BTreeMap<u64, Usage>>,
}

impl Shared {
    /// Fails once the store is poisoned.
    ///
    /// # Errors
    /// [`QueueError::Poisoned`].
    pub fn check(&self) -> Result<(), QueueError> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(QueueError::Poisoned(self.poison_reason.lock().clone()))
        } else {
            Ok(())
        }
    }

    fn poison(&self, reason: String) {
        tracing::error!(error = %reason, "store poisoned; every later write fails until it is reopened");
        *self.poison_reason.lock() = reason;
        self.poisoned.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The sending side of the writer thread.
pub struct Writer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What the thread shares.
    pub shared: Arc<Shared>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// A submitted write; await it for durability.
pub type Pending = oneshot::Receiver<Result<Placed, QueueError>>;

/// Settings of the writer.
#[expect(
    missing_debug_implementations,
    reason = "holds a file handle and a trait object"
)]
pub struct WriterConfig {
    /// The store directory.
    pub dir: PathBuf,
    /// The active segment, opened for writing.
    pub file: File,
    /// The end of its data: where the next write goes.
    pub len: u64,
    /// Its number.
    pub segment: u64,
    /// Roll to a new segment once the active one is larger than this.
    pub segment_size: u64,
    /// The file calls.
    pub storage: Arc<dyn Storage>,
}

impl Writer {
    /// Starts the writer thread on the active segment.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(config: WriterConfig, shared: Arc<Shared>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        // Completions run on a thread of their own, in commit order, so that the writer
        // starts the next write while the last batch's callers are answered.
        let (done_tx, done_rx) = mpsc::channel::<Completions>();
        std::thread::Builder::new()
            .name("queue-log-complete".into())
            .spawn(move || {
                for batch in done_rx {
                    for (result, done) in batch {
                        done(result);
                    }
                }
            })?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("queue-log-writer".into())
            .spawn(move || run(config, &thread_shared, &rx, &done_tx))?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
        })
    }

    /// Queues encoded records; `done` runs on the writer's thread once they are durable or
    /// have failed. Records submitted earlier are written earlier. `messages` counts the
    /// message records among them, which the writer adds to the segment's usage as it
    /// writes them.
    pub fn submit_then(&self, bytes: Vec<u8>, messages: u64, done: Done) {
        self.send(Job {
            bytes,
            messages,
            done: Some(done),
        });
    }

    /// Queues encoded records; the returned future completes once they are durable.
    pub fn submit(&self, bytes: Vec<u8>, messages: u64) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.submit_then(
            bytes,
            messages,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// Queues nothing but a commit and blocks the calling thread until it is durable.
    ///
    /// # Errors
    /// The write or sync error.
    pub fn commit_blocking(&self) -> Result<(), QueueError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit_then(
            Vec::new(),
            0,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(QueueError::Closed)).map(|_| ())
    }

    fn send(&self, job: Job) {
        let guard = self.tx.lock();
        match guard.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(job) {
                    fail(job, &QueueError::Closed);
                }
            }
            None => fail(job, &QueueError::Closed),
        }
    }

    /// Waits for a submitted write.
    ///
    /// # Errors
    /// [`QueueError::Poisoned`] after a failed write or sync; [`QueueError::Closed`].
    pub async fn wait(pending: Pending) -> Result<Placed, QueueError> {
        pending.await.unwrap_or(Err(QueueError::Closed))
    }

    /// Stops accepting writes, lets the thread write and sync what it has, and joins it.
    pub fn shutdown(&self) {
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            // The last handle to a store can go away on the writer's own thread; it then
            // ends by itself once the queue is drained.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn fail(job: Job, error: &QueueError) {
    if let Some(done) = job.done {
        done(Err(match error {
            QueueError::Poisoned(r) => QueueError::Poisoned(r.clone()),
            _ => QueueError::Closed,
        }));
    }
}

/// Bytes gathered into one group commit at most (a single larger write goes alone).
const BATCH_BYTES: usize = 4 << 20;

fn run(
    mut c: WriterConfig,
    shared: &Shared,
    rx: &mpsc::Receiver<Job>,
    completions: &mpsc::Sender<Completions>,
) {
    // The next segment is prepared once the active one is half full.
    let mut prepared: Option<Preparing> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch: Vec<(usize, Option<Done>)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut size = jobs[0].bytes.len();
        while size < BATCH_BYTES {
            match rx.try_recv() {
                Ok(j) => {
                    size += j.bytes.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = shared.check() {
            jobs.into_iter().for_each(|j| fail(j, &e));
            continue;
        }
        if c.len > format::HEADER_LEN as u64
            && c.len + size as u64 > c.segment_size
            && let Err(e) = roll(&mut c, shared, &mut prepared)
        {
            shared.poison(format!("cannot start segment {}: {e}", c.segment + 1));
            let err = shared.check().expect_err("just poisoned");
            jobs.into_iter().for_each(|j| fail(j, &err));
            continue;
        }
        buf.clear();
        batch.clear();
        let mut messages = 0;
        for job in jobs {
            batch.push((buf.len(), job.done));
            buf.extend_from_slice(&job.bytes);
            messages += job.messages;
        }
        format::encode(
            &Record::Commit {
                next_id: shared.next_id.load(Ordering::Acquire),
                epoch: shared.epoch,
            },
            &mut buf,
        );
        let result = c
            .storage
            .write_at(&c.file, &buf, c.len)
            .and_then(|()| c.storage.sync_data(&c.file));
        match result {
            Ok(()) => {
                let base = c.len;
                c.len += buf.len() as u64;
                shared
                    .written
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                shared.commits.fetch_add(1, Ordering::Relaxed);
                if prepared.is_none() && c.len > c.segment_size / 2 {
                    prepared = Some(Preparing::start(&c, c.segment + 1));
                }
                if messages > 0 {
                    let mut usage = shared.usage.lock();
                    let u = usage.entry(c.segment).or_default();
                    u.written += messages;
                    u.live += messages;
                }
                let answered: Completions = batch
                    .drain(..)
                    .filter_map(|(at, done)| {
                        let placed = Placed {
                            segment: c.segment,
                            offset: base + at as u64,
                        };
                        done.map(|d| (Ok(placed), d))
                    })
                    .collect();
                let _ = completions.send(answered);
            }
            Err(e) => {
                shared.poison(format!(
                    "write or fdatasync of {} failed: {e}",
                    segment_path(&c.dir, c.segment).display()
                ));
                let err = shared.check().expect_err("just poisoned");
                let reason = match &err {
                    QueueError::Poisoned(r) => r.clone(),
                    other => other.to_string(),
                };
                let failed: Completions = batch
                    .drain(..)
                    .filter_map(|(_, done)| {
                        done.map(|d| (Err(QueueError::Poisoned(reason.clone())), d))
                    })
                    .collect();
                let _ = completions.send(failed);
            }
        }
    }
    if shared.check().is_ok()
        && let Err(e) = c.storage.sync_data(&c.file)
    {
        tracing::error!(error = %e, "final fdatasync failed");
    }
    if let Some(p) = prepared {
        let _ = p.handle.join();
        let _ = std::fs::remove_file(prepared_path(&c.dir, p.number));
    }
}

/// Starts the next segment: the one prepared in the background when it is ready, else one
/// prepared now. Every batch was synced already, so the old segment is sealed as it is.
fn roll(c: &mut WriterConfig, shared: &Shared, prepared: &mut Option<Preparing>) -> io::Result<()> {
    let next = c.segment + 1;
    let file = match prepared.take() {
        Some(p) if p.number == next => p
            .handle
            .join()
            .map_err(|_| io::Error::other("segment preparation panicked"))??,
        _ => prepare_segment(&c.dir, next, c.segment_size, &*c.storage)?,
    };
    let commit = Record::Commit {
        next_id: shared.next_id.load(Ordering::Acquire),
        epoch: shared.epoch,
    };
    let len = install_segment(&c.dir, next, &file, &commit, &*c.storage)?;
    let reader = Arc::new(File::open(segment_path(&c.dir, next))?);
    shared.segments.write().insert(next, reader);
    shared.active.store(next, Ordering::Release);
    c.file = file;
    c.len = len;
    c.segment = next;
    tracing::debug!(segment = next, "started a new segment");
    Ok(())
}

/// A segment being prepared on its own thread.
struct Preparing {
    number: u64,
    handle: std::thread::JoinHandle<io::Result<File>>,
}

impl Preparing {
    fn start(c: &WriterConfig, number: u64) -> Self {
        let dir = c.dir.clone();
        let size = c.segment_size;
        let storage = c.storage.clone();
        Preparing {
            number,
            handle: std::thread::spawn(move || prepare_gently(&dir, number, size, &*storage)),
        }
    }
}

/// A new shared state.
pub fn shared(next_id: u64, epoch: u64, active: u64) -> Arc<Shared> {
    Arc::new(Shared {
        segments: RwLock::new(BTreeMap::new()),
        active: AtomicU64::new(active),
        poisoned: AtomicBool::new(false),
        poison_reason: Mutex::new(String::new()),
        next_id: AtomicU64::new(next_id),
        epoch,
        written: AtomicU64::new(0),
        commits: AtomicU64::new(0),
        usage: Mutex::new(BTreeMap::new()),
    })
}
