//! The broker server: any adapter (the embedded store in `queue-broker`) behind a socket.
//!
//! Each connection has a reader (this task), a writer task fed by a channel, one task per
//! request (so requests are pipelined and a slow produce does not hold up an ack), and one
//! task per subscription pushing deliveries. Closing a connection aborts its subscription
//! tasks, which drops their subscriptions: every lease they hold is released at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use parking_lot::Mutex;
use queue_core::{Adapter, MessageId, QueueError, Receipt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OnceCell, Semaphore, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::protocol::{
    self, ClientFrame, Reply, Request, ServerFrame, WireError, code, error_code, receipts_to_wire,
};

/// Settings of a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The token clients must present; `None` accepts any client.
    pub token: Option<String>,
    /// The largest frame accepted, checked before anything is allocated for it.
    pub max_frame: usize,
    /// Connections served at once; more are refused with an error frame.
    pub max_connections: usize,
    /// How long a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long a produce key is remembered for idempotent retries.
    pub idempotency_window: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            token: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            idempotency_window: Duration::from_secs(600),
        }
    }
}

/// Counters of a running broker.
#[derive(Debug, Default)]
pub struct BrokerCounters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicI64,
    /// Connections closed for a protocol error, a bad token or a timeout.
    pub rejected: AtomicU64,
    /// Produce requests answered from the idempotency cache.
    pub replayed_produces: AtomicU64,
}

type Remembered = Arc<OnceCell<Vec<Receipt>>>;

/// The longest produce key accepted.
const MAX_PRODUCE_KEY: usize = 128;

/// Produce keys seen recently, so that a produce retried after a reconnect is not stored
/// twice.
#[derive(Default)]
struct Idempotency {
    keys: HashMap<String, Remembered>,
    order: VecDeque<(Instant, String)>,
}

/// A broker serving one adapter.
pub struct Broker {
    adapter: Arc<dyn Adapter>,
    config: BrokerConfig,
    slots: Arc<Semaphore>,
    idempotency: Mutex<Idempotency>,
    /// What the broker has done.
    pub counters: BrokerCounters,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Broker {
    /// A broker over `adapter`.
    pub fn new(adapter: Arc<dyn Adapter>, config: BrokerConfig) -> Arc<Self> {
        Arc::new(Broker {
            adapter,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            idempotency: Mutex::new(Idempotency::default()),
            counters: BrokerCounters::default(),
            shutdown: watch::channel(false).0,
        })
    }

    /// The adapter served.
    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.adapter
    }

    /// Closes every connection (their leases are released) and stops serving.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Accepts connections from `listener` until [`Broker::shutdown`].
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        self.clone().spawn_connection(stream, peer.to_string());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Accepts TLS connections from `listener` until [`Broker::shutdown`]. The TLS handshake
    /// must finish within the handshake timeout.
    #[cfg(feature = "tls")]
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let broker = self.clone();
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let timeout = broker.config.handshake_timeout;
                            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => broker.spawn_connection(tls, peer.to_string()),
                                Ok(Err(e)) => {
                                    broker.counters.rejected.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(peer = %peer, error = %e, "tls handshake failed");
                                }
                                Err(_) => {
                                    broker.counters.rejected.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(peer = %peer, "tls handshake timed out");
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Accepts connections on a Unix socket until [`Broker::shutdown`].
    #[cfg(unix)]
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => self.clone().spawn_connection(stream, "unix".into()),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Serves one already-accepted stream (TCP, Unix or TLS).
    pub fn spawn_connection<S>(self: Arc<Self>, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let permit = self.slots.clone().try_acquire_owned();
            let codec = LengthDelimitedCodec::builder()
                .max_frame_length(self.config.max_frame)
                .new_codec();
            let mut framed = Framed::new(stream, codec);
            let Ok(_permit) = permit else {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %peer, "refusing a connection: too many connections");
                let frame = error_frame(
                    0,
                    code::TOO_MANY_CONNECTIONS,
                    "the broker serves no more connections",
                );
                let _ = framed.send(frame).await;
                return;
            };
            self.counters.open.fetch_add(1, Ordering::Relaxed);
            let reason = Connection::new(self.clone()).run(framed).await;
            self.counters.open.fetch_sub(1, Ordering::Relaxed);
            match reason {
                Ok(()) => tracing::debug!(peer = %peer, "connection closed"),
                Err(e) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %peer, error = %e, "connection closed after an error");
                }
            }
        });
    }

    fn remembered(&self, key: &str) -> Remembered {
        let mut idem = self.idempotency.lock();
        let now = Instant::now();
        while let Some((at, _)) = idem.order.front() {
            if now.duration_since(*at) < self.config.idempotency_window
                && idem.order.len() < 1_000_000
            {
                break;
            }
            let (_, old) = idem.order.pop_front().expect("checked");
            idem.keys.remove(&old);
        }
        if let Some(cell) = idem.keys.get(key) {
            return cell.clone();
        }
        let cell = Remembered::default();
        idem.keys.insert(key.to_string(), cell.clone());
        idem.order.push_back((now, key.to_string()));
        cell
    }
}

/// Completes once shutdown is signalled (or the broker is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn error_frame(id: i64, code: &str, message: &str) -> Bytes {
    protocol::encode(&ServerFrame::Error {
        id,
        code: code.into(),
        message: message.into(),
    })
    .expect("error frames encode")
}

struct Connection {
    broker: Arc<Broker>,
    subs: Arc<Mutex<HashMap<i64, SubControl>>>,
}

/// A subscription's pump task: abort it to close the subscription, or ask it to pause.
struct SubControl {
    abort: AbortHandle,
    pause: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{1}")]
    Protocol(&'static str, String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Connection {
    fn new(broker: Arc<Broker>) -> Self {
        Connection {
            broker,
            subs: Arc::default(),
        }
    }

    async fn run<S>(self, framed: Framed<S, LengthDelimitedCodec>) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = framed.split();
        let (out, mut out_rx) = mpsc::channel::<Bytes>(4096);
        let writer = tokio::spawn(async move {
            while let Some(first) = out_rx.recv().await {
                sink.feed(first).await?;
                while let Ok(more) = out_rx.try_recv() {
                    sink.feed(more).await?;
                }
                sink.flush().await?;
            }
            sink.close().await
        });
        let result = self.serve(&mut stream, &out).await;
        if let Err(ConnError::Protocol(code, message)) = &result {
            let _ = out.send(error_frame(0, code, message)).await;
        }
        for (_, sub) in self.subs.lock().drain() {
            sub.abort.abort();
        }
        drop(out);
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        result
    }

    async fn serve<S>(
        &self,
        stream: &mut futures_util::stream::SplitStream<Framed<S, LengthDelimitedCodec>>,
        out: &mpsc::Sender<Bytes>,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.broker.shutdown.subscribe();
        let first = tokio::time::timeout(self.broker.config.handshake_timeout, stream.next())
            .await
            .map_err(|_| {
                ConnError::Protocol(
                    code::HANDSHAKE,
                    format!(
                        "no handshake within {:?}",
                        self.broker.config.handshake_timeout
                    ),
                )
            })?;
        let hello = match first {
            None => return Ok(()),
            Some(frame) => decode_frame(frame)?,
        };
        let Request::Hello {
            version,
            token,
            client,
        } = hello.request
        else {
            return Err(ConnError::Protocol(
                code::HANDSHAKE,
                "the first frame must be `hello`".into(),
            ));
        };
        if version != protocol::VERSION {
            return Err(ConnError::Protocol(
                code::VERSION,
                format!(
                    "protocol version {version} is not supported (this broker speaks {})",
                    protocol::VERSION
                ),
            ));
        }
        if let Some(expected) = &self.broker.config.token {
            let given = token.unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(ConnError::Protocol(
                    code::UNAUTHORIZED,
                    "wrong or missing token".into(),
                ));
            }
        }
        tracing::debug!(client = %client, "client connected");
        let welcome = ServerFrame::Reply {
            id: hello.id,
            reply: Reply::Welcome {
                version: protocol::VERSION,
                server: format!("queue-broker/{}", env!("CARGO_PKG_VERSION")),
            },
        };
        send(out, &welcome).await;
        // Requests run concurrently inside this task: no task switch per request.
        let mut in_flight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        let result = loop {
            let frame = tokio::select! {
                () = stopped(&mut stop) => break Ok(()),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                frame = stream.next() => frame,
            };
            let Some(frame) = frame else { break Ok(()) };
            match decode_frame(frame) {
                Ok(frame) => {
                    if let Some(work) = self.dispatch(frame, out) {
                        in_flight.push(work);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        // Requests already taken finish even though the connection is gone: a produce that
        // was stored must be remembered for its retry.
        if !in_flight.is_empty() {
            tokio::spawn(async move { while in_flight.next().await.is_some() {} });
        }
        result
    }

    fn dispatch(
        &self,
        frame: ClientFrame,
        out: &mpsc::Sender<Bytes>,
    ) -> Option<BoxFuture<'static, ()>> {
        let id = frame.id;
        let broker = self.broker.clone();
        let out = out.clone();
        match frame.request {
            Request::Subscribe {
                sub: sub_id,
                spec,
                max_parallel,
            } => {
                let subs = self.subs.clone();
                if subs.lock().contains_key(&sub_id) {
                    let e = QueueError::InvalidRequest(format!(
                        "subscription {sub_id} is open already"
                    ));
                    return Some(
                        async move {
                            send(&out, &error_reply(id, &e)).await;
                        }
                        .boxed(),
                    );
                }
                let (pause, mut paused) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
                let task = tokio::spawn(async move {
                    let subscribed = async {
                        let spec = spec.to_spec()?;
                        let max = u32::try_from(max_parallel.clamp(1, 65_536)).unwrap_or(1);
                        broker.adapter.subscribe(&spec, max).await
                    }
                    .await;
                    let sub = match subscribed {
                        Ok(sub) => sub,
                        Err(e) => {
                            send(&out, &error_reply(id, &e)).await;
                            return;
                        }
                    };
                    send(
                        &out,
                        &ServerFrame::Reply {
                            id,
                            reply: Reply::Subscribed { sub: sub_id },
                        },
                    )
                    .await;
                    loop {
                        let next = tokio::select! {
                            biased;
                            ack = paused.recv() => {
                                // Taking is cancel safe: a message is leased and returned in
                                // the same poll, so dropping `next` here loses nothing.
                                if let Some(ack) = ack {
                                    let _ = ack.send(());
                                }
                                std::future::pending::<()>().await;
                                return;
                            }
                            next = sub.next() => next,
                        };
                        match next {
                            Ok(d) => {
                                let frame = ServerFrame::Delivery {
                                    sub: sub_id,
                                    delivery: d.into(),
                                };
                                if !send(&out, &frame).await {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "subscription ended");
                                return;
                            }
                        }
                    }
                });
                subs.lock().insert(
                    sub_id,
                    SubControl {
                        abort: task.abort_handle(),
                        pause,
                    },
                );
            }
            Request::Pause { sub } => {
                let (ack, acked) = oneshot::channel();
                let found = self
                    .subs
                    .lock()
                    .get(&sub)
                    .map(|c| c.pause.send(ack).is_ok())
                    .unwrap_or(false);
                tokio::spawn(async move {
                    if found {
                        let _ = acked.await;
                    }
                    send(
                        &out,
                        &ServerFrame::Reply {
                            id,
                            reply: Reply::Done,
                        },
                    )
                    .await
                });
            }
            Request::Unsubscribe { sub } => {
                if let Some(task) = self.subs.lock().remove(&sub) {
                    task.abort.abort();
                }
                tokio::spawn(async move {
                    send(
                        &out,
                        &ServerFrame::Reply {
                            id,
                            reply: Reply::Done,
                        },
                    )
                    .await
                });
            }
            request => {
                return Some(
                    async move {
                        let frame = match answer(&broker, request).await {
                            Ok(reply) => ServerFrame::Reply { id, reply },
                            Err(e) => error_reply(id, &e),
                        };
                        send(&out, &frame).await;
                    }
                    .boxed(),
                );
            }
        }
        None
    }
}

fn decode_frame(frame: Result<bytes::BytesMut, std::io::Error>) -> Result<ClientFrame, ConnError> {
    let bytes = frame.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            ConnError::Protocol(code::FRAME_TOO_LARGE, e.to_string())
        } else {
            ConnError::Io(e)
        }
    })?;
    protocol::decode::<ClientFrame>(&bytes)
        .map_err(|e| ConnError::Protocol(code::BAD_FRAME, e.to_string()))
}

fn error_reply(id: i64, e: &QueueError) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: error_code(e).into(),
        message: e.to_string(),
    }
}

async fn send(out: &mpsc::Sender<Bytes>, frame: &ServerFrame) -> bool {
    match protocol::encode(frame) {
        Ok(bytes) => out.send(bytes).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            false
        }
    }
}

fn ids(ids: Option<Vec<i64>>) -> Option<Vec<MessageId>> {
    ids.map(|v| v.into_iter().map(|i| MessageId(i as u64)).collect())
}

fn limit(l: i64) -> usize {
    usize::try_from(l.clamp(0, 100_000)).unwrap_or(0)
}

async fn answer(broker: &Broker, request: Request) -> Result<Reply, QueueError> {
    let a = &broker.adapter;
    Ok(match request {
        Request::Produce {
            spec,
            messages,
            key,
        } => {
            let spec = spec.to_spec()?;
            let batch = messages
                .into_iter()
                .map(|m| m.into_outgoing())
                .collect::<Result<Vec<_>, _>>()?;
            for m in &batch {
                if m.payload.len() > queue_core::codec::MAX_PAYLOAD {
                    return Err(QueueError::PayloadTooLarge {
                        size: m.payload.len(),
                        max: queue_core::codec::MAX_PAYLOAD,
                    });
                }
            }
            let receipts = match key {
                Some(key) => {
                    if key.is_empty() || key.len() > MAX_PRODUCE_KEY {
                        return Err(QueueError::InvalidRequest(format!(
                            "a produce key has 1 to {MAX_PRODUCE_KEY} bytes, not {}",
                            key.len()
                        )));
                    }
                    let cell = broker.remembered(&key);
                    let mut ran = false;
                    let window = broker.config.idempotency_window;
                    let r = cell
                        .get_or_try_init(|| {
                            ran = true;
                            a.produce_keyed(&spec, batch, &key, window)
                        })
                        .await?
                        .clone();
                    if !ran {
                        broker
                            .counters
                            .replayed_produces
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }
                None => a.produce(&spec, batch).await?,
            };
            Reply::Receipts {
                receipts: receipts_to_wire(&receipts),
            }
        }
        Request::Settle { lease, outcome } => {
            a.settle(&lease.into(), outcome.into()).await?;
            Reply::Done
        }
        Request::SettleMany { settles } => {
            // Settled together, so that they share the store's group commits.
            let settled = settles
                .into_iter()
                .map(|s| async move { a.settle(&s.lease.into(), s.outcome.into()).await });
            let errors = futures_util::future::join_all(settled)
                .await
                .into_iter()
                .map(|r| {
                    r.err().map(|e| WireError {
                        code: error_code(&e).into(),
                        message: e.to_string(),
                    })
                })
                .collect();
            Reply::Settled { errors }
        }
        Request::Extend { lease, by_ms } => {
            let deadline = a
                .extend(&lease.into(), Duration::from_millis(by_ms.max(0) as u64))
                .await?;
            Reply::Deadline {
                deadline: deadline as i64,
            }
        }
        Request::Stats => Reply::Stats {
            channels: a.stats().await?.into_iter().map(Into::into).collect(),
        },
        Request::Peek { channel, limit: l } => Reply::Peeked {
            messages: a
                .peek(&channel, limit(l))
                .await?
                .into_iter()
                .map(Into::into)
                .collect(),
        },
        Request::DeadLetters { channel, limit: l } => Reply::DeadLetters {
            messages: a
                .dead_letters(&channel, limit(l))
                .await?
                .into_iter()
                .map(Into::into)
                .collect(),
        },
        Request::Redrive { channel, ids: i } => {
            let i = ids(i);
            Reply::Count {
                count: a.redrive(&channel, i.as_deref()).await? as i64,
            }
        }
        Request::Purge { channel, ids: i } => {
            let i = ids(i);
            Reply::Count {
                count: a.purge_dead(&channel, i.as_deref()).await? as i64,
            }
        }
        Request::Ping => Reply::Pong,
        Request::Hello { .. } => {
            return Err(QueueError::Protocol("`hello` was already sent".into()));
        }
        Request::Subscribe { .. } | Request::Pause { .. } | Request::Unsubscribe { .. } => {
            unreachable!("handled by the connection")
        }
    })
}
