//! `queue://HOST:PORT` and `queue+unix://PATH`: the client of `queue-broker`.
//!
//! One connection per adapter, shared by every request (pipelined: each request has an id,
//! replies may come in any order) and every subscription (deliveries are pushed). When the
//! connection drops, the adapter reconnects with backoff and opens every live subscription
//! again; deliveries from the old connection that were not yet handed out are dropped, since
//! the broker released their leases when the connection closed. A produce carries a key
//! chosen by the client and is retried after a reconnect with the same key, so the broker
//! stores it once. Settling or extending a lease across a reconnect fails with
//! `StaleLease`: the lease was released with the old connection.
//!
//! Nothing waits forever: connecting, the handshake and every request have a timeout
//! ([`RemoteOptions`], or the URL's `connect_timeout`, `handshake_timeout`,
//! `request_timeout`) and fail with `QueueError::Timeout`. The client pings a quiet
//! connection and drops one it hears nothing from for its idle timeout. Lease deadlines are
//! put on the client's own clock: the broker sends how long a lease is valid, not when it
//! lapses on the broker's clock.
//!
//! `conn` holds a connection (handshake, reader, heartbeat, reconnecting), `batch` gathers
//! produces and settles into shared requests, and `subs` keeps subscriptions open across
//! connections.

mod batch;
mod conn;
mod subs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use foldhash::HashMap;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use queue_core::clock::{Clock, Timestamp};
use queue_core::{
    Adapter, Cancelled, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, Outcome, Outgoing,
    QueueError, Receipt, StoredMessage, Subscription,
};
use tokio::sync::{mpsc, oneshot};

use self::batch::{ChannelBatch, SettleBatch, flush_now, spawn_flush, spawn_settle_flush};
use self::conn::Conn;
use self::subs::{LocalSub, RemoteSubscription, subscribe_on};
use crate::broker::protocol::{self, Reply, Request, WireLease, WireSettle};

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`.
    Tcp(String),
    /// `host:port` with TLS, trusting the certificates in the PEM file.
    #[cfg(feature = "tls")]
    Tls {
        /// `host:port`.
        address: String,
        /// The trusted certificates.
        ca: std::path::PathBuf,
    },
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

/// Settings of the client.
#[derive(Clone)]
pub struct RemoteOptions {
    /// The token to present.
    pub token: Option<String>,
    /// The largest frame accepted from the broker.
    pub max_frame: usize,
    /// Bytes of frames queued for the broker and not yet written; senders wait for room.
    pub max_outbound_bytes: usize,
    /// How long a request may wait for a connection (connecting and the handshake, with
    /// retries) before it fails with [`QueueError::Timeout`].
    pub connect_timeout: Duration,
    /// How long one attempt at connecting and the handshake may take.
    pub handshake_timeout: Duration,
    /// How long a request may wait for its answer before it fails with
    /// [`QueueError::Timeout`].
    pub request_timeout: Duration,
    /// The client pings a quiet connection this often (or more often, if the broker's idle
    /// timeout asks for it).
    pub heartbeat: Duration,
    /// A connection the client hears nothing from for this long is dropped and opened
    /// again.
    pub idle_timeout: Duration,
    /// TCP keepalive probes start after the connection is quiet this long.
    pub keepalive: Duration,
    /// The clock lease deadlines are put on: the broker sends how long a lease is valid,
    /// and the deadline is that long after now on this clock.
    pub clock: Arc<dyn Clock>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            token: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            max_outbound_bytes: 32 << 20,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(10),
            clock: Arc::new(crate::SystemClock),
        }
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("max_frame", &self.max_frame)
            .field("max_outbound_bytes", &self.max_outbound_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("idle_timeout", &self.idle_timeout)
            .field("keepalive", &self.keepalive)
            .finish_non_exhaustive()
    }
}

struct Inner {
    target: Target,
    options: RemoteOptions,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    current: Mutex<Option<Arc<Conn>>>,
    subs: Mutex<HashMap<u64, LocalSub>>,
    next_local: AtomicU64,
    generation: AtomicU64,
    closed: AtomicBool,
    reconnect: Arc<tokio::sync::Notify>,
    batches: Mutex<HashMap<String, ChannelBatch>>,
    settles: Mutex<SettleBatch>,
}

/// The `queue://` adapter.
#[derive(Clone)]
pub struct RemoteAdapter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteAdapter")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

fn lost() -> QueueError {
    QueueError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection to the broker lost",
    ))
}

impl RemoteAdapter {
    /// Connects to a broker.
    ///
    /// # Errors
    /// The connection or handshake error.
    pub async fn connect(target: Target, options: RemoteOptions) -> Result<Self, QueueError> {
        let adapter = RemoteAdapter {
            inner: Arc::new(Inner {
                target,
                options,
                conn: tokio::sync::Mutex::new(None),
                current: Mutex::new(None),
                subs: Mutex::new(HashMap::default()),
                next_local: AtomicU64::new(1),
                generation: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                reconnect: Arc::new(tokio::sync::Notify::new()),
                batches: Mutex::new(HashMap::default()),
                settles: Mutex::default(),
            }),
        };
        adapter.inner.connection().await?;
        let weak = Arc::downgrade(&adapter.inner);
        let reconnect = adapter.inner.reconnect.clone();
        tokio::spawn(async move {
            loop {
                reconnect.notified().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = inner.connection().await {
                    tracing::warn!(error = %e, "reconnecting to the broker failed");
                    inner.reconnect.notify_one();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Ok(adapter)
    }
}

impl Inner {
    /// Runs `f` within the request timeout.
    async fn within<T>(
        &self,
        f: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        let timeout = self.options.request_timeout;
        tokio::time::timeout(timeout, f)
            .await
            .unwrap_or(Err(QueueError::Timeout(timeout)))
    }

    /// A listing of up to `limit` entries, fetched page by page: `request` makes the
    /// request for `limit` more entries from `offset`. Each page is a separate request, so
    /// entries added or removed meanwhile may shift the pages.
    async fn list(
        self: &Arc<Self>,
        limit: usize,
        request: impl Fn(i64, i64) -> Request,
    ) -> Result<Vec<Reply>, QueueError> {
        let mut pages = Vec::new();
        let mut offset = 0i64;
        let mut left = limit;
        while left > 0 {
            let reply = self
                .call(
                    request(i64::try_from(left).unwrap_or(i64::MAX), offset),
                    true,
                )
                .await?;
            let (taken, next) = match &reply {
                Reply::Peeked { messages, next } => (messages.len(), *next),
                Reply::DeadLetters { messages, next } => (messages.len(), *next),
                other => return Err(unexpected(other)),
            };
            pages.push(reply);
            left = left.saturating_sub(taken);
            match next {
                Some(n) if taken > 0 && n > offset => offset = n,
                _ => break,
            }
        }
        Ok(pages)
    }
}

fn wire_ids(ids: Option<&[MessageId]>) -> Option<Vec<i64>> {
    ids.map(|i| i.iter().map(|m| m.0 as i64).collect())
}

fn unexpected(reply: &Reply) -> QueueError {
    QueueError::Protocol(format!("unexpected reply {reply:?}"))
}

fn stale_on_loss(lease: &Lease, e: QueueError) -> QueueError {
    match e {
        QueueError::Io(_) => QueueError::StaleLease { id: lease.id },
        QueueError::StaleLease { .. } => QueueError::StaleLease { id: lease.id },
        other => other,
    }
}

impl Adapter for RemoteAdapter {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        async move {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(QueueError::Closed);
            }
            let (tx, rx) = oneshot::channel();
            let start = {
                let mut batches = self.inner.batches.lock();
                let b = batches
                    .entry(spec.name.to_string())
                    .or_insert_with(|| ChannelBatch {
                        spec: spec.clone(),
                        messages: Vec::new(),
                        waiting: Vec::new(),
                        pending: false,
                        in_flight: 0,
                        alone: true,
                    });
                b.spec = spec.clone();
                b.waiting.push((batch.len(), tx));
                b.messages.extend(batch);
                b.claim()
            };
            if start && !flush_now(&self.inner, &spec.name) {
                spawn_flush(self.inner.clone(), spec.name.to_string());
            }
            self.inner
                .within(async { rx.await.unwrap_or(Err(QueueError::Closed)) })
                .await
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        async move {
            let local = self.inner.next_local.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let generation = Arc::new(AtomicU64::new(0));
            self.inner.subs.lock().insert(
                local,
                LocalSub {
                    spec: spec.clone(),
                    max_parallel,
                    tx,
                    generation: generation.clone(),
                },
            );
            let sub = RemoteSubscription {
                inner: self.inner.clone(),
                local,
                generation: generation.clone(),
                rx: Arc::new(tokio::sync::Mutex::new(rx)),
            };
            self.inner
                .within(async {
                    let conn = self.inner.connection().await?;
                    if generation.load(Ordering::Acquire) != conn.generation {
                        subscribe_on(&conn, local, spec, max_parallel, &generation).await?;
                    }
                    Ok(())
                })
                .await?;
            Ok(Box::new(sub) as Box<dyn Subscription>)
        }
        .boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(QueueError::Closed);
            }
            let (tx, rx) = oneshot::channel();
            let settle = WireSettle {
                lease: WireLease::from(lease),
                outcome: outcome.into(),
            };
            let start = {
                let mut b = self.inner.settles.lock();
                b.waiting.push((settle, (lease.id, tx)));
                !std::mem::replace(&mut b.pending, true)
            };
            if start {
                spawn_settle_flush(self.inner.clone());
            }
            self.inner
                .within(async {
                    rx.await
                        .unwrap_or(Err(QueueError::StaleLease { id: lease.id }))
                })
                .await
        }
        .boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        async move {
            let request = Request::Extend {
                lease: WireLease::from(lease),
                by_ms: i64::try_from(by.as_millis()).unwrap_or(i64::MAX),
            };
            // Counted from the send: the lease runs from a moment between the send and the
            // reply, so the deadline errs early by at most a round trip, never late.
            let sent = self.inner.options.clock.now();
            match self
                .inner
                .call(request, false)
                .await
                .map_err(|e| stale_on_loss(lease, e))?
            {
                Reply::Extended { lease_ms } => Ok(sent.saturating_add(lease_ms.max(0) as u64)),
                other => Err(unexpected(&other)),
            }
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        async move {
            match self.inner.call(Request::Stats, true).await? {
                Reply::Stats { channels } => Ok(channels.into_iter().map(Into::into).collect()),
                other => Err(unexpected(&other)),
            }
        }
        .boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        self.inner
            .list(limit, move |limit, offset| Request::Peek {
                channel: channel.into(),
                limit,
                offset,
            })
            .map(|listed| {
                let mut messages = Vec::new();
                for reply in listed? {
                    match reply {
                        Reply::Peeked { messages: page, .. } => {
                            messages.extend(page.into_iter().map(Into::into));
                        }
                        other => return Err(unexpected(&other)),
                    }
                }
                Ok(messages)
            })
            .boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        self.inner
            .list(limit, move |limit, offset| Request::DeadLetters {
                channel: channel.into(),
                limit,
                offset,
            })
            .map(|listed| {
                let mut messages = Vec::new();
                for reply in listed? {
                    match reply {
                        Reply::DeadLetters { messages: page, .. } => {
                            messages.extend(page.into_iter().map(Into::into));
                        }
                        other => return Err(unexpected(&other)),
                    }
                }
                Ok(messages)
            })
            .boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            let request = Request::Redrive {
                channel: channel.into(),
                ids: wire_ids(ids),
            };
            self.inner.count(request).await
        }
        .boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            let request = Request::Purge {
                channel: channel.into(),
                ids: wire_ids(ids),
            };
            self.inner.count(request).await
        }
        .boxed()
    }

    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
        async move {
            let request = Request::PurgePending {
                channel: channel.into(),
            };
            self.inner.count(request).await
        }
        .boxed()
    }

    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: MessageId,
    ) -> BoxFuture<'a, Result<Cancelled, QueueError>> {
        async move {
            let request = Request::Cancel {
                channel: channel.into(),
                message: i64::try_from(id.0).unwrap_or(i64::MAX),
            };
            // Not retried: a second cancel after a lost reply finds nothing.
            match self.inner.call(request, false).await? {
                Reply::Cancelled { was } => Ok(was),
                other => Err(unexpected(&other)),
            }
        }
        .boxed()
    }

    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            let request = Request::PauseChannel {
                channel: channel.into(),
                paused,
            };
            match self.inner.call(request, true).await? {
                Reply::Done => Ok(()),
                other => Err(unexpected(&other)),
            }
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            self.inner.closed.store(true, Ordering::Release);
            let conn = self.inner.current.lock().take();
            if let Some(conn) = conn {
                conn.fail_all();
            }
            *self.inner.conn.lock().await = None;
            self.inner.subs.lock().clear();
            self.inner.reconnect.notify_one();
            Ok(())
        }
        .boxed()
    }
}
