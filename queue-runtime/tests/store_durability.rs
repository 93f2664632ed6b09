//! The embedded store across restarts, damage and failing disks.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use queue_core::clock::Clock as _;
use queue_core::{
    Adapter, Channel, ChannelSpec, Outcome, Outgoing, Queue, QueueError, RawDelivery, VirtualClock,
    channel, codec,
};
use queue_runtime::TokioSpawner;
use queue_runtime::adapters::file::format::{self, Read, Record};
use queue_runtime::adapters::file::writer::{Handle, OsStorage, Storage, segment_path};
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use serde::{Deserialize, Serialize};

mod store;

#[channel("store/orders", lease = "10s", max_attempts = 5, backoff = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub n: u32,
}

#[channel("store/signups", exactly_once, dedup = "1m")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signup {
    pub email: String,
}

const ORDERS: &str = "store/orders";

fn options(segment_size: u64) -> FileOptions {
    FileOptions {
        segment_size,
        background_compaction: false,
        ..FileOptions::default()
    }
}

fn open_with(dir: &Path, clock: &VirtualClock, options: FileOptions) -> (Arc<FileAdapter>, Queue) {
    let adapter = store::open(dir, clock, || options.clone());
    let queue = Queue::new(
        adapter.clone(),
        Arc::new(clock.clone()),
        Arc::new(TokioSpawner::current()),
        "file://test",
    );
    (adapter, queue)
}

fn open(dir: &Path, clock: &VirtualClock) -> (Arc<FileAdapter>, Queue) {
    open_with(dir, clock, options(1 << 20))
}

async fn take(queue: &Queue, spec: &ChannelSpec) -> RawDelivery {
    let sub = queue.adapter().subscribe(spec, 1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery")
        .unwrap();
    // Keep the lease: dropping the subscription would release it.
    std::mem::forget(sub);
    d
}

async fn stats(queue: &Queue, channel: &str) -> queue_core::ChannelStats {
    queue
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.channel == channel)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_restart_keeps_messages_dedup_windows_delays_attempts_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let signup = Signup {
        email: "a@example.com".into(),
    };
    let (first_signup, delayed, failing, dead, acked, token_before) = {
        let (adapter, queue) = open(dir.path(), &clock);
        let first_signup = Signup::produce(&queue, signup.clone()).await.unwrap();
        let failing = Order::produce(&queue, Order { n: 1 }).await.unwrap();
        for _ in 0..2 {
            let d = take(&queue, &OrderChannel::SPEC).await;
            assert_eq!(d.lease.id, failing.id);
            let retry = Outcome::Retry {
                after: Some(Duration::ZERO),
                error: "flaky".into(),
            };
            queue.adapter().settle(&d.lease, retry).await.unwrap();
        }
        let d = take(&queue, &OrderChannel::SPEC).await;
        assert_eq!(d.lease.id, failing.id);
        queue
            .adapter()
            .settle(&d.lease, Outcome::Release)
            .await
            .unwrap();
        let held = take(&queue, &OrderChannel::SPEC).await;
        assert_eq!((held.lease.id, held.attempt), (failing.id, 3));
        let dead = Order::produce(&queue, Order { n: 2 }).await.unwrap();
        let acked = Order::produce(&queue, Order { n: 3 }).await.unwrap();
        let delayed = Order::producer(&queue)
            .delay(Duration::from_secs(3600))
            .produce(Order { n: 4 })
            .await
            .unwrap();
        let d = take(&queue, &OrderChannel::SPEC).await;
        assert_eq!(d.lease.id, dead.id);
        queue
            .adapter()
            .settle(
                &d.lease,
                Outcome::DeadLetter {
                    error: "bad order".into(),
                },
            )
            .await
            .unwrap();
        let d = take(&queue, &OrderChannel::SPEC).await;
        assert_eq!(d.lease.id, acked.id);
        queue
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
        let token_before = d.lease.token;
        queue.close().await.unwrap();
        drop(adapter);
        (first_signup, delayed, failing, dead, acked, token_before)
    };

    clock.advance(Duration::from_secs(30));
    let (adapter, queue) = open(dir.path(), &clock);
    assert_eq!(
        adapter.open_report().messages,
        4,
        "{:?}",
        adapter.open_report()
    );

    // The dedup window (1 minute from the first produce) holds across the restart.
    let again = Signup::produce(&queue, signup.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first_signup.id);

    // Attempts survive: the message had three deliveries (one given back unprocessed).
    let d = take(&queue, &OrderChannel::SPEC).await;
    assert_eq!(d.lease.id, failing.id);
    assert_eq!(
        d.attempt, 4,
        "two failures and one delivery cut short by the restart, plus this one"
    );
    assert!(
        d.lease.token > token_before,
        "fencing tokens never go backwards across restarts"
    );

    // The dead letter and its error survive; the acked message is gone; the delay holds.
    let dl = queue.dead_letters(ORDERS, 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!((dl[0].id, dl[0].error.as_str()), (dead.id, "bad order"));
    let pending = queue.peek(ORDERS, 10).await.unwrap();
    assert!(pending.iter().all(|m| m.id != acked.id));
    let s = stats(&queue, ORDERS).await;
    assert_eq!((s.delayed, s.in_flight, s.dead), (1, 1, 1));
    assert!(
        pending
            .iter()
            .any(|m| m.id == delayed.id && m.state == queue_core::MessageState::Delayed)
    );

    // New ids are larger than every id before the restart.
    let fresh = Order::produce(&queue, Order { n: 5 }).await.unwrap();
    assert!(fresh.id > delayed.id);

    // After the window the payload is accepted again.
    clock.advance(Duration::from_secs(31));
    assert!(!Signup::produce(&queue, signup).await.unwrap().duplicate);
}

#[tokio::test]
async fn groups_keep_their_order_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let (adapter, queue) = open(dir.path(), &clock);
    let producer = Order::producer(&queue);
    for (group, n) in [("a", 1), ("a", 2), ("b", 3), ("a", 4)] {
        producer
            .clone()
            .group(group)
            .produce(Order { n })
            .await
            .unwrap();
    }
    let held = take(&queue, &OrderChannel::SPEC).await;
    assert_eq!(codec::decode::<Order>(&held.payload).unwrap().n, 1);
    queue.close().await.unwrap();
    drop((adapter, queue));

    // The message in flight when the store closed heads its group again.
    let (_adapter, queue) = open(dir.path(), &clock);
    let sub = queue
        .adapter()
        .subscribe(&OrderChannel::SPEC, 10)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok(d) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        got.push(d.unwrap());
    }
    let mut firsts: Vec<u32> = got
        .iter()
        .map(|d| codec::decode::<Order>(&d.payload).unwrap().n)
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts, vec![1, 3]);
    let one = got.iter().find(|d| d.lease.id == held.lease.id).unwrap();
    assert_eq!(one.attempt, 2);
    queue
        .adapter()
        .settle(&one.lease, Outcome::Ack)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(codec::decode::<Order>(&d.payload).unwrap().n, 2);
}

#[tokio::test]
async fn a_purge_of_pending_messages_holds_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let (adapter, queue) = open(dir.path(), &clock);
    for n in 0..3 {
        Order::produce(&queue, Order { n }).await.unwrap();
    }
    Order::producer(&queue)
        .delay(Duration::from_secs(60))
        .produce(Order { n: 3 })
        .await
        .unwrap();
    let held = take(&queue, &OrderChannel::SPEC).await;
    assert_eq!(queue.purge(ORDERS).await.unwrap(), 3);
    queue.close().await.unwrap();
    drop((adapter, queue));
    clock.advance(Duration::from_secs(120));

    // The message that was in flight comes back (its worker is gone); nothing purged does.
    let (_adapter, queue) = open(dir.path(), &clock);
    let s = stats(&queue, ORDERS).await;
    assert_eq!((s.ready, s.delayed, s.in_flight), (1, 0, 0));
    let d = take(&queue, &OrderChannel::SPEC).await;
    assert_eq!(d.lease.id, held.lease.id);
}

#[tokio::test]
async fn a_pause_holds_across_restarts_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open(dir.path(), &clock);
        Order::produce(&queue, Order { n: 1 }).await.unwrap();
        queue.pause(ORDERS).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
    }
    {
        let (adapter, queue) = open(dir.path(), &clock);
        let s = stats(&queue, ORDERS).await;
        assert_eq!((s.ready, s.paused), (1, true));
        let sub = queue
            .adapter()
            .subscribe(&OrderChannel::SPEC, 1)
            .await
            .unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(150), sub.next()).await;
        assert!(waiting.is_err(), "a paused channel delivered {waiting:?}");
        queue.resume(ORDERS).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a delivery after resume")
            .unwrap();
        queue
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
        sub.stop().await;
        queue.close().await.unwrap();
        drop(adapter);
    }
    let (_adapter, queue) = open(dir.path(), &clock);
    assert!(!stats(&queue, ORDERS).await.paused);
}

#[tokio::test]
async fn a_pause_that_cannot_be_made_durable_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let storage = Arc::new(FailingSync::default());
    let opts = FileOptions {
        storage: storage.clone(),
        ..options(1 << 20)
    };
    let (_adapter, queue) = open_with(dir.path(), &clock, opts);
    Order::produce(&queue, Order { n: 1 }).await.unwrap();
    storage.fail.store(true, Ordering::SeqCst);
    let err = queue.pause(ORDERS).await.unwrap_err();
    assert!(err.to_string().contains("injected fsync failure"), "{err}");
    storage.fail.store(false, Ordering::SeqCst);
    assert!(!stats(&queue, ORDERS).await.paused);
    assert!(!dir.path().join("paused").exists());
}

#[tokio::test]
async fn a_damaged_record_of_paused_channels_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open(dir.path(), &clock);
        Order::produce(&queue, Order { n: 1 }).await.unwrap();
        queue.pause(ORDERS).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
    }
    let path = dir.path().join("paused");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let err = FileAdapter::open(dir.path(), Arc::new(clock), options(1 << 20)).unwrap_err();
    assert!(matches!(err, QueueError::Corrupt(_)), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_delivery_taken_ahead_and_then_cancelled_is_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let (_adapter, queue) = open(dir.path(), &clock);
    let first = Order::produce(&queue, Order { n: 0 }).await.unwrap();
    let second = Order::produce(&queue, Order { n: 1 }).await.unwrap();
    let sub = queue
        .adapter()
        .subscribe(&OrderChannel::SPEC, 2)
        .await
        .unwrap();
    let next = || tokio::time::timeout(Duration::from_millis(300), sub.next());
    let d = next().await.expect("a delivery").unwrap();
    assert_eq!(d.lease.id, first.id);
    // The second was taken with the first, into the subscription's inbox.
    assert_eq!(stats(&queue, ORDERS).await.in_flight, 2);
    assert_eq!(
        queue.cancel(ORDERS, second.id).await.unwrap(),
        queue_core::Cancelled::InFlight
    );
    assert!(
        next().await.is_err(),
        "the cancelled delivery was handed out"
    );
    let third = Order::produce(&queue, Order { n: 2 }).await.unwrap();
    let d = next().await.expect("a delivery").unwrap();
    assert_eq!(d.lease.id, third.id);
}

/// The counters of `s` agree with its depths: every produced message is pending, held,
/// dead or acked (nothing was purged or cancelled).
fn consistent(s: &queue_core::ChannelStats) -> bool {
    s.produced == s.ready + s.delayed + s.in_flight + s.dead + s.acked
}

#[tokio::test]
async fn counters_survive_a_restart_and_agree_with_the_depths() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let first_open = clock.now();
    let before = {
        let (adapter, queue) = open(dir.path(), &clock);
        for n in 0..5 {
            Order::produce(&queue, Order { n }).await.unwrap();
        }
        let sub = queue
            .adapter()
            .subscribe(&OrderChannel::SPEC, 4)
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
            held.push(d.expect("a delivery").unwrap().lease);
        }
        let adapter_ref = queue.adapter();
        adapter_ref.settle(&held[0], Outcome::Ack).await.unwrap();
        adapter_ref.settle(&held[1], Outcome::Ack).await.unwrap();
        let retry = Outcome::Retry {
            after: None,
            error: "later".into(),
        };
        adapter_ref.settle(&held[2], retry).await.unwrap();
        let dead = Outcome::DeadLetter { error: "no".into() };
        adapter_ref.settle(&held[3], dead).await.unwrap();
        drop(sub);
        let s = stats(&queue, ORDERS).await;
        assert_eq!(
            (s.produced, s.acked, s.retried, s.dead_lettered, s.dead),
            (5, 2, 1, 1, 1)
        );
        assert!(consistent(&s), "{s:?}");
        assert_eq!(s.counted_since, first_open);
        queue.close().await.unwrap();
        drop(adapter);
        s
    };
    clock.advance(Duration::from_secs(3600));
    {
        let (adapter, queue) = open(dir.path(), &clock);
        let s = stats(&queue, ORDERS).await;
        assert_eq!(
            (s.produced, s.acked, s.retried, s.dead_lettered),
            (
                before.produced,
                before.acked,
                before.retried,
                before.dead_lettered
            )
        );
        assert_eq!((s.counted_since, s.dead), (first_open, 1));
        assert!(consistent(&s), "{s:?}");
        Order::produce(&queue, Order { n: 9 }).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
    }
    let (adapter, queue) = open(dir.path(), &clock);
    let s = stats(&queue, ORDERS).await;
    assert_eq!((s.produced, s.acked, s.counted_since), (6, 2, first_open));
    assert!(consistent(&s), "{s:?}");
    queue.close().await.unwrap();
    drop(adapter);
    let url = format!("file://{}", dir.path().display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"))
        .args(["stats", "--url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let since = std::time::UNIX_EPOCH + Duration::from_millis(first_open);
    let line = format!(
        "PRODUCED, ACKED and RETRIED count since {}",
        humantime::format_rfc3339_seconds(since)
    );
    assert!(text.contains(&line), "{text}");
}

#[tokio::test]
async fn a_damaged_counters_file_restarts_the_count_and_keeps_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open(dir.path(), &clock);
        Order::produce(&queue, Order { n: 1 }).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
    }
    let path = dir.path().join("counters");
    let mut bytes = std::fs::read(&path).expect("a counters file");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    clock.advance(Duration::from_secs(60));
    let (adapter, queue) = open(dir.path(), &clock);
    let s = stats(&queue, ORDERS).await;
    assert_eq!((s.produced, s.ready, s.counted_since), (0, 1, clock.now()));
    queue.close().await.unwrap();
    drop(adapter);
}

#[tokio::test]
async fn queuectl_stats_shows_when_the_next_delayed_message_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let clock = VirtualClock::new(queue_core::clock::millis(wall));
    let (adapter, queue) = open(dir.path(), &clock);
    Order::producer(&queue)
        .delay(Duration::from_secs(7_200))
        .produce(Order { n: 1 })
        .await
        .unwrap();
    Signup::produce(
        &queue,
        Signup {
            email: "a@b".into(),
        },
    )
    .await
    .unwrap();
    let s = stats(&queue, ORDERS).await;
    assert_eq!(s.next_due, Some(clock.now() + 7_200_000));
    queue.close().await.unwrap();
    drop(adapter);
    let url = format!("file://{}", dir.path().display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"))
        .args(["stats", "--url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or("");
    assert!(text.lines().next().unwrap().ends_with("NEXT DUE"), "{text}");
    assert!(
        line(ORDERS).ends_with(" in 1h 59m 59s") || line(ORDERS).ends_with(" in 2h"),
        "{text}"
    );
    assert!(line("store/signups").ends_with(" -"), "{text}");
}

#[tokio::test]
async fn queuectl_purge_asks_for_yes_then_deletes_pending_messages() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open(dir.path(), &clock);
        for n in 0..2 {
            Order::produce(&queue, Order { n }).await.unwrap();
        }
        queue.close().await.unwrap();
        drop(adapter);
    }
    let url = format!("file://{}", dir.path().display());
    let purge = |yes: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"));
        cmd.args(["purge", ORDERS, "--url", &url]);
        if yes {
            cmd.arg("--yes");
        }
        cmd.output().unwrap()
    };
    let refused = purge(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pass --yes"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let done = purge(true);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{out}");
    assert!(
        out.contains("purged 2 pending message(s) from store/orders"),
        "{out}"
    );
    let (_adapter, queue) = open(dir.path(), &clock);
    assert_eq!(stats(&queue, ORDERS).await.ready, 0);
}

#[tokio::test]
async fn queuectl_cancel_deletes_one_message_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let id = {
        let (adapter, queue) = open(dir.path(), &clock);
        let receipt = Order::produce(&queue, Order { n: 1 }).await.unwrap();
        Order::produce(&queue, Order { n: 2 }).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
        receipt.id
    };
    let url = format!("file://{}", dir.path().display());
    let cancel = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"))
            .args(["cancel", ORDERS, &id.0.to_string(), "--url", &url])
            .output()
            .unwrap()
    };
    let done = cancel();
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{out}");
    assert!(
        out.contains(&format!("cancelled message {id} of store/orders")),
        "{out}"
    );
    let again = cancel();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!("no message {id} in `store/orders`")),
        "{err}"
    );
    let (_adapter, queue) = open(dir.path(), &clock);
    assert_eq!(stats(&queue, ORDERS).await.ready, 1);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let (_adapter, _queue) = open(dir.path(), &clock);
    let err = FileAdapter::open(dir.path(), Arc::new(clock), options(1 << 20)).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

fn payload(n: u32) -> Outgoing {
    Outgoing {
        payload: codec::encode(&Order { n }).unwrap(),
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    }
}

#[tokio::test]
async fn compaction_keeps_the_groups_of_the_messages_it_relocates() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let spec = OrderChannel::SPEC;
    let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
    let producer = Order::producer(&queue);
    for n in 0..400u32 {
        let p = producer.clone();
        let p = if n.is_multiple_of(100) {
            p.group("g")
        } else {
            p
        };
        p.produce(Order { n }).await.unwrap();
    }
    // Everything but the group is acked, so its messages sit in sparse segments.
    let sub = queue.adapter().subscribe(&spec, 1000).await.unwrap();
    while let Ok(d) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let d = d.unwrap();
        let n = codec::decode::<Order>(&d.payload).unwrap().n;
        if !n.is_multiple_of(100) {
            queue
                .adapter()
                .settle(&d.lease, Outcome::Ack)
                .await
                .unwrap();
        }
    }
    drop(sub);
    let before = adapter.segments().len();
    assert!(adapter.compact().await.unwrap() > 0);
    assert!(adapter.segments().len() < before);
    queue.close().await.unwrap();
    drop((adapter, queue));

    let (_adapter, queue) = open_with(dir.path(), &clock, options(4096));
    let sub = queue.adapter().subscribe(&spec, 10).await.unwrap();
    for n in [0, 100, 200, 300] {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(codec::decode::<Order>(&d.payload).unwrap().n, n);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sub.next())
                .await
                .is_err(),
            "a second message of the group left while {n} was in flight"
        );
        queue
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn compaction_deletes_acked_segments_and_relocates_sparse_ones() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let spec = OrderChannel::SPEC;
    let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
    let mut ids = BTreeMap::new();
    for n in 0..600 {
        let r = queue.produce_raw(&spec, vec![payload(n)]).await.unwrap();
        ids.insert(r[0].id, n);
    }
    let signup = Signup::produce(
        &queue,
        Signup {
            email: "keep@example.com".into(),
        },
    )
    .await
    .unwrap();
    let before = adapter.segments().len();
    assert!(before > 5, "{before} segments");

    // Ack all but every 50th; dead-letter one of the survivors.
    let sub = queue.adapter().subscribe(&spec, 1000).await.unwrap();
    let mut kept = Vec::new();
    for _ in 0..600 {
        let d = sub.next().await.unwrap();
        let n = ids[&d.lease.id];
        if n % 50 == 0 {
            kept.push((d.lease.id, n));
            if n == 100 {
                let dead = Outcome::DeadLetter {
                    error: "kept dead".into(),
                };
                queue.adapter().settle(&d.lease, dead).await.unwrap();
            }
        } else {
            queue
                .adapter()
                .settle(&d.lease, Outcome::Ack)
                .await
                .unwrap();
        }
    }
    drop(sub);
    let deleted = adapter.compact().await.unwrap();
    let after = adapter.segments().len();
    assert!(
        deleted > 0 && after < before / 2,
        "{before} segments before, {after} after, {deleted} deleted; usage {:?}",
        adapter.usage()
    );
    queue.close().await.unwrap();
    drop(adapter);

    let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
    assert_eq!(adapter.open_report().messages, kept.len() as u64 + 1);
    let pending = queue.peek(ORDERS, 1000).await.unwrap();
    let mut seen: Vec<u32> = pending
        .iter()
        .map(|m| codec::decode::<Order>(&m.payload).unwrap().n)
        .collect();
    let dead = queue.dead_letters(ORDERS, 10).await.unwrap();
    assert_eq!(codec::decode::<Order>(&dead[0].payload).unwrap().n, 100);
    assert_eq!(dead[0].error, "kept dead");
    seen.push(100);
    seen.sort_unstable();
    assert_eq!(seen, kept.iter().map(|(_, n)| *n).collect::<Vec<_>>());
    let dup = Signup::produce(
        &queue,
        Signup {
            email: "keep@example.com".into(),
        },
    )
    .await
    .unwrap();
    assert!(
        dup.duplicate && dup.id == signup.id,
        "the dedup entry survives compaction"
    );
}

#[tokio::test]
async fn settled_compaction_waits_until_a_segment_stops_draining() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let spec = OrderChannel::SPEC;
    let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
    for n in 0..600 {
        queue.produce_raw(&spec, vec![payload(n)]).await.unwrap();
    }
    // Ack nine of every ten of the first 300: their segments are mostly dead.
    let sub = queue.adapter().subscribe(&spec, 1000).await.unwrap();
    let mut held = Vec::new();
    for i in 0..300 {
        let d = sub.next().await.unwrap();
        if i % 10 == 0 {
            held.push(d);
        } else {
            let ack = queue.adapter().settle(&d.lease, Outcome::Ack);
            ack.await.unwrap();
        }
    }
    let before = adapter.segments().len();

    // First look: nothing is known about the segments yet, so nothing moves.
    adapter.compact_settled().await.unwrap();
    assert_eq!(adapter.segments().len(), before);

    // A consumer keeps draining the oldest segment: still nothing moves.
    let first = held.remove(0);
    queue
        .adapter()
        .settle(&first.lease, Outcome::Ack)
        .await
        .unwrap();
    adapter.compact_settled().await.unwrap();
    assert_eq!(adapter.segments().len(), before);

    // Unchanged since the last look: the sparse segments are rewritten and deleted.
    adapter.compact_settled().await.unwrap();
    let after = adapter.segments().len();
    assert!(after < before, "{before} segments before, {after} after");
    for d in &held {
        queue
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
    let pending = queue.peek(ORDERS, 1000).await.unwrap();
    assert_eq!(pending.len(), 300);
    drop(sub);
}

#[tokio::test]
async fn a_produce_key_is_answered_across_a_restart_until_its_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    async fn keyed(queue: &Queue, n: u32) -> Vec<queue_core::Receipt> {
        let batch = vec![payload(n), payload(n + 1)];
        let window = Duration::from_secs(60);
        let spec = OrderChannel::SPEC;
        let adapter = queue.adapter();
        let produce = adapter
            .keyed()
            .expect("keyed")
            .produce_keyed(&spec, batch, "key-1", window);
        produce.await.unwrap()
    }
    let (adapter, queue) = open(dir.path(), &clock);
    let first = keyed(&queue, 1).await;
    assert_eq!(keyed(&queue, 10).await, first, "answered from the key");
    assert_eq!(stats(&queue, ORDERS).await.ready, 2);
    queue.close().await.unwrap();
    drop(adapter);

    let (adapter, queue) = open(dir.path(), &clock);
    clock.advance(Duration::from_secs(59));
    assert_eq!(keyed(&queue, 20).await, first, "the key outlives a restart");
    assert_eq!(stats(&queue, ORDERS).await.ready, 2);
    clock.advance(Duration::from_secs(2));
    let later = keyed(&queue, 30).await;
    assert!(
        later[0].id > first[1].id,
        "after the window it is a new produce"
    );
    assert_eq!(stats(&queue, ORDERS).await.ready, 4);
    queue.close().await.unwrap();
    drop(adapter);
}

#[tokio::test]
async fn a_produce_key_survives_the_deletion_of_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let spec = OrderChannel::SPEC;
    let window = Duration::from_secs(600);
    let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
    let first = queue
        .adapter()
        .keyed()
        .expect("keyed")
        .produce_keyed(&spec, vec![payload(0)], "kept", window)
        .await
        .unwrap();
    let home = *adapter.segments().last().unwrap();
    for n in 1..300 {
        queue.produce_raw(&spec, vec![payload(n)]).await.unwrap();
    }
    let sub = queue.adapter().subscribe(&spec, 1000).await.unwrap();
    for _ in 0..300 {
        let d = sub.next().await.unwrap();
        queue
            .adapter()
            .settle(&d.lease, Outcome::Ack)
            .await
            .unwrap();
    }
    drop(sub);
    adapter.compact().await.unwrap();
    assert!(
        !adapter.segments().contains(&home),
        "segment {home} was deleted"
    );
    queue.close().await.unwrap();
    drop(adapter);

    let (_adapter, queue) = open_with(dir.path(), &clock, options(4096));
    let again = queue
        .adapter()
        .keyed()
        .expect("keyed")
        .produce_keyed(&spec, vec![payload(0)], "kept", window)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(stats(&queue, ORDERS).await.ready, 0, "nothing stored again");
}

/// Bytes of a commit record, frame included.
const COMMIT_LEN: usize = format::FRAME_LEN + 17;

/// The start and end offsets of every message record in a segment, in order.
fn record_ends(path: &Path) -> Vec<(usize, usize)> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = format::HEADER_LEN;
    let mut ends = Vec::new();
    while at < bytes.len() {
        match format::decode(&bytes[at..]) {
            Read::Record(r, len) => {
                if let Record::Message(_) = r {
                    ends.push((at, at + len));
                }
                at += len;
            }
            _ => break,
        }
    }
    ends
}

async fn produce_each(queue: &Queue, n: u32) -> Vec<queue_core::MessageId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            queue
                .produce_raw(&OrderChannel::SPEC, vec![payload(i)])
                .await
                .unwrap()[0]
                .id,
        );
    }
    ids
}

async fn surviving(dir: &Path, clock: &VirtualClock) -> Result<Vec<u32>, QueueError> {
    let adapter = FileAdapter::open(dir, Arc::new(clock.clone()), options(1 << 20))?;
    let pending = match adapter.peek(ORDERS, 10_000).await {
        Err(QueueError::UnknownChannel(_)) => Vec::new(),
        other => other?,
    };
    Ok(pending
        .iter()
        .map(|m| codec::decode::<Order>(&m.payload).unwrap().n)
        .collect())
}

#[tokio::test]
async fn a_truncated_segment_keeps_every_record_before_the_cut() {
    let clock = VirtualClock::default();
    for round in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        {
            let (adapter, queue) = open(dir.path(), &clock);
            produce_each(&queue, 40).await;
            queue.close().await.unwrap();
            drop(adapter);
        }
        let path = segment_path(dir.path(), 1);
        let ends = record_ends(&path);
        assert_eq!(ends.len(), 40);
        let data_end = ends.last().unwrap().1 + 30;
        let cut = format::HEADER_LEN
            + (fastrand::usize(..) ^ round as usize) % (data_end - format::HEADER_LEN);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        // Each produce is one group commit: the message, then a commit record. A message
        // counts once its commit record is whole.
        let expected: Vec<u32> = (0..40)
            .filter(|i| ends[*i as usize].1 + COMMIT_LEN <= cut)
            .collect();
        let got = surviving(dir.path(), &clock)
            .await
            .expect("a torn tail is repaired, not refused");
        assert_eq!(got, expected, "cut at {cut}");
    }
}

#[tokio::test]
async fn damage_in_the_last_commit_is_cut_off_and_damage_before_a_later_commit_is_refused() {
    let clock = VirtualClock::default();
    for round in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        {
            let (adapter, queue) = open(dir.path(), &clock);
            produce_each(&queue, 20).await;
            queue.close().await.unwrap();
            drop(adapter);
        }
        let path = segment_path(dir.path(), 1);
        let ends = record_ends(&path);
        let mut bytes = std::fs::read(&path).unwrap();
        if round % 2 == 0 {
            // Inside the last message: its commit never completed as far as the disk knows.
            let (start, end) = ends[19];
            let at = start + fastrand::usize(..end - start);
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            let got = surviving(dir.path(), &clock)
                .await
                .expect("a damaged tail is cut off");
            assert_eq!(got, (0..19).collect::<Vec<_>>(), "flip at {at}");
        } else {
            // Inside an earlier message: later commits made it, so this is corruption.
            let (start, end) = ends[5 + fastrand::usize(..10)];
            let at = start + fastrand::usize(..end - start);
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            let err = surviving(dir.path(), &clock).await.unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, QueueError::Corrupt(_)), "{text}");
            assert!(
                text.contains("00000000000000000001.qlog")
                    && text.contains(&format!("offset {start}")),
                "{text}"
            );
        }
    }
}

/// Storage whose syncs fail once `fail` is set.
#[derive(Default)]
struct FailingSync {
    fail: AtomicBool,
}

impl Storage for FailingSync {
    fn sync_data(&self, file: &Handle) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fsync failure"));
        }
        file.file()?.sync_data()
    }
}

/// Storage that records which thread made each sync, and can make syncs slow. Its syncs
/// reach only the page cache, so that a loaded machine's disk does not make them slow too.
#[derive(Default)]
struct WatchedSync {
    slow: AtomicBool,
    threads: parking_lot::Mutex<Vec<String>>,
    /// Open files that are not segments (the `counters` file the store saves in the
    /// background, say): their syncs are not the log's.
    others: parking_lot::Mutex<Vec<std::os::fd::RawFd>>,
}

impl Storage for WatchedSync {
    fn create(&self, path: &Path) -> io::Result<Handle> {
        use std::os::fd::AsRawFd as _;
        let handle = OsStorage.create(path)?;
        if !path.to_string_lossy().contains(".qlog") {
            self.others.lock().push(handle.file()?.as_raw_fd());
        }
        Ok(handle)
    }

    fn sync_data(&self, file: &Handle) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let fd = file.file()?.as_raw_fd();
        {
            let mut others = self.others.lock();
            if let Some(at) = others.iter().position(|o| *o == fd) {
                // Synced once, then closed: its descriptor may be reused by a segment.
                others.remove(at);
                return Ok(());
            }
        }
        if self.slow.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(150));
        }
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().push(name);
        Ok(())
    }
}

impl WatchedSync {
    fn last(&self) -> String {
        self.threads.lock().last().cloned().unwrap_or_default()
    }
}

/// A call of the writer to a segment file.
#[derive(Clone, Debug, PartialEq)]
enum SegmentCall {
    Write { offset: u64, len: u64 },
    Writeback { offset: u64, len: u64 },
    Sync,
}

/// Storage that records the calls made to segment files, and holds syncs while told to.
#[derive(Default)]
struct Pipelined {
    hold: parking_lot::Mutex<bool>,
    released: parking_lot::Condvar,
    held: std::sync::atomic::AtomicUsize,
    calls: parking_lot::Mutex<Vec<SegmentCall>>,
    others: parking_lot::Mutex<Vec<std::os::fd::RawFd>>,
}

/// Releases held syncs when dropped, so that a failing test ends instead of waiting.
struct Release(Arc<Pipelined>);

impl Drop for Release {
    fn drop(&mut self) {
        *self.0.hold.lock() = false;
        self.0.released.notify_all();
    }
}

impl Pipelined {
    fn segment(&self, file: &Handle) -> bool {
        use std::os::fd::AsRawFd as _;
        file.file()
            .is_ok_and(|f| !self.others.lock().contains(&f.as_raw_fd()))
    }
}

impl Storage for Pipelined {
    fn create(&self, path: &Path) -> io::Result<Handle> {
        use std::os::fd::AsRawFd as _;
        let handle = OsStorage.create(path)?;
        let fd = handle.file()?.as_raw_fd();
        let mut others = self.others.lock();
        others.retain(|o| *o != fd);
        if !path.to_string_lossy().contains(".qlog") {
            others.push(fd);
        }
        Ok(handle)
    }

    fn write_at(&self, file: &Handle, bytes: &[u8], offset: u64) -> io::Result<()> {
        if self.segment(file) {
            self.calls.lock().push(SegmentCall::Write {
                offset,
                len: bytes.len() as u64,
            });
        }
        OsStorage.write_at(file, bytes, offset)
    }

    fn start_writeback(&self, file: &Handle, offset: u64, len: u64) {
        if self.segment(file) {
            self.calls
                .lock()
                .push(SegmentCall::Writeback { offset, len });
        }
        OsStorage.start_writeback(file, offset, len);
    }

    fn sync_data(&self, file: &Handle) -> io::Result<()> {
        if self.segment(file) {
            let mut hold = self.hold.lock();
            if *hold {
                self.held.fetch_add(1, Ordering::SeqCst);
                while *hold {
                    self.released.wait(&mut hold);
                }
            }
            drop(hold);
            self.calls.lock().push(SegmentCall::Sync);
        }
        file.file()?.sync_data()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_writes_the_next_batch_before_answering_the_last_and_confirms_only_synced_ones()
{
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let storage = Arc::new(Pipelined::default());
    let opts = FileOptions {
        storage: storage.clone(),
        // Every commit on the writer thread, which writes the next batch while one syncs.
        lead_commits: false,
        ..options(1 << 20)
    };
    let (adapter, queue) = open_with(dir.path(), &clock, opts);
    Order::produce(&queue, Order { n: 0 }).await.unwrap();
    storage.calls.lock().clear();
    let release = Release(storage.clone());
    *storage.hold.lock() = true;
    let first = tokio::spawn({
        let queue = queue.clone();
        async move { Order::produce(&queue, Order { n: 1 }).await }
    });
    for _ in 0..500 {
        if storage.held.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        storage.held.load(Ordering::SeqCst),
        1,
        "the first commit waits in its sync"
    );
    let later: Vec<_> = (2..=4)
        .map(|n| {
            let queue = queue.clone();
            tokio::spawn(async move { Order::produce(&queue, Order { n }).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first.is_finished(), "confirmed before its sync returned");
    assert!(
        later.iter().all(|t| !t.is_finished()),
        "confirmed before being synced"
    );
    drop(release);
    first.await.unwrap().unwrap();
    for t in later {
        t.await.unwrap().unwrap();
    }
    let calls = storage.calls.lock().clone();
    // The first batch, its sync, then the next batch written and its writeback started
    // before its own sync (the first batch's answers go between the two).
    let Some(at) = calls.iter().position(|c| *c == SegmentCall::Sync) else {
        panic!("no sync in {calls:?}");
    };
    let Some(SegmentCall::Write { offset, len }) = calls.get(at + 1).cloned() else {
        panic!("the next batch is not written right after the first sync: {calls:?}");
    };
    assert_eq!(
        calls.get(at + 2),
        Some(&SegmentCall::Writeback { offset, len }),
        "no writeback started for the next batch before its sync: {calls:?}"
    );
    assert_eq!(calls.get(at + 3), Some(&SegmentCall::Sync), "{calls:?}");
    queue.close().await.unwrap();
    drop(adapter);
    let (_adapter, queue) = open(dir.path(), &clock);
    assert_eq!(stats(&queue, ORDERS).await.ready, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_producer_commits_on_its_own_thread_until_a_sync_is_slow() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let storage = Arc::new(WatchedSync::default());
    let opts = FileOptions {
        storage: storage.clone(),
        ..options(1 << 20)
    };
    let (adapter, queue) = open_with(dir.path(), &clock, opts);
    let writer = "queue-log-writer";
    let produce = |n| Order::produce(&queue, Order { n });
    // The writer thread may still hold the log for an instant after answering a commit, so
    // a producer leads within a few tries rather than at once.
    let mut n = 0;
    let mut led = async || {
        for _ in 0..10 {
            n += 1;
            Order::produce(&queue, Order { n }).await.unwrap();
            if storage.last() != writer {
                return true;
            }
        }
        false
    };
    assert!(led().await, "the idle log is synced by the producer");
    // A slow sync hands commits back to the writer thread, until one is fast again.
    storage.slow.store(true, Ordering::SeqCst);
    produce(2).await.unwrap();
    produce(3).await.unwrap();
    assert_eq!(storage.last(), writer);
    storage.slow.store(false, Ordering::SeqCst);
    produce(4).await.unwrap();
    assert_eq!(storage.last(), writer);
    assert!(led().await, "leading resumes after a fast commit");
    queue.close().await.unwrap();
    drop(adapter);
    let (_adapter, queue) = open(dir.path(), &clock);
    assert_eq!(stats(&queue, ORDERS).await.ready, u64::from(n) + 3);

    // Turned off, the writer thread syncs every commit.
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(WatchedSync::default());
    let opts = FileOptions {
        storage: storage.clone(),
        lead_commits: false,
        ..options(1 << 20)
    };
    let (_adapter, queue) = open_with(dir.path(), &clock, opts);
    Order::produce(&queue, Order { n: 1 }).await.unwrap();
    assert_eq!(storage.last(), writer);
}

#[tokio::test]
async fn an_fsync_failure_poisons_the_store_and_surfaces_to_producers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let storage = Arc::new(FailingSync::default());
    let opts = FileOptions {
        storage: storage.clone(),
        ..options(1 << 20)
    };
    let (adapter, queue) = open_with(dir.path(), &clock, opts);
    let kept = Order::produce(&queue, Order { n: 1 }).await.unwrap();
    storage.fail.store(true, Ordering::SeqCst);
    let err = Order::produce(&queue, Order { n: 2 }).await.unwrap_err();
    assert!(matches!(err, QueueError::Poisoned(_)), "{err:?}");
    assert!(err.to_string().contains("injected fsync failure"), "{err}");
    // Poisoned for good, even once the disk recovers: no retried fsync.
    storage.fail.store(false, Ordering::SeqCst);
    let err = Order::produce(&queue, Order { n: 3 }).await.unwrap_err();
    assert!(matches!(err, QueueError::Poisoned(_)), "{err:?}");
    let err = queue
        .adapter()
        .subscribe(&OrderChannel::SPEC, 1)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, QueueError::Poisoned(_)), "{err:?}");
    drop(queue);
    drop(adapter);

    let (_adapter, queue) = open(dir.path(), &clock);
    let pending = queue.peek(ORDERS, 10).await.unwrap();
    assert_eq!(
        pending.first().map(|m| m.id),
        Some(kept.id),
        "what was confirmed is still there"
    );
}

/// A text over 64 KiB, mostly three-byte characters, with a character across byte 65,535.
fn long_korean_json() -> String {
    let mut text = String::from("{\"error\": \"");
    while text.len() < 70_000 {
        text.push_str("결제 서버가 응답하지 않습니다. ");
    }
    text.push_str("\"}");
    assert!(
        !text.is_char_boundary(u16::MAX as usize),
        "the old cut at 65,535 bytes splits a character"
    );
    text
}

#[tokio::test]
async fn a_long_non_ascii_error_on_the_last_attempt_is_cut_with_a_marker_and_the_store_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let spec = ChannelSpec::new("store/payments").max_attempts(1);
    let text = long_korean_json();
    let dead_id = {
        let (adapter, queue) = open(dir.path(), &clock);
        queue.produce_raw(&spec, vec![payload(1)]).await.unwrap();
        let d = take(&queue, &spec).await;
        queue
            .adapter()
            .settle(
                &d.lease,
                Outcome::Retry {
                    after: None,
                    error: text.clone(),
                },
            )
            .await
            .unwrap();
        // A later write after the dead letter.
        queue.produce_raw(&spec, vec![payload(2)]).await.unwrap();
        queue.close().await.unwrap();
        drop(adapter);
        d.lease.id
    };
    let (_adapter, queue) = open(dir.path(), &clock);
    let dl = queue.dead_letters("store/payments", 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].id, dead_id);
    let error = &dl[0].error;
    assert!(
        error.len() <= queue_core::limits::MAX_ERROR_TEXT,
        "{} bytes",
        error.len()
    );
    let (kept, marker) = error.rsplit_once("… [cut: ").expect("a visible marker");
    assert!(
        text.starts_with(kept),
        "the kept text is the start of the error"
    );
    let (cut, note) = marker.split_once(" bytes]").expect("the marker's end");
    assert_eq!(kept.len() + cut.parse::<usize>().unwrap(), text.len());
    assert_eq!(
        note, " (attempt 1 of 1)",
        "the engine's note follows the cut text"
    );
    assert_eq!(
        stats(&queue, "store/payments").await.ready,
        1,
        "the later produce is there"
    );
}

#[tokio::test]
async fn a_zeroed_header_of_the_newest_segment_is_reported_not_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open(dir.path(), &clock);
        produce_each(&queue, 100).await;
        queue.close().await.unwrap();
        drop(adapter);
    }
    let path = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..format::HEADER_LEN].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let err = surviving(dir.path(), &clock).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, QueueError::Corrupt(_)), "{text}");
    assert!(
        text.contains("00000000000000000001.qlog") && text.contains("offset 0"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the damaged file is left as it was"
    );
}

#[tokio::test]
async fn a_channel_name_near_64_kib_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    let name = "a".repeat(65_000);
    let spec = ChannelSpec {
        name: name.into(),
        ..ChannelSpec::new("")
    };
    {
        let (adapter, queue) = open(dir.path(), &clock);
        let big = Outgoing {
            payload: vec![0; 1 << 20],
            ..payload(0)
        };
        let err = queue
            .produce_raw(&spec, vec![big.clone()])
            .await
            .unwrap_err();
        assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
        let err = adapter.produce(&spec, vec![big]).await.unwrap_err();
        assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
        let err = adapter.subscribe(&spec, 1).await.err().expect("refused");
        assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
        produce_each(&queue, 1).await;
        queue.close().await.unwrap();
        drop(adapter);
    }
    assert_eq!(surviving(dir.path(), &clock).await.unwrap(), vec![0]);
}

#[tokio::test]
async fn a_segment_size_beyond_32_bit_offsets_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileAdapter::open(
        dir.path(),
        Arc::new(VirtualClock::default()),
        options(5 << 30),
    )
    .unwrap_err();
    assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("segment_size"), "{err}");
}

#[tokio::test]
async fn queuectl_check_names_each_damaged_segment_and_offset_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::default();
    {
        let (adapter, queue) = open_with(dir.path(), &clock, options(4096));
        produce_each(&queue, 60).await;
        queue.close().await.unwrap();
        drop(adapter);
    }
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"))
            .args(["check", "--data"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let clean = check();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );

    let path = segment_path(dir.path(), 1);
    let (start, _) = record_ends(&path)[3];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start + format::FRAME_LEN + 2] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let newest = segment_path(dir.path(), *adapter_segments(dir.path()).last().unwrap());
    let mut newest_bytes = std::fs::read(&newest).unwrap();
    newest_bytes[..format::HEADER_LEN].fill(0);
    std::fs::write(&newest, &newest_bytes).unwrap();

    let damaged = check();
    let out = String::from_utf8_lossy(&damaged.stdout);
    assert!(!damaged.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "{} at offset {start}: checksum mismatch",
            path.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} at offset 0", newest.display())),
        "{out}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "check writes nothing");
    assert_eq!(std::fs::read(&newest).unwrap(), newest_bytes);
}

/// The segment numbers in a store directory, sorted.
fn adapter_segments(dir: &Path) -> Vec<u64> {
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_suffix(".qlog")
                .and_then(|n| n.parse().ok())
        })
        .collect();
    numbers.sort_unstable();
    assert!(numbers.len() >= 2, "several segments");
    numbers
}
