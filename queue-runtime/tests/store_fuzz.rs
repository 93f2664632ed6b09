//! Recovery under random damage: bit flips, zeroed ranges and random bytes in the headers,
//! the synced batches and the tails of random segments. Each case either fails to open with
//! a clean `Corrupt`, or opens with every acknowledged produce, ack and dead letter intact.
//!
//! `QUEUE_FUZZ_CASES` sets the number of cases (default 10,000), `QUEUE_FUZZ_SECS` the time
//! limit (default 60), `QUEUE_FUZZ_SEED` the seed:
//! `QUEUE_FUZZ_CASES=200000 QUEUE_FUZZ_SECS=3600 cargo test -p queue-runtime --test store_fuzz -- --nocapture`

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_core::{
    Adapter, ChannelSpec, MessageId, Outcome, Outgoing, Queue, QueueError, VirtualClock,
};
use queue_runtime::TokioSpawner;
use queue_runtime::adapters::file::format::{self, Read};
use queue_runtime::adapters::file::writer::{Handle, Storage};
use queue_runtime::adapters::file::{FileAdapter, FileOptions};

const CHANNEL: &str = "fuzz/orders";

/// Bytes of a commit record, frame included.
const COMMIT_LEN: usize = format::FRAME_LEN + 17;

fn spec() -> ChannelSpec {
    ChannelSpec::new(CHANNEL).max_attempts(10)
}

/// Writes without syncing: the cases check recovery, not the disk.
struct NoSync;

impl Storage for NoSync {
    fn sync_data(&self, _: &Handle) -> io::Result<()> {
        Ok(())
    }
    fn sync_dir(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
}

fn options() -> FileOptions {
    FileOptions {
        segment_size: 4096,
        background_compaction: false,
        storage: Arc::new(NoSync),
        lead_commits: true,
    }
}

fn payload(n: u32) -> Vec<u8> {
    queue_core::codec::encode(&format!("order {n} {}", "x".repeat(n as usize % 40))).unwrap()
}

/// What the fixture's acknowledged operations left.
#[derive(Default)]
struct Expected {
    pending: BTreeMap<MessageId, Vec<u8>>,
    dead: BTreeMap<MessageId, String>,
    acked: BTreeSet<MessageId>,
}

fn queue_of(adapter: &Arc<FileAdapter>, clock: &VirtualClock) -> Queue {
    Queue::new(
        adapter.clone(),
        Arc::new(clock.clone()),
        Arc::new(TokioSpawner::current()),
        "file://fuzz",
    )
}

/// A store of a few segments: messages pending, acked and dead-lettered, each produce and
/// settlement its own group commit. It is opened twice more at the end, so its last two
/// group commits are lone commit records: the acknowledged batches are all followed by a
/// later commit, as in a store that kept running.
async fn build(dir: &Path, clock: &VirtualClock) -> Expected {
    let mut expected = Expected::default();
    let adapter = FileAdapter::open(dir, Arc::new(clock.clone()), options()).unwrap();
    let queue = queue_of(&adapter, clock);
    for n in 0..90 {
        let receipt = queue
            .produce_raw(
                &spec(),
                vec![Outgoing {
                    payload: payload(n),
                    dedup_key: None,
                    delay: Duration::ZERO,
                    priority: 0,
                    group: None,
                }],
            )
            .await
            .unwrap();
        expected.pending.insert(receipt[0].id, payload(n));
    }
    let sub = adapter.subscribe(&spec(), 1).await.unwrap();
    for i in 0..60 {
        let d = sub.next().await.unwrap();
        let id = d.lease.id;
        let outcome = match i % 4 {
            0 | 1 => Outcome::Ack,
            2 => Outcome::DeadLetter {
                error: format!("dead {i} 한국어"),
            },
            _ => Outcome::Release,
        };
        match &outcome {
            Outcome::Ack => {
                expected.pending.remove(&id);
                expected.acked.insert(id);
            }
            Outcome::DeadLetter { error } => {
                expected.pending.remove(&id);
                expected.dead.insert(id, error.clone());
            }
            _ => {}
        }
        adapter.settle(&d.lease, outcome).await.unwrap();
    }
    drop(sub);
    queue.close().await.unwrap();
    drop((queue, adapter));
    for _ in 0..2 {
        let adapter = FileAdapter::open(dir, Arc::new(clock.clone()), options()).unwrap();
        queue_of(&adapter, clock).close().await.unwrap();
    }
    expected
}

/// Checks that the store in `dir` holds exactly what the fixture acknowledged.
async fn intact(adapter: &Arc<FileAdapter>, expected: &Expected) -> Result<(), String> {
    let pending = match adapter.peek(CHANNEL, 10_000).await {
        Ok(p) => p,
        Err(QueueError::UnknownChannel(_)) => Vec::new(),
        Err(e) => return Err(format!("peek failed: {e}")),
    };
    let got: BTreeMap<MessageId, Vec<u8>> =
        pending.into_iter().map(|m| (m.id, m.payload)).collect();
    if got != expected.pending {
        let missing: Vec<_> = expected
            .pending
            .keys()
            .filter(|id| !got.contains_key(id))
            .collect();
        let extra: Vec<_> = got
            .keys()
            .filter(|id| !expected.pending.contains_key(id))
            .collect();
        return Err(format!(
            "pending differs: missing {missing:?}, extra {extra:?}, or a payload changed"
        ));
    }
    let dead: BTreeMap<MessageId, String> = match adapter.dead_letters(CHANNEL, 10_000).await {
        Ok(d) => d.into_iter().map(|d| (d.id, d.error)).collect(),
        Err(QueueError::UnknownChannel(_)) => BTreeMap::new(),
        Err(e) => return Err(format!("dead letters failed: {e}")),
    };
    if dead != expected.dead {
        return Err(format!(
            "dead letters differ: got {:?}, expected {:?}",
            dead.keys().collect::<Vec<_>>(),
            expected.dead.keys().collect::<Vec<_>>()
        ));
    }
    if let Some(id) = expected.acked.iter().find(|id| got.contains_key(id)) {
        return Err(format!("acked message {id} is back"));
    }
    Ok(())
}

/// The end of the last record of a segment: where its written data ends.
fn data_end(bytes: &[u8]) -> usize {
    let mut at = format::HEADER_LEN;
    while let Read::Record(_, len) = format::decode(&bytes[at..]) {
        at += len;
    }
    at
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Region {
    Header,
    Synced,
    Tail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    BitFlips,
    Zeros,
    RandomBytes,
}

struct Damage {
    file: usize,
    region: Region,
    kind: Kind,
    at: usize,
    len: usize,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} in the {:?} of segment file {} at {} for {} bytes",
            self.kind, self.region, self.file, self.at, self.len
        )
    }
}

fn damage(rng: &mut fastrand::Rng, files: &[(String, Vec<u8>)]) -> (usize, Vec<u8>, Damage) {
    let file = rng.usize(..files.len());
    let mut bytes = files[file].1.clone();
    let end = data_end(&bytes);
    let region = match rng.u8(..10) {
        0..=1 => Region::Header,
        2..=7 => Region::Synced,
        _ => Region::Tail,
    };
    let (lo, hi) = match region {
        Region::Header => (0, format::HEADER_LEN),
        Region::Synced => (format::HEADER_LEN, end),
        Region::Tail => (end, bytes.len()),
    };
    let kind = match rng.u8(..3) {
        0 => Kind::BitFlips,
        1 => Kind::Zeros,
        _ => Kind::RandomBytes,
    };
    let at = rng.usize(lo..hi.max(lo + 1)).min(bytes.len() - 1);
    let len = match rng.u8(..4) {
        0 => 1,
        1 => rng.usize(1..16),
        2 => rng.usize(1..256),
        _ => rng.usize(1..2048),
    }
    .min(bytes.len() - at);
    match kind {
        Kind::BitFlips => {
            for _ in 0..rng.usize(1..=8) {
                bytes[rng.usize(at..at + len)] ^= 1 << rng.u8(..8);
            }
        }
        Kind::Zeros => bytes[at..at + len].fill(0),
        Kind::RandomBytes => rng.fill(&mut bytes[at..at + len]),
    }
    let d = Damage {
        file,
        region,
        kind,
        at,
        len,
    };
    (file, bytes, d)
}

#[derive(Default)]
struct Tally {
    cases: u64,
    corrupt: BTreeMap<(Region, Kind), u64>,
    intact: BTreeMap<(Region, Kind), u64>,
    lost_tail: u64,
}

#[test]
fn random_damage_is_refused_as_corrupt_or_leaves_every_acknowledged_change_intact() {
    let cases: u64 = std::env::var("QUEUE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let secs: u64 = std::env::var("QUEUE_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("QUEUE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let clock = VirtualClock::default();
    let fixture = tempfile::tempdir().unwrap();
    let expected = runtime.block_on(build(fixture.path(), &clock));
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qlog"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "the fixture spans several segments");
    assert!(!expected.pending.is_empty() && !expected.dead.is_empty());

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::default();
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    while tally.cases < cases && started.elapsed() < Duration::from_secs(secs) {
        // Case 0 is the undamaged store.
        let (file, bytes, what) = if tally.cases == 0 {
            let d = Damage {
                file: 0,
                region: Region::Synced,
                kind: Kind::Zeros,
                at: 0,
                len: 0,
            };
            (0, files[0].1.clone(), d)
        } else {
            damage(&mut rng, &files)
        };
        let dir = work.path().join(tally.cases.to_string());
        std::fs::create_dir(&dir).unwrap();
        for (i, (name, original)) in files.iter().enumerate() {
            let b = if i == file { &bytes } else { original };
            std::fs::write(dir.join(name), b).unwrap();
        }
        let context = format!("case {} (seed {seed}): {what}", tally.cases);
        let opened = std::panic::catch_unwind(|| {
            FileAdapter::open(&dir, Arc::new(clock.clone()), options())
        })
        .unwrap_or_else(|_| panic!("open panicked: {context}"));
        let key = (what.region, what.kind);
        match opened {
            Err(QueueError::Corrupt(text)) => {
                assert!(
                    text.contains(&files[file].0) || tally.cases == 0,
                    "the error names the damaged file: {text}; {context}"
                );
                assert!(text.contains("at offset"), "{text}; {context}");
                *tally.corrupt.entry(key).or_default() += 1;
            }
            Err(e) => panic!("open failed with {e:?}, not Corrupt: {context}"),
            Ok(adapter) => {
                let check = runtime.block_on(intact(&adapter, &expected));
                drop(adapter);
                match check {
                    Ok(()) => *tally.intact.entry(key).or_default() += 1,
                    // Zeros from a point to the end of a file are what a write that never
                    // reached the disk leaves, and damage reaching into the last group
                    // commit of the newest segment leaves no later commit to prove that the
                    // damaged batches were synced: recovery cuts both as a torn tail (see
                    // docs/design.md, what is assumed of the disk).
                    Err(_)
                        if (what.kind == Kind::Zeros
                            && bytes[what.at..].iter().all(|b| *b == 0))
                            || (file + 1 == files.len()
                                && what.at + what.len
                                    > data_end(&files[file].1) - 2 * COMMIT_LEN) =>
                    {
                        tally.lost_tail += 1;
                    }
                    Err(e) => panic!("opened with a change lost: {e}; {context}"),
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        tally.cases += 1;
    }
    let corrupt: u64 = tally.corrupt.values().sum();
    let intact: u64 = tally.intact.values().sum();
    println!(
        "store fuzz: {} cases in {:.1}s (seed {seed}): {corrupt} refused as corrupt, {intact} opened intact, {} tails cut",
        tally.cases,
        started.elapsed().as_secs_f64(),
        tally.lost_tail
    );
    for (key, n) in &tally.corrupt {
        println!("  corrupt  {key:?}: {n}");
    }
    for (key, n) in &tally.intact {
        println!("  intact   {key:?}: {n}");
    }
    assert!(tally.cases >= cases.min(1_000), "too few cases ran");
    assert!(corrupt > 0 && intact > 0, "both outcomes occur");
}
