//! Hostile clients and dead peers against a real `queue-broker` process: a client that
//! pipelines without reading, half-sent frames, connections dropped mid-frame, a subscriber
//! that never reads, a huge listing, and a broker or worker behind a blackholed link.
//!
//! Each test reads the broker's resident memory (`VmRSS` in `/proc/PID/status`) before and
//! after, and checks that it grew by less than [`RSS_BOUND_KIB`], that a well-behaved client
//! keeps working, and that nothing stored is lost.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use queue_core::{Channel, ChannelSpec, Outcome, Queue, QueueError, channel};
use queue_runtime::broker::protocol::{self, ClientFrame, Reply, Request, ServerFrame, WireSpec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// How much the broker's resident memory may grow in one test, in KiB: 64 MiB. The broker
/// at rest holds about 10 to 20 MiB; the limits of one connection are 32 MiB outbound and
/// 64 MiB of requests in flight by default, lower in these tests.
const RSS_BOUND_KIB: u64 = 64 * 1024;

#[channel("hostile/jobs", lease = "30s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
    pub body: String,
}

/// A `queue-broker` child process on a fresh directory, killed when dropped.
struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    async fn start(extra: &[&str]) -> BrokerProcess {
        Self::start_in(tempfile::tempdir().unwrap(), extra, None).await
    }

    /// Starts the broker on `dir`, through `sh -c SHELL` when given (the script ends with
    /// `exec "$0" "$@"`).
    async fn start_in(dir: tempfile::TempDir, extra: &[&str], shell: Option<&str>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = match shell {
            Some(script) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(script)
                    .arg(env!("CARGO_BIN_EXE_queue-broker"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_queue-broker")),
        };
        let child = command
            .arg("--data")
            .arg(dir.path())
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start queue-broker");
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        BrokerProcess {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Open file descriptors: the listener, the store's files and one per connection.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn client(&self, query: &str) -> Queue {
        queue_runtime::connect(&format!("queue://{}{query}", self.addr))
            .await
            .expect("a good client connects")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn framed(stream: TcpStream) -> Framed<TcpStream, LengthDelimitedCodec> {
    Framed::new(
        stream,
        LengthDelimitedCodec::builder()
            .max_frame_length(64 << 20)
            .new_codec(),
    )
}

fn frame(id: i64, request: Request) -> Bytes {
    protocol::encode(&ClientFrame { id, request }).unwrap()
}

fn hello() -> Bytes {
    frame(
        1,
        Request::Hello {
            version: protocol::VERSION,
            token: None,
            client: "hostile".into(),
        },
    )
}

/// A raw connection past the handshake.
async fn greeted(addr: SocketAddr) -> Framed<TcpStream, LengthDelimitedCodec> {
    let mut f = framed(TcpStream::connect(addr).await.unwrap());
    f.send(hello()).await.unwrap();
    let welcome = f.next().await.unwrap().unwrap();
    assert!(matches!(
        protocol::decode::<ServerFrame>(&welcome).unwrap(),
        ServerFrame::Reply {
            reply: Reply::Welcome { .. },
            ..
        }
    ));
    f
}

async fn ready(queue: &Queue, channel: &str) -> u64 {
    let stats = queue.stats().await.expect("stats");
    stats
        .iter()
        .find(|s| s.channel == channel)
        .map_or(0, |s| s.ready)
}

async fn produce_jobs(queue: &Queue, range: std::ops::Range<u32>, body: usize) {
    for n in range {
        Job::produce(
            queue,
            Job {
                n,
                body: "x".repeat(body),
            },
        )
        .await
        .expect("produce");
    }
}

fn grew(before: u64, after: u64) -> u64 {
    after.saturating_sub(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_without_reading_meets_backpressure() {
    let broker = BrokerProcess::start(&[
        "--max-in-flight",
        "64",
        "--max-outbound-bytes",
        "1048576",
        "--idle-timeout",
        "6",
    ])
    .await;
    let good = broker.client("").await;
    produce_jobs(&good, 0..10, 10).await;
    let before = broker.rss_kib();

    let f = greeted(broker.addr).await;
    let mut raw = f.into_inner();
    // 2 million `stats` requests, written in runs of 1,000, never reading a reply.
    let run: Vec<u8> = (0..1000)
        .flat_map(|i| {
            let body = frame(i + 2, Request::Stats);
            let mut b = BytesMut::new();
            b.put_u32(body.len() as u32);
            b.put_slice(&body);
            b.to_vec()
        })
        .collect();
    // Written until 3 s pass without the broker taking a byte, or all are sent.
    let mut sent = 0u64;
    let mut quiet = 0;
    let started = Instant::now();
    let blocked = loop {
        if sent >= 2_000_000 || started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        if quiet == 3 {
            break true;
        }
        match tokio::time::timeout(Duration::from_secs(1), raw.write_all(&run)).await {
            Ok(Ok(())) => {
                sent += 1000;
                quiet = 0;
            }
            Ok(Err(_)) => break false,
            Err(_) => quiet += 1,
        }
    };
    let during = broker.rss_kib();
    eprintln!(
        "pipelining: {sent} requests sent before the broker stopped reading; \
         broker RSS {before} KiB before, {during} KiB while stalled"
    );
    assert!(blocked, "the broker kept reading: {sent} requests taken in");
    // 64 requests in flight and 1 MiB outbound: far less than the test's general bound.
    assert!(
        grew(before, during) < RSS_BOUND_KIB / 4,
        "the broker grew from {before} to {during} KiB"
    );
    // Meanwhile a good client is served.
    produce_jobs(&good, 10..20, 10).await;
    assert_eq!(
        ready(&good, "hostile/jobs").await,
        20,
        "nothing stored is lost"
    );
    // The stalled connection is dropped after the idle timeout: its socket closes.
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match raw.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled connection was not dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_sent_frames_are_held_cheaply_and_dropped() {
    let broker = BrokerProcess::start(&["--handshake-timeout", "2"]).await;
    let good = broker.client("").await;
    produce_jobs(&good, 0..5, 10).await;
    let before = broker.rss_kib();
    let fds_before = broker.fds();

    // Before `hello`, a frame announcing more than a few KiB is refused from its length.
    let mut big = TcpStream::connect(broker.addr).await.unwrap();
    let mut b = BytesMut::new();
    b.put_u32(1 << 20);
    b.put_slice(&[0; 100]);
    big.write_all(&b).await.unwrap();
    let mut reply = Vec::new();
    let refused = tokio::time::timeout(Duration::from_secs(1), big.read_to_end(&mut reply)).await;
    assert!(
        refused.is_ok(),
        "a large frame before hello is refused at once"
    );
    assert!(
        String::from_utf8_lossy(&reply).contains("frame_too_large"),
        "{reply:?}"
    );

    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(broker.addr).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u32(3000);
        b.put_slice(&[7; 1500]);
        s.write_all(&b).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = broker.rss_kib();
    eprintln!("half frames: broker RSS {before} KiB before, {during} KiB with 1,000 stalled");
    assert!(
        grew(before, during) < RSS_BOUND_KIB,
        "the broker grew from {before} to {during} KiB"
    );
    produce_jobs(&good, 5..10, 10).await;
    assert_eq!(ready(&good, "hostile/jobs").await, 10);

    // Each is dropped after the handshake timeout.
    let started = Instant::now();
    for s in &mut stalled {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stalled connection was kept open");
    }
    eprintln!(
        "half frames: all 1,000 dropped {:.1} s after the check began",
        started.elapsed().as_secs_f64()
    );
    drop(stalled);
    let settled = wait_for(|| broker.fds() <= fds_before + 4, Duration::from_secs(10)).await;
    assert!(
        settled,
        "connections left open: {} fds, {fds_before} before",
        broker.fds()
    );
}

async fn wait_for(mut done: impl FnMut() -> bool, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_dropped_mid_frame_leave_nothing_behind() {
    let broker = BrokerProcess::start(&[]).await;
    let good = broker.client("").await;
    produce_jobs(&good, 0..5, 10).await;
    let before = broker.rss_kib();
    let fds_before = broker.fds();
    let mut half = BytesMut::new();
    half.put_u32(200);
    half.put_slice(&[1; 100]);
    let half = half.freeze();
    let mut after_hello = BytesMut::new();
    let body = hello();
    after_hello.put_u32(body.len() as u32);
    after_hello.put_slice(&body);
    after_hello.put_u32(5000);
    after_hello.put_slice(&[2; 2000]);
    let after_hello = after_hello.freeze();
    for round in 0..100 {
        let opened = (0..100).map(|i| {
            let bytes = if (round + i) % 2 == 0 {
                half.clone()
            } else {
                after_hello.clone()
            };
            async move {
                if let Ok(mut s) = TcpStream::connect(broker.addr).await {
                    let _ = s.write_all(&bytes).await;
                }
            }
        });
        futures_util::future::join_all(opened).await;
    }
    let settled = wait_for(|| broker.fds() <= fds_before + 4, Duration::from_secs(10)).await;
    let after = broker.rss_kib();
    eprintln!(
        "10,000 dropped connections: broker RSS {before} KiB before, {after} KiB after; \
         fds {fds_before} before, {} after",
        broker.fds()
    );
    assert!(settled, "connections left open: {} fds", broker.fds());
    assert!(
        grew(before, after) < RSS_BOUND_KIB,
        "the broker grew from {before} to {after} KiB"
    );
    produce_jobs(&good, 5..10, 10).await;
    assert_eq!(ready(&good, "hostile/jobs").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_dropped_and_its_messages_go_to_others() {
    let broker = BrokerProcess::start(&[
        "--idle-timeout",
        "2",
        "--max-outbound-bytes",
        "1048576",
        "--max-parallel",
        "64",
    ])
    .await;
    let good = broker.client("").await;
    const JOBS: u32 = 100;
    produce_jobs(&good, 0..JOBS, 64 * 1024).await;
    let before = broker.rss_kib();

    let mut f = greeted(broker.addr).await;
    let spec = WireSpec::from(&<JobChannel as Channel>::SPEC);
    // Over the cap: refused with a clear code, the connection stays open.
    f.send(frame(
        2,
        Request::Subscribe {
            sub: 1,
            spec: spec.clone(),
            max_parallel: 1000,
        },
    ))
    .await
    .unwrap();
    let refused = protocol::decode::<ServerFrame>(&f.next().await.unwrap().unwrap()).unwrap();
    let ServerFrame::Error { id: 2, error } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(error.code, "limit_exceeded", "{}", error.message);
    f.send(frame(
        3,
        Request::Subscribe {
            sub: 1,
            spec,
            max_parallel: 64,
        },
    ))
    .await
    .unwrap();
    // From here on it reads nothing, but keeps talking so it is never idle.
    let (mut write, _read) = f.split();
    let talking = Arc::new(AtomicBool::new(true));
    let pinger = {
        let talking = talking.clone();
        tokio::spawn(async move {
            let mut id = 10;
            while talking.load(Ordering::Relaxed) {
                id += 1;
                if write.send(frame(id, Request::Ping)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = broker.rss_kib();

    // Another worker gets every message, those pushed to the stuck subscriber included.
    let worker = broker.client("").await;
    let sub = worker
        .adapter()
        .subscribe(&<JobChannel as Channel>::SPEC, 8)
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut redelivered = 0;
    let started = Instant::now();
    while seen.len() < JOBS as usize {
        // Well before the 30 s leases of the stuck subscriber could lapse.
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("every message reaches the other worker once the broker drops the stuck one")
            .unwrap();
        let job: Job = queue_core::codec::decode(&d.payload).unwrap();
        seen.insert(job.n);
        if d.attempt > 1 {
            redelivered += 1;
        }
        worker
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
    talking.store(false, Ordering::Relaxed);
    pinger.abort();
    let after = broker.rss_kib();
    eprintln!(
        "stuck subscriber: broker RSS {before} KiB before, {during} KiB while stuck, {after} KiB \
         after; the other worker had all {JOBS} after {:.1} s, {redelivered} of them taken \
         back from the stuck subscriber",
        started.elapsed().as_secs_f64()
    );
    assert!(redelivered > 0, "the stuck subscriber held nothing");
    assert!(
        grew(before, during) < RSS_BOUND_KIB,
        "{before} -> {during} KiB"
    );
    assert!(
        grew(before, after) < RSS_BOUND_KIB,
        "{before} -> {after} KiB"
    );
    assert_eq!(seen.len(), JOBS as usize);
    let stats = good.stats().await.unwrap();
    let jobs = stats.iter().find(|s| s.channel == "hostile/jobs").unwrap();
    assert_eq!(
        (jobs.acked, jobs.ready, jobs.in_flight),
        (JOBS as u64, 0, 0)
    );
}

#[channel("hostile/dead", max_attempts = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doomed {
    pub n: u32,
    pub body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_dead_letter_listing_comes_in_pages_within_the_limit() {
    const PAGE: usize = 1 << 20;
    let broker = BrokerProcess::start(&["--max-page-bytes", &PAGE.to_string()]).await;
    let queue = broker.client("").await;
    const DEAD: u32 = 40;
    const BODY: usize = 256 * 1024;
    for n in 0..DEAD {
        Doomed::produce(
            &queue,
            Doomed {
                n,
                body: "d".repeat(BODY),
            },
        )
        .await
        .unwrap();
    }
    let spec: ChannelSpec = <DoomedChannel as Channel>::SPEC;
    let sub = queue.adapter().subscribe(&spec, 16).await.unwrap();
    for _ in 0..DEAD {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        let outcome = Outcome::DeadLetter {
            error: "doomed".into(),
        };
        queue.adapter().settle(&d.lease, outcome).await.unwrap();
    }
    drop(sub);
    let before = broker.rss_kib();

    // One request gets one page, within the page limit, and where the next one starts.
    let mut f = greeted(broker.addr).await;
    f.send(frame(
        2,
        Request::DeadLetters {
            channel: "hostile/dead".into(),
            limit: 1000,
            offset: 0,
        },
    ))
    .await
    .unwrap();
    let bytes = f.next().await.unwrap().unwrap();
    let page = protocol::decode::<ServerFrame>(&bytes).unwrap();
    let ServerFrame::Reply {
        reply: Reply::DeadLetters { messages, next },
        ..
    } = page
    else {
        panic!("{page:?}")
    };
    eprintln!(
        "listing: first page {} entries, {} bytes, next at {next:?}",
        messages.len(),
        bytes.len()
    );
    assert!(
        bytes.len() <= PAGE + 64 * 1024,
        "a page of {} bytes",
        bytes.len()
    );
    assert!(!messages.is_empty() && messages.len() < DEAD as usize);
    assert_eq!(next, Some(messages.len() as i64));

    // The client API pages on its own and gets all of them.
    let all = queue
        .adapter()
        .dead_letters("hostile/dead", 1000)
        .await
        .unwrap();
    let ns: BTreeSet<u32> = all
        .iter()
        .map(|d| queue_core::codec::decode::<Doomed>(&d.payload).unwrap().n)
        .collect();
    assert_eq!(ns.len(), DEAD as usize, "every dead letter listed once");
    assert!(all.iter().all(|d| d.error == "doomed"));
    let some = queue
        .adapter()
        .dead_letters("hostile/dead", 7)
        .await
        .unwrap();
    assert_eq!(some.len(), 7);
    let after = broker.rss_kib();
    eprintln!("listing: broker RSS {before} KiB before, {after} KiB after");
    assert!(
        grew(before, after) < RSS_BOUND_KIB,
        "{before} -> {after} KiB"
    );
    // A channel the store has never seen lists nothing.
    let none = queue.adapter().dead_letters("hostile/never", 10).await;
    assert!(matches!(&none, Ok(v) if v.is_empty()), "{none:?}");
    let purged = queue.adapter().purge_dead("hostile/never", None).await;
    assert!(matches!(purged, Ok(0)), "{purged:?}");
    let redriven = queue.adapter().redrive("hostile/never", None).await;
    assert!(matches!(redriven, Ok(0)), "{redriven:?}");
}

/// A TCP proxy that forwards bytes both ways until `blackhole` is set; then it stops
/// forwarding in both directions and keeps every socket open.
async fn proxy(upstream: SocketAddr, blackhole: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let hole = blackhole.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = pump(&mut cr, &mut sw, &hole);
                let down = pump(&mut sr, &mut cw, &hole);
                tokio::join!(up, down);
                // Held open: a blackhole never closes.
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    hole: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hole.load(Ordering::Relaxed) {
            // Swallow everything from now on.
            loop {
                if from.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_to_a_blackholed_broker_times_out() {
    let broker = BrokerProcess::start(&[]).await;
    let hole = Arc::new(AtomicBool::new(false));
    let through = proxy(broker.addr, hole.clone()).await;
    let queue = queue_runtime::connect(&format!(
        "queue://{through}?request_timeout=2&connect_timeout=1.5&handshake_timeout=0.5\
         &heartbeat=0.2&idle_timeout=1"
    ))
    .await
    .unwrap();
    produce_jobs(&queue, 0..1, 10).await;
    hole.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let result = Job::produce(
        &queue,
        Job {
            n: 1,
            body: "late".into(),
        },
    )
    .await;
    let took = started.elapsed();
    eprintln!(
        "blackholed produce: {result:?} after {:.2} s",
        took.as_secs_f64()
    );
    assert!(result.is_err(), "{result:?}");
    assert!(
        took < Duration::from_secs(6),
        "the produce hung for {took:?}, past its 2 s request timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_worker_leases_go_to_another_worker_within_the_idle_timeout() {
    let broker = BrokerProcess::start(&["--idle-timeout", "1"]).await;
    let hole = Arc::new(AtomicBool::new(false));
    let through = proxy(broker.addr, hole.clone()).await;
    let producer = broker.client("").await;
    produce_jobs(&producer, 0..1, 10).await;

    let doomed = queue_runtime::connect(&format!("queue://{through}?heartbeat=0.2"))
        .await
        .unwrap();
    let held_sub = doomed
        .adapter()
        .subscribe(&<JobChannel as Channel>::SPEC, 1)
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), held_sub.next())
        .await
        .unwrap()
        .unwrap();
    hole.store(true, Ordering::Relaxed);
    let started = Instant::now();

    let other = broker.client("").await;
    let sub = other
        .adapter()
        .subscribe(&<JobChannel as Channel>::SPEC, 1)
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("the message reaches the other worker")
        .unwrap();
    let took = started.elapsed();
    eprintln!(
        "blackholed worker: its lease went to another worker after {:.2} s (idle timeout 1 s, \
         lease 30 s)",
        took.as_secs_f64()
    );
    assert_eq!(again.lease.id, held.lease.id);
    assert!(again.attempt > held.attempt);
    // Well before the 30 s lease could lapse.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(held_sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_store_ends_the_broker_process_with_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    // Files may grow to 1024 blocks (512 KiB or 1 MiB, by shell): a 2 MiB message written
    // past the end of a 64 KiB segment fails with EFBIG, and a failed write poisons the
    // store. SIGXFSZ is ignored so the write fails instead of killing the process.
    let mut broker = BrokerProcess::start_in(
        dir,
        &["--segment-size", "65536"],
        Some("ulimit -f 1024 && trap '' XFSZ && exec \"$0\" \"$@\""),
    )
    .await;
    let queue = broker.client("").await;
    produce_jobs(&queue, 0..3, 10).await;
    let failed = Job::produce(
        &queue,
        Job {
            n: 3,
            body: "p".repeat(2 << 20),
        },
    )
    .await;
    assert!(
        matches!(&failed, Err(QueueError::Poisoned(_))),
        "{failed:?}"
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the poisoned broker kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "poisoned store: the broker exited with {status} {:.2} s after the failed write",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "a failure exit, not a signal: {status}"
    );
    // A supervisor restarts it on the same data: what was confirmed is there.
    let dir = std::mem::replace(&mut broker._dir, tempfile::tempdir().unwrap());
    assert_eq!(dir.path(), data);
    let again = BrokerProcess::start_in(dir, &[], None).await;
    let queue = again.client("").await;
    assert_eq!(ready(&queue, "hostile/jobs").await, 3);
}

/// True if a broker told to listen on `unix` exits with a failure within 10 s.
async fn refuses_to_start(data: std::path::PathBuf, unix: &std::path::Path) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_queue-broker"))
        .arg("--data")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--unix")
        .arg(unix)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(status) = child.try_wait().unwrap() {
            return !status.success();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    assert!(
        refuses_to_start(dir.path().join("data"), &file).await,
        "a broker replaced a regular file"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"precious",
        "the file is kept"
    );

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let broker = BrokerProcess::start(&["--unix", stale.to_str().unwrap()]).await;
    let started = Instant::now();
    let queue = loop {
        match queue_runtime::connect(&format!("queue+unix://{}", stale.display())).await {
            Ok(queue) => break queue,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(10), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    produce_jobs(&queue, 0..1, 10).await;
    // A second broker may not take over the live socket.
    assert!(
        refuses_to_start(dir.path().join("other"), &stale).await,
        "a second broker took over a live socket"
    );
    produce_jobs(&queue, 1..2, 10).await;
    drop(broker);
}

/// The status code of `GET /metrics` on `addr`, with a bearer token if given.
async fn metrics_status(addr: SocketAddr, token: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let broker = BrokerProcess::start(&[
        "--token",
        "s3cret",
        "--metrics",
        &metrics.to_string(),
        "--metrics-token",
    ])
    .await;
    let started = Instant::now();
    while TcpStream::connect(metrics).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics_status(metrics, None).await, "401");
    assert_eq!(metrics_status(metrics, Some("guess")).await, "401");
    assert_eq!(metrics_status(metrics, Some("s3cret")).await, "200");
    drop(broker);
}
