//! Throughput of the `memory://` adapter: produce, and consume+ack through the consumer loop.
//! Run with `cargo bench -p queue-runtime --bench memory`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("bench/memory")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Msg {
    body: String,
}

fn msg() -> Msg {
    // About 256 bytes of BSON.
    Msg {
        body: "x".repeat(236),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn produce(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("memory/produce");
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        let queue = rt.block_on(queue_runtime::connect("memory://")).unwrap();
        let m = msg();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    Msg::produce(&queue, m.clone()).await.unwrap();
                }
                start.elapsed()
            })
        });
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("batch_64", |b| {
        let queue = rt.block_on(queue_runtime::connect("memory://")).unwrap();
        let batch: Vec<Msg> = (0..64).map(|_| msg()).collect();
        let producer = Msg::producer(&queue);
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    producer.produce_batch(batch.clone()).await.unwrap();
                }
                start.elapsed()
            })
        });
    });
    g.finish();
}

fn consume_ack(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("memory/consume_ack");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.bench_function("max_parallel_64", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let queue = queue_runtime::connect("memory://").await.unwrap();
                let producer = Msg::producer(&queue);
                let mut left = iters;
                while left > 0 {
                    let n = left.min(1024);
                    producer.produce_batch((0..n).map(|_| msg())).await.unwrap();
                    left -= n;
                }
                let done = Arc::new(AtomicU64::new(0));
                let counter = done.clone();
                let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
                let start = Instant::now();
                let consumer = Msg::consumer(&queue)
                    .max_parallel(64)
                    .handle(move |_m: Msg| {
                        let counter = counter.clone();
                        let tx = tx.clone();
                        async move {
                            if counter.fetch_add(1, Ordering::Relaxed) + 1 == iters {
                                let _ = tx.try_send(());
                            }
                        }
                    })
                    .await
                    .unwrap();
                rx.recv().await;
                // The last ack follows the last handler call.
                while queue.stats().await.unwrap()[0].acked < iters {
                    tokio::task::yield_now().await;
                }
                let elapsed = start.elapsed();
                consumer.stop(Duration::ZERO).await.unwrap();
                elapsed
            })
        });
    });
    g.finish();
}

criterion_group!(benches, produce, consume_ack);
criterion_main!(benches);
