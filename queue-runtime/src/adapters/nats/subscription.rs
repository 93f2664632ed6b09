//! A subscription on `nats://`: takes by appending `take` commands, and holds what its takes
//! handed out until `next` returns it.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt, select};
use parking_lot::Mutex;
use queue_core::clock::Timestamp;
use queue_core::{QueueError, RawDelivery, Subscription};

use super::command::Op;
use super::replica::{Answer, Payload, TAKE_BATCH};
use super::{Inner, Link};
use crate::broker::protocol::{WireLease, WireOutcome};
use crate::engine::Held;

/// How long a subscription waits before looking again when its rules say a take is due but
/// one just found nothing (clients whose clocks disagree).
const SPIN_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Deliveries taken for one subscription and not yet returned by `next`.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    ready: VecDeque<Held<Payload>>,
    /// Set by `stop`: later deliveries are given back.
    stopped: bool,
}

impl Inbox {
    /// Keeps deliveries a take handed out; returns those to give back (after `stop`).
    pub(crate) fn hand(&mut self, taken: Vec<Held<Payload>>) -> Vec<Held<Payload>> {
        if self.stopped {
            taken
        } else {
            self.ready.extend(taken);
            Vec::new()
        }
    }
}

/// The command that gives `held` back unprocessed.
pub(crate) fn release_op(channel: &Arc<str>, held: &[Held<Payload>]) -> Op {
    Op::Settle {
        items: held
            .iter()
            .map(|h| {
                (
                    WireLease {
                        channel: channel.clone(),
                        id: h.entry.id.0 as i64,
                        token: h.token as i64,
                    },
                    WireOutcome::Release,
                )
            })
            .collect(),
        unit: 0.0,
    }
}

pub(crate) struct NatsSubscription {
    pub(crate) inner: Arc<Inner>,
    pub(crate) link: Arc<Link>,
    pub(crate) consumer: u64,
    pub(crate) inbox: Arc<Mutex<Inbox>>,
}

/// When a take found nothing: the replica's version then, and when time may change that.
#[derive(Clone, Copy)]
struct Blocked {
    version: u64,
    until: Option<Timestamp>,
}

async fn next_delivery(
    inner: Arc<Inner>,
    link: Arc<Link>,
    consumer: u64,
    inbox: Arc<Mutex<Inbox>>,
) -> Result<RawDelivery, QueueError> {
    let mut blocked: Option<Blocked> = None;
    loop {
        inner.check_open()?;
        link.check()?;
        let notified = link.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let held = inbox.lock().ready.pop_front();
        if let Some(held) = held {
            // Taken ahead and since lapsed or cancelled: another holder may have it now.
            if held.deadline <= inner.clock.now()
                || !link.replica.lock().state.holds(held.entry.id, held.token)
            {
                continue;
            }
            return Ok(held.to_delivery(&link.name, held.entry.payload.to_vec()));
        }
        let now = inner.clock.now();
        let (could, version, wakeup) = {
            let replica = link.replica.lock();
            (
                replica.could_take(consumer, now),
                replica.version,
                replica.state.next_wakeup(),
            )
        };
        let waited_enough = blocked
            .is_none_or(|b| b.version != version || b.until.is_some_and(|until| until <= now));
        if could && waited_enough {
            let max = i64::from(TAKE_BATCH);
            match inner
                .submit(
                    &link,
                    Op::Take {
                        consumer: consumer as i64,
                        max,
                    },
                )
                .await?
            {
                Answer::Taken { count: 0, wakeup } => {
                    blocked = Some(Blocked {
                        version: link.replica.lock().version,
                        until: wakeup,
                    });
                }
                _ => blocked = None,
            }
            continue;
        }
        let until = match (wakeup, blocked.and_then(|b| b.until)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match until {
            Some(at) if at > now => {
                let sleep = inner.clock.sleep_until(at);
                let _ = select(notified, sleep).await;
            }
            // Due already, and a take at this version found nothing: news, or a moment.
            Some(_) => {
                let _ = select(notified, Box::pin(tokio::time::sleep(SPIN_PAUSE))).await;
            }
            None => notified.await,
        }
    }
}

impl Subscription for NatsSubscription {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        next_delivery(
            self.inner.clone(),
            self.link.clone(),
            self.consumer,
            self.inbox.clone(),
        )
        .boxed()
    }

    fn stop(&self) -> BoxFuture<'static, ()> {
        let taken: Vec<Held<Payload>> = {
            let mut inbox = self.inbox.lock();
            inbox.stopped = true;
            inbox.ready.drain(..).collect()
        };
        let inner = self.inner.clone();
        let link = self.link.clone();
        async move {
            if taken.is_empty() {
                return;
            }
            if let Err(e) = inner.submit(&link, release_op(&link.name, &taken)).await {
                tracing::warn!(channel = %link.name, error = %e, "giving back deliveries taken ahead failed; their leases lapse instead");
            }
        }
        .boxed()
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        self.link.inboxes.lock().remove(&self.consumer);
        self.inner.send_later(
            self.link.clone(),
            Op::Unsubscribe {
                consumer: self.consumer as i64,
            },
        );
    }
}
