//! `queuectl bench`: a load generator in the spirit of `redis-benchmark` and `nats bench`.
//!
//! Producers send messages of `--size` payload bytes, each produce awaited (so each is
//! durable before the next), closed loop or at a fixed `--rate` (open loop: latency counts
//! from the scheduled send time, so a stall is not hidden). Consumers take up to
//! `--max-parallel` deliveries at once and ack each. End-to-end latency is measured from the
//! send time carried in the message to the handler call.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use queue_core::consume::{ErasedHandler, start_consumer};
use queue_core::{Channel as _, ChannelSpec, GroupKey as _, Outgoing, codec};
use queue_runtime::{Queue, channel};
use serde::{Deserialize, Serialize};

#[channel("queuectl/bench", lease = "60s")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchMessage {
    /// Nanoseconds since the Unix epoch at the (scheduled) send time.
    pub sent_ns: u64,
    /// Filler.
    pub body: String,
}

/// Options of `queuectl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Queue URL; a fresh temporary embedded store when omitted.
    #[arg(long, env = "QUEUE_URL")]
    pub url: Option<String>,
    /// Concurrent producers (0: consume an existing backlog only).
    #[arg(long, default_value_t = 32)]
    pub producers: usize,
    /// Concurrent consumers (0: produce only).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Deliveries each consumer holds at once.
    #[arg(long, default_value_t = 64)]
    pub max_parallel: u32,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Messages to produce (or to consume with `--producers 0`).
    #[arg(long, default_value_t = 200_000, conflicts_with = "duration")]
    pub count: u64,
    /// Produce for this long instead of a count, e.g. `10s`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Total messages per second across producers (open loop); unlimited when omitted.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Messages per produce call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Connections the producers share, round robin (each opens its own queue handle).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Skip the fsync probe.
    #[arg(long)]
    pub no_fsync_probe: bool,
    /// Spreads the messages round robin over this many groups (0: no groups).
    #[arg(long, default_value_t = 0)]
    pub groups: u64,
    /// A global limit of deliveries in flight on the channel (0: none).
    #[arg(long, default_value_t = 0)]
    pub concurrency: u32,
}

/// Parses `500ms`, `10s`, `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Single small appends each followed by `fdatasync`, for one second or 5,000 syncs, in `dir`.
pub fn fsync_rate(dir: &Path) -> Result<(f64, f64)> {
    let path = dir.join(format!(".fsync-probe-{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = [0u8; 256];
    let start = Instant::now();
    let mut n = 0u64;
    while n < 5_000 && start.elapsed() < Duration::from_secs(1) {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok((n as f64 / elapsed, elapsed / n as f64 * 1e6))
}

struct Shared {
    spec: ChannelSpec,
    groups: u64,
    next_group: AtomicU64,
    produced: AtomicU64,
    consumed: AtomicU64,
    stop: AtomicBool,
    e2e: Mutex<Histogram<u64>>,
    produce_latency: Mutex<Histogram<u64>>,
    send_lag: Mutex<Histogram<u64>>,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> Result<()> {
    let temp;
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            temp = tempfile_dir()?;
            format!("file://{}", temp.display())
        }
    };
    let probe_dir = url
        .strip_prefix("file://")
        .map(Path::new)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let queue = queue_runtime::connect(&url)
        .await
        .with_context(|| format!("opening {url}"))?;
    let fsync = if args.no_fsync_probe {
        None
    } else {
        std::fs::create_dir_all(&probe_dir).ok();
        Some(fsync_rate(&probe_dir)?)
    };

    let shared = Arc::new(Shared {
        spec: BenchMessageChannel::SPEC.concurrency(args.concurrency),
        groups: args.groups,
        next_group: AtomicU64::new(0),
        produced: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        e2e: Mutex::new(histogram()),
        produce_latency: Mutex::new(histogram()),
        send_lag: Mutex::new(histogram()),
    });
    let body = "x".repeat(args.size.saturating_sub(40).max(1));
    let target = if args.producers == 0 {
        args.count
    } else {
        u64::MAX
    };

    println!(
        "bench: url={url} producers={} consumers={} size={}B batch={} max_parallel={}{}{}{}",
        args.producers,
        args.consumers,
        args.size,
        args.batch,
        args.max_parallel,
        args.rate
            .map(|r| format!(" rate={r}/s"))
            .unwrap_or_default(),
        if args.groups > 0 {
            format!(" groups={}", args.groups)
        } else {
            String::new()
        },
        if args.concurrency > 0 {
            format!(" concurrency={}", args.concurrency)
        } else {
            String::new()
        },
    );

    let start = Instant::now();
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let s = shared.clone();
        let handler = ErasedHandler::new::<BenchMessage, _, _>(move |m: BenchMessage| {
            let s = s.clone();
            async move {
                let lat_us = now_ns().saturating_sub(m.sent_ns) / 1_000;
                let _ = s.e2e.lock().record(lat_us.max(1));
                s.consumed.fetch_add(1, Ordering::Relaxed);
            }
        });
        let handle = start_consumer(
            queue.clone(),
            shared.spec.clone(),
            handler,
            args.max_parallel,
            "bench".into(),
        )
        .await?;
        consumers.push(handle);
    }

    let mut producers = Vec::new();
    let per_producer_rate = args.rate.map(|r| r as f64 / args.producers.max(1) as f64);
    let deadline = args.duration.map(|d| start + d);
    let quota = if args.duration.is_some() {
        u64::MAX
    } else {
        args.count
    };
    let mut handles = vec![queue.clone()];
    for _ in 1..args.connections.max(1) {
        handles.push(queue_runtime::connect(&url).await?);
    }
    for p in 0..args.producers {
        let s = shared.clone();
        let queue = handles[p % handles.len()].clone();
        let body = body.clone();
        let batch = args.batch.max(1);
        let my_quota =
            quota / args.producers as u64 + u64::from((p as u64) < quota % args.producers as u64);
        producers.push(tokio::spawn(produce_loop(
            queue,
            s,
            body,
            batch,
            my_quota,
            per_producer_rate,
            deadline,
        )));
    }
    // A progress bar on a terminal (hidden when stderr is not one).
    let bar = match (args.producers, args.duration) {
        (0, _) => None,
        (_, Some(d)) => Some(indicatif::ProgressBar::new(d.as_millis() as u64)),
        (_, None) => Some(indicatif::ProgressBar::new(args.count)),
    };
    if let Some(bar) = &bar {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} producing [{bar:40}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let all = futures_util::future::try_join_all(producers);
        tokio::pin!(all);
        loop {
            tokio::select! {
                done = &mut all => {
                    for r in done? {
                        r?;
                    }
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    let produced = shared.produced.load(Ordering::Relaxed);
                    match args.duration {
                        Some(_) => bar.set_position(start.elapsed().as_millis() as u64),
                        None => bar.set_position(produced),
                    }
                    bar.set_message(format!("{produced} messages"));
                }
            }
        }
        bar.finish_and_clear();
    } else {
        for p in producers {
            p.await??;
        }
    }
    let produce_elapsed = start.elapsed();
    let produced = shared.produced.load(Ordering::Relaxed);

    if args.consumers > 0 {
        let expected = if args.producers == 0 {
            target
        } else {
            produced
        };
        let mut last = (Instant::now(), 0);
        while shared.consumed.load(Ordering::Relaxed) < expected {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let c = shared.consumed.load(Ordering::Relaxed);
            if c != last.1 {
                last = (Instant::now(), c);
            } else if last.0.elapsed() > Duration::from_secs(10) {
                eprintln!("consumers stalled at {c} of {expected}");
                break;
            }
        }
    }
    let total_elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.stop(Duration::from_secs(5)).await?;
    }
    let consumed = shared.consumed.load(Ordering::Relaxed);

    if let Some((rate, us)) = fsync {
        println!(
            "fsync:    {rate:>10.0} fdatasync/s ({us:.0} µs each, 256-byte appends, same disk)"
        );
    }
    if args.producers > 0 {
        let pl = shared.produce_latency.lock();
        println!(
            "produce:  {:>10.0} msg/s  ({produced} msgs in {:.2}s; produce call p50 {} µs, p99 {} µs)",
            produced as f64 / produce_elapsed.as_secs_f64(),
            produce_elapsed.as_secs_f64(),
            pl.value_at_quantile(0.5),
            pl.value_at_quantile(0.99),
        );
    }
    if args.consumers > 0 {
        println!(
            "consume:  {:>10.0} msg/s  ({consumed} msgs acked in {:.2}s)",
            consumed as f64 / total_elapsed.as_secs_f64(),
            total_elapsed.as_secs_f64()
        );
        if args.producers > 0 {
            let h = shared.e2e.lock();
            println!(
                "latency:  end-to-end p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            );
        }
        if args.rate.is_some() {
            let lag = shared.send_lag.lock();
            println!(
                "schedule: sends behind the fixed rate by p50 {:.2} ms, p99 {:.2} ms (tokio timers tick in 1 ms)",
                lag.value_at_quantile(0.5) as f64 / 1000.0,
                lag.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    queue.close().await?;
    if args.url.is_none() {
        let _ = std::fs::remove_dir_all(&probe_dir);
    }
    Ok(())
}

async fn produce_loop(
    queue: Queue,
    s: Arc<Shared>,
    body: String,
    batch: usize,
    quota: u64,
    rate: Option<f64>,
    deadline: Option<Instant>,
) -> Result<()> {
    let interval = rate.map(|r| Duration::from_secs_f64(batch as f64 / r));
    let begin = Instant::now();
    let mut sent = 0u64;
    let mut round = 0u32;
    while sent < quota {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(i) = interval {
            let at = begin + i * round;
            round += 1;
            tokio::time::sleep_until(at.into()).await;
            // How late this send is against the schedule: a stalled queue shows up here
            // rather than disappearing from the latency figures.
            let _ = s
                .send_lag
                .lock()
                .record((at.elapsed().as_micros() as u64).max(1));
        }
        let sent_ns = now_ns();
        let n = (quota - sent).min(batch as u64) as usize;
        let t = Instant::now();
        let payload = codec::encode(&BenchMessage {
            sent_ns,
            body: body.clone(),
        })?;
        let batch = (0..n)
            .map(|_| Outgoing {
                payload: payload.clone(),
                dedup_key: None,
                delay: Duration::ZERO,
                priority: 0,
                group: (s.groups > 0).then(|| {
                    (s.next_group.fetch_add(1, Ordering::Relaxed) % s.groups).group_hash()
                }),
            })
            .collect();
        queue.adapter().produce(&s.spec, batch).await?;
        let _ = s
            .produce_latency
            .lock()
            .record((t.elapsed().as_micros() as u64).max(1));
        sent += n as u64;
        s.produced.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "queuectl-bench-{}-{}",
        std::process::id(),
        now_ns()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
