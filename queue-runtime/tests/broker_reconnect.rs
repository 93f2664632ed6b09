//! A connection to the broker dropped in the middle of a produce: the client reconnects and
//! sends the produce again under the same key, and the broker stores it exactly once, also
//! when the broker itself restarted in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use queue_core::{Queue, VirtualClock, channel};
use queue_runtime::ConnectOptions;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::protocol::{self, ClientFrame, Reply, Request, ServerFrame};
use queue_runtime::broker::{Broker, BrokerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[channel("reconnect/jobs")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

/// Where the proxy cuts the connection, once.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Drop the first produce request before the broker sees it.
    Request,
    /// Drop the broker's first receipts after the broker stored the messages.
    Reply,
    /// Cut nothing more.
    Done,
}

fn framed(stream: TcpStream) -> Framed<TcpStream, LengthDelimitedCodec> {
    Framed::new(
        stream,
        LengthDelimitedCodec::builder()
            .max_frame_length(64 << 20)
            .new_codec(),
    )
}

/// Forwards frames between clients and the broker at `broker`, closing both sides at the
/// armed cut.
async fn proxy(listener: TcpListener, broker: Arc<Mutex<SocketAddr>>, cut: Arc<Mutex<Cut>>) {
    while let Ok((client, _)) = listener.accept().await {
        let cut = cut.clone();
        let broker = *broker.lock();
        tokio::spawn(async move {
            // A broker that is down refuses: the client sees the connection close.
            let Ok(upstream) = TcpStream::connect(broker).await else {
                return;
            };
            let (mut to_client, mut from_client) = framed(client).split();
            let (mut to_broker, mut from_broker) = framed(upstream).split();
            loop {
                tokio::select! {
                    frame = from_client.next() => {
                        let Some(Ok(bytes)) = frame else { return };
                        let frame: ClientFrame = protocol::decode(&bytes).unwrap();
                        if matches!(frame.request, Request::Produce { .. }) {
                            let mut cut = cut.lock();
                            if *cut == Cut::Request {
                                *cut = Cut::Done;
                                return;
                            }
                        }
                        to_broker.send(bytes.freeze()).await.unwrap();
                    }
                    frame = from_broker.next() => {
                        let Some(Ok(bytes)) = frame else { return };
                        let frame: ServerFrame = protocol::decode(&bytes).unwrap();
                        if matches!(frame, ServerFrame::Reply { reply: Reply::Receipts { .. }, .. }) {
                            let mut cut = cut.lock();
                            if *cut == Cut::Reply {
                                *cut = Cut::Done;
                                return;
                            }
                        }
                        if to_client.send(bytes.freeze()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

struct Setup {
    broker: Arc<Broker>,
    upstream: Arc<Mutex<SocketAddr>>,
    queue: Queue,
    cut: Arc<Mutex<Cut>>,
    clock: Arc<VirtualClock>,
    dir: tempfile::TempDir,
}

/// A broker on the store in `dir`, and its address.
async fn start_broker(
    dir: &std::path::Path,
    clock: Arc<VirtualClock>,
) -> (Arc<Broker>, SocketAddr) {
    let options = FileOptions {
        segment_size: 1 << 16,
        ..FileOptions::default()
    };
    let adapter = FileAdapter::open(dir, clock, options).unwrap();
    let broker = Broker::new(adapter, BrokerConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker.clone().serve_tcp(listener));
    (broker, addr)
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(VirtualClock::default());
    let (broker, broker_addr) = start_broker(dir.path(), clock.clone()).await;
    let upstream = Arc::new(Mutex::new(broker_addr));
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let cut = Arc::new(Mutex::new(Cut::Done));
    tokio::spawn(proxy(front, upstream.clone(), cut.clone()));
    let queue = queue_runtime::connect_with(
        &format!("queue://{front_addr}"),
        ConnectOptions::with_clock(clock.clone()),
    )
    .await
    .unwrap();
    Setup {
        broker,
        upstream,
        queue,
        cut,
        clock,
        dir,
    }
}

/// Produces `n` jobs at once with the cut armed; returns the ids confirmed.
async fn produce_across_a_cut(s: &Setup, cut: Cut, n: u32) -> Vec<u64> {
    *s.cut.lock() = cut;
    let produces = (0..n).map(|i| {
        let queue = s.queue.clone();
        async move { Job::produce(&queue, Job { n: i }).await }
    });
    let receipts = futures_util::future::join_all(produces).await;
    assert_eq!(*s.cut.lock(), Cut::Done, "the connection was cut");
    receipts
        .into_iter()
        .map(|r| {
            r.expect("every produce is confirmed after the reconnect")
                .id
                .0
        })
        .collect()
}

async fn stored(queue: &Queue) -> Vec<u64> {
    let mut ids: Vec<u64> = queue
        .peek("reconnect/jobs", 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id.0)
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn a_produce_whose_reply_was_lost_is_answered_from_the_first_store() {
    let s = setup().await;
    let mut confirmed = produce_across_a_cut(&s, Cut::Reply, 20).await;
    confirmed.sort_unstable();
    assert_eq!(stored(&s.queue).await, confirmed, "stored once each");
    assert!(s.broker.counters.replayed_produces.load(Ordering::Relaxed) >= 1);
    assert!(s.broker.counters.connections.load(Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn a_produce_lost_on_its_way_is_stored_after_the_reconnect() {
    let s = setup().await;
    let mut confirmed = produce_across_a_cut(&s, Cut::Request, 20).await;
    confirmed.sort_unstable();
    assert_eq!(stored(&s.queue).await, confirmed, "stored once each");
    assert_eq!(
        s.broker.counters.replayed_produces.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_produce_whose_reply_was_lost_is_not_stored_again_by_a_restarted_broker() {
    let s = setup().await;
    // The broker goes down once the reply is cut, before the client can send the produce
    // again: the restarted broker has only the store to go by.
    *s.cut.lock() = Cut::Reply;
    let down = s.broker.clone();
    let cut = s.cut.clone();
    let upstream = s.upstream.clone();
    let (dir, clock) = (s.dir.path().to_path_buf(), s.clock.clone());
    let restart = tokio::spawn(async move {
        while *cut.lock() != Cut::Done {
            tokio::task::yield_now().await;
        }
        // The old broker stops listening before the proxy can reach it again.
        down.shutdown();
        down.adapter().close().await.unwrap();
        let (broker, addr) = start_broker(&dir, clock).await;
        *upstream.lock() = addr;
        broker
    });
    let mut confirmed = produce_across_a_cut(&s, Cut::Reply, 20).await;
    let restarted = restart.await.unwrap();
    confirmed.sort_unstable();
    assert_eq!(stored(&s.queue).await, confirmed, "stored once each");
    assert_eq!(
        restarted.counters.replayed_produces.load(Ordering::Relaxed),
        0,
        "answered by the store, not by the broker's memory"
    );
}
