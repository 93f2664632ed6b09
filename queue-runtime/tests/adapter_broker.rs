//! The conformance suite against `queue://`: a broker on the embedded store, in process, on
//! a loopback port, sharing the test's virtual clock.

mod conformance;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::{Broker, BrokerConfig};

struct Served {
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.broker.shutdown();
    }
}

async fn broker(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let (queue, served, _) = serve(clock).await;
    (queue, served)
}

/// A broker and one client of it, with the broker's address for more.
async fn serve(
    clock: VirtualClock,
) -> (Queue, Box<dyn std::any::Any + Send>, std::net::SocketAddr) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = FileOptions {
        segment_size: 1 << 16,
        ..FileOptions::default()
    };
    let adapter = FileAdapter::open(dir.path(), Arc::new(clock.clone()), options).expect("store");
    let broker = Broker::new(adapter, BrokerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker.clone().serve_tcp(listener));
    let queue = queue_runtime::connect_with(
        &format!("queue://{addr}"),
        ConnectOptions::with_clock(Arc::new(clock)),
    )
    .await
    .expect("client");
    (queue, Box::new(Served { broker, _dir: dir }), addr)
}

conformance_suite!(broker);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_holds_across_worker_connections() {
    let clock = VirtualClock::default();
    let (first, _served, addr) = serve(clock.clone()).await;
    let mut queues = vec![first];
    for _ in 0..2 {
        let options = ConnectOptions::with_clock(Arc::new(clock.clone()));
        queues.push(
            queue_runtime::connect_with(&format!("queue://{addr}"), options)
                .await
                .expect("client"),
        );
    }
    conformance::flow::concurrency_holds_across_worker_connections(&queues).await;
}

/// The broker keeps the spec of a connection's last produce; a produce of another channel on
/// the same connection must not be stored under it.
#[tokio::test]
async fn produces_of_two_channels_on_one_connection_keep_their_own_specs() {
    use queue_core::{ChannelSpec, Outgoing};
    let clock = VirtualClock::default();
    let (queue, _served, _) = serve(clock).await;
    let plain = ChannelSpec::new("memo/plain");
    let once = ChannelSpec::new("memo/once").exactly_once(std::time::Duration::from_secs(60));
    let message = || Outgoing {
        payload: bson::serialize_to_vec(&bson::doc! { "n": 1 }).unwrap(),
        dedup_key: Some(7),
        delay: std::time::Duration::ZERO,
        priority: 0,
        group: None,
    };
    for _ in 0..3 {
        for spec in [&plain, &once] {
            queue
                .produce_raw(spec, vec![message()])
                .await
                .expect("produce");
        }
    }
    let stats = queue.stats().await.expect("stats");
    let of = |name: &str| stats.iter().find(|s| s.channel == name).expect(name);
    assert_eq!(
        (of("memo/plain").produced, of("memo/plain").duplicates),
        (3, 0)
    );
    assert_eq!(
        (of("memo/once").produced, of("memo/once").duplicates),
        (1, 2)
    );
}

/// A lone producer's request goes at once; produces made together on one connection still
/// travel together, a few requests for many messages.
#[tokio::test]
async fn produces_made_together_share_requests_and_a_lone_one_goes_alone() {
    use queue_core::{ChannelSpec, Outgoing};
    use std::sync::atomic::Ordering;
    let clock = VirtualClock::default();
    let (queue, served, _) = serve(clock).await;
    let served = served.downcast::<Served>().expect("served");
    let requests = || {
        served
            .broker
            .counters
            .produce_requests
            .load(Ordering::Relaxed)
    };
    let spec = ChannelSpec::new("gather/a");
    let message = || Outgoing {
        payload: bson::serialize_to_vec(&bson::doc! { "n": 1 }).unwrap(),
        dedup_key: None,
        delay: std::time::Duration::ZERO,
        priority: 0,
        group: None,
    };
    for n in 1..=3 {
        queue
            .produce_raw(&spec, vec![message()])
            .await
            .expect("produce");
        assert_eq!(requests(), n, "one request per awaited produce");
    }
    let before = requests();
    let together = (0..64).map(|_| queue.produce_raw(&spec, vec![message()]));
    for r in futures_util::future::join_all(together).await {
        r.expect("produce");
    }
    let used = requests() - before;
    assert!(used <= 4, "64 produces made together took {used} requests");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats[0].produced, 67);
}
