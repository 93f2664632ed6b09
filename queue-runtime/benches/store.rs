//! The embedded store at depth: heap bytes per pending message and reopen time with a deep
//! backlog (1,000,000 messages of 256 bytes unless `STORE_BENCH_MESSAGES` says otherwise).
//! Run with `cargo bench -p queue-runtime --bench store`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use queue_core::{Adapter, ChannelSpec, Outgoing, codec};
use queue_runtime::SystemClock;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[expect(
    unsafe_code,
    reason = "a global allocator is unsafe to implement; this one only counts"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let n: usize = std::env::var("STORE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = ChannelSpec::new("bench/depth");
    let payload = codec::encode(&"x".repeat(236)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = FileOptions {
            background_compaction: false,
            ..FileOptions::default()
        };
        let adapter =
            FileAdapter::open(dir.path(), Arc::new(SystemClock), options.clone()).unwrap();
        let before = LIVE.load(Ordering::Relaxed);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let adapter = adapter.clone();
            let spec = spec.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..n / 8 / 500 {
                    let batch: Vec<Outgoing> = (0..500)
                        .map(|_| Outgoing {
                            payload: payload.clone(),
                            dedup_key: None,
                            delay: Duration::ZERO,
                            priority: 0,
                            group: None,
                        })
                        .collect();
                    adapter.produce(&spec, batch).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stored = n / 8 / 500 * 8 * 500;
        let produce = start.elapsed();
        let after = LIVE.load(Ordering::Relaxed);
        println!(
            "filled {stored} messages of {} bytes in {:.2}s ({:.0} msg/s in batches of 500)",
            payload.len(),
            produce.as_secs_f64(),
            stored as f64 / produce.as_secs_f64()
        );
        println!(
            "heap per pending message while running: {:.1} bytes",
            (after - before) as f64 / stored as f64
        );
        adapter.close().await.unwrap();
        drop(adapter);

        let before = LIVE.load(Ordering::Relaxed);
        let start = Instant::now();
        let adapter = FileAdapter::open(dir.path(), Arc::new(SystemClock), options).unwrap();
        let reopen = start.elapsed();
        let after = LIVE.load(Ordering::Relaxed);
        let report = adapter.open_report();
        println!(
            "reopen with {} pending: {:.3}s ({} records, {} segments)",
            report.messages,
            reopen.as_secs_f64(),
            report.records,
            report.segments
        );
        println!(
            "heap per pending message after reopen: {:.1} bytes",
            (after - before) as f64 / report.messages as f64
        );
        let stats = adapter.stats().await.unwrap();
        assert_eq!(stats[0].ready, stored as u64);
    });
}
