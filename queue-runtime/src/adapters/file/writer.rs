//! Group commit: whoever holds the active segment takes every write waiting, appends them with
//! a commit record in one `write`, calls `fdatasync` once, and answers all of them. The writer
//! thread does this for whatever is queued; a caller that submits with [`Writer::lead`] while
//! the segment is free commits on its own thread instead, so a lone write costs no hand-off
//! to another thread and back. A lone writer is written at once; no timer holds it back. After a failed sync, or a write
//! failing other than for want of space, the store is poisoned: the failed batch and every
//! later one fail, and the sync is never retried (the kernel may have dropped the dirty pages
//! it could not write). A write that fails for want of space fails its batch only; new
//! messages are refused while the disk is full, and settling writes use a reserve.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use queue_core::QueueError;
use tokio::sync::oneshot;

use super::format::{self, Record};

/// An open file of the store: an OS file, or a number a test storage gives out.
#[derive(Debug)]
pub enum Handle {
    /// An open file.
    File(File),
    /// A storage's own handle.
    Id(u64),
}

impl Handle {
    /// The OS file.
    ///
    /// # Errors
    /// `Unsupported` for a storage's own handle.
    pub fn file(&self) -> io::Result<&File> {
        match self {
            Handle::File(f) => Ok(f),
            Handle::Id(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not an operating-system file",
            )),
        }
    }
}

/// Every file-system call the log makes, replaceable to inject failures in tests. The
/// defaults are the operating system's. Creating the store directory and locking its `LOCK`
/// file are always the OS's.
pub trait Storage: Send + Sync + 'static {
    /// Creates a file, or truncates an existing one, open for reading and writing.
    ///
    /// # Errors
    /// The open error.
    fn create(&self, path: &Path) -> io::Result<Handle> {
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map(Handle::File)
    }

    /// Opens an existing file for reading and writing.
    ///
    /// # Errors
    /// The open error.
    fn open(&self, path: &Path) -> io::Result<Handle> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(Handle::File)
    }

    /// Writes bytes into a file at `offset`.
    ///
    /// # Errors
    /// The write error.
    fn write_at(&self, file: &Handle, bytes: &[u8], offset: u64) -> io::Result<()> {
        file.file()?.write_all_at(bytes, offset)
    }

    /// Fills `buf` from a file at `offset`.
    ///
    /// # Errors
    /// The read error, `UnexpectedEof` past the end.
    fn read_at(&self, file: &Handle, buf: &mut [u8], offset: u64) -> io::Result<()> {
        file.file()?.read_exact_at(buf, offset)
    }

    /// Reads a whole file.
    ///
    /// # Errors
    /// The read error.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    /// Starts writing back a range of a file's data without waiting for it, so that a
    /// later [`Storage::sync_data`] has less to do. A hint: it makes nothing durable.
    fn start_writeback(&self, file: &Handle, offset: u64, len: u64) {
        #[cfg(target_os = "linux")]
        if let (Ok(f), Ok(offset), Ok(len)) =
            (file.file(), i64::try_from(offset), i64::try_from(len))
        {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the call; the kernel only reads the range.
            #[expect(
                unsafe_code,
                reason = "sync_file_range has no safe wrapper in std, rustix or nix"
            )]
            unsafe {
                libc::sync_file_range(f.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (file, offset, len);
    }

    /// Makes a file's data durable (`fdatasync`).
    ///
    /// # Errors
    /// The sync error.
    fn sync_data(&self, file: &Handle) -> io::Result<()> {
        file.file()?.sync_data()
    }

    /// Renames a file; durable once the directory is synced.
    ///
    /// # Errors
    /// The rename error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    /// Removes a file; durable once the directory is synced.
    ///
    /// # Errors
    /// The remove error.
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    /// The names of the entries in a directory.
    ///
    /// # Errors
    /// The listing error.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
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
pub fn prepare_segment(dir: &Path, n: u64, size: u64, storage: &dyn Storage) -> io::Result<Handle> {
    prepare(dir, n, size, storage, Duration::ZERO)
}

/// [`prepare_segment`] in the background: synced every 4 MiB with a pause after each, so the
/// zeros never queue a long write-back in front of the commits that share the disk.
fn prepare_gently(dir: &Path, n: u64, size: u64, storage: &dyn Storage) -> io::Result<Handle> {
    prepare(dir, n, size, storage, Duration::from_millis(3))
}

fn prepare(
    dir: &Path,
    n: u64,
    size: u64,
    storage: &dyn Storage,
    pause: Duration,
) -> io::Result<Handle> {
    const CHUNK: u64 = 1 << 20;
    let path = prepared_path(dir, n);
    let file = storage.create(&path)?;
    let fill = || {
        let zeros = vec![0u8; CHUNK.min(size) as usize];
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
        storage.sync_data(&file)
    };
    if let Err(e) = fill() {
        // A partly filled file would only hold space (on a full disk, the space acks need).
        let _ = storage.remove(&path);
        return Err(e);
    }
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
    file: &Handle,
    commit: &Record<'_>,
    storage: &dyn Storage,
) -> io::Result<u64> {
    let mut head = format::header(n).to_vec();
    format::encode(commit, &mut head);
    storage.write_at(file, &head, 0)?;
    storage.sync_data(file)?;
    storage.rename(&prepared_path(dir, n), &segment_path(dir, n))?;
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

/// What runs once a submitted write is durable (or failed): for a [`Class::Growth`] write
/// that succeeded, on the writer's thread as soon as the commit is synced; otherwise on the
/// store's completion thread, in commit order.
pub type Done = Box<dyn FnOnce(Result<Placed, QueueError>) + Send>;

type Completions = Vec<(Result<Placed, QueueError>, Done)>;

/// What a write does to the space the store needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Stores new messages: refused on a full disk once the reserve is reached.
    Growth,
    /// Settles or moves what is stored (acks, leases, retries, dead letters, compaction):
    /// may use the reserve.
    Settle,
}

struct Job {
    bytes: Vec<u8>,
    messages: u64,
    class: Class,
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
    pub segments: RwLock<BTreeMap<u64, Arc<Handle>>>,
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
    /// Set when segments were deleted: a full disk may have room again.
    freed: AtomicBool,
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

    /// Tells the writer that segments were deleted, so a full disk may have room again.
    pub fn space_freed(&self) {
        self.freed.store(true, Ordering::Release);
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

/// The queue of writes and the active segment, shared by the writer thread and leading
/// callers.
pub struct Writer {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What the thread shares.
    pub shared: Arc<Shared>,
}

struct Inner {
    /// Writes waiting, in submission order, and whether the writer is shut down.
    waiting: Mutex<Waiting>,
    /// Signalled when writes wait that no caller leads.
    wake: Condvar,
    /// The active segment. Writes are taken from `waiting` only while it is held, so they
    /// are written in submission order whoever writes them.
    io: Mutex<Io>,
    /// Completions other than new messages', run on a thread of their own in commit order.
    completions: mpsc::Sender<Completions>,
    /// Whether callers may lead commits.
    lead: Lead,
}

/// Whether callers may lead commits (see [`Writer::lead`]).
struct Lead {
    /// Now: allowed, and the last commit was not slow.
    on: AtomicBool,
    /// At all (`FileOptions::lead_commits`).
    allowed: bool,
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The active segment and what writing it needs.
struct Io {
    c: WriterConfig,
    /// The segment after the active one, prepared once the active one is half full.
    next: Next,
    reserve: u64,
    buf: Vec<u8>,
    batch: Vec<(usize, Class, Option<Done>)>,
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
    pub file: Handle,
    /// The end of its data: where the next write goes.
    pub len: u64,
    /// Its number.
    pub segment: u64,
    /// Roll to a new segment once the active one is larger than this.
    pub segment_size: u64,
    /// The file calls.
    pub storage: Arc<dyn Storage>,
    /// Whether callers may lead commits (see [`Writer::lead`]).
    pub lead: bool,
}

impl Writer {
    /// Starts the writer thread on the active segment.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(config: WriterConfig, shared: Arc<Shared>) -> io::Result<Self> {
        // Other completions run on a thread of their own, in commit order, so that the writer
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
        let lead = config.lead;
        let inner = Arc::new(Inner {
            waiting: Mutex::new(Waiting::default()),
            wake: Condvar::new(),
            io: Mutex::new(Io {
                reserve: reserve(config.segment_size),
                c: config,
                next: Next::None,
                buf: Vec::with_capacity(1 << 20),
                batch: Vec::new(),
            }),
            lead: Lead {
                on: AtomicBool::new(lead),
                allowed: lead,
            },
            completions: done_tx,
        });
        let (thread_inner, thread_shared) = (inner.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("queue-log-writer".into())
            .spawn(move || run(&thread_inner, &thread_shared))?;
        Ok(Writer {
            inner,
            thread: Mutex::new(Some(thread)),
            shared,
        })
    }

    /// Queues encoded records; `done` runs once they are durable or have failed (where:
    /// see [`Done`]). Records submitted earlier are written earlier. `messages` counts the
    /// message records among them, which the writer adds to the segment's usage as it
    /// writes them.
    pub fn submit_then(&self, bytes: Vec<u8>, messages: u64, class: Class, done: Done) {
        if self.queue(Job {
            bytes,
            messages,
            class,
            done: Some(done),
        }) {
            self.inner.wake.notify_one();
        }
    }

    /// Like [`Writer::submit_then`], for a caller that then calls [`Writer::lead`]; until it
    /// does, the write may wait.
    pub fn submit_led(&self, bytes: Vec<u8>, messages: u64, class: Class, done: Done) {
        self.queue(Job {
            bytes,
            messages,
            class,
            done: Some(done),
        });
    }

    /// Writes and syncs what waits, on the calling thread, if nobody is writing now; else
    /// leaves it to the writer thread. A new message's completion runs here; the others on
    /// the completion thread. The caller must hold no lock a completion takes.
    pub fn lead(&self) {
        // On a runtime of one thread, waiting callers queue up while the writer thread syncs,
        // and share its next commit; a caller syncing on that thread would stop them.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let io = if multi_thread && self.inner.lead.on.load(Ordering::Relaxed) {
            self.inner.io.try_lock()
        } else {
            None
        };
        let Some(mut io) = io else {
            // Whoever writes now, the writer thread takes what waits after it.
            self.inner.wake.notify_one();
            return;
        };
        let jobs = take_jobs(&self.inner.waiting);
        if !jobs.is_empty() {
            io.write(
                jobs,
                &self.shared,
                &self.inner.completions,
                &self.inner.lead,
            );
        }
        drop(io);
        if !self.inner.waiting.lock().jobs.is_empty() {
            self.inner.wake.notify_one();
        }
    }

    /// Queues encoded records that settle or move what is stored; the returned future
    /// completes once they are durable.
    pub fn submit(&self, bytes: Vec<u8>, messages: u64) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.submit_then(
            bytes,
            messages,
            Class::Settle,
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
            Class::Settle,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(QueueError::Closed)).map(|_| ())
    }

    /// Queues a job; false (and the job failed) once the writer is shut down.
    fn queue(&self, job: Job) -> bool {
        let mut waiting = self.inner.waiting.lock();
        if waiting.closed {
            drop(waiting);
            fail(job, &QueueError::Closed);
            return false;
        }
        waiting.jobs.push_back(job);
        true
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
        self.inner.waiting.lock().closed = true;
        self.inner.wake.notify_one();
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
        done(Err(failure(error)));
    }
}

/// What a job refused for `error` is told: the poisoning, or that the writer is closed.
fn failure(error: &QueueError) -> QueueError {
    match error {
        QueueError::Poisoned(r) => QueueError::Poisoned(r.clone()),
        _ => QueueError::Closed,
    }
}

/// A commit slower than this stops callers from leading commits until one is faster again.
const SLOW_SYNC: Duration = Duration::from_millis(100);

/// Bytes gathered into one group commit at most (a single larger write goes alone).
const BATCH_BYTES: usize = 4 << 20;

/// How long a full disk is left alone before the writer tries again to prepare a segment,
/// unless segments are deleted sooner.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// The bytes of the active segment kept for [`Class::Settle`] writes once the next segment
/// cannot be prepared: new messages are refused when they would leave less.
pub fn reserve(segment_size: u64) -> u64 {
    segment_size / 8
}

/// The error of a write refused or failed for want of space.
pub fn full_error(reason: &str) -> QueueError {
    QueueError::Io(io::Error::new(
        io::ErrorKind::StorageFull,
        format!(
            "the disk is full: {reason}; new messages are refused until space is freed \
             (acks, dead letters and compaction still work)"
        ),
    ))
}

fn is_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded
}

/// The segment after the active one.
enum Next {
    /// Not started.
    None,
    /// Being prepared on its own thread.
    Preparing(Preparing),
    /// Prepared and synced under its temporary name.
    Ready(Handle),
    /// Could not be prepared for want of space.
    Full { reason: String, since: Instant },
}

impl Next {
    /// Resolves to `Ready` or `Full`: waits for a preparation under way, prepares one now,
    /// or tries again on a full disk once space may have been freed.
    ///
    /// # Errors
    /// A preparation error other than a full disk.
    fn resolve(&mut self, c: &WriterConfig, shared: &Shared) -> io::Result<()> {
        let number = c.segment + 1;
        let result = match std::mem::replace(self, Next::None) {
            Next::Ready(file) => Ok(file),
            Next::Preparing(p) if p.number == number => p
                .handle
                .join()
                .map_err(|_| io::Error::other("segment preparation panicked"))?,
            Next::Full { reason, since }
                if !shared.freed.swap(false, Ordering::AcqRel) && since.elapsed() < FULL_RETRY =>
            {
                *self = Next::Full { reason, since };
                return Ok(());
            }
            _ => prepare_segment(&c.dir, number, c.segment_size, &*c.storage),
        };
        *self = match result {
            Ok(file) => Next::Ready(file),
            Err(e) if is_full(&e) => {
                tracing::warn!(segment = number, error = %e, "cannot prepare the next segment: the disk is full");
                Next::Full {
                    reason: format!("cannot prepare segment {number}: {e}"),
                    since: Instant::now(),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(())
    }
}

/// Takes the waiting jobs, at most [`BATCH_BYTES`] of them (at least one). Called with the
/// active segment held, so that jobs are written in the order they were queued.
fn take_jobs(waiting: &Mutex<Waiting>) -> Vec<Job> {
    let mut waiting = waiting.lock();
    let mut jobs = Vec::new();
    let mut size = 0;
    while let Some(j) = waiting.jobs.front() {
        if !jobs.is_empty() && size >= BATCH_BYTES {
            break;
        }
        size += j.bytes.len();
        jobs.push(waiting.jobs.pop_front().expect("looked at"));
    }
    jobs
}

/// The writer thread: writes whatever waits that no caller led, until shut down and drained.
fn run(inner: &Inner, shared: &Shared) {
    loop {
        {
            let mut waiting = inner.waiting.lock();
            while waiting.jobs.is_empty() && !waiting.closed {
                inner.wake.wait(&mut waiting);
            }
            if waiting.jobs.is_empty() && waiting.closed {
                break;
            }
        }
        let mut io = inner.io.lock();
        let jobs = take_jobs(&inner.waiting);
        if !jobs.is_empty() {
            io.write_all(
                jobs,
                &inner.waiting,
                shared,
                &inner.completions,
                &inner.lead,
            );
        }
    }
    let mut io = inner.io.lock();
    let c = &io.c;
    if shared.check().is_ok()
        && let Err(e) = c.storage.sync_data(&c.file)
    {
        tracing::error!(error = %e, "final fdatasync failed");
    }
    let number = c.segment + 1;
    let (dir, storage) = (c.dir.clone(), c.storage.clone());
    match std::mem::replace(&mut io.next, Next::None) {
        Next::Preparing(p) => {
            let _ = p.handle.join();
            let _ = storage.remove(&prepared_path(&dir, p.number));
        }
        Next::Ready(_) => {
            let _ = storage.remove(&prepared_path(&dir, number));
        }
        Next::None | Next::Full { .. } => {}
    }
}

/// A batch written to the active segment and not yet synced.
struct Staged {
    /// Where it starts in the segment.
    base: u64,
    /// Its length with its commit record.
    len: u64,
    /// The message records among it.
    messages: u64,
    /// Each job's offset in the batch, class and completion.
    batch: Vec<(usize, Class, Option<Done>)>,
    /// New messages refused for want of space, answered with the batch.
    refused: Completions,
    /// When writing it started.
    started: Instant,
}

/// What a batch's callers are told, in order: `now` on the answering thread, then `later`
/// on the completion thread.
#[derive(Default)]
struct Answers {
    now: Completions,
    later: Completions,
}

impl Answers {
    fn give(self, completions: &mpsc::Sender<Completions>) {
        for (result, done) in self.now {
            done(result);
        }
        if !self.later.is_empty() {
            let _ = completions.send(self.later);
        }
    }
}

impl Io {
    /// Writes one batch with its commit record, syncs it, and answers its jobs: a new
    /// message's completion at once, the others through `completions`. Once synced, and
    /// before anyone is answered, `lead` says whether callers may lead the next commit: not
    /// after a write and sync slower than [`SLOW_SYNC`].
    fn write(
        &mut self,
        jobs: Vec<Job>,
        shared: &Shared,
        completions: &mpsc::Sender<Completions>,
        lead: &Lead,
    ) {
        match self.stage(jobs, shared) {
            Ok(staged) => self.seal(staged, shared, lead).give(completions),
            Err(refused) => refused.give(completions),
        }
    }

    /// Writes, syncs and answers batch after batch while jobs wait (the writer thread). Each
    /// next batch is written, and its writeback started, before the last one's callers are
    /// answered, so that its sync overlaps their answers.
    fn write_all(
        &mut self,
        jobs: Vec<Job>,
        waiting: &Mutex<Waiting>,
        shared: &Shared,
        completions: &mpsc::Sender<Completions>,
        lead: &Lead,
    ) {
        let mut staged = match self.stage(jobs, shared) {
            Ok(staged) => staged,
            Err(refused) => return refused.give(completions),
        };
        loop {
            let answers = self.seal(staged, shared, lead);
            let more = take_jobs(waiting);
            if more.is_empty() {
                return answers.give(completions);
            }
            let next = self.stage(more, shared);
            if let Ok(next) = &next {
                let c = &self.c;
                c.storage.start_writeback(&c.file, next.base, next.len);
            }
            answers.give(completions);
            match next {
                Ok(next) => staged = next,
                Err(refused) => return refused.give(completions),
            }
        }
    }

    /// Writes a batch with its commit record to the active segment (rolling to the next
    /// one when it would not fit), unsynced. Every earlier batch is synced. The jobs refused
    /// (a poisoned store, a full disk) come back with their answers.
    fn stage(&mut self, mut jobs: Vec<Job>, shared: &Shared) -> Result<Staged, Answers> {
        let started = Instant::now();
        let Io {
            c,
            next,
            reserve,
            buf,
            batch: _,
        } = self;
        let reserve = *reserve;
        let mut refused = Answers::default();
        let fail_all = |jobs: Vec<Job>, err: &QueueError| Answers {
            now: jobs
                .into_iter()
                .filter_map(|j| j.done.map(|d| (Err(failure(err)), d)))
                .collect(),
            later: Vec::new(),
        };
        let mut size: usize = jobs.iter().map(|j| j.bytes.len()).sum();
        if let Err(e) = shared.check() {
            return Err(fail_all(jobs, &e));
        }
        // New messages take the reserve only while the next segment can be had.
        let growth: u64 = jobs
            .iter()
            .filter(|j| j.class == Class::Growth)
            .map(|j| j.bytes.len() as u64)
            .sum();
        if growth > 0 && c.len + growth + reserve > c.segment_size {
            if let Err(e) = next.resolve(c, shared) {
                shared.poison(format!("cannot start segment {}: {e}", c.segment + 1));
                let err = shared.check().expect_err("just poisoned");
                return Err(fail_all(jobs, &err));
            }
            if let Next::Full { reason, .. } = &*next {
                let (full, kept): (Vec<Job>, Vec<Job>) =
                    jobs.into_iter().partition(|j| j.class == Class::Growth);
                refused.later = full
                    .into_iter()
                    .filter_map(|j| j.done.map(|d| (Err(full_error(reason)), d)))
                    .collect();
                jobs = kept;
                if jobs.is_empty() {
                    return Err(refused);
                }
                size = jobs.iter().map(|j| j.bytes.len()).sum();
            }
        }
        if c.len > format::HEADER_LEN as u64 && c.len + size as u64 > c.segment_size {
            // On a full disk the batch goes past the segment's end and fails if the file
            // cannot grow.
            let rolled = next.resolve(c, shared).and_then(|()| roll(c, shared, next));
            if let Err(e) = rolled {
                shared.poison(format!("cannot start segment {}: {e}", c.segment + 1));
                let err = shared.check().expect_err("just poisoned");
                let mut failed = fail_all(jobs, &err);
                failed.later = refused.later;
                return Err(failed);
            }
        }
        buf.clear();
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let mut messages = 0;
        for job in jobs {
            batch.push((buf.len(), job.class, job.done));
            buf.extend_from_slice(&job.bytes);
            messages += job.messages;
        }
        format::encode(
            &Record::Commit {
                next_id: shared.next_id.load(Ordering::Acquire),
                epoch: shared.epoch,
            },
            buf,
        );
        let staged = Staged {
            base: c.len,
            len: buf.len() as u64,
            messages,
            batch,
            refused: refused.later,
            started,
        };
        match c.storage.write_at(&c.file, buf, c.len) {
            Ok(()) => Ok(staged),
            Err(e) if is_full(&e) => {
                // Nothing of the batch was synced, and the next batch is written at the same
                // offset. What landed is zeroed (the blocks it took exist), so no part of a
                // failed batch can be synced with a later one.
                let _ = c.storage.write_at(&c.file, &vec![0; buf.len()], c.len);
                let reason = format!(
                    "write to {} failed: {e}",
                    segment_path(&c.dir, c.segment).display()
                );
                tracing::warn!(error = %reason, "batch refused: the disk is full");
                let Staged {
                    mut batch,
                    refused: mut later,
                    ..
                } = staged;
                later.extend(
                    batch
                        .drain(..)
                        .filter_map(|(_, _, done)| done.map(|d| (Err(full_error(&reason)), d))),
                );
                self.batch = batch;
                Err(Answers {
                    now: Vec::new(),
                    later,
                })
            }
            Err(e) => Err(self.fail_staged(staged, shared, &e)),
        }
    }

    /// Syncs a staged batch and says who is told what: new messages are made visible at
    /// once (`now`), the other completions are handed on (`later`).
    fn seal(&mut self, mut staged: Staged, shared: &Shared, lead: &Lead) -> Answers {
        let c = &mut self.c;
        if let Err(e) = c.storage.sync_data(&c.file) {
            return self.fail_staged(staged, shared, &e);
        }
        lead.on.store(
            lead.allowed && staged.started.elapsed() <= SLOW_SYNC,
            Ordering::Relaxed,
        );
        c.len += staged.len;
        shared.written.fetch_add(staged.len, Ordering::Relaxed);
        shared.commits.fetch_add(1, Ordering::Relaxed);
        if matches!(self.next, Next::None) && c.len > c.segment_size / 2 {
            self.next = Next::Preparing(Preparing::start(c, c.segment + 1));
        }
        if staged.messages > 0 {
            let mut usage = shared.usage.lock();
            let u = usage.entry(c.segment).or_default();
            u.written += staged.messages;
            u.live += staged.messages;
        }
        // New messages are made visible by whoever synced them, before the commit's other
        // completions are handed on: a step that only inserts and answers costs less than a
        // hand-off to another thread.
        let mut answers = Answers {
            now: Vec::new(),
            later: std::mem::take(&mut staged.refused),
        };
        for (at, class, done) in staged.batch.drain(..) {
            let placed = Placed {
                segment: c.segment,
                offset: staged.base + at as u64,
            };
            match done {
                Some(d) if class == Class::Growth => answers.now.push((Ok(placed), d)),
                Some(d) => answers.later.push((Ok(placed), d)),
                None => {}
            }
        }
        self.batch = staged.batch;
        answers
    }

    /// Poisons the store after a failed write or sync of a staged batch, and fails its jobs.
    fn fail_staged(&mut self, mut staged: Staged, shared: &Shared, e: &io::Error) -> Answers {
        let c = &self.c;
        shared.poison(format!(
            "write or fdatasync of {} failed: {e}",
            segment_path(&c.dir, c.segment).display()
        ));
        let err = shared.check().expect_err("just poisoned");
        let reason = match &err {
            QueueError::Poisoned(r) => r.clone(),
            other => other.to_string(),
        };
        let mut later = std::mem::take(&mut staged.refused);
        later.extend(staged.batch.drain(..).filter_map(|(_, _, done)| {
            done.map(|d| (Err(QueueError::Poisoned(reason.clone())), d))
        }));
        self.batch = staged.batch;
        Answers {
            now: Vec::new(),
            later,
        }
    }
}

/// Starts the next segment if it is ready; on a full disk stays on the active one. Every
/// batch was synced already, so the old segment is sealed as it is.
fn roll(c: &mut WriterConfig, shared: &Shared, next: &mut Next) -> io::Result<()> {
    let number = c.segment + 1;
    let file = match std::mem::replace(next, Next::None) {
        Next::Ready(file) => file,
        other => {
            *next = other;
            return Ok(());
        }
    };
    let commit = Record::Commit {
        next_id: shared.next_id.load(Ordering::Acquire),
        epoch: shared.epoch,
    };
    let len = install_segment(&c.dir, number, &file, &commit, &*c.storage)?;
    let reader = Arc::new(c.storage.open(&segment_path(&c.dir, number))?);
    shared.segments.write().insert(number, reader);
    shared.active.store(number, Ordering::Release);
    c.file = file;
    c.len = len;
    c.segment = number;
    tracing::debug!(segment = number, "started a new segment");
    Ok(())
}

/// A segment being prepared on its own thread.
struct Preparing {
    number: u64,
    handle: std::thread::JoinHandle<io::Result<Handle>>,
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
        freed: AtomicBool::new(false),
    })
}
