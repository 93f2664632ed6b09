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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use parking_lot::Mutex;
use queue_core::clock::Timestamp;
use queue_core::{
    Adapter, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, Outcome, Outgoing,
    QueueError, RawDelivery, Receipt, StoredMessage, Subscription,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::broker::protocol::{
    self, ClientFrame, Reply, Request, ServerFrame, WireLease, WireSettle, WireSpec, error_from,
    receipts_from_wire,
};

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
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The token to present.
    pub token: Option<String>,
    /// The largest frame accepted from the broker.
    pub max_frame: usize,
    /// How long a request may wait for a connection before it fails.
    pub connect_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            token: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

type Pending = HashMap<i64, Awaiting>;

/// Who waits for the reply to a request.
enum Awaiting {
    /// A caller awaiting the reply.
    Caller(oneshot::Sender<Result<Reply, QueueError>>),
    /// The producers whose messages went in one produce request. The reader hands them
    /// their receipts itself, with no task in between.
    Producers(Produce),
    /// The settles that went in one `settle_many`, in order.
    Settlers(Vec<Settler>),
}

/// A settle waiting for its answer: the message, and where the answer goes.
type Settler = (MessageId, oneshot::Sender<Result<(), QueueError>>);

/// A produce request in flight, kept whole so it can be sent again after a reconnect.
struct Produce {
    inner: std::sync::Weak<Inner>,
    request: Request,
    waiting: Vec<Waiting>,
    /// Given back when this is dropped, after the waiting produces have their answer.
    _slot: Slot,
}

impl Awaiting {
    fn answer(self, result: Result<Reply, QueueError>) {
        match self {
            Awaiting::Caller(tx) => {
                let _ = tx.send(result);
            }
            Awaiting::Producers(p) => hand_out(p.waiting, receipts_of(result)),
            Awaiting::Settlers(settlers) => match result {
                Ok(Reply::Settled { errors }) if errors.len() == settlers.len() => {
                    for ((id, tx), error) in settlers.into_iter().zip(errors) {
                        let _ = tx.send(match error {
                            None => Ok(()),
                            Some(e) => Err(error_from(&e.code, e.message, Some(id))),
                        });
                    }
                }
                Ok(other) => {
                    for (_, tx) in settlers {
                        let _ = tx.send(Err(unexpected(&other)));
                    }
                }
                Err(e) => {
                    for (id, tx) in settlers {
                        let _ = tx.send(Err(match &e {
                            // The lease went with the connection.
                            QueueError::Io(_) | QueueError::StaleLease { .. } => {
                                QueueError::StaleLease { id }
                            }
                            other => copy_of(other),
                        }));
                    }
                }
            },
        }
    }

    /// The connection dropped before the reply came: a caller sees `Lost`, a produce is
    /// sent again under the same key.
    fn lost(self) {
        match self {
            Awaiting::Caller(_) => {}
            // The leases went with the connection.
            Awaiting::Settlers(settlers) => {
                for (id, tx) in settlers {
                    let _ = tx.send(Err(QueueError::StaleLease { id }));
                }
            }
            Awaiting::Producers(p) => {
                let Some(inner) = p.inner.upgrade() else {
                    return hand_out(p.waiting, Err(QueueError::Closed));
                };
                tokio::spawn(async move {
                    let Produce {
                        request,
                        waiting,
                        _slot,
                        ..
                    } = p;
                    let result = inner.call(request, true).await;
                    hand_out(waiting, receipts_of(result));
                    drop(_slot);
                });
            }
        }
    }
}

fn receipts_of(reply: Result<Reply, QueueError>) -> Result<Vec<Receipt>, QueueError> {
    match reply? {
        Reply::Receipts { receipts } => Ok(receipts_from_wire(receipts)),
        other => Err(unexpected(&other)),
    }
}

/// Gives each waiting produce its share of the receipts, or the error.
fn hand_out(waiting: Vec<Waiting>, result: Result<Vec<Receipt>, QueueError>) {
    match result {
        Ok(receipts) => {
            let mut receipts = receipts.into_iter();
            for (n, tx) in waiting {
                let _ = tx.send(Ok(receipts.by_ref().take(n).collect()));
            }
        }
        Err(e) => {
            for (_, tx) in waiting {
                let _ = tx.send(Err(copy_of(&e)));
            }
        }
    }
}

/// The same error for another caller of one failed request: the kinds callers act on are
/// kept, the rest carry the text.
fn copy_of(e: &QueueError) -> QueueError {
    match e {
        QueueError::Closed => QueueError::Closed,
        QueueError::Poisoned(m) => QueueError::Poisoned(m.clone()),
        QueueError::Unauthorized(m) => QueueError::Unauthorized(m.clone()),
        QueueError::UnknownChannel(m) => QueueError::UnknownChannel(m.clone()),
        QueueError::InvalidRequest(m) => QueueError::InvalidRequest(m.clone()),
        QueueError::PayloadTooLarge { size, max } => QueueError::PayloadTooLarge {
            size: *size,
            max: *max,
        },
        QueueError::Io(io) => QueueError::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => QueueError::Protocol(other.to_string()),
    }
}

/// One live connection.
struct Conn {
    out: mpsc::Sender<Bytes>,
    pending: Mutex<Pending>,
    next_id: AtomicI64,
    alive: AtomicBool,
    generation: u64,
    /// Server subscription id to local subscription id.
    subs: Mutex<HashMap<i64, u64>>,
    /// Wakes the reader to close the connection.
    closing: tokio::sync::Notify,
}

/// A client frame on the wire, refused if it is larger than the broker accepts.
fn encode_frame(frame: &ClientFrame) -> Result<Bytes, QueueError> {
    let bytes = protocol::encode(frame)?;
    if bytes.len() > protocol::DEFAULT_MAX_FRAME {
        return Err(QueueError::PayloadTooLarge {
            size: bytes.len(),
            max: protocol::DEFAULT_MAX_FRAME,
        });
    }
    Ok(bytes)
}

/// Why a request did not get an answer.
enum CallError {
    /// The connection dropped before the answer came.
    Lost,
    /// The broker answered with an error.
    Queue(QueueError),
}

impl Conn {
    /// Registers who awaits the reply to request `id` and queues its frame for sending. If
    /// the connection is gone, the awaiting side learns it as from a dropped connection.
    async fn send(&self, id: i64, bytes: Bytes, awaiting: Awaiting) -> Result<(), CallError> {
        self.pending.lock().insert(id, awaiting);
        if self.out.send(bytes).await.is_err() {
            let awaiting = self.pending.lock().remove(&id);
            if let Some(awaiting) = awaiting {
                awaiting.lost();
            }
            return Err(CallError::Lost);
        }
        Ok(())
    }

    async fn call(&self, request: Request) -> Result<Reply, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let bytes = encode_frame(&ClientFrame { id, request }).map_err(CallError::Queue)?;
        self.send(id, bytes, Awaiting::Caller(tx)).await?;
        match rx.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(CallError::Queue(e)),
            Err(_) => Err(CallError::Lost),
        }
    }

    fn fail_all(&self) {
        self.alive.store(false, Ordering::Release);
        let pending: Vec<Awaiting> = self.pending.lock().drain().map(|(_, a)| a).collect();
        for awaiting in pending {
            awaiting.lost();
        }
        self.closing.notify_one();
    }
}

struct LocalSub {
    spec: ChannelSpec,
    max_parallel: u32,
    tx: mpsc::UnboundedSender<(u64, RawDelivery)>,
    /// The connection generation its current server subscription belongs to.
    generation: Arc<AtomicU64>,
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

type Waiting = (usize, oneshot::Sender<Result<Vec<Receipt>, QueueError>>);

/// Produces of one channel waiting to be sent: the client-side half of group commit.
///
/// A produce spawns a flusher when none is pending and fewer than [`IN_FLIGHT`] requests of
/// the channel are out; produces arriving before the flusher runs join its request. The
/// producers woken together by one reply go back together in one request, and produces
/// that find every slot taken join the request sent when the next reply frees one, so the
/// broker's commits stay few and full.
struct ChannelBatch {
    spec: ChannelSpec,
    messages: Vec<Outgoing>,
    waiting: Vec<Waiting>,
    /// A flusher is spawned and has not yet taken the waiting produces.
    pending: bool,
    /// Flushers spawned and requests out, each holding a [`Slot`].
    in_flight: usize,
}

impl ChannelBatch {
    /// Claims a slot for a new flusher if one should start now.
    fn claim(&mut self) -> bool {
        let start = !self.pending && !self.waiting.is_empty() && self.in_flight < IN_FLIGHT;
        if start {
            self.pending = true;
            self.in_flight += 1;
        }
        start
    }
}

/// Produce requests of one channel out at once. Two keep the broker's disk busy, one
/// request being committed while the next waits, and going beyond two would split the
/// producers into more, smaller commits.
const IN_FLIGHT: usize = 2;

/// A produce request's claim on one of its channel's [`IN_FLIGHT`] slots, given back when
/// the request has been answered, failed, or was never sent.
struct Slot {
    inner: std::sync::Weak<Inner>,
    channel: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let start = {
            let mut batches = inner.batches.lock();
            let Some(b) = batches.get_mut(&self.channel) else {
                return;
            };
            b.in_flight -= 1;
            b.claim()
        };
        if start && let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(flush(inner, std::mem::take(&mut self.channel)));
        } else if start {
            // No runtime to send from: give the claim back.
            let mut batches = inner.batches.lock();
            if let Some(b) = batches.get_mut(&self.channel) {
                b.pending = false;
                b.in_flight -= 1;
            }
        }
    }
}

/// How many times a flusher yields, at most, for more produces to join its request.
const GATHER_ROUNDS: usize = 4;

/// Settles waiting to be sent, gathered like produces: one flusher at a time is spawned and
/// takes every settle made before it runs.
#[derive(Default)]
struct SettleBatch {
    waiting: Vec<(WireSettle, Settler)>,
    /// A flusher is spawned and has not yet taken the waiting settles.
    pending: bool,
}

/// The most settles one `settle_many` carries.
const BATCH_SETTLES: usize = 4096;

/// The most messages or bytes one produce request carries.
const BATCH_MESSAGES: usize = 1024;
const BATCH_BYTES: usize = 4 << 20;

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
                subs: Mutex::new(HashMap::new()),
                next_local: AtomicU64::new(1),
                generation: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                reconnect: Arc::new(tokio::sync::Notify::new()),
                batches: Mutex::new(HashMap::new()),
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

async fn open_stream(target: &Target) -> std::io::Result<Box<dyn Stream>> {
    match target {
        Target::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Target::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        #[cfg(feature = "tls")]
        Target::Tls { address, ca } => {
            let connector = crate::broker::tls::connector(ca).map_err(std::io::Error::other)?;
            let name = crate::broker::tls::server_name(address).map_err(std::io::Error::other)?;
            let s = tokio::net::TcpStream::connect(address).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(connector.connect(name, s).await?))
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Inner {
    /// The live connection, connecting (with backoff, up to the connect timeout) if needed.
    async fn connection(self: &Arc<Self>) -> Result<Arc<Conn>, QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        let deadline = tokio::time::Instant::now() + self.options.connect_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.handshake().await {
                Ok(conn) => {
                    *slot = Some(conn.clone());
                    *self.current.lock() = Some(conn.clone());
                    drop(slot);
                    self.resubscribe(&conn).await;
                    return Ok(conn);
                }
                Err(e @ (QueueError::Unauthorized(_) | QueueError::Protocol(_))) => return Err(e),
                Err(e) => {
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, ?pause, "broker unreachable, retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return Err(QueueError::Closed);
            }
        }
    }

    async fn handshake(self: &Arc<Self>) -> Result<Arc<Conn>, QueueError> {
        let stream = open_stream(&self.target).await?;
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(self.options.max_frame)
            .new_codec();
        let (mut sink, mut frames) = Framed::new(stream, codec).split();
        let (out, mut out_rx) = mpsc::channel::<Bytes>(4096);
        tokio::spawn(async move {
            while let Some(first) = out_rx.recv().await {
                if sink.feed(first).await.is_err() {
                    return;
                }
                while let Ok(more) = out_rx.try_recv() {
                    if sink.feed(more).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let conn = Arc::new(Conn {
            out,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicI64::new(1),
            alive: AtomicBool::new(true),
            generation,
            subs: Mutex::new(HashMap::new()),
            closing: tokio::sync::Notify::new(),
        });
        let reader_conn = conn.clone();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    () = reader_conn.closing.notified() => break,
                    frame = frames.next() => frame,
                };
                let Some(Ok(bytes)) = frame else { break };
                let Ok(frame) = protocol::decode::<ServerFrame>(&bytes) else {
                    tracing::warn!("malformed frame from the broker; reconnecting");
                    break;
                };
                match frame {
                    ServerFrame::Reply { id, reply } => {
                        let awaiting = reader_conn.pending.lock().remove(&id);
                        if let Some(awaiting) = awaiting {
                            awaiting.answer(Ok(reply));
                        }
                    }
                    ServerFrame::Error {
                        id: 0,
                        code,
                        message,
                    } => {
                        tracing::warn!(code = %code, message = %message, "the broker closed the connection");
                        let err = error_from(&code, message, None);
                        let pending: Vec<Awaiting> =
                            reader_conn.pending.lock().drain().map(|(_, a)| a).collect();
                        for awaiting in pending {
                            awaiting.answer(Err(copy_of(&err)));
                        }
                        break;
                    }
                    ServerFrame::Error { id, code, message } => {
                        let awaiting = reader_conn.pending.lock().remove(&id);
                        if let Some(awaiting) = awaiting {
                            awaiting.answer(Err(error_from(&code, message, None)));
                        }
                    }
                    ServerFrame::Delivery { sub, delivery } => {
                        let Some(inner) = weak.upgrade() else { break };
                        let local = reader_conn.subs.lock().get(&sub).copied();
                        if let Some(local) = local
                            && let Some(s) = inner.subs.lock().get(&local)
                        {
                            let _ = s.tx.send((reader_conn.generation, delivery.into()));
                        }
                    }
                }
            }
            reader_conn.fail_all();
            // Reconnect at once if subscriptions are waiting for deliveries.
            if let Some(inner) = weak.upgrade()
                && !inner.closed.load(Ordering::Acquire)
                && !inner.subs.lock().is_empty()
            {
                inner.reconnect.notify_one();
            }
        });
        let hello = Request::Hello {
            version: protocol::VERSION,
            token: self.options.token.clone(),
            client: format!("queue-runtime/{}", env!("CARGO_PKG_VERSION")),
        };
        match conn.call(hello).await {
            Ok(Reply::Welcome { .. }) => Ok(conn),
            Ok(other) => Err(QueueError::Protocol(format!(
                "unexpected handshake reply {other:?}"
            ))),
            Err(CallError::Queue(e)) => Err(e),
            Err(CallError::Lost) => Err(lost()),
        }
    }

    async fn resubscribe(self: &Arc<Self>, conn: &Arc<Conn>) {
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

    /// Sends a dead-letter operation (not retried: it is not idempotent) and reads its count.
    async fn count(self: &Arc<Self>, request: Request) -> Result<u64, QueueError> {
        match self.call(request, false).await? {
            Reply::Count { count } => Ok(count.max(0) as u64),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request, reconnecting and retrying it when `retry` says the request is safe
    /// to send again.
    async fn call(self: &Arc<Self>, request: Request, retry: bool) -> Result<Reply, QueueError> {
        let mut attempts = 0;
        loop {
            let conn = self.connection().await?;
            match conn.call(request.clone()).await {
                Ok(r) => return Ok(r),
                Err(CallError::Queue(e)) => return Err(e),
                Err(CallError::Lost) => {
                    attempts += 1;
                    if !retry || attempts > 20 {
                        return Err(lost());
                    }
                }
            }
        }
    }
}

async fn subscribe_on(
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

struct RemoteSubscription {
    inner: Arc<Inner>,
    local: u64,
    generation: Arc<AtomicU64>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(u64, RawDelivery)>>>,
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
                    return Ok(d);
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
                if from == generation.load(Ordering::Acquire) {
                    let request = Request::Settle {
                        lease: WireLease::from(&d.lease),
                        outcome: Outcome::Release.into(),
                    };
                    let _ = conn.call(request).await;
                }
            }
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

/// Lets the tasks woken alongside this one join its request: yields while the number
/// `waiting` reports keeps growing.
async fn gather(waiting: impl Fn() -> usize) {
    let mut seen = waiting();
    for _ in 0..GATHER_ROUNDS {
        tokio::task::yield_now().await;
        let now = waiting();
        if now == seen {
            break;
        }
        seen = now;
    }
}

fn spawn_settle_flush(inner: Arc<Inner>) {
    tokio::spawn(flush_settles(inner));
}

/// Sends the settles waiting now as one `settle_many`.
async fn flush_settles(inner: Arc<Inner>) {
    gather(|| inner.settles.lock().waiting.len()).await;
    let (settles, settlers): (Vec<WireSettle>, Vec<Settler>) = {
        let mut b = inner.settles.lock();
        let n = b.waiting.len().min(BATCH_SETTLES);
        let taken: Vec<_> = b.waiting.drain(..n).collect();
        b.pending = !b.waiting.is_empty();
        if b.pending {
            spawn_settle_flush(inner.clone());
        }
        taken.into_iter().unzip()
    };
    if settlers.is_empty() {
        return;
    }
    let conn = match inner.connection().await {
        Ok(conn) => conn,
        Err(e) => return Awaiting::Settlers(settlers).answer(Err(e)),
    };
    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
    let frame = ClientFrame {
        id,
        request: Request::SettleMany { settles },
    };
    match encode_frame(&frame) {
        // A lost connection fails them as stale, from `Awaiting::lost`.
        Ok(bytes) => {
            let _ = conn.send(id, bytes, Awaiting::Settlers(settlers)).await;
        }
        Err(e) => Awaiting::Settlers(settlers).answer(Err(e)),
    }
}

fn spawn_flush(inner: Arc<Inner>, channel: String) {
    tokio::spawn(flush(inner, channel));
}

/// Sends the produces of `channel` waiting now as one request.
async fn flush(inner: Arc<Inner>, channel: String) {
    let slot = Slot {
        inner: Arc::downgrade(&inner),
        channel: channel.clone(),
    };
    gather(|| {
        inner
            .batches
            .lock()
            .get(&channel)
            .map_or(0, |b| b.waiting.len())
    })
    .await;
    let (spec, messages, waiting) = {
        let mut batches = inner.batches.lock();
        let Some(b) = batches.get_mut(&channel) else {
            return;
        };
        // Take whole produces while they fit in one request.
        let (mut count, mut bytes, mut take) = (0, 0, 0);
        for (n, _) in &b.waiting {
            let size: usize = b.messages[count..count + n]
                .iter()
                .map(|m| m.payload.len())
                .sum();
            if take > 0 && (count + n > BATCH_MESSAGES || bytes + size > BATCH_BYTES) {
                break;
            }
            count += n;
            bytes += size;
            take += 1;
        }
        let messages: Vec<Outgoing> = b.messages.drain(..count).collect();
        let waiting: Vec<Waiting> = b.waiting.drain(..take).collect();
        b.pending = false;
        if b.claim() {
            spawn_flush(inner.clone(), channel.clone());
        }
        (b.spec.clone(), messages, waiting)
    };
    if waiting.is_empty() {
        return;
    }
    let request = Request::Produce {
        spec: (&spec).into(),
        messages: messages.into_iter().map(Into::into).collect(),
        key: Some(produce_key()),
    };
    let conn = match inner.connection().await {
        Ok(conn) => conn,
        Err(e) => return hand_out(waiting, Err(e)),
    };
    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
    let frame = ClientFrame { id, request };
    let bytes = match encode_frame(&frame) {
        Ok(bytes) => bytes,
        Err(e) => return hand_out(waiting, Err(e)),
    };
    let awaiting = Awaiting::Producers(Produce {
        inner: Arc::downgrade(&inner),
        request: frame.request,
        waiting,
        _slot: slot,
    });
    // A lost connection sends the request again on the next one, from `Awaiting::lost`.
    let _ = conn.send(id, bytes, awaiting).await;
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

fn produce_key() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
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
                    });
                b.spec = spec.clone();
                b.waiting.push((batch.len(), tx));
                b.messages.extend(batch);
                b.claim()
            };
            if start {
                spawn_flush(self.inner.clone(), spec.name.to_string());
            }
            rx.await.unwrap_or(Err(QueueError::Closed))
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
            let conn = self.inner.connection().await?;
            if generation.load(Ordering::Acquire) != conn.generation {
                subscribe_on(&conn, local, spec, max_parallel, &generation).await?;
            }
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
            rx.await
                .unwrap_or(Err(QueueError::StaleLease { id: lease.id }))
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
            match self
                .inner
                .call(request, false)
                .await
                .map_err(|e| stale_on_loss(lease, e))?
            {
                Reply::Deadline { deadline } => Ok(deadline.max(0) as u64),
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
        async move {
            let request = Request::Peek {
                channel: channel.into(),
                limit: i64::try_from(limit).unwrap_or(i64::MAX),
            };
            match self.inner.call(request, true).await? {
                Reply::Peeked { messages } => Ok(messages.into_iter().map(Into::into).collect()),
                other => Err(unexpected(&other)),
            }
        }
        .boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        async move {
            let request = Request::DeadLetters {
                channel: channel.into(),
                limit: i64::try_from(limit).unwrap_or(i64::MAX),
            };
            match self.inner.call(request, true).await? {
                Reply::DeadLetters { messages } => {
                    Ok(messages.into_iter().map(Into::into).collect())
                }
                other => Err(unexpected(&other)),
            }
        }
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
