//! The conformance suite against `nats://` on one real `nats-server`, each test in a fresh
//! namespace, and the tests of what crosses clients: several connections sharing a channel,
//! a client that joins late rebuilding the state from the stream.

mod conformance;
mod nats;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;

async fn open(url: &str, clock: &VirtualClock) -> Queue {
    queue_runtime::connect_with(url, ConnectOptions::with_clock(Arc::new(clock.clone())))
        .await
        .expect("nats queue")
}

async fn single(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let url = nats::shared_single().url("");
    (open(&url, &clock).await, Box::new(()))
}

conformance_suite!(single);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_holds_across_worker_connections() {
    let clock = VirtualClock::default();
    let url = nats::shared_single().url("");
    let mut queues = Vec::new();
    for _ in 0..3 {
        queues.push(open(&url, &clock).await);
    }
    conformance::flow::concurrency_holds_across_worker_connections(&queues).await;
    for q in queues {
        q.close().await.unwrap();
    }
}

#[queue_core::channel("snap/jobs", lease = "10s", max_attempts = 2, backoff = "1s")]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapJob {
    pub n: u32,
}

/// The stream of channel `name` under the namespace of `url`, as the adapter names it.
async fn stream_state(url: &str, name: &str) -> async_nats::jetstream::stream::State {
    let rest = url.trim_start_matches("nats://");
    let (hosts, tail) = rest.split_once('/').unwrap();
    let namespace = tail.split('?').next().unwrap();
    let hash = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
    let client = async_nats::connect(hosts.split(',').next().unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = format!("{namespace}.c.{hash:016x}");
    let stream_name = js.stream_by_subject(subject).await.unwrap();
    let mut stream = js.get_stream(stream_name).await.unwrap();
    stream.info().await.unwrap().state.clone()
}

/// A channel as a client sees it: stats, pending ids, dead letters with their errors.
type View = (queue_core::ChannelStats, Vec<u64>, Vec<(u64, String)>);

async fn channel_view(q: &Queue, name: &str) -> View {
    let mut stats = q
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.channel == name)
        .unwrap();
    stats.consumers = 0;
    let peek = q
        .peek(name, 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id.0)
        .collect();
    let dead = q
        .dead_letters(name, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.id.0, d.error))
        .collect();
    (stats, peek, dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_stream_and_a_new_client_starts_from_one() {
    use queue_core::{Channel, Outcome, codec};
    let clock = VirtualClock::default();
    let url = nats::shared_single().url("compact_every=16");
    let first = open(&url, &clock).await;
    for n in 0..100 {
        SnapJob::produce(&first, SnapJob { n }).await.unwrap();
    }
    let sub = first
        .adapter()
        .subscribe(&SnapJobChannel::SPEC, 1)
        .await
        .unwrap();
    for i in 0..45u32 {
        let d = conformance::next(&*sub).await;
        let job: SnapJob = codec::decode(&d.payload).unwrap();
        assert_eq!(job.n, i);
        let outcome = if i < 40 {
            Outcome::Ack
        } else {
            Outcome::DeadLetter {
                error: format!("bad {i}"),
            }
        };
        first.adapter().settle(&d.lease, outcome).await.unwrap();
    }
    drop(sub);
    // About 200 commands: the stream keeps at most two snapshot intervals of them.
    conformance::eventually("the stream purged up to a snapshot", || async {
        let state = stream_state(&url, "snap/jobs").await;
        state.first_sequence > 100 && state.messages <= 2 * 16 + 2
    })
    .await;
    let state = stream_state(&url, "snap/jobs").await;
    assert!(state.last_sequence > 180, "{state:?}");

    // A client that starts now loads the snapshot and replays the rest: it sees what the
    // first sees, and takes over the backlog in order.
    let second = open(&url, &clock).await;
    let seen = channel_view(&first, "snap/jobs").await;
    assert_eq!(channel_view(&second, "snap/jobs").await, seen);
    assert_eq!(
        (seen.0.produced, seen.0.acked, seen.0.ready, seen.0.dead),
        (100, 40, 55, 5)
    );
    assert_eq!(seen.2[0].1, "bad 40");
    let sub = second
        .adapter()
        .subscribe(&SnapJobChannel::SPEC, 4)
        .await
        .unwrap();
    for n in 45..100u32 {
        let d = conformance::next(&*sub).await;
        let job: SnapJob = codec::decode(&d.payload).unwrap();
        assert_eq!(job.n, n);
        second
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
    let after = channel_view(&first, "snap/jobs").await;
    assert_eq!(
        (after.0.acked, after.0.ready, after.0.in_flight),
        (95, 0, 0)
    );
    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_wants_a_token_takes_the_one_in_the_url() {
    let clock = VirtualClock::default();
    let servers = nats::Servers::single_with("authorization { token: \"s3cret\" }");
    let queue = open(&servers.url("token=s3cret"), &clock).await;
    let receipt = SnapJob::produce(&queue, SnapJob { n: 1 }).await.unwrap();
    let peeked = queue.peek("snap/jobs", 10).await.unwrap();
    assert_eq!(peeked[0].id, receipt.id);
    queue.close().await.unwrap();
    for query in ["token=wrong&connect_timeout=2", "connect_timeout=2"] {
        let refused = queue_runtime::connect_with(
            &servers.url(query),
            ConnectOptions::with_clock(Arc::new(clock.clone())),
        )
        .await;
        let error = refused.expect_err(query).to_string();
        assert!(error.contains("connecting to NATS"), "{query}: {error}");
    }
}

/// A client on a runtime of its own, which the test can freeze.
struct Frozen {
    orders: tokio::sync::mpsc::UnboundedSender<Order>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Order {
    Freeze(std::time::Duration),
    View(tokio::sync::oneshot::Sender<View>),
}

impl Frozen {
    fn open(url: String) -> Frozen {
        let (orders, mut rx) = tokio::sync::mpsc::unbounded_channel::<Order>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let queue = queue_runtime::connect(&url).await.unwrap();
                // Opens the channel: its reader runs from now on.
                let _ = channel_view(&queue, "snap/jobs").await;
                ready_tx.send(()).unwrap();
                while let Some(order) = rx.recv().await {
                    match order {
                        // Blocks the runtime's only thread: the reader stops.
                        Order::Freeze(d) => std::thread::sleep(d),
                        Order::View(reply) => {
                            let _ = reply.send(channel_view(&queue, "snap/jobs").await);
                        }
                    }
                }
                queue.close().await.unwrap();
            });
        });
        ready_rx.recv().unwrap();
        Frozen {
            orders,
            thread: Some(thread),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        self.orders = tx;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_a_purge_catches_up_from_the_snapshot() {
    let url = nats::shared_single().url("compact_every=16");
    let writer = queue_runtime::connect(&url).await.unwrap();
    SnapJob::produce(&writer, SnapJob { n: 0 }).await.unwrap();
    let behind = tokio::task::spawn_blocking({
        let url = url.clone();
        move || Frozen::open(url)
    })
    .await
    .unwrap();
    behind
        .orders
        .send(Order::Freeze(std::time::Duration::from_secs(4)))
        .unwrap();
    // More commands than the frozen reader has asked for (its consumer pulls 500 at a
    // time), so that the stream is purged past what it can still read.
    let producer = SnapJob::producer(&writer);
    for chunk in 0..40u32 {
        let batch: Vec<SnapJob> = (0..20)
            .map(|i| SnapJob {
                n: chunk * 20 + i + 1,
            })
            .collect();
        for job in batch {
            producer.produce(job).await.unwrap();
        }
    }
    let state = stream_state(&url, "snap/jobs").await;
    assert!(state.first_sequence > 600, "{state:?}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    behind.orders.send(Order::View(tx)).unwrap();
    let seen = conformance::within("the client behind to answer", rx)
        .await
        .unwrap();
    let expected = channel_view(&writer, "snap/jobs").await;
    assert_eq!(seen, expected);
    assert_eq!(expected.0.produced, 801);
    writer.close().await.unwrap();
    drop(behind);
}
