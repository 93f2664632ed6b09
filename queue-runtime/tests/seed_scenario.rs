//! The seed's promise, end to end on `memory://`: an `exactly_once` channel with a 1 s dedup
//! window, a handler that fails once, and a consumer that dies while holding a message.

use std::sync::Arc;
use std::time::Duration;

use queue_core::{Delivery, VirtualClock, channel};
use queue_runtime::ConnectOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[channel("user/registered", exactly_once, dedup = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub id: u64,
    pub username: String,
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a handler call within 10 s")
        .expect("handler alive")
}

async fn acked(queue: &queue_core::Queue) -> u64 {
    queue.stats().await.unwrap().iter().map(|s| s.acked).sum()
}

async fn retried(queue: &queue_core::Queue) -> u64 {
    queue.stats().await.unwrap().iter().map(|s| s.retried).sum()
}

/// Yields until `done` holds, for at most 10 s of real time.
async fn wait_for<F: std::future::Future<Output = bool>>(done: impl Fn() -> F) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done().await {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "condition not reached within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_holds() {
    let clock = VirtualClock::default();
    let queue = queue_runtime::connect_with(
        "memory://seed",
        ConnectOptions::with_clock(Arc::new(clock.clone())),
    )
    .await
    .unwrap();
    let peter = UserRegistered {
        id: 1,
        username: "Peter".into(),
    };

    // A consumer that fails on the first attempt and succeeds on the second.
    let (tx, mut calls) = mpsc::unbounded_channel();
    let consumer = UserRegistered::consumer(&queue)
        .deliveries(move |d: Delivery<UserRegistered>| {
            let tx = tx.clone();
            async move {
                tx.send((d.message().username.clone(), d.attempt()))
                    .unwrap();
                if d.attempt() == 1 {
                    Err("mail server down")
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();

    // The same user twice: the second produce is a duplicate of the first.
    let first = UserRegistered::produce(&queue, peter.clone())
        .await
        .unwrap();
    let second = UserRegistered::produce(&queue, peter.clone())
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.id, first.id);

    // Attempt 1 fails, attempt 2 (after the backoff) succeeds: the handler ran for one message.
    assert_eq!(recv(&mut calls).await, ("Peter".to_string(), 1));
    // The failure is settled after the handler returns: move the clock only once the retry
    // is scheduled, or it would be scheduled against the later time.
    wait_for(|| async { retried(&queue).await >= 1 }).await;
    clock.advance(Duration::from_secs(1));
    assert_eq!(recv(&mut calls).await, ("Peter".to_string(), 2));
    while acked(&queue).await < 1 {
        tokio::task::yield_now().await;
    }
    assert!(
        calls.try_recv().is_err(),
        "the duplicate never reached the handler"
    );

    // After the window the same payload is a new message.
    clock.advance(Duration::from_secs(1));
    let third = UserRegistered::produce(&queue, peter.clone())
        .await
        .unwrap();
    assert!(!third.duplicate);
    assert_ne!(third.id, first.id);
    assert_eq!(recv(&mut calls).await, ("Peter".to_string(), 1));
    consumer.stop(Duration::ZERO).await.unwrap();

    // A consumer dropped while holding a message: another consumer gets it.
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let dying = UserRegistered::consume(&queue, move |user: UserRegistered| {
        let held_tx = held_tx.clone();
        async move {
            held_tx.send(user.id).unwrap();
            std::future::pending::<()>().await;
        }
    })
    .await
    .unwrap();
    let anna = UserRegistered {
        id: 2,
        username: "Anna".into(),
    };
    let anna_receipt = UserRegistered::produce(&queue, anna).await.unwrap();
    assert_eq!(recv(&mut held).await, 2);
    drop(dying);

    let (tx, mut rescued) = mpsc::unbounded_channel();
    let _rescuer = UserRegistered::consumer(&queue)
        .deliveries(move |d: Delivery<UserRegistered>| {
            let tx = tx.clone();
            async move { tx.send((d.id(), d.message().username.clone())).unwrap() }
        })
        .await
        .unwrap();
    // The message from before the drop, or the retry of the third produce, may come first.
    let mut got = vec![recv(&mut rescued).await];
    if got[0].0 != anna_receipt.id {
        clock.advance(Duration::from_secs(1));
        got.push(recv(&mut rescued).await);
    }
    assert!(
        got.contains(&(anna_receipt.id, "Anna".to_string())),
        "{got:?}"
    );
}
