//! The broker between its store and its clients when something is wrong: a store that
//! fails (every error reaches the client as the store returned it), a poisoned store, a
//! subscription the store ends, a lease settled from the wrong connection, a client whose
//! clock is far from the broker's, and an old client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use parking_lot::Mutex;
use queue_core::clock::{Clock, Timestamp};
use queue_core::{
    Adapter, Channel, ChannelSpec, ChannelStats, DeadLetter, KeyedProduce, Lease, MessageId,
    Outcome, Outgoing, Queue, QueueError, RawDelivery, Receipt, StoredMessage, Subscription,
    VirtualClock, channel,
};
use queue_runtime::ConnectOptions;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::protocol::{self, ClientFrame, Request, ServerFrame};
use queue_runtime::broker::{Broker, BrokerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[channel("faults/jobs", lease = "10s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

type MakeError = fn() -> QueueError;

/// The file store, with failures switched on by the test.
struct Faulty {
    inner: Arc<dyn Adapter>,
    /// `stats` fails with this.
    stats_error: Mutex<Option<MakeError>>,
    /// `produce` fails as a poisoned store does.
    poisoned: AtomicBool,
    /// The next `next` of a subscription fails.
    break_subs: Arc<AtomicBool>,
}

struct FaultySub {
    inner: Box<dyn Subscription>,
    broken: Arc<AtomicBool>,
}

impl Subscription for FaultySub {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        if self.broken.swap(false, Ordering::AcqRel) {
            return async { Err(QueueError::Corrupt("a segment could not be read".into())) }
                .boxed();
        }
        self.inner.next()
    }
}

impl KeyedProduce for Faulty {
    fn produce_keyed<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
        key: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        if self.poisoned.load(Ordering::Acquire) {
            return async { Err(QueueError::Poisoned("fdatasync failed: EIO".into())) }.boxed();
        }
        match self.inner.keyed() {
            Some(keyed) => keyed.produce_keyed(spec, batch, key, window),
            None => self.inner.produce(spec, batch),
        }
    }
}

impl Adapter for Faulty {
    fn keyed(&self) -> Option<&dyn KeyedProduce> {
        Some(self)
    }

    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        if self.poisoned.load(Ordering::Acquire) {
            return async { Err(QueueError::Poisoned("fdatasync failed: EIO".into())) }.boxed();
        }
        self.inner.produce(spec, batch)
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        async move {
            let inner = self.inner.subscribe(spec, max_parallel).await?;
            Ok(Box::new(FaultySub {
                inner,
                broken: self.break_subs.clone(),
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.settle(lease, outcome)
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        self.inner.extend(lease, by)
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        if let Some(make) = *self.stats_error.lock() {
            return async move { Err(make()) }.boxed();
        }
        self.inner.stats()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        self.inner.peek(channel, limit)
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        self.inner.dead_letters(channel, limit)
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.redrive(channel, ids)
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.purge_dead(channel, ids)
    }

    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.purge(channel)
    }

    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.set_paused(channel, paused)
    }

    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: queue_core::MessageId,
    ) -> BoxFuture<'a, Result<queue_core::Cancelled, QueueError>> {
        self.inner.cancel(channel, id)
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        self.inner.close()
    }
}

struct Setup {
    addr: std::net::SocketAddr,
    broker: Arc<Broker>,
    faulty: Arc<Faulty>,
    _dir: tempfile::TempDir,
}

async fn setup(config: BrokerConfig, clock: VirtualClock) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let options = FileOptions {
        segment_size: 1 << 16,
        ..FileOptions::default()
    };
    let store = FileAdapter::open(dir.path(), Arc::new(clock.clone()), options).unwrap();
    let faulty = Arc::new(Faulty {
        inner: store,
        stats_error: Mutex::new(None),
        poisoned: AtomicBool::new(false),
        break_subs: Arc::default(),
    });
    let broker = Broker::with_clock(faulty.clone(), config, Arc::new(clock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker.clone().serve_tcp(listener));
    Setup {
        addr,
        broker,
        faulty,
        _dir: dir,
    }
}

async fn client(addr: std::net::SocketAddr, clock: VirtualClock) -> Queue {
    queue_runtime::connect_with(
        &format!("queue://{addr}"),
        ConnectOptions::with_clock(Arc::new(clock)),
    )
    .await
    .unwrap()
}

const SPEC: ChannelSpec = <JobChannel as Channel>::SPEC;

async fn next(sub: &dyn Subscription) -> Result<RawDelivery, QueueError> {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery in time")
}

#[tokio::test]
async fn every_store_error_reaches_the_client_as_the_store_returned_it() {
    let clock = VirtualClock::default();
    let s = setup(BrokerConfig::default(), clock.clone()).await;
    let queue = client(s.addr, clock).await;
    let errors: Vec<MakeError> = vec![
        || QueueError::Encode("an integer above i64::MAX".into()),
        || QueueError::Decode("missing field `n`".into()),
        || QueueError::PayloadTooLarge {
            size: 20_000_000,
            max: 16_777_216,
        },
        || QueueError::StaleLease { id: MessageId(77) },
        || QueueError::UnknownChannel("x".into()),
        || QueueError::UnknownMessage {
            channel: "a/b".into(),
            id: MessageId(5),
        },
        || QueueError::InvalidRequest("a dedup key on an at_least_once channel".into()),
        || QueueError::Closed,
        || QueueError::Io(std::io::Error::other("disk on fire")),
        || QueueError::Corrupt("bad crc in segment 3".into()),
        || QueueError::InvalidUrl {
            url: "nope://".into(),
            reason: "unknown scheme".into(),
        },
        || QueueError::Unsupported("listing by priority"),
        || QueueError::Protocol("the peer spoke nonsense".into()),
        || QueueError::Unauthorized("read-only token".into()),
        || QueueError::Timeout(Duration::from_millis(1500)),
        || QueueError::backend("querying the table", "connection reset".to_string()),
    ];
    for make in errors {
        let embedded = make();
        *s.faulty.stats_error.lock() = Some(make);
        let remote = queue.stats().await.expect_err("stats fails");
        assert_eq!(remote.code(), embedded.code(), "{remote}");
        assert_eq!(remote.to_string(), embedded.to_string());
        if !matches!(embedded, QueueError::Io(_)) {
            // Same variant, same fields (an i/o error's kind is not carried).
            assert_eq!(format!("{remote:?}"), format!("{embedded:?}"));
        }
    }
    *s.faulty.stats_error.lock() = None;
    assert!(
        queue.stats().await.is_ok(),
        "the connection survived every error"
    );
    assert!(s.broker.failure().is_none());
}

#[tokio::test]
async fn a_lease_is_settled_only_by_the_connection_it_was_handed_to() {
    let clock = VirtualClock::default();
    let s = setup(BrokerConfig::default(), clock.clone()).await;
    let worker = client(s.addr, clock.clone()).await;
    let thief = client(s.addr, clock).await;
    Job::produce(&worker, Job { n: 1 }).await.unwrap();
    let sub = worker.adapter().subscribe(&SPEC, 1).await.unwrap();
    let d = next(&*sub).await.unwrap();
    // The thief knows the id and the token, and still may not touch the lease.
    let acked = thief.adapter().settle(&d.lease, Outcome::Ack).await;
    assert!(
        matches!(acked, Err(QueueError::StaleLease { id }) if id == d.lease.id),
        "{acked:?}"
    );
    let extended = thief
        .adapter()
        .extend(&d.lease, Duration::from_secs(60))
        .await;
    assert!(
        matches!(extended, Err(QueueError::StaleLease { .. })),
        "{extended:?}"
    );
    worker
        .adapter()
        .settle(&d.lease, Outcome::Ack)
        .await
        .unwrap();
    let stats = worker.stats().await.unwrap();
    let jobs = stats.iter().find(|c| c.channel == "faults/jobs").unwrap();
    assert_eq!((jobs.acked, jobs.in_flight), (1, 0));
}

#[tokio::test]
async fn a_client_with_a_skewed_clock_gets_deadlines_on_its_own_clock() {
    // The broker's clock is 30 years ahead of the client's.
    let broker_clock = VirtualClock::new(1_000_000_000_000);
    let client_clock = VirtualClock::new(5_000);
    let s = setup(BrokerConfig::default(), broker_clock.clone()).await;
    let queue = client(s.addr, client_clock.clone()).await;
    Job::produce(&queue, Job { n: 1 }).await.unwrap();
    let sub = queue.adapter().subscribe(&SPEC, 1).await.unwrap();
    let d = next(&*sub).await.unwrap();
    assert_eq!(d.deadline, client_clock.now() + 10_000, "the 10 s lease");
    broker_clock.advance(Duration::from_secs(4));
    let deadline = queue
        .adapter()
        .extend(&d.lease, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(deadline, client_clock.now() + 20_000);
    queue
        .adapter()
        .settle(&d.lease, Outcome::Ack)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_poisoned_store_stops_the_broker_and_the_client_hears_why() {
    let clock = VirtualClock::default();
    let s = setup(BrokerConfig::default(), clock.clone()).await;
    let queue = client(s.addr, clock).await;
    Job::produce(&queue, Job { n: 1 }).await.unwrap();
    s.faulty.poisoned.store(true, Ordering::Release);
    let produced = Job::produce(&queue, Job { n: 2 }).await;
    assert!(
        matches!(&produced, Err(QueueError::Poisoned(cause)) if cause.contains("EIO")),
        "{produced:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), s.broker.stopped())
        .await
        .expect("the broker stops");
    assert_eq!(s.broker.failure(), Some("fdatasync failed: EIO"));
}

#[tokio::test]
async fn a_subscription_the_store_ends_is_reported_and_opened_again() {
    let clock = VirtualClock::default();
    let s = setup(BrokerConfig::default(), clock.clone()).await;
    let queue = client(s.addr, clock).await;
    // The broker's first `next` on the subscription fails.
    s.faulty.break_subs.store(true, Ordering::Release);
    let sub = queue.adapter().subscribe(&SPEC, 1).await.unwrap();
    Job::produce(&queue, Job { n: 1 }).await.unwrap();
    Job::produce(&queue, Job { n: 2 }).await.unwrap();
    let mut failed = None;
    let mut got = Vec::new();
    while got.is_empty() {
        match next(&*sub).await {
            Err(e) => failed = Some(e),
            Ok(d) => got.push(d),
        }
    }
    let failed = failed.expect("the subscriber heard why its subscription ended");
    assert!(
        matches!(&failed, QueueError::Corrupt(m) if m.contains("segment")),
        "{failed:?}"
    );
    // Opened again: the messages still arrive.
    queue
        .adapter()
        .settle(&got[0].lease, Outcome::Ack)
        .await
        .unwrap();
    let second = next(&*sub).await.unwrap();
    queue
        .adapter()
        .settle(&second.lease, Outcome::Ack)
        .await
        .unwrap();
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused_with_a_clear_code() {
    let clock = VirtualClock::default();
    let s = setup(
        BrokerConfig {
            max_subscriptions: 2,
            max_parallel: 8,
            ..BrokerConfig::default()
        },
        clock.clone(),
    )
    .await;
    let queue = client(s.addr, clock).await;
    let too_wide = queue.adapter().subscribe(&SPEC, 9).await.err();
    assert!(
        matches!(&too_wide, Some(QueueError::InvalidRequest(m)) if m.contains("limit_exceeded")),
        "{too_wide:?}"
    );
    let _a = queue.adapter().subscribe(&SPEC, 8).await.unwrap();
    let _b = queue.adapter().subscribe(&SPEC, 8).await.unwrap();
    let third = queue.adapter().subscribe(&SPEC, 1).await.err();
    assert!(
        matches!(&third, Some(QueueError::InvalidRequest(m)) if m.contains("limit_exceeded")),
        "{third:?}"
    );
    assert!(queue.stats().await.is_ok());
}

#[tokio::test]
async fn an_old_client_gets_a_clear_version_error() {
    let s = setup(BrokerConfig::default(), VirtualClock::default()).await;
    let mut f = Framed::new(
        TcpStream::connect(s.addr).await.unwrap(),
        LengthDelimitedCodec::new(),
    );
    let hello = ClientFrame {
        id: 1,
        request: Request::Hello {
            version: 2,
            token: None,
            client: "queue-runtime/0.0.9".into(),
        },
    };
    f.send(protocol::encode(&hello).unwrap()).await.unwrap();
    let bytes = f.next().await.unwrap().unwrap();
    let ServerFrame::Error { id: 0, error } = protocol::decode(&bytes).unwrap() else {
        panic!("an error frame")
    };
    assert_eq!(error.code, "version");
    assert!(
        error.message.contains("version 2") && error.message.contains("version 3"),
        "{}",
        error.message
    );
    assert!(f.next().await.is_none(), "and the connection closes");
}

#[tokio::test]
async fn a_subscriber_that_only_receives_is_not_taken_for_idle() {
    let clock = VirtualClock::default();
    let s = setup(
        BrokerConfig {
            idle_timeout: Duration::from_secs(1),
            ..BrokerConfig::default()
        },
        clock.clone(),
    )
    .await;
    let producer = client(s.addr, clock.clone()).await;
    let consumer = client(s.addr, clock).await;
    let sub = consumer.adapter().subscribe(&SPEC, 64).await.unwrap();
    // For 2 s the consumer hears a delivery every 100 ms and says nothing itself.
    let mut held = Vec::new();
    for n in 0..20 {
        Job::produce(&producer, Job { n }).await.unwrap();
        held.push(next(&*sub).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still its leases: the connection was never dropped.
    for d in &held {
        consumer
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
    let idle = s.broker.counters.idle.load(Ordering::Relaxed);
    assert_eq!(idle, 0, "a connection was dropped as idle");
}
