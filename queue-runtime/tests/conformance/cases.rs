//! The behaviours. Each takes a fresh [`Harness`] and asserts one guarantee.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use queue_core::clock::Clock as _;
use queue_core::{
    Cancelled, Channel, ChannelSpec, Delivery, MessageState, Outcome, Outgoing, QueueError,
    channel, codec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Harness, eventually, next, settle, still_waiting, within};

pub use super::flow::*;
pub use super::traces::a_trace_runs_from_produce_to_handle_through_a_retry;

#[channel("conf/jobs", lease = "10s", max_attempts = 3, backoff = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

#[channel("conf/signups", exactly_once, dedup = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signup {
    pub email: String,
}

#[channel("conf/other")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Other {
    pub n: u32,
}

const JOBS: &str = "conf/jobs";
const SECOND: Duration = Duration::from_secs(1);

fn jobs() -> ChannelSpec {
    JobChannel::SPEC
}

async fn produce_jobs(h: &Harness, range: std::ops::Range<u32>) -> Vec<queue_core::Receipt> {
    Job::producer(&h.queue)
        .produce_batch(range.map(|n| Job { n }))
        .await
        .expect("produce")
}

async fn subscribe(h: &Harness, max_parallel: u32) -> Box<dyn queue_core::Subscription> {
    h.queue
        .adapter()
        .subscribe(&jobs(), max_parallel)
        .await
        .expect("subscribe")
}

fn job(d: &queue_core::RawDelivery) -> u32 {
    codec::decode::<Job>(&d.payload).expect("decode").n
}

async fn settle_with(
    h: &Harness,
    d: &queue_core::RawDelivery,
    outcome: Outcome,
) -> Result<(), QueueError> {
    h.queue.adapter().settle(&d.lease, outcome).await
}

fn retry(error: &str) -> Outcome {
    Outcome::Retry {
        after: None,
        error: error.into(),
    }
}

pub async fn produce_returns_a_distinct_id_per_message(h: &Harness) {
    let receipts = produce_jobs(h, 0..20).await;
    let mut ids: Vec<_> = receipts.iter().map(|r| r.id).collect();
    assert!(receipts.iter().all(|r| !r.duplicate));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
}

pub async fn a_produced_message_is_delivered_with_its_payload(h: &Harness) {
    let receipt = Job::produce(&h.queue, Job { n: 42 }).await.unwrap();
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    assert_eq!(d.lease.id, receipt.id);
    assert_eq!(&*d.lease.channel, JOBS);
    assert_eq!(job(&d), 42);
    assert_eq!(d.attempt, 1);
    assert_eq!(d.deadline, h.clock.now() + 10_000);
}

pub async fn batch_produce_returns_receipts_in_order(h: &Harness) {
    let receipts = produce_jobs(h, 0..5).await;
    let sub = subscribe(h, 5).await;
    for (i, r) in receipts.iter().enumerate() {
        let d = next(&*sub).await;
        assert_eq!(d.lease.id, r.id);
        assert_eq!(job(&d), i as u32);
    }
}

pub async fn an_acked_message_is_gone(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    let s = h.stats(JOBS).await;
    assert_eq!(
        (s.ready, s.delayed, s.in_flight, s.dead, s.acked),
        (0, 0, 0, 0, 1)
    );
    assert!(h.queue.peek(JOBS, 10).await.unwrap().is_empty());
    h.advance(Duration::from_secs(60)).await;
    drop(still_waiting(sub.next()).await);
}

pub async fn equal_priority_messages_leave_in_produce_order(h: &Harness) {
    for n in 0..10 {
        Job::produce(&h.queue, Job { n }).await.unwrap();
    }
    let sub = subscribe(h, 10).await;
    let mut order = Vec::new();
    for _ in 0..10 {
        order.push(job(&next(&*sub).await));
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>());
}

pub async fn higher_priority_messages_leave_first(h: &Harness) {
    let p = Job::producer(&h.queue);
    p.clone().produce(Job { n: 1 }).await.unwrap();
    p.clone().priority(9).produce(Job { n: 2 }).await.unwrap();
    p.clone().priority(3).produce(Job { n: 3 }).await.unwrap();
    p.clone().priority(9).produce(Job { n: 4 }).await.unwrap();
    let sub = subscribe(h, 4).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(job(&next(&*sub).await));
    }
    assert_eq!(order, vec![2, 4, 3, 1]);
}

pub async fn a_delayed_message_waits_for_its_due_time(h: &Harness) {
    Job::producer(&h.queue)
        .delay(Duration::from_secs(5))
        .produce(Job { n: 1 })
        .await
        .unwrap();
    Job::produce(&h.queue, Job { n: 2 }).await.unwrap();
    let s = h.stats(JOBS).await;
    assert_eq!((s.ready, s.delayed), (1, 1));
    let sub = subscribe(h, 10).await;
    assert_eq!(job(&next(&*sub).await), 2);
    let pending = still_waiting(sub.next()).await;
    h.advance(Duration::from_millis(4_999)).await;
    let pending = still_waiting(pending).await;
    h.advance(Duration::from_millis(1)).await;
    let d = within("the delayed message", pending).await.unwrap();
    assert_eq!(job(&d), 1);
}

pub async fn a_message_is_held_by_one_consumer_at_a_time(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let a = subscribe(h, 1).await;
    let b = subscribe(h, 1).await;
    let d = next(&*a).await;
    let waiting = still_waiting(b.next()).await;
    assert_eq!(h.stats(JOBS).await.in_flight, 1);
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    drop(waiting);
    assert_eq!(h.stats(JOBS).await.acked, 1);
}

pub async fn competing_consumers_share_the_backlog_without_overlap(h: &Harness) {
    produce_jobs(h, 0..20).await;
    let a = subscribe(h, 3).await;
    let b = subscribe(h, 3).await;
    let mut seen = Vec::new();
    for i in 0..20 {
        let sub = if i % 2 == 0 { &a } else { &b };
        let d = next(&**sub).await;
        seen.push(job(&d));
        settle_with(h, &d, Outcome::Ack).await.unwrap();
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert_eq!(h.stats(JOBS).await.acked, 20);
}

pub async fn max_parallel_bounds_unsettled_deliveries(h: &Harness) {
    produce_jobs(h, 0..3).await;
    let sub = subscribe(h, 2).await;
    let first = next(&*sub).await;
    let _second = next(&*sub).await;
    let third = still_waiting(sub.next()).await;
    settle_with(h, &first, Outcome::Ack).await.unwrap();
    let d = within("capacity freed by an ack", third).await.unwrap();
    assert_eq!(job(&d), 2);
}

pub async fn a_lapsed_lease_goes_to_another_consumer(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let a = subscribe(h, 1).await;
    let b = subscribe(h, 1).await;
    let first = next(&*a).await;
    let waiting = still_waiting(b.next()).await;
    h.advance(Duration::from_millis(9_999)).await;
    let waiting = still_waiting(waiting).await;
    h.advance(Duration::from_millis(1)).await;
    // `a` has a free slot again too; an adapter that fetches ahead may hand it to either.
    let second = match futures_util::future::select(waiting, a.next()).await {
        futures_util::future::Either::Left((d, _))
        | futures_util::future::Either::Right((d, _)) => d.unwrap(),
    };
    assert_eq!(second.lease.id, first.lease.id);
    assert_eq!(second.attempt, 2);
    assert!(second.lease.token > first.lease.token);
    assert_eq!(h.stats(JOBS).await.lease_expiries, 1);
    let err = settle_with(h, &first, Outcome::Ack).await.unwrap_err();
    assert!(matches!(err, QueueError::StaleLease { .. }), "{err:?}");
}

pub async fn a_redelivery_carries_a_larger_fencing_token(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 2).await;
    let first = next(&*sub).await;
    settle_with(h, &first, Outcome::Release).await.unwrap();
    let second = next(&*sub).await;
    assert_eq!(second.lease.id, first.lease.id);
    assert!(
        second.lease.token > first.lease.token,
        "{} <= {}",
        second.lease.token,
        first.lease.token
    );
}

async fn lapsed_and_redelivered(h: &Harness) -> (queue_core::RawDelivery, queue_core::RawDelivery) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 2).await;
    let first = next(&*sub).await;
    h.advance(Duration::from_secs(10)).await;
    let second = next(&*sub).await;
    assert_eq!(second.lease.id, first.lease.id);
    std::mem::forget(sub);
    (first, second)
}

pub async fn ack_with_a_stale_token_is_refused(h: &Harness) {
    let (stale, fresh) = lapsed_and_redelivered(h).await;
    let err = settle_with(h, &stale, Outcome::Ack).await.unwrap_err();
    assert!(
        matches!(err, QueueError::StaleLease { id } if id == stale.lease.id),
        "{err:?}"
    );
    assert_eq!(
        h.stats(JOBS).await.in_flight,
        1,
        "the stale ack must change nothing"
    );
    settle_with(h, &fresh, Outcome::Ack).await.unwrap();
    assert_eq!(h.stats(JOBS).await.acked, 1);
}

pub async fn nack_with_a_stale_token_is_refused(h: &Harness) {
    let (stale, fresh) = lapsed_and_redelivered(h).await;
    for outcome in [
        retry("late"),
        Outcome::DeadLetter {
            error: "late".into(),
        },
        Outcome::Release,
    ] {
        let err = settle_with(h, &stale, outcome).await.unwrap_err();
        assert!(matches!(err, QueueError::StaleLease { .. }), "{err:?}");
    }
    let s = h.stats(JOBS).await;
    assert_eq!((s.in_flight, s.dead, s.delayed), (1, 0, 0));
    settle_with(h, &fresh, Outcome::Ack).await.unwrap();
}

pub async fn extend_with_a_stale_token_is_refused(h: &Harness) {
    let (stale, fresh) = lapsed_and_redelivered(h).await;
    let err = h
        .queue
        .adapter()
        .extend(&stale.lease, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::StaleLease { .. }), "{err:?}");
    h.queue
        .adapter()
        .extend(&fresh.lease, Duration::from_secs(60))
        .await
        .unwrap();
}

pub async fn an_extended_lease_keeps_the_message(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let a = subscribe(h, 1).await;
    let b = subscribe(h, 1).await;
    let d = next(&*a).await;
    h.advance(Duration::from_secs(8)).await;
    let deadline = h
        .queue
        .adapter()
        .extend(&d.lease, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(deadline, h.clock.now() + 10_000);
    h.advance(Duration::from_secs(8)).await;
    let waiting = still_waiting(b.next()).await;
    assert_eq!(h.stats(JOBS).await.lease_expiries, 0);
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    drop(waiting);
}

pub async fn a_delivery_cannot_be_settled_twice(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    let err = settle_with(h, &d, Outcome::Ack).await.unwrap_err();
    assert!(matches!(err, QueueError::StaleLease { .. }), "{err:?}");
    assert_eq!(h.stats(JOBS).await.acked, 1);
}

pub async fn a_failed_delivery_is_retried_after_backoff(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(h, &d, retry("boom")).await.unwrap();
    let s = h.stats(JOBS).await;
    assert_eq!((s.delayed, s.ready, s.retried), (1, 0, 1));
    let waiting = still_waiting(sub.next()).await;
    // The first retry waits between half the backoff and the whole of it (jitter).
    h.advance(Duration::from_millis(499)).await;
    let waiting = still_waiting(waiting).await;
    h.advance(Duration::from_millis(501)).await;
    let again = within("the retry", waiting).await.unwrap();
    assert_eq!((again.lease.id, again.attempt), (d.lease.id, 2));
}

pub async fn backoff_doubles_with_each_attempt(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(h, &d, retry("one")).await.unwrap();
    h.advance(SECOND).await;
    let d = next(&*sub).await;
    assert_eq!(d.attempt, 2);
    settle_with(h, &d, retry("two")).await.unwrap();
    // The second retry waits between one and two backoffs.
    h.advance(Duration::from_millis(999)).await;
    let waiting = still_waiting(sub.next()).await;
    h.advance(Duration::from_millis(1_001)).await;
    let d = within("the second retry", waiting).await.unwrap();
    assert_eq!(d.attempt, 3);
}

pub async fn retry_after_overrides_the_backoff(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    let outcome = Outcome::Retry {
        after: Some(Duration::from_secs(30)),
        error: "later".into(),
    };
    settle_with(h, &d, outcome).await.unwrap();
    h.advance(Duration::from_secs(29)).await;
    let waiting = still_waiting(sub.next()).await;
    h.advance(SECOND).await;
    assert_eq!(within("the retry", waiting).await.unwrap().attempt, 2);
}

async fn fail_until_dead(h: &Harness, sub: &dyn queue_core::Subscription) {
    for attempt in 1..=3 {
        let d = next(sub).await;
        assert_eq!(d.attempt, attempt);
        settle_with(h, &d, retry(&format!("failure {attempt}")))
            .await
            .unwrap();
        h.advance(Duration::from_secs(4)).await;
    }
}

pub async fn after_max_attempts_the_message_is_dead_lettered_with_its_last_error(h: &Harness) {
    let receipt = produce_jobs(h, 0..1).await[0];
    let sub = subscribe(h, 1).await;
    fail_until_dead(h, &*sub).await;
    let s = h.stats(JOBS).await;
    assert_eq!(
        (s.dead, s.ready, s.delayed, s.in_flight, s.dead_lettered),
        (1, 0, 0, 0, 1)
    );
    let dead = h.queue.dead_letters(JOBS, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, receipt.id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].error, "failure 3 (attempt 3 of 3)");
    assert_eq!(
        codec::decode::<Job>(&dead[0].payload).unwrap(),
        Job { n: 0 }
    );
    drop(still_waiting(sub.next()).await);
}

pub async fn dead_letter_moves_a_message_at_once(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(
        h,
        &d,
        Outcome::DeadLetter {
            error: "bad input".into(),
        },
    )
    .await
    .unwrap();
    let dead = h.queue.dead_letters(JOBS, 10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].attempts, dead[0].error.as_str()),
        (1, 1, "bad input")
    );
}

pub async fn a_lapsed_lease_on_the_last_attempt_dead_letters(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    for _ in 0..3 {
        let _held = next(&*sub).await;
        h.advance(Duration::from_secs(10)).await;
    }
    let s = h.stats(JOBS).await;
    assert_eq!((s.dead, s.lease_expiries), (1, 3));
    let dead = h.queue.dead_letters(JOBS, 1).await.unwrap();
    assert_eq!(dead[0].error, "lease expired on attempt 3 of 3");
}

pub async fn redrive_returns_dead_letters_with_attempts_reset(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    fail_until_dead(h, &*sub).await;
    assert_eq!(h.queue.redrive(JOBS, None).await.unwrap(), 1);
    let d = next(&*sub).await;
    assert_eq!((job(&d), d.attempt), (0, 1));
    assert_eq!(h.stats(JOBS).await.dead, 0);
}

pub async fn redrive_of_chosen_ids_leaves_the_others(h: &Harness) {
    let receipts = produce_jobs(h, 0..2).await;
    let sub = subscribe(h, 2).await;
    for _ in 0..2 {
        let d = next(&*sub).await;
        settle_with(h, &d, Outcome::DeadLetter { error: "x".into() })
            .await
            .unwrap();
    }
    let moved = h
        .queue
        .redrive(JOBS, Some(&[receipts[1].id]))
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let d = next(&*sub).await;
    assert_eq!(d.lease.id, receipts[1].id);
    let dead = h.queue.dead_letters(JOBS, 10).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![receipts[0].id]
    );
}

pub async fn purge_deletes_dead_letters(h: &Harness) {
    produce_jobs(h, 0..3).await;
    let sub = subscribe(h, 3).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = next(&*sub).await;
        ids.push(d.lease.id);
        settle_with(h, &d, Outcome::DeadLetter { error: "x".into() })
            .await
            .unwrap();
    }
    assert_eq!(h.queue.purge_dead(JOBS, Some(&ids[..1])).await.unwrap(), 1);
    assert_eq!(h.queue.dead_letters(JOBS, 10).await.unwrap().len(), 2);
    assert_eq!(h.queue.purge_dead(JOBS, None).await.unwrap(), 2);
    assert!(h.queue.dead_letters(JOBS, 10).await.unwrap().is_empty());
    let s = h.stats(JOBS).await;
    assert_eq!((s.dead, s.ready, s.in_flight), (0, 0, 0));
}

pub async fn purge_deletes_pending_messages_and_leaves_those_in_flight(h: &Harness) {
    produce_jobs(h, 0..3).await;
    Job::producer(&h.queue)
        .delay(Duration::from_secs(5))
        .produce(Job { n: 3 })
        .await
        .unwrap();
    let sub = subscribe(h, 1).await;
    let held = next(&*sub).await;
    assert_eq!(job(&held), 0);
    assert_eq!(h.queue.purge(JOBS).await.unwrap(), 3);
    let s = h.stats(JOBS).await;
    assert_eq!((s.ready, s.delayed, s.in_flight), (0, 0, 1));
    // The held message finishes as usual; nothing purged arrives, due or not.
    settle_with(h, &held, Outcome::Ack).await.unwrap();
    let pending = still_waiting(sub.next()).await;
    h.advance(Duration::from_secs(6)).await;
    let pending = still_waiting(pending).await;
    // The channel goes on: a message produced after the purge is delivered.
    produce_jobs(h, 4..5).await;
    let d = within("a message produced after the purge", pending)
        .await
        .unwrap();
    assert_eq!(job(&d), 4);
    assert_eq!(h.queue.purge("conformance/never-seen").await.unwrap(), 0);
    assert_eq!(h.queue.purge(JOBS).await.unwrap(), 0);
}

pub async fn a_paused_channel_delivers_nothing_until_resumed(h: &Harness) {
    produce_jobs(h, 0..2).await;
    let sub = subscribe(h, 1).await;
    let held = next(&*sub).await;
    assert_eq!(job(&held), 0);
    h.queue.pause(JOBS).await.unwrap();
    h.queue.pause(JOBS).await.unwrap();
    assert!(h.stats(JOBS).await.paused);
    // Producers go on; the delivery in flight finishes.
    produce_jobs(h, 2..3).await;
    settle_with(h, &held, Outcome::Ack).await.unwrap();
    let other = subscribe(h, 2).await;
    let pending = still_waiting(sub.next()).await;
    drop(still_waiting(other.next()).await);
    other.stop().await;
    h.advance(Duration::from_secs(60)).await;
    let pending = still_waiting(pending).await;
    let s = h.stats(JOBS).await;
    assert_eq!((s.ready, s.in_flight, s.paused), (2, 0, true));
    h.queue.resume(JOBS).await.unwrap();
    let d = within("a delivery after resume", pending).await.unwrap();
    assert_eq!(job(&d), 1);
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    assert_eq!(job(&next(&*sub).await), 2);
    assert!(!h.stats(JOBS).await.paused);
    let err = h.queue.pause("conformance/never-seen").await.unwrap_err();
    assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
}

pub async fn cancel_deletes_pending_messages_and_refuses_the_settle_of_one_in_flight(h: &Harness) {
    let receipts = produce_jobs(h, 0..2).await;
    let delayed = Job::producer(&h.queue)
        .delay(Duration::from_secs(5))
        .produce(Job { n: 2 })
        .await
        .unwrap();
    let sub = subscribe(h, 1).await;
    let held = next(&*sub).await;
    assert_eq!(held.lease.id, receipts[0].id);
    let cancel = |id| h.queue.cancel(JOBS, id);
    assert_eq!(cancel(receipts[1].id).await.unwrap(), Cancelled::Pending);
    assert_eq!(cancel(delayed.id).await.unwrap(), Cancelled::Pending);
    assert_eq!(cancel(held.lease.id).await.unwrap(), Cancelled::InFlight);
    let s = h.stats(JOBS).await;
    assert_eq!((s.ready, s.delayed, s.in_flight), (0, 0, 0));
    let refused = settle_with(h, &held, Outcome::Ack).await.unwrap_err();
    assert!(
        matches!(refused, QueueError::Cancelled { id } if id == held.lease.id),
        "{refused:?}"
    );
    assert_eq!(
        refused.to_string(),
        format!("message {} was cancelled", held.lease.id)
    );
    let refused = h
        .queue
        .adapter()
        .extend(&held.lease, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, QueueError::Cancelled { .. }),
        "{refused:?}"
    );
    for (channel, id) in [
        (JOBS, receipts[1].id),
        ("conformance/never-seen", receipts[1].id),
    ] {
        let err = h.queue.cancel(channel, id).await.unwrap_err();
        assert!(matches!(err, QueueError::UnknownMessage { .. }), "{err:?}");
    }
    // Nothing cancelled arrives, due or not; the freed slot takes new work.
    let pending = still_waiting(sub.next()).await;
    h.advance(Duration::from_secs(6)).await;
    let pending = still_waiting(pending).await;
    produce_jobs(h, 3..4).await;
    let d = within("a message produced after the cancels", pending)
        .await
        .unwrap();
    assert_eq!(job(&d), 3);
    assert_eq!(h.stats(JOBS).await.acked, 0);
}

pub async fn a_running_handler_learns_its_message_was_cancelled(h: &Harness) {
    let (tx, mut rx) = recorder();
    let _consumer = Job::consumer(&h.queue)
        .deliveries(move |d: Delivery<Job>| {
            let tx = tx.clone();
            async move {
                tx.send(("started", d.id())).unwrap();
                d.cancelled().await;
                tx.send(("cancelled", d.id())).unwrap();
                Ok::<(), &str>(())
            }
        })
        .await
        .unwrap();
    // Cancelled through a handle of the same queue: the handler is told at once.
    let receipt = Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    assert_eq!(recv(&mut rx).await, ("started", receipt.id));
    assert_eq!(
        h.queue.cancel(JOBS, receipt.id).await.unwrap(),
        Cancelled::InFlight
    );
    assert_eq!(recv(&mut rx).await, ("cancelled", receipt.id));
    // Cancelled through another handle (as from another process): the worker learns it
    // when it next extends the lease, a third of the lease on.
    let elsewhere = queue_core::Queue::new(
        h.queue.adapter().clone(),
        h.queue.clock().clone(),
        h.queue.spawner().clone(),
        "another handle",
    );
    let receipt = Job::produce(&h.queue, Job { n: 2 }).await.unwrap();
    assert_eq!(recv(&mut rx).await, ("started", receipt.id));
    assert_eq!(
        elsewhere.cancel(JOBS, receipt.id).await.unwrap(),
        Cancelled::InFlight
    );
    let told = still_waiting(Box::pin(recv(&mut rx))).await;
    h.advance(Duration::from_secs(4)).await;
    assert_eq!(told.await, ("cancelled", receipt.id));
    let s = h.stats(JOBS).await;
    assert_eq!((s.acked, s.ready, s.in_flight), (0, 0, 0));
}

pub async fn snooze_delivers_again_later_without_counting_the_attempt(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    // More snoozes than `max_attempts` (3): none counts, so it is never dead-lettered.
    for _ in 0..5 {
        let d = next(&*sub).await;
        assert_eq!((job(&d), d.attempt), (0, 1));
        let after = Duration::from_secs(30);
        settle_with(h, &d, Outcome::Snooze { after }).await.unwrap();
        let s = h.stats(JOBS).await;
        assert_eq!((s.delayed, s.retried, s.dead), (1, 0, 0));
        let pending = still_waiting(sub.next()).await;
        h.advance(Duration::from_millis(29_999)).await;
        drop(still_waiting(pending).await);
        h.advance(Duration::from_millis(1)).await;
    }
    let d = next(&*sub).await;
    assert_eq!(d.attempt, 1);
    settle_with(h, &d, Outcome::Ack).await.unwrap();
}

pub async fn release_gives_a_message_back_without_counting_the_attempt(h: &Harness) {
    produce_jobs(h, 0..2).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    settle_with(h, &d, Outcome::Release).await.unwrap();
    let again = next(&*sub).await;
    assert_eq!(
        (again.lease.id, again.attempt),
        (d.lease.id, 1),
        "released first, at the front"
    );
}

pub async fn settle_many_settles_each_on_its_own(h: &Harness) {
    produce_jobs(h, 0..4).await;
    let sub = subscribe(h, 4).await;
    let mut d = Vec::new();
    for _ in 0..4 {
        d.push(next(&*sub).await);
    }
    settle_with(h, &d[3], Outcome::Ack).await.unwrap();
    let mut unknown = d[0].lease.clone();
    unknown.channel = "conf/never-seen".into();
    let results = h
        .queue
        .adapter()
        .settle_many(vec![
            (d[0].lease.clone(), Outcome::Ack),
            (d[3].lease.clone(), Outcome::Ack),
            (unknown, Outcome::Ack),
            (d[1].lease.clone(), retry("again")),
            (
                d[2].lease.clone(),
                Outcome::DeadLetter { error: "no".into() },
            ),
        ])
        .await;
    assert_eq!(results.len(), 5);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(QueueError::StaleLease { .. })),
        "settled already: {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(QueueError::StaleLease { .. })),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_ok() && results[4].is_ok(), "{results:?}");
    let s = h.stats(JOBS).await;
    assert_eq!((s.in_flight, s.delayed, s.dead), (0, 1, 1));
    h.advance(2 * SECOND).await;
    let again = next(&*sub).await;
    assert_eq!((job(&again), again.attempt), (1, 2));
}

pub async fn a_dropped_subscription_releases_its_messages_at_once(h: &Harness) {
    produce_jobs(h, 0..2).await;
    let a = subscribe(h, 2).await;
    let b = subscribe(h, 2).await;
    let first = next(&*a).await;
    let _second = next(&*a).await;
    drop(a);
    let again = next(&*b).await;
    assert_eq!((again.lease.id, again.attempt), (first.lease.id, 2));
    assert_eq!(job(&next(&*b).await), 1);
}

pub async fn a_subscription_dropped_on_the_last_attempt_dead_letters_the_message(h: &Harness) {
    produce_jobs(h, 0..1).await;
    for attempt in 1..=3 {
        let sub = subscribe(h, 1).await;
        let d = next(&*sub).await;
        assert_eq!(d.attempt, attempt);
        drop(sub);
    }
    eventually("the dead letter", || async {
        h.stats(JOBS).await.dead == 1
    })
    .await;
    let dead = h.queue.dead_letters(JOBS, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "worker lost on attempt 3 of 3");
    assert_eq!(dead[0].attempts, 3);
    let sub = subscribe(h, 1).await;
    let _waiting = still_waiting(sub.next()).await;
}

pub async fn exactly_once_drops_a_duplicate_inside_the_window(h: &Harness) {
    let s = Signup {
        email: "a@example.com".into(),
    };
    let first = Signup::produce(&h.queue, s.clone()).await.unwrap();
    let second = Signup::produce(&h.queue, s).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.id, first.id);
    let stats = h.stats("conf/signups").await;
    assert_eq!((stats.ready, stats.produced, stats.duplicates), (1, 1, 1));
}

pub async fn the_dedup_window_is_fixed_at_the_first_produce(h: &Harness) {
    let s = Signup {
        email: "b@example.com".into(),
    };
    let first = Signup::produce(&h.queue, s.clone()).await.unwrap();
    h.advance(Duration::from_millis(600)).await;
    assert!(
        Signup::produce(&h.queue, s.clone())
            .await
            .unwrap()
            .duplicate
    );
    // A duplicate does not extend the window: it still ends 1 s after the first produce.
    h.advance(Duration::from_millis(400)).await;
    let third = Signup::produce(&h.queue, s).await.unwrap();
    assert!(!third.duplicate);
    assert_ne!(third.id, first.id);
    assert_eq!(h.stats("conf/signups").await.ready, 2);
}

pub async fn the_dedup_window_outlives_the_ack(h: &Harness) {
    let s = Signup {
        email: "c@example.com".into(),
    };
    let first = Signup::produce(&h.queue, s.clone()).await.unwrap();
    let sub = h
        .queue
        .adapter()
        .subscribe(&SignupChannel::SPEC, 1)
        .await
        .unwrap();
    let d = next(&*sub).await;
    settle_with(h, &d, Outcome::Ack).await.unwrap();
    let again = Signup::produce(&h.queue, s).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    drop(still_waiting(sub.next()).await);
}

pub async fn explicit_dedup_keys_deduplicate_different_payloads(h: &Harness) {
    let p = Signup::producer(&h.queue);
    let a = p
        .clone()
        .dedup_key("user-7")
        .produce(Signup {
            email: "x@example.com".into(),
        })
        .await
        .unwrap();
    let b = p
        .clone()
        .dedup_key("user-7")
        .produce(Signup {
            email: "y@example.com".into(),
        })
        .await
        .unwrap();
    let c = p
        .clone()
        .dedup_key("user-8")
        .produce(Signup {
            email: "x@example.com".into(),
        })
        .await
        .unwrap();
    assert!(!a.duplicate && b.duplicate && !c.duplicate);
    assert_eq!(b.id, a.id);
}

pub async fn a_dedup_key_on_an_at_least_once_channel_is_refused(h: &Harness) {
    let err = Job::producer(&h.queue)
        .dedup_key("k")
        .produce(Job { n: 1 })
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
    assert_eq!(h.stats(JOBS).await.produced, 0);
}

pub async fn at_least_once_channels_accept_equal_payloads(h: &Harness) {
    let a = Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    let b = Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    assert!(!a.duplicate && !b.duplicate);
    assert_ne!(a.id, b.id);
    assert_eq!(h.stats(JOBS).await.ready, 2);
}

pub async fn channels_are_independent(h: &Harness) {
    Other::produce(&h.queue, Other { n: 5 }).await.unwrap();
    let sub = subscribe(h, 1).await;
    drop(still_waiting(sub.next()).await);
    let other = h
        .queue
        .adapter()
        .subscribe(&OtherChannel::SPEC, 1)
        .await
        .unwrap();
    let d = next(&*other).await;
    assert_eq!(&*d.lease.channel, "conf/other");
    assert_eq!(codec::decode::<Other>(&d.payload).unwrap().n, 5);
}

pub async fn stats_count_every_state(h: &Harness) {
    produce_jobs(h, 0..4).await;
    Job::producer(&h.queue)
        .delay(SECOND * 60)
        .produce(Job { n: 9 })
        .await
        .unwrap();
    for outcome in [Outcome::Ack, Outcome::DeadLetter { error: "x".into() }] {
        let sub = subscribe(h, 1).await;
        let d = next(&*sub).await;
        settle_with(h, &d, outcome).await.unwrap();
    }
    let holder = subscribe(h, 1).await;
    let _held = next(&*holder).await;
    eventually("every state to be counted", || async {
        let s = h.stats(JOBS).await;
        (s.ready, s.delayed, s.in_flight, s.dead) == (1, 1, 1, 1)
    })
    .await;
    let s = h.stats(JOBS).await;
    assert_eq!(s.channel, JOBS);
    assert_eq!((s.produced, s.acked, s.dead_lettered), (5, 1, 1));
    assert!(s.consumers >= 1);
}

pub async fn peek_shows_pending_messages_without_taking_them(h: &Harness) {
    produce_jobs(h, 0..3).await;
    Job::producer(&h.queue)
        .delay(SECOND)
        .produce(Job { n: 7 })
        .await
        .unwrap();
    let peeked = h.queue.peek(JOBS, 10).await.unwrap();
    let shown: Vec<(u32, MessageState)> = peeked
        .iter()
        .map(|m| (codec::decode::<Job>(&m.payload).unwrap().n, m.state))
        .collect();
    assert_eq!(
        shown,
        vec![
            (0, MessageState::Ready),
            (1, MessageState::Ready),
            (2, MessageState::Ready),
            (7, MessageState::Delayed)
        ]
    );
    assert_eq!(h.queue.peek(JOBS, 2).await.unwrap().len(), 2);
    let sub = subscribe(h, 1).await;
    assert_eq!(job(&next(&*sub).await), 0, "peek took nothing");
}

pub async fn an_oversized_payload_is_refused_and_nothing_is_stored(h: &Harness) {
    let big = Outgoing {
        payload: vec![0; codec::MAX_PAYLOAD + 1],
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    };
    let err = h.queue.produce_raw(&jobs(), vec![big]).await.unwrap_err();
    assert!(matches!(err, QueueError::PayloadTooLarge { .. }), "{err:?}");
    Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    assert_eq!(h.stats(JOBS).await.ready, 1);
}

pub async fn a_channel_name_beyond_the_limits_is_refused_and_nothing_is_stored(h: &Harness) {
    let one = || Outgoing {
        payload: codec::encode(&Job { n: 1 }).unwrap(),
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    };
    let long = "a".repeat(queue_core::limits::MAX_CHANNEL_NAME + 1);
    for name in [long.as_str(), "a b", "/a", "채널"] {
        let spec = ChannelSpec {
            name: name.to_string().into(),
            ..jobs()
        };
        let err = h.queue.produce_raw(&spec, vec![one()]).await.unwrap_err();
        assert!(matches!(err, QueueError::InvalidRequest(_)), "{err:?}");
        let err = h
            .queue
            .adapter()
            .produce(&spec, vec![one()])
            .await
            .unwrap_err();
        assert!(
            matches!(err, QueueError::InvalidRequest(_)),
            "{name}: {err:?}"
        );
        let err = h
            .queue
            .adapter()
            .subscribe(&spec, 1)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, QueueError::InvalidRequest(_)),
            "{name}: {err:?}"
        );
    }
    let longest = "a".repeat(queue_core::limits::MAX_CHANNEL_NAME);
    let spec = ChannelSpec {
        name: longest.clone().into(),
        ..jobs()
    };
    h.queue.produce_raw(&spec, vec![one()]).await.unwrap();
    let names: Vec<String> = h
        .queue
        .stats()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.channel)
        .collect();
    assert!(names.contains(&longest), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| queue_core::limits::channel_name_problem(n).is_none()),
        "no refused channel exists: {names:?}"
    );
}

pub async fn a_long_error_text_is_cut_on_a_character_boundary_with_a_marker(h: &Harness) {
    produce_jobs(h, 0..1).await;
    let sub = subscribe(h, 1).await;
    let d = next(&*sub).await;
    let text = "오류 {\"본문\": 1} ".repeat(2_000);
    settle_with(
        h,
        &d,
        Outcome::DeadLetter {
            error: text.clone(),
        },
    )
    .await
    .unwrap();
    let dead = h.queue.dead_letters(JOBS, 10).await.unwrap();
    let error = &dead[0].error;
    assert!(
        error.len() <= queue_core::limits::MAX_ERROR_TEXT,
        "{} bytes",
        error.len()
    );
    let (kept, marker) = error.rsplit_once("… [cut: ").expect("a marker");
    assert!(text.starts_with(kept));
    assert_eq!(marker, format!("{} bytes]", text.len() - kept.len()));
}

fn recorder<T: Send + 'static>() -> (mpsc::UnboundedSender<T>, mpsc::UnboundedReceiver<T>) {
    mpsc::unbounded_channel()
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    within("a handler call", rx.recv())
        .await
        .expect("handler alive")
}

pub async fn a_typed_consumer_acks_on_ok(h: &Harness) {
    let (tx, mut rx) = recorder();
    let consumer = Job::consume(&h.queue, move |job: Job| {
        let tx = tx.clone();
        async move {
            tx.send(job.n).unwrap();
        }
    })
    .await
    .unwrap();
    produce_jobs(h, 0..3).await;
    let mut got = vec![
        recv(&mut rx).await,
        recv(&mut rx).await,
        recv(&mut rx).await,
    ];
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2]);
    eventually("three acks", || async { h.stats(JOBS).await.acked == 3 }).await;
    consumer.stop(SECOND).await.unwrap();
}

pub async fn a_handler_error_is_retried_and_its_text_kept(h: &Harness) {
    let (tx, mut rx) = recorder();
    let _consumer = Job::consumer(&h.queue)
        .deliveries(move |d: Delivery<Job>| {
            let tx = tx.clone();
            async move {
                tx.send(d.attempt()).unwrap();
                Err::<(), _>(format!("smtp down on attempt {}", d.attempt()))
            }
        })
        .await
        .unwrap();
    produce_jobs(h, 0..1).await;
    for attempt in 1..=3 {
        assert_eq!(recv(&mut rx).await, attempt);
        eventually("the failure to be recorded", || async {
            let s = h.stats(JOBS).await;
            s.in_flight == 0
        })
        .await;
        h.advance(Duration::from_secs(4)).await;
    }
    eventually("the message to die", || async {
        h.stats(JOBS).await.dead == 1
    })
    .await;
    let dead = h.queue.dead_letters(JOBS, 1).await.unwrap();
    assert_eq!(dead[0].error, "smtp down on attempt 3 (attempt 3 of 3)");
}

pub async fn a_panicking_handler_is_retried(h: &Harness) {
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = recorder();
    let seen = calls.clone();
    let _consumer = Job::consume(&h.queue, move |_job: Job| {
        let tx = tx.clone();
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                panic!("first call panics");
            }
            tx.send(n).unwrap();
        }
    })
    .await
    .unwrap();
    produce_jobs(h, 0..1).await;
    eventually("the panic to become a retry", || async {
        h.stats(JOBS).await.retried == 1
    })
    .await;
    h.advance(SECOND).await;
    assert_eq!(recv(&mut rx).await, 1);
    eventually("the ack", || async { h.stats(JOBS).await.acked == 1 }).await;
}

pub async fn a_poison_payload_is_dead_lettered_at_once(h: &Harness) {
    let garbage = Outgoing {
        payload: codec::encode(&"not a job").unwrap(),
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    };
    h.queue.produce_raw(&jobs(), vec![garbage]).await.unwrap();
    let (tx, mut rx) = recorder();
    let _consumer = Job::consume(&h.queue, move |job: Job| {
        let tx = tx.clone();
        async move { tx.send(job.n).unwrap() }
    })
    .await
    .unwrap();
    Job::produce(&h.queue, Job { n: 5 }).await.unwrap();
    assert_eq!(
        recv(&mut rx).await,
        5,
        "the consumer is not wedged by the poison message"
    );
    eventually("the poison message to die", || async {
        h.stats(JOBS).await.dead == 1
    })
    .await;
    let dead = h.queue.dead_letters(JOBS, 1).await.unwrap();
    assert_eq!(dead[0].attempts, 1);
    assert!(dead[0].error.contains("decode"), "{}", dead[0].error);
}

pub async fn a_consumer_dropped_while_handling_gives_the_message_to_another(h: &Harness) {
    let (started_tx, mut started) = recorder();
    let stuck = Job::consume(&h.queue, move |job: Job| {
        let started_tx = started_tx.clone();
        async move {
            started_tx.send(job.n).unwrap();
            std::future::pending::<()>().await;
        }
    })
    .await
    .unwrap();
    produce_jobs(h, 0..1).await;
    assert_eq!(recv(&mut started).await, 0);
    drop(stuck);
    let (tx, mut rx) = recorder();
    let _other = Job::consumer(&h.queue)
        .deliveries(move |d: Delivery<Job>| {
            let tx = tx.clone();
            async move { tx.send((d.message().n, d.attempt())).unwrap() }
        })
        .await
        .unwrap();
    let (n, attempt) = recv(&mut rx).await;
    assert_eq!(
        (n, attempt),
        (0, 1),
        "given back without counting the attempt"
    );
    eventually("the ack", || async { h.stats(JOBS).await.acked == 1 }).await;
}

pub async fn the_consumer_extends_the_lease_while_the_handler_runs(h: &Harness) {
    let (started_tx, mut started) = recorder();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let finish_rx = Arc::new(tokio::sync::Mutex::new(Some(finish_rx)));
    let _consumer = Job::consume(&h.queue, move |_job: Job| {
        let started_tx = started_tx.clone();
        let finish_rx = finish_rx.clone();
        async move {
            started_tx.send(()).unwrap();
            let rx = finish_rx.lock().await.take();
            if let Some(rx) = rx {
                let _ = rx.await;
            }
        }
    })
    .await
    .unwrap();
    produce_jobs(h, 0..1).await;
    recv(&mut started).await;
    // Three lease lengths pass in steps of 2 s; each step waits for the lease to move.
    for _ in 0..15 {
        h.advance(Duration::from_secs(2)).await;
        let now = h.clock.now();
        eventually("the lease to be extended", || async {
            let peeked = h.queue.peek(JOBS, 1).await.unwrap();
            peeked
                .first()
                .is_some_and(|m| m.state == MessageState::InFlight && m.due > now + 5_000)
        })
        .await;
    }
    assert_eq!(h.stats(JOBS).await.lease_expiries, 0);
    finish_tx.send(()).unwrap();
    eventually("the ack", || async { h.stats(JOBS).await.acked == 1 }).await;
}

/// Every running handler's lease is extended until that handler returns, also while a
/// stopping consumer waits for its handlers.
pub async fn the_consumer_extends_each_running_lease_until_its_handler_returns(h: &Harness) {
    let (started_tx, mut started) = recorder();
    let (release, released) = tokio::sync::watch::channel(0u32);
    let consumer = Job::consumer(&h.queue)
        .max_parallel(3)
        .handle(move |job: Job| {
            let started_tx = started_tx.clone();
            let mut released = released.clone();
            async move {
                started_tx.send(job.n).unwrap();
                let _ = released.wait_for(|n| *n >= job.n).await;
            }
        })
        .await
        .unwrap();
    // Every running lease ahead of the clock. Awaited after each move of the clock, so that
    // the clock never passes a lease whose extension is still on its way to the store.
    let ahead = || async move {
        let now = h.clock.now();
        eventually("the running leases to be extended", || async {
            let peeked = h.queue.peek(JOBS, 10).await.unwrap();
            peeked
                .iter()
                .all(|m| m.state == MessageState::InFlight && m.due > now + 5_000)
        })
        .await;
    };
    // Three handlers started 3 s apart, so that their extensions fall due at different times.
    for n in 1..=3 {
        produce_jobs(h, n..n + 1).await;
        assert_eq!(recv(&mut started).await, n);
        h.advance(Duration::from_secs(3)).await;
        ahead().await;
    }
    let steps = |count: usize| async move {
        for _ in 0..count {
            h.advance(Duration::from_secs(2)).await;
            ahead().await;
        }
    };
    steps(10).await;
    release.send(1).unwrap();
    eventually("the first ack", || async { h.stats(JOBS).await.acked == 1 }).await;
    steps(10).await;
    assert_eq!(h.stats(JOBS).await.in_flight, 2);
    // Stopping waits for the two running handlers, and their leases go on being extended.
    let stopping = tokio::spawn(consumer.stop(Duration::from_secs(300)));
    steps(10).await;
    assert!(
        !stopping.is_finished(),
        "stop waits for the running handlers"
    );
    release.send(3).unwrap();
    within("the stop", stopping).await.unwrap().unwrap();
    let s = h.stats(JOBS).await;
    assert_eq!((s.acked, s.in_flight, s.lease_expiries), (3, 0, 0));
}

pub async fn a_delivery_handler_sees_id_attempt_and_token(h: &Harness) {
    let (tx, mut rx) = recorder();
    let _consumer = Job::consumer(&h.queue)
        .deliveries(move |d: Delivery<Job>| {
            let tx = tx.clone();
            async move {
                tx.send((d.id(), d.attempt(), d.fencing_token(), d.message().n))
                    .unwrap();
                if d.attempt() == 1 {
                    Err("again")
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    let receipt = Job::produce(&h.queue, Job { n: 3 }).await.unwrap();
    let (id, attempt, token, n) = recv(&mut rx).await;
    assert_eq!((id, attempt, n), (receipt.id, 1, 3));
    eventually("the retry to be scheduled", || async {
        h.stats(JOBS).await.delayed == 1
    })
    .await;
    h.advance(SECOND).await;
    let (id2, attempt2, token2, _) = recv(&mut rx).await;
    assert_eq!((id2, attempt2), (receipt.id, 2));
    assert!(token2 > token);
}

pub async fn a_delivery_handler_can_retry_and_dead_letter_by_hand(h: &Harness) {
    let (tx, mut rx) = recorder();
    let _consumer = Job::consumer(&h.queue)
        .deliveries(move |d: Delivery<Job>| {
            let tx = tx.clone();
            async move {
                tx.send(d.attempt()).unwrap();
                if d.attempt() == 1 {
                    d.retry_after(Duration::from_secs(60)).await
                } else {
                    d.dead_letter("refused by hand").await
                }
            }
        })
        .await
        .unwrap();
    Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    assert_eq!(recv(&mut rx).await, 1);
    eventually("the hand-made retry", || async {
        h.stats(JOBS).await.delayed == 1
    })
    .await;
    h.advance(Duration::from_secs(59)).await;
    assert_eq!(
        h.stats(JOBS).await.delayed,
        1,
        "retry_after overrides the 1 s backoff"
    );
    h.advance(SECOND).await;
    assert_eq!(recv(&mut rx).await, 2);
    eventually("the dead letter", || async {
        h.stats(JOBS).await.dead == 1
    })
    .await;
    let dead = h.queue.dead_letters(JOBS, 1).await.unwrap();
    assert_eq!(dead[0].error, "refused by hand");
    assert_eq!(
        h.stats(JOBS).await.acked,
        0,
        "a settled delivery is not acked again"
    );
}

pub async fn stopping_a_consumer_waits_for_running_handlers(h: &Harness) {
    let (started_tx, mut started) = recorder();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let finish_rx = Arc::new(tokio::sync::Mutex::new(Some(finish_rx)));
    let consumer = Job::consume(&h.queue, move |_job: Job| {
        let started_tx = started_tx.clone();
        let finish_rx = finish_rx.clone();
        async move {
            started_tx.send(()).unwrap();
            let rx = finish_rx.lock().await.take();
            if let Some(rx) = rx {
                let _ = rx.await;
            }
        }
    })
    .await
    .unwrap();
    produce_jobs(h, 0..1).await;
    recv(&mut started).await;
    let stopping = tokio::spawn(consumer.stop(Duration::from_secs(30)));
    settle().await;
    assert!(
        !stopping.is_finished(),
        "stop waits for the running handler"
    );
    finish_tx.send(()).unwrap();
    within("the stop", stopping).await.unwrap().unwrap();
    let s = h.stats(JOBS).await;
    assert_eq!((s.acked, s.in_flight), (1, 0));
}

pub async fn a_closed_queue_refuses_work(h: &Harness) {
    Job::produce(&h.queue, Job { n: 1 }).await.unwrap();
    h.queue.close().await.unwrap();
    let err = Job::produce(&h.queue, Job { n: 2 }).await.unwrap_err();
    assert!(matches!(err, QueueError::Closed), "{err:?}");
}
