//! Subscriptions over the connection: each local subscription has a subscription on the
//! broker, opened again on every new connection and after the broker ends one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use queue_core::{ChannelSpec, Outcome, QueueError, RawDelivery, Subscription};
use tokio::sync::mpsc;

use super::conn::{CallError, Conn};
use super::{Inner, lost};
use crate::broker::protocol::{Reply, Request, WireLease, WireSpec};

/// Deliveries (or why the subscription failed) tagged with the connection generation that
/// brought them.
pub(super) type Pushed = (u64, Result<RawDelivery, QueueError>);

pub(super) struct LocalSub {
    pub(super) spec: ChannelSpec,
    pub(super) max_parallel: u32,
    pub(super) tx: mpsc::UnboundedSender<Pushed>,
    /// The connection generation its current server subscription belongs to.
    pub(super) generation: Arc<AtomicU64>,
}

impl Inner {
    pub(super) async fn resubscribe(self: &Arc<Self>, conn: &Arc<Conn>) {
        let subs: Vec<(u64, ChannelSpec, u32, Arc<AtomicU64>)> = self
            .subs
            .lock()
            .iter()
            .map(|(id, s)| (*id, s.spec.clone(), s.max_parallel, s.generation.clone()))
            .collect();
        for (local, spec, max_parallel, generation) in subs {
            if generation.load(Ordering::Acquire) == conn.generation {
                continue;
            }
            if let Err(e) = subscribe_on(conn, local, &spec, max_parallel, &generation).await {
                tracing::warn!(channel = %spec.name, error = %e, "resubscribing failed");
            }
        }
    }

    /// The broker ended subscription `sub` on `conn`: its caller hears why, and it is opened
    /// again after a pause while the connection lives.
    pub(super) fn ended(self: &Arc<Self>, conn: &Arc<Conn>, sub: i64, error: QueueError) {
        let Some(local) = conn.subs.lock().remove(&sub) else {
            return;
        };
        tracing::warn!(error = %error, "the broker ended a subscription; opening it again");
        let found = self.subs.lock().get(&local).map(|s| {
            let _ = s.tx.send((conn.generation, Err(error)));
            (s.spec.clone(), s.max_parallel, s.generation.clone())
        });
        let Some((spec, max_parallel, generation)) = found else {
            return;
        };
        let (inner, conn) = (Arc::downgrade(self), conn.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                tokio::time::sleep(pause).await;
                let Some(inner) = inner.upgrade() else { return };
                if !conn.alive.load(Ordering::Acquire) || !inner.subs.lock().contains_key(&local) {
                    return;
                }
                match subscribe_on(&conn, local, &spec, max_parallel, &generation).await {
                    Ok(()) => return,
                    Err(e) => {
                        if let Some(s) = inner.subs.lock().get(&local) {
                            let _ = s.tx.send((conn.generation, Err(e)));
                        }
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
}

pub(super) async fn subscribe_on(
    conn: &Conn,
    local: u64,
    spec: &ChannelSpec,
    max_parallel: u32,
    generation: &AtomicU64,
) -> Result<(), QueueError> {
    // The server numbers its pushes with our id, so the mapping exists before any delivery.
    let sub = local as i64;
    conn.subs.lock().insert(sub, local);
    generation.store(conn.generation, Ordering::Release);
    let request = Request::Subscribe {
        sub,
        spec: WireSpec::from(spec),
        max_parallel: i64::from(max_parallel),
    };
    let result = match conn.call(request).await {
        Ok(Reply::Subscribed { .. }) => return Ok(()),
        Ok(other) => Err(QueueError::Protocol(format!("unexpected reply {other:?}"))),
        Err(CallError::Queue(e)) => Err(e),
        Err(CallError::Lost) => Err(lost()),
    };
    conn.subs.lock().remove(&sub);
    result
}

pub(super) struct RemoteSubscription {
    pub(super) inner: Arc<Inner>,
    pub(super) local: u64,
    pub(super) generation: Arc<AtomicU64>,
    pub(super) rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Pushed>>>,
}

impl Subscription for RemoteSubscription {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        let rx = self.rx.clone();
        let generation = self.generation.clone();
        let inner = self.inner.clone();
        async move {
            let mut rx = rx.lock().await;
            loop {
                if inner.closed.load(Ordering::Acquire) {
                    return Err(QueueError::Closed);
                }
                let Some((from, d)) = rx.recv().await else {
                    return Err(QueueError::Closed);
                };
                if from == generation.load(Ordering::Acquire) {
                    return d;
                }
            }
        }
        .boxed()
    }

    fn stop(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        let rx = self.rx.clone();
        let generation = self.generation.clone();
        let local = self.local;
        async move {
            let timeout = inner.options.request_timeout;
            let stopping = async {
                let conn = inner.current.lock().clone();
                let Some(conn) = conn.filter(|c| c.alive.load(Ordering::Acquire)) else {
                    return;
                };
                for sub in server_subs(&conn, local) {
                    let _ = conn.call(Request::Pause { sub }).await;
                }
                // Give back what was pushed ahead and never handed out, without counting it.
                let mut rx = rx.lock().await;
                while let Ok((from, d)) = rx.try_recv() {
                    if let Ok(d) = d
                        && from == generation.load(Ordering::Acquire)
                    {
                        let request = Request::Settle {
                            lease: WireLease::from(&d.lease),
                            outcome: Outcome::Release.into(),
                        };
                        let _ = conn.call(request).await;
                    }
                }
            };
            // A broker that does not answer releases the leases when the connection drops.
            let _ = tokio::time::timeout(timeout, stopping).await;
        }
        .boxed()
    }
}

/// The broker's subscriptions on `conn` that feed local subscription `local`.
fn server_subs(conn: &Conn, local: u64) -> Vec<i64> {
    conn.subs
        .lock()
        .iter()
        .filter(|(_, l)| **l == local)
        .map(|(s, _)| *s)
        .collect()
}

impl Drop for RemoteSubscription {
    fn drop(&mut self) {
        self.inner.subs.lock().remove(&self.local);
        let conn = self.inner.current.lock().clone();
        if let Some(conn) = conn.filter(|c| c.alive.load(Ordering::Acquire)) {
            for sub in server_subs(&conn, self.local) {
                conn.subs.lock().remove(&sub);
                let conn = conn.clone();
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = conn.call(Request::Unsubscribe { sub }).await;
                    });
                }
            }
        }
    }
}
