//! Flow control declared on the channel: groups, concurrency and rate limits, periodic
//! channels. Specs are built by hand so that each case names exactly the rule it checks.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::FutureExt as _;
use queue_core::clock::Clock as _;
use queue_core::{
    Channel, ChannelSpec, GroupKey, Message, Outcome, Outgoing, RawDelivery, Subscription, codec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Harness, eventually, next, still_waiting, within};

const SECOND: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    group: String,
    n: u32,
}

fn item(d: &RawDelivery) -> (String, u32) {
    let i: Item = codec::decode(&d.payload).expect("decode");
    (i.group, i.n)
}

/// Produces `(group, n)` items in order, each in its group (none for "").
async fn produce_items(h: &Harness, spec: &ChannelSpec, items: &[(&str, u32)]) {
    let batch = items
        .iter()
        .map(|(g, n)| Outgoing {
            payload: codec::encode(&Item {
                group: (*g).to_string(),
                n: *n,
            })
            .unwrap(),
            dedup_key: None,
            delay: Duration::ZERO,
            priority: 0,
            group: (!g.is_empty()).then(|| g.group_hash()),
        })
        .collect();
    h.queue
        .adapter()
        .produce(spec, batch)
        .await
        .expect("produce");
}

async fn subscribe(h: &Harness, spec: &ChannelSpec, max_parallel: u32) -> Box<dyn Subscription> {
    h.queue
        .adapter()
        .subscribe(spec, max_parallel)
        .await
        .expect("subscribe")
}

async fn ack(h: &Harness, d: &RawDelivery) {
    h.queue
        .adapter()
        .settle(&d.lease, Outcome::Ack)
        .await
        .expect("ack");
}

/// Takes deliveries from `sub` until none comes within the wait of `still_waiting`.
async fn drain(sub: &dyn Subscription) -> Vec<RawDelivery> {
    let mut got = Vec::new();
    loop {
        let attempt = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        match attempt {
            Ok(d) => got.push(d.expect("delivery")),
            Err(_) => return got,
        }
    }
}

pub async fn groups_keep_produce_order_under_retries_across_two_consumers(h: &Harness) {
    let spec = ChannelSpec::new("flow/groups")
        .max_attempts(2)
        .backoff(SECOND);
    produce_items(
        h,
        &spec,
        &[("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("a", 4)],
    )
    .await;
    let one = subscribe(h, &spec, 10).await;
    let two = subscribe(h, &spec, 10).await;
    let subs = [&*one, &*two];
    // Only each group's oldest message leaves; the groups run side by side.
    let first = next_any(&subs).await;
    let second = next_any(&subs).await;
    let mut heads = vec![item(&first), item(&second)];
    heads.sort();
    assert_eq!(heads, vec![("a".into(), 1), ("b".into(), 1)]);
    nothing_more(&subs).await;
    let (a1, b1) = if item(&first).0 == "a" {
        (first, second)
    } else {
        (second, first)
    };
    // A retry holds its group through the backoff; the other group goes on.
    h.queue
        .adapter()
        .settle(
            &a1.lease,
            Outcome::Retry {
                after: None,
                error: "a1 failed".into(),
            },
        )
        .await
        .unwrap();
    ack(h, &b1).await;
    let b2 = next_any(&subs).await;
    assert_eq!(item(&b2), ("b".into(), 2));
    ack(h, &b2).await;
    nothing_more(&subs).await;
    h.advance(SECOND).await;
    let a1 = next_any(&subs).await;
    assert_eq!((item(&a1), a1.attempt), (("a".into(), 1), 2));
    nothing_more(&subs).await;
    ack(h, &a1).await;
    // A dead letter releases its group.
    let a2 = next_any(&subs).await;
    assert_eq!(item(&a2), ("a".into(), 2));
    h.queue
        .adapter()
        .settle(
            &a2.lease,
            Outcome::DeadLetter {
                error: "a2 is poison".into(),
            },
        )
        .await
        .unwrap();
    let a3 = next_any(&subs).await;
    assert_eq!(item(&a3), ("a".into(), 3));
    ack(h, &a3).await;
    let a4 = next_any(&subs).await;
    assert_eq!(item(&a4), ("a".into(), 4));
    ack(h, &a4).await;
    let s = h.stats("flow/groups").await;
    assert_eq!((s.ready, s.delayed, s.in_flight, s.dead), (0, 0, 0, 1));
}

/// The next delivery of whichever subscription has one. The other calls are dropped, which
/// loses nothing: `next` is cancel safe.
async fn next_any(subs: &[&dyn Subscription]) -> RawDelivery {
    let calls = subs.iter().map(|s| s.next());
    let (d, _, _) = within("a delivery", futures_util::future::select_all(calls)).await;
    d.expect("delivery")
}

/// Checks that no subscription gets a delivery now.
async fn nothing_more(subs: &[&dyn Subscription]) {
    let calls = subs.iter().map(|s| s.next());
    let any = futures_util::future::select_all(calls).map(|(d, _, _)| d);
    drop(still_waiting(any).await);
}

pub async fn concurrency_per_group_lets_that_many_of_a_group_run(h: &Harness) {
    let spec = ChannelSpec::new("flow/per-group").concurrency_per_group(2);
    produce_items(h, &spec, &[("a", 1), ("a", 2), ("a", 3), ("b", 1)]).await;
    let sub = subscribe(h, &spec, 10).await;
    let mut got: Vec<_> = drain(&*sub).await;
    let mut seen: Vec<_> = got.iter().map(item).collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]
    );
    let a1 = got.remove(got.iter().position(|d| item(d) == ("a".into(), 1)).unwrap());
    ack(h, &a1).await;
    assert_eq!(item(&next(&*sub).await), ("a".into(), 3));
}

pub async fn a_global_concurrency_limit_holds_across_subscriptions(h: &Harness) {
    let spec = ChannelSpec::new("flow/concurrency").concurrency(3);
    let items: Vec<(&str, u32)> = (0..10).map(|n| ("", n)).collect();
    produce_items(h, &spec, &items).await;
    let subs = [
        subscribe(h, &spec, 10).await,
        subscribe(h, &spec, 10).await,
        subscribe(h, &spec, 10).await,
    ];
    let mut held = Vec::new();
    for sub in &subs {
        held.extend(drain(&**sub).await);
    }
    assert_eq!(
        held.len(),
        3,
        "in flight at once across three subscriptions"
    );
    assert_eq!(h.stats("flow/concurrency").await.in_flight, 3);
    let all: Vec<&dyn Subscription> = subs.iter().map(|s| &**s).collect();
    nothing_more(&all).await;
    ack(h, &held.pop().unwrap()).await;
    held.push(next_any(&all).await);
    nothing_more(&all).await;
    assert_eq!(h.stats("flow/concurrency").await.in_flight, 3);
}

pub async fn a_rate_limit_delivers_its_budget_per_window_and_no_more(h: &Harness) {
    let spec = ChannelSpec::new("flow/rate").rate(100, SECOND);
    let items: Vec<(&str, u32)> = (0..250).map(|n| ("", n)).collect();
    produce_items(h, &spec, &items).await;
    let sub = subscribe(h, &spec, 1_000).await;
    let mut per_window = Vec::new();
    for _ in 0..3 {
        let got = drain(&*sub).await;
        per_window.push(got.len());
        let settles = got
            .iter()
            .map(|d| (d.lease.clone(), Outcome::Ack))
            .collect();
        for r in h.queue.adapter().settle_many(settles).await {
            r.unwrap();
        }
        h.advance(SECOND).await;
    }
    assert_eq!(per_window, vec![100, 100, 50]);
}

pub async fn a_rate_per_group_bounds_each_group(h: &Harness) {
    let spec = ChannelSpec::new("flow/group-rate")
        .concurrency_per_group(10)
        .rate_per_group(2, SECOND);
    produce_items(
        h,
        &spec,
        &[("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)],
    )
    .await;
    let sub = subscribe(h, &spec, 10).await;
    let count = |got: &[RawDelivery]| {
        let mut per: HashMap<String, u32> = HashMap::new();
        for d in got {
            *per.entry(item(d).0).or_default() += 1;
        }
        let mut v: Vec<_> = per.into_iter().collect();
        v.sort();
        v
    };
    let first = drain(&*sub).await;
    assert_eq!(count(&first), vec![("a".into(), 2), ("b".into(), 2)]);
    for d in &first {
        ack(h, d).await;
    }
    h.advance(SECOND).await;
    let second = drain(&*sub).await;
    assert_eq!(count(&second), vec![("a".into(), 1), ("b".into(), 1)]);
}

/// A periodic channel: every minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tick {}

/// The marker of [`Tick`]'s channel, declared by hand as `#[channel]` would.
#[derive(Debug)]
pub struct TickChannel;

impl Channel for TickChannel {
    type Message = Tick;
    const SPEC: ChannelSpec = ChannelSpec::new("flow/tick").every(Duration::from_secs(60));
}

impl Message for Tick {
    type Channel = TickChannel;
    fn for_slot(_slot: u64) -> Option<Self> {
        Some(Tick {})
    }
}

pub async fn a_periodic_channel_fires_once_per_slot_with_two_workers(h: &Harness) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for worker in 0..2u32 {
        let tx = tx.clone();
        workers.push(
            h.queue
                .consumer::<TickChannel>()
                .handle(move |_: Tick| {
                    let tx = tx.clone();
                    async move {
                        tx.send(worker).unwrap();
                    }
                })
                .await
                .unwrap(),
        );
    }
    let minute = 60_000;
    for slot in 1..=3u64 {
        let now = h.clock.now();
        let due = (now / minute + 1) * minute;
        // Both workers produced the slot; the store kept one.
        eventually("the slot produced by both workers", || async {
            let s = h.stats("flow/tick").await;
            s.delayed == 1 && s.duplicates >= slot && s.next_due == Some(due)
        })
        .await;
        h.advance(Duration::from_millis(due - now)).await;
        within("the slot's delivery", rx.recv()).await.unwrap();
        eventually("the slot acked", || async {
            h.stats("flow/tick").await.acked == slot
        })
        .await;
    }
    eventually("the next slot produced", || async {
        h.stats("flow/tick").await.delayed == 1
    })
    .await;
    let s = h.stats("flow/tick").await;
    assert_eq!(
        s.produced, 4,
        "three slots delivered and the next one waiting"
    );
    assert!(rx.try_recv().is_err(), "a slot was delivered twice");
    for w in workers {
        w.stop(SECOND).await.unwrap();
    }
}

/// A channel whose concurrency is 3, declared by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limited {
    pub n: u32,
}

/// The marker of [`Limited`]'s channel.
#[derive(Debug)]
pub struct LimitedChannel;

impl Channel for LimitedChannel {
    type Message = Limited;
    const SPEC: ChannelSpec = ChannelSpec::new("flow/limited").concurrency(3);
}

impl Message for Limited {
    type Channel = LimitedChannel;
}

/// Workers on separate connections (`queues`), each with `max_parallel` 10, never run more
/// handlers at once than the channel's concurrency of 3, and do reach it.
pub async fn concurrency_holds_across_worker_connections(queues: &[queue_core::Queue]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    queues[0]
        .producer::<LimitedChannel>()
        .produce_batch((0..30).map(|n| Limited { n }))
        .await
        .unwrap();
    let mut workers = Vec::new();
    for queue in queues {
        let (running, most, done) = (running.clone(), most.clone(), done.clone());
        let worker = queue
            .consumer::<LimitedChannel>()
            .max_parallel(10)
            .handle(move |_: Limited| {
                let (running, most, done) = (running.clone(), most.clone(), done.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await
            .unwrap();
        workers.push(worker);
    }
    within("30 messages handled", async {
        while done.load(Ordering::SeqCst) < 30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 3, "handlers running at once");
    for w in workers {
        w.stop(SECOND).await.unwrap();
    }
}
