//! The embedded store under power loss and a full disk.
//!
//! A simulated file system keeps, per file, a durable image and a volatile one. Writes change
//! the volatile image; `sync_data` makes a file's data durable; `sync_dir` makes names
//! (creates, renames, removes) durable. At a power cut every write not covered by a sync is
//! kept, dropped or torn, each 512-byte sector on its own, and every name change not synced is
//! lost. The store is then opened from what is durable and checked against what it confirmed.
//!
//! The same file system can hold a byte budget: writes past it fail with `StorageFull`. A
//! real small file system (a tmpfs, mounted when the test runs as root) checks the same.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use queue_core::{
    Adapter, Channel, ChannelSpec, MessageId, Outcome, Outgoing, QueueError, VirtualClock, channel,
};
use queue_runtime::adapters::file::writer::{Handle, Storage};
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use serde::{Deserialize, Serialize};

mod store;

#[channel("power/jobs", lease = "10m", max_attempts = 3)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

const NAME: &str = "power/jobs";
const SECTOR: usize = 512;

#[derive(Default)]
struct Inode {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    /// Writes since the last sync, in order: offset and bytes.
    pending: Vec<(usize, Vec<u8>)>,
}

#[derive(Default)]
struct Sim {
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    handles: HashMap<u64, u64>,
    next: u64,
    calls: u64,
    cut_at: Option<u64>,
    cut: bool,
    budget: Option<usize>,
}

/// The simulated file system.
#[derive(Default)]
struct SimFs(Mutex<Sim>);

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
}

impl Sim {
    /// Counts a call; fails every call from the cut on.
    fn call(&mut self) -> io::Result<()> {
        self.calls += 1;
        if self.cut_at == Some(self.calls) {
            self.cut = true;
        }
        if self.cut {
            return Err(io::Error::other("power cut"));
        }
        Ok(())
    }

    fn inode(&mut self, h: &Handle) -> io::Result<&mut Inode> {
        let Handle::Id(id) = h else {
            return Err(io::Error::other("not a simulated handle"));
        };
        let ino = self
            .handles
            .get(id)
            .ok_or_else(|| io::Error::other("stale handle"))?;
        Ok(self.inodes.get_mut(ino).expect("inode of an open handle"))
    }

    fn handle(&mut self, ino: u64) -> Handle {
        self.next += 1;
        self.handles.insert(self.next, ino);
        Handle::Id(self.next)
    }

    /// Bytes of the files that have a name.
    fn used(&self) -> usize {
        let named: BTreeSet<u64> = self.names.values().copied().collect();
        named.iter().map(|i| self.inodes[i].volatile.len()).sum()
    }
}

impl SimFs {
    /// Cuts the power at the `n`th call from now on.
    fn cut_after(&self, n: u64) {
        let mut s = self.0.lock();
        s.cut_at = Some(s.calls + n);
    }

    fn cut_now(&self) {
        self.0.lock().cut = true;
    }

    fn calls(&self) -> u64 {
        self.0.lock().calls
    }

    fn set_budget(&self, bytes: Option<usize>) {
        self.0.lock().budget = bytes;
    }

    /// Power comes back: every file holds its durable image with each unsynced write kept,
    /// dropped or torn per sector; names are the durable ones.
    fn restart(&self, rng: &mut fastrand::Rng) {
        let mut s = self.0.lock();
        let s = &mut *s;
        for inode in s.inodes.values_mut() {
            let mut image = inode.durable.clone();
            // Per sector, the number of its pending writes that reached the disk: each sector
            // is written back at some point of its history, sectors independently.
            let mut sectors: BTreeMap<usize, usize> = BTreeMap::new();
            for (off, bytes) in &inode.pending {
                for sector in off / SECTOR..(off + bytes.len()).div_ceil(SECTOR) {
                    *sectors.entry(sector).or_default() += 1;
                }
            }
            let mode = rng.u8(0..3);
            let reached: BTreeMap<usize, usize> = sectors
                .into_iter()
                .map(|(sector, n)| {
                    let k = match mode {
                        0 => n,
                        1 => 0,
                        _ => rng.usize(0..=n),
                    };
                    (sector, k)
                })
                .collect();
            let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
            for (off, bytes) in &inode.pending {
                for sector in off / SECTOR..(off + bytes.len()).div_ceil(SECTOR) {
                    let nth = seen.entry(sector).or_default();
                    *nth += 1;
                    if *nth > reached[&sector] {
                        continue;
                    }
                    let from = (sector * SECTOR).max(*off);
                    let to = ((sector + 1) * SECTOR).min(off + bytes.len());
                    if image.len() < to {
                        image.resize(to, 0);
                    }
                    image[from..to].copy_from_slice(&bytes[from - off..to - off]);
                }
            }
            inode.durable.clone_from(&image);
            inode.volatile = image;
            inode.pending.clear();
        }
        s.names = s.durable_names.clone();
        let named: BTreeSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|i, _| named.contains(i));
        s.handles.clear();
        s.cut = false;
        s.cut_at = None;
    }
}

impl Storage for SimFs {
    /// A new file, or an existing one truncated in place. The truncation is taken as
    /// durable at once (the worst case: the length reaches the disk before the new data).
    fn create(&self, path: &Path) -> io::Result<Handle> {
        let mut s = self.0.lock();
        s.call()?;
        if let Some(&ino) = s.names.get(path) {
            let inode = s.inodes.get_mut(&ino).expect("inode of a name");
            *inode = Inode::default();
            return Ok(s.handle(ino));
        }
        s.next += 1;
        let ino = s.next;
        s.inodes.insert(ino, Inode::default());
        s.names.insert(path.to_path_buf(), ino);
        Ok(s.handle(ino))
    }

    fn open(&self, path: &Path) -> io::Result<Handle> {
        let mut s = self.0.lock();
        s.call()?;
        let ino = *s.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(s.handle(ino))
    }

    fn write_at(&self, file: &Handle, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        let room = s.budget.map(|b| b.saturating_sub(s.used()));
        let inode = s.inode(file)?;
        let at = offset as usize;
        let grows = (at + bytes.len()).saturating_sub(inode.volatile.len());
        let (bytes, full) = match room {
            Some(room) if grows > room => {
                // A short write up to the space there is, then the error.
                let fits = (inode.volatile.len() + room).saturating_sub(at);
                (&bytes[..fits.min(bytes.len())], true)
            }
            _ => (bytes, false),
        };
        if !bytes.is_empty() {
            if inode.volatile.len() < at + bytes.len() {
                inode.volatile.resize(at + bytes.len(), 0);
            }
            inode.volatile[at..at + bytes.len()].copy_from_slice(bytes);
            inode.pending.push((at, bytes.to_vec()));
        }
        if full {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device (simulated)",
            ));
        }
        Ok(())
    }

    fn read_at(&self, file: &Handle, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        let inode = s.inode(file)?;
        let at = offset as usize;
        let src = inode
            .volatile
            .get(at..at + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.0.lock();
        s.call()?;
        let ino = *s.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(s.inodes[&ino].volatile.clone())
    }

    fn sync_data(&self, file: &Handle) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        let inode = s.inode(file)?;
        inode.durable.clone_from(&inode.volatile);
        inode.pending.clear();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        let ino = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        s.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut s = self.0.lock();
        s.call()?;
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.0.lock();
        s.call()?;
        let s = &mut *s;
        s.durable_names.retain(|p, _| p.parent() != Some(dir));
        for (p, ino) in &s.names {
            if p.parent() == Some(dir) {
                s.durable_names.insert(p.clone(), *ino);
            }
        }
        Ok(())
    }
}

fn spec() -> &'static ChannelSpec {
    static SPEC: std::sync::LazyLock<ChannelSpec> = std::sync::LazyLock::new(|| JobChannel::SPEC);
    &SPEC
}

fn open(
    dir: &Path,
    clock: &VirtualClock,
    storage: Arc<dyn Storage>,
    segment_size: u64,
) -> Arc<FileAdapter> {
    store::open(dir, clock, || FileOptions {
        segment_size,
        storage: storage.clone(),
        background_compaction: false,
        lead_commits: true,
    })
}

/// What the store confirmed.
#[derive(Default)]
struct History {
    /// Messages whose produce returned `Ok` and whose ack did not.
    stored: BTreeMap<MessageId, Vec<u8>>,
    /// Messages whose ack returned `Ok`.
    acked: BTreeSet<MessageId>,
    produces: u64,
    /// Messages delivered: one can reach its consumer before its producer hears it stored.
    delivered: BTreeSet<MessageId>,
}

/// Random produces, deliveries with acks, retries and dead letters, and compactions, until
/// the store fails or `steps` are done. Returns whether it stopped on an error.
async fn workload(
    adapter: &Arc<FileAdapter>,
    rng: &mut fastrand::Rng,
    steps: usize,
    history: &mut History,
) -> bool {
    let Ok(sub) = adapter.subscribe(spec(), 1).await else {
        return true;
    };
    // Messages ready for delivery: the pending ones, since the clock stands still.
    let pending = match adapter.peek(NAME, LIMIT).await {
        Ok(pending) => pending,
        Err(QueueError::UnknownChannel(_)) => Vec::new(),
        Err(_) => return true,
    };
    // A recovered message whose attempts are used up dies when it is taken.
    let mut ready = pending.iter().filter(|m| m.attempts < 3).count();
    for _ in 0..steps {
        match rng.u8(0..10) {
            0..4 => {
                let batch: Vec<Outgoing> = (0..rng.usize(1..4))
                    .map(|_| Outgoing {
                        payload: (0..rng.usize(8..400)).map(|_| rng.u8(..)).collect(),
                        dedup_key: None,
                        delay: Duration::ZERO,
                        priority: 0,
                        group: None,
                    })
                    .collect();
                let payloads: Vec<Vec<u8>> = batch.iter().map(|o| o.payload.clone()).collect();
                match adapter.produce(spec(), batch).await {
                    Ok(receipts) => {
                        for (r, p) in receipts.into_iter().zip(payloads) {
                            history.stored.insert(r.id, p);
                            history.produces += 1;
                            ready += 1;
                        }
                    }
                    Err(_) => return true,
                }
            }
            4..9 if ready > 0 => {
                let d = match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(_)) => return true,
                    Err(_) => panic!("no delivery of a ready message"),
                };
                ready -= 1;
                assert_eq!(
                    history.stored.get(&d.lease.id),
                    Some(&d.payload),
                    "delivered as produced"
                );
                assert!(d.attempt <= 3, "at most 3 attempts");
                let outcome = match rng.u8(0..10) {
                    0..6 => Outcome::Ack,
                    6..9 => Outcome::Retry {
                        after: Some(Duration::ZERO),
                        error: "flaky".into(),
                    },
                    _ => Outcome::DeadLetter {
                        error: "bad".into(),
                    },
                };
                let requeued = matches!(outcome, Outcome::Retry { .. }) && d.attempt < 3;
                let acked = matches!(outcome, Outcome::Ack);
                let settled = adapter.settle(&d.lease, outcome).await;
                if acked {
                    // An ack that failed may still have reached the disk: neither outcome
                    // is checked.
                    history.stored.remove(&d.lease.id);
                }
                if settled.is_err() {
                    return true;
                }
                if acked {
                    history.acked.insert(d.lease.id);
                }
                if requeued {
                    ready += 1;
                }
            }
            9 => {
                let compacted = adapter.compact().await;
                if compacted.is_err() {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

const LIMIT: usize = 1_000_000;

/// Every confirmed message is stored with its payload; no acked one is. Messages stored whose
/// produce was not confirmed are taken into the history: they are durable now. Returns the
/// confirmed messages checked.
async fn check(adapter: &Arc<FileAdapter>, history: &mut History) -> usize {
    let mut found: BTreeMap<MessageId, Vec<u8>> = BTreeMap::new();
    // A store that lost every record of the channel does not know it.
    let pending = match adapter.peek(NAME, LIMIT).await {
        Err(QueueError::UnknownChannel(_)) => Vec::new(),
        r => r.unwrap(),
    };
    for m in pending {
        found.insert(m.id, m.payload);
    }
    for d in adapter.dead_letters(NAME, LIMIT).await.unwrap() {
        found.insert(d.id, d.payload);
    }
    for (id, payload) in &history.stored {
        assert_eq!(
            found.get(id),
            Some(payload),
            "confirmed message {id:?} lost"
        );
    }
    for id in &history.acked {
        assert!(!found.contains_key(id), "acked message {id:?} came back");
    }
    let checked = history.stored.len();
    history.stored.extend(found);
    checked
}

const SEGMENT: u64 = 4096;
const STEPS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_point_loses_nothing_confirmed_and_brings_back_no_ack() {
    let cuts: u64 = std::env::var("QUEUE_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let started = Instant::now();
    // A run without a cut: how many storage calls a workload makes.
    let full = {
        let fs = Arc::new(SimFs::default());
        let adapter = open(dir.path(), &clock, fs.clone(), SEGMENT);
        let mut history = History::default();
        let stopped = workload(
            &adapter,
            &mut fastrand::Rng::with_seed(0),
            STEPS,
            &mut history,
        )
        .await;
        assert!(!stopped, "the workload runs without failures");
        adapter.close().await.unwrap();
        fs.calls()
    };
    let (mut checked, mut acked, mut confirmed, mut opened_segments) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..cuts {
        let mut rng = fastrand::Rng::with_seed(i + 1);
        let fs = Arc::new(SimFs::default());
        // A directory of its own for the `LOCK` file: a process another test spawns may hold
        // a copy of the last one's descriptor for a moment.
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::default();
        // Two lives, each cut at a random call: the second starts from what the first left.
        for life in 0..2 {
            let adapter = open(dir.path(), &clock, fs.clone(), SEGMENT);
            if life > 0 {
                checked += check(&adapter, &mut history).await as u64;
            }
            fs.cut_after(rng.u64(1..=full));
            workload(&adapter, &mut rng, STEPS, &mut history).await;
            fs.cut_now();
            let _ = adapter.close().await;
            drop(adapter);
            fs.restart(&mut rng);
        }
        let recovered = open(dir.path(), &clock, fs.clone(), SEGMENT);
        opened_segments += recovered.segments().len() as u64;
        checked += check(&recovered, &mut history).await as u64;
        acked += history.acked.len() as u64;
        confirmed += history.produces;
        recovered.close().await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "power cuts: {} in {secs:.1}s ({full} storage calls per workload); {confirmed} confirmed \
         produces, {checked} stored messages checked present, {acked} acks checked gone, \
         {opened_segments} segments opened; lost 0, acked back 0",
        cuts * 2
    );
    assert!(
        confirmed > cuts,
        "the workloads confirm produces before the cuts"
    );
    assert!(
        acked > cuts / 2,
        "the workloads confirm acks before the cuts"
    );
}

/// Four producers and an acking consumer at once, producers leading commits on both runtime
/// threads while the writer thread commits the acks; the power is cut at a random call.
/// Nothing confirmed is lost, nothing acked comes back, in either life or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_under_concurrent_producers_and_acks_loses_nothing_confirmed() {
    let cuts: u64 = std::env::var("QUEUE_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(100, |n: u64| (n / 10).max(1));
    let clock = VirtualClock::default();
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(SimFs::default());
    let full = {
        let adapter = open(dir.path(), &clock, fs.clone(), SEGMENT * 4);
        let history = Arc::new(Mutex::new(History::default()));
        assert!(!together(&adapter, &history).await, "runs without failures");
        adapter.close().await.unwrap();
        fs.calls()
    };
    let (mut checked, mut acked) = (0u64, 0u64);
    for i in 0..cuts {
        let mut rng = fastrand::Rng::with_seed(i + 7_000);
        let fs = Arc::new(SimFs::default());
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(Mutex::new(History::default()));
        for life in 0..2 {
            let adapter = open(dir.path(), &clock, fs.clone(), SEGMENT * 4);
            if life > 0 {
                let mut h = std::mem::take(&mut *history.lock());
                checked += check(&adapter, &mut h).await as u64;
                *history.lock() = h;
            }
            fs.cut_after(rng.u64(1..=full));
            together(&adapter, &history).await;
            fs.cut_now();
            let _ = adapter.close().await;
            drop(adapter);
            fs.restart(&mut rng);
        }
        let recovered = open(dir.path(), &clock, fs.clone(), SEGMENT * 4);
        let mut h = std::mem::take(&mut *history.lock());
        checked += check(&recovered, &mut h).await as u64;
        *history.lock() = h;
        acked += history.lock().acked.len() as u64;
        recovered.close().await.unwrap();
    }
    println!(
        "concurrent producers and acks: {} power cuts; {checked} stored messages checked present, {acked} \
         acks checked gone; lost 0, acked back 0",
        cuts * 2
    );
    assert!(
        checked > cuts,
        "the workloads confirm produces before the cuts"
    );
}

/// Four producers of 12 messages each and a consumer acking what it gets, at once, until
/// they are done or the store fails. Returns whether anything failed.
async fn together(adapter: &Arc<FileAdapter>, history: &Arc<Mutex<History>>) -> bool {
    let Ok(sub) = adapter.subscribe(spec(), 8).await else {
        return true;
    };
    // Messages produced while it has room are leased to it in their produce's commit.
    sub.take_ahead();
    let mut producers = Vec::new();
    for p in 0..4u8 {
        let (adapter, history) = (adapter.clone(), history.clone());
        producers.push(tokio::spawn(async move {
            for n in 0..12u8 {
                let payload = vec![p, n, 7, 7, 7, 7, 7, 7];
                let out = Outgoing {
                    payload: payload.clone(),
                    dedup_key: None,
                    delay: Duration::ZERO,
                    priority: 0,
                    group: None,
                };
                match adapter.produce(spec(), vec![out]).await {
                    Ok(receipts) => {
                        let mut h = history.lock();
                        if !h.delivered.contains(&receipts[0].id) {
                            h.stored.insert(receipts[0].id, payload);
                        }
                        h.produces += 1;
                    }
                    Err(_) => return true,
                }
            }
            false
        }));
    }
    let consumer = {
        let (adapter, history) = (adapter.clone(), history.clone());
        tokio::spawn(async move {
            for _ in 0..24 {
                let d = match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(_)) => return true,
                    Err(_) => return false,
                };
                // An ack that failed may still have reached the disk: neither outcome is
                // checked.
                {
                    let mut h = history.lock();
                    h.stored.remove(&d.lease.id);
                    h.delivered.insert(d.lease.id);
                }
                if adapter.settle(&d.lease, Outcome::Ack).await.is_err() {
                    return true;
                }
                history.lock().acked.insert(d.lease.id);
            }
            false
        })
    };
    let mut failed = false;
    for p in producers {
        failed |= p.await.unwrap();
    }
    failed | consumer.await.unwrap()
}

fn is_full(e: &QueueError) -> bool {
    matches!(e, QueueError::Io(io) if io.kind() == io::ErrorKind::StorageFull)
        && e.to_string().contains("the disk is full")
}

/// Fills the store until produces are refused, then checks that deliveries, acks, dead
/// letters and compaction still work, that produces work again once space is freed, and
/// that a reopen finds everything confirmed. `payload` sizes the messages.
async fn fill_drain_refill(
    dir: &Path,
    storage: Arc<dyn Storage>,
    segment_size: u64,
    payload: usize,
) -> String {
    let clock = VirtualClock::default();
    let adapter = open(dir, &clock, storage.clone(), segment_size);
    let mut history = History::default();
    let mut n = 0u32;
    let refused = loop {
        n += 1;
        let body = vec![(n % 251) as u8; payload];
        match adapter
            .produce(
                spec(),
                vec![Outgoing {
                    payload: body.clone(),
                    dedup_key: None,
                    delay: Duration::ZERO,
                    priority: 0,
                    group: None,
                }],
            )
            .await
        {
            Ok(r) => {
                history.stored.insert(r[0].id, body);
            }
            Err(e) => break e,
        }
        assert!(n < 100_000, "the disk never filled");
    };
    assert!(is_full(&refused), "refused with a clear error: {refused}");
    let filled = history.stored.len();
    // Refused again, not poisoned.
    let again = adapter
        .produce(
            spec(),
            vec![Outgoing {
                payload: vec![1; payload],
                dedup_key: None,
                delay: Duration::ZERO,
                priority: 0,
                group: None,
            }],
        )
        .await
        .expect_err("still full");
    assert!(is_full(&again), "{again}");
    // Consume everything: most acked, some dead-lettered. Compaction runs as in the
    // background, deleting the segments that empty; the settling writes between two
    // deletions take more than a produce left, so they need the reserve.
    let sub = adapter.subscribe(spec(), 1).await.unwrap();
    let mut dead = 0;
    let mut deleted = 0;
    for i in 0..filled {
        if i % 16 == 15 {
            deleted += adapter
                .compact_settled()
                .await
                .expect("compaction works on a full disk");
        }
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a delivery on a full disk")
            .expect("deliveries work on a full disk");
        // The last few die: they are in the newest segments, so compaction has nothing to
        // move and deletes the segments before them.
        if i + 3 >= filled {
            adapter
                .settle(
                    &d.lease,
                    Outcome::DeadLetter {
                        error: "bad".into(),
                    },
                )
                .await
                .expect("a dead-letter move works on a full disk");
            dead += 1;
        } else {
            adapter
                .settle(&d.lease, Outcome::Ack)
                .await
                .expect("an ack works on a full disk");
            history.stored.remove(&d.lease.id);
            history.acked.insert(d.lease.id);
        }
    }
    drop(sub);
    deleted += adapter
        .compact()
        .await
        .expect("compaction works on a full disk");
    assert!(deleted > 0, "compaction frees segments");
    // Produces work again without a restart.
    let mut more = 0;
    for i in 0..(filled / 2) {
        let body = vec![7u8; payload];
        let r = adapter
            .produce(
                spec(),
                vec![Outgoing {
                    payload: body.clone(),
                    dedup_key: None,
                    delay: Duration::ZERO,
                    priority: 0,
                    group: None,
                }],
            )
            .await
            .unwrap_or_else(|e| panic!("produce {i} after compaction: {e}"));
        history.stored.insert(r[0].id, body);
        more += 1;
    }
    adapter.close().await.expect("closes cleanly");
    drop(adapter);
    let reopened = open(dir, &clock, storage, segment_size);
    assert_eq!(
        reopened.open_report().truncated,
        0,
        "reopens without a torn tail"
    );
    let present = check(&reopened, &mut history).await;
    reopened.close().await.unwrap();
    format!(
        "{filled} produces before refusal ({refused}); {} acks and {dead} dead letters on the \
         full disk; compaction deleted {deleted} segments; {more} produces after; reopened with \
         {present} messages, all confirmed present, acks gone",
        history.acked.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_produces_but_not_acks_and_recovers_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(SimFs::default());
    fs.set_budget(Some(256 << 10));
    let report = fill_drain_refill(dir.path(), fs.clone(), 64 << 10, 1500).await;
    println!("simulated full disk: {report}");
}

/// Unmounts the tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tmpfs_refuses_produces_but_not_acks_and_recovers_without_restart() {
    let root = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(root.path())
        .status();
    if !matches!(mounted, Ok(s) if s.success()) {
        println!("note: skipped the tmpfs part: cannot mount a tmpfs (not root?): {mounted:?}");
        return;
    }
    let _mount = Mount(root.path().to_path_buf());
    let dir = root.path().join("store");
    let report = fill_drain_refill(
        &dir,
        Arc::new(queue_runtime::adapters::file::writer::OsStorage),
        1 << 20,
        16 << 10,
    )
    .await;
    println!("8 MiB tmpfs: {report}");
}

fn outgoing(payload: Vec<u8>) -> Vec<Outgoing> {
    vec![Outgoing {
        payload,
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    }]
}

#[tokio::test]
async fn a_write_that_fails_for_want_of_space_fails_its_batch_only_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let fs = Arc::new(SimFs::default());
    // Two 16 KiB segments fit, and 8 KiB more.
    fs.set_budget(Some(40 << 10));
    let adapter = open(dir.path(), &clock, fs.clone(), 16 << 10);
    // Larger than a segment: it goes alone into the next one and grows it past the budget.
    let refused = adapter
        .produce(spec(), outgoing(vec![7; 30 << 10]))
        .await
        .expect_err("no room for the write");
    assert!(is_full(&refused), "{refused}");
    let kept = adapter
        .produce(spec(), outgoing(vec![1; 100]))
        .await
        .expect("the store is not poisoned");
    adapter.close().await.unwrap();
    drop(adapter);
    let reopened = open(dir.path(), &clock, fs.clone(), 16 << 10);
    assert_eq!(
        reopened.open_report().truncated,
        0,
        "what the failed write left was zeroed"
    );
    let ids: Vec<MessageId> = reopened
        .peek(NAME, LIMIT)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        ids,
        vec![kept[0].id],
        "only the confirmed message is stored"
    );
    println!("refused: {refused}");
}

/// Pauses and resumes a channel `toggles` times in a row; returns the last state confirmed
/// and the one being set when a call failed.
async fn toggle(adapter: &Arc<FileAdapter>, toggles: &[bool]) -> (bool, Option<bool>) {
    let mut confirmed = false;
    for &paused in toggles {
        match adapter.set_paused(NAME, paused).await {
            Ok(()) => confirmed = paused,
            Err(_) => return (confirmed, Some(paused)),
        }
    }
    (confirmed, None)
}

#[tokio::test]
async fn a_power_cut_during_a_pause_or_resume_leaves_the_old_state_or_the_new_one() {
    let clock = VirtualClock::default();
    let toggles = [true, false, true, false, true];
    let setup = |dir: &Path, fs: &Arc<SimFs>| {
        let adapter = open(dir, &clock, fs.clone(), SEGMENT);
        let fs = fs.clone();
        async move {
            adapter
                .produce(spec(), outgoing(vec![7; 16]))
                .await
                .unwrap();
            (adapter, fs.calls())
        }
    };
    // The storage calls of the whole sequence, without a cut.
    let full = {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(SimFs::default());
        let (adapter, before) = setup(dir.path(), &fs).await;
        assert_eq!(toggle(&adapter, &toggles).await, (true, None));
        fs.calls() - before
    };
    let mut outcomes = BTreeSet::new();
    for cut in 1..=full + 1 {
        for seed in 0..3 {
            let mut rng = fastrand::Rng::with_seed(cut * 10 + seed);
            let dir = tempfile::tempdir().unwrap();
            let fs = Arc::new(SimFs::default());
            let (adapter, _) = setup(dir.path(), &fs).await;
            fs.cut_after(cut);
            let (confirmed, attempted) = toggle(&adapter, &toggles).await;
            fs.cut_now();
            let _ = adapter.close().await;
            drop(adapter);
            fs.restart(&mut rng);
            let reopened = FileAdapter::open(
                dir.path(),
                Arc::new(clock.clone()),
                FileOptions {
                    segment_size: SEGMENT,
                    storage: fs.clone(),
                    background_compaction: false,
                    lead_commits: true,
                },
            )
            .unwrap_or_else(|e| panic!("cut at call {cut}: the store does not reopen: {e}"));
            let paused = reopened
                .stats()
                .await
                .unwrap()
                .into_iter()
                .find(|s| s.channel == NAME)
                .expect("the channel is known")
                .paused;
            assert!(
                paused == confirmed || Some(paused) == attempted,
                "cut at call {cut}: paused {paused}, confirmed {confirmed}, attempted {attempted:?}"
            );
            outcomes.insert((confirmed, attempted.is_some(), paused));
            reopened.close().await.unwrap();
        }
    }
    // The cuts fell before, inside and after the changes, and a failed change was seen both
    // taking effect and not.
    assert!(outcomes.contains(&(false, true, false)), "{outcomes:?}");
    assert!(outcomes.contains(&(true, true, true)), "{outcomes:?}");
    assert!(outcomes.contains(&(true, false, true)), "{outcomes:?}");
}
