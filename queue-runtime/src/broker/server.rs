//! The broker server: any adapter (the embedded store in `queue-broker`) behind a socket.
//!
//! Each connection has a reader (its task), a writer task fed by an outbox bounded in bytes
//! ([`transport::Outbox`]), its requests (run concurrently inside the reader's task, at
//! most `max_in_flight` at once: at the cap the reader stops reading the socket), and one
//! task per subscription pushing deliveries. Closing a connection aborts its subscription
//! tasks, which drops their subscriptions: every lease they hold is released at once.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use queue_core::clock::{Clock, Timestamp};

use crate::engine::KeyWindow;
use queue_core::{Adapter, ChannelSpec, Lease, MessageId, QueueError, Receipt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OnceCell, Semaphore, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

use super::protocol::{
    self, ClientFrame, Incoming, ProduceFrame, Reply, Request, ServerFrame, WireDelivery,
    WireError, WireOutgoing, code, receipts_to_wire,
};
use super::transport::{self, Acceptor, BoxStream, Leases, Outbox, WriteEnd};

/// Settings of a broker. Every limit holds per connection unless it says otherwise.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The token clients must present; `None` accepts any client.
    pub token: Option<String>,
    /// The largest frame accepted, checked before anything is allocated for it.
    pub max_frame: usize,
    /// The largest frame accepted before `hello` succeeded.
    pub max_hello_frame: usize,
    /// Connections served at once (for the whole broker); more are refused with an error
    /// frame.
    pub max_connections: usize,
    /// Requests of one connection being served at once; at the cap the broker stops
    /// reading the connection until one finishes.
    pub max_in_flight: usize,
    /// Bytes of request frames being served at once; as `max_in_flight`.
    pub max_in_flight_bytes: usize,
    /// Bytes of frames queued for a connection and not yet written; replies and deliveries
    /// wait for room.
    pub max_outbound_bytes: usize,
    /// Subscriptions open on one connection.
    pub max_subscriptions: usize,
    /// The largest `max_parallel` of a subscription.
    pub max_parallel: u32,
    /// The most bytes of messages in one page of `peek` or `dead_letters`.
    pub max_page_bytes: usize,
    /// How long a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// A connection the broker hears nothing from for this long, or that takes no frame
    /// for this long while frames wait for it, is dropped. Clients ping well within it.
    pub idle_timeout: Duration,
    /// TCP keepalive probes start after the connection is quiet this long.
    pub keepalive: Duration,
    /// How long a produce key is remembered for idempotent retries.
    pub idempotency_window: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            token: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            max_hello_frame: protocol::DEFAULT_MAX_HELLO_FRAME,
            max_connections: 1024,
            max_in_flight: 256,
            max_in_flight_bytes: 64 << 20,
            max_outbound_bytes: 32 << 20,
            max_subscriptions: 256,
            max_parallel: 4096,
            max_page_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(10),
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
    /// Connections dropped for silence or for not reading (`idle_timeout`).
    pub idle: AtomicU64,
    /// Produce requests answered from the idempotency cache.
    pub replayed_produces: AtomicU64,
    /// Produce requests received; against the messages produced, how well clients gather.
    pub produce_requests: AtomicU64,
}

type Remembered = Arc<OnceCell<Vec<Receipt>>>;

/// Produce keys remembered at most.
const MAX_PRODUCE_KEYS: usize = 1_000_000;

/// A broker serving one adapter.
pub struct Broker {
    adapter: Arc<dyn Adapter>,
    config: BrokerConfig,
    slots: Arc<Semaphore>,
    /// Produce keys seen recently, so that a produce retried after a reconnect is not
    /// stored twice.
    idempotency: Mutex<KeyWindow<Arc<str>, Remembered>>,
    /// What the broker has done.
    pub counters: BrokerCounters,
    shutdown: watch::Sender<bool>,
    failure: OnceLock<String>,
    /// The adapter's clock, to tell clients how long a lease has left.
    clock: Option<Arc<dyn Clock>>,
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
    /// A broker over `adapter`. Without the adapter's clock (see [`Broker::with_clock`]) a
    /// lease is announced as valid for its whole duration from when the broker sends it.
    pub fn new(adapter: Arc<dyn Adapter>, config: BrokerConfig) -> Arc<Self> {
        Self::build(adapter, config, None)
    }

    /// A broker over `adapter`, whose time rules read `clock`: a lease is announced as
    /// valid until its deadline on that clock.
    pub fn with_clock(
        adapter: Arc<dyn Adapter>,
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Self::build(adapter, config, Some(clock))
    }

    fn build(
        adapter: Arc<dyn Adapter>,
        config: BrokerConfig,
        clock: Option<Arc<dyn Clock>>,
    ) -> Arc<Self> {
        Arc::new(Broker {
            clock,
            adapter,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            idempotency: Mutex::new(KeyWindow::new(MAX_PRODUCE_KEYS)),
            counters: BrokerCounters::default(),
            shutdown: watch::channel(false).0,
            failure: OnceLock::new(),
        })
    }

    /// The adapter served.
    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.adapter
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// How long a lease lapsing at `deadline` has left: by the adapter's clock, or
    /// `otherwise` without one.
    fn left(&self, deadline: Timestamp, otherwise: Duration) -> Duration {
        match &self.clock {
            Some(clock) => Duration::from_millis(deadline.saturating_sub(clock.now())),
            None => otherwise,
        }
    }

    /// Closes every connection (their leases are released) and stops serving.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Completes once the broker stops serving: after [`Broker::shutdown`], or after the
    /// store failed for good (see [`Broker::failure`]).
    pub async fn stopped(&self) {
        stopped(&mut self.shutdown.subscribe()).await;
    }

    /// Why the broker stopped on its own: the store reported itself poisoned. A supervisor
    /// restarts the broker on the same data.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Notes an error of the store; a poisoned store stops the broker.
    fn check(&self, e: &QueueError) {
        if let QueueError::Poisoned(cause) = e {
            if self.failure.set(cause.clone()).is_ok() {
                tracing::error!(cause = %cause, "the store is poisoned; the broker stops");
            }
            self.shutdown();
        }
    }

    /// Accepts connections from `listener` until [`Broker::shutdown`].
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let keepalive = self.config.keepalive;
        self.serve(transport::TcpAcceptor {
            listener,
            keepalive,
        })
        .await;
    }

    /// Accepts TLS connections from `listener` until [`Broker::shutdown`]. The TLS handshake
    /// must finish within the handshake timeout.
    #[cfg(feature = "tls")]
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let keepalive = self.config.keepalive;
        self.serve(transport::TlsAcceptor {
            listener,
            acceptor,
            keepalive,
        })
        .await;
    }

    /// Accepts connections on a Unix socket until [`Broker::shutdown`].
    #[cfg(unix)]
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        self.serve(transport::UnixAcceptor(listener)).await;
    }

    /// The accept loop of every listener: each connection is set up (TLS: its handshake,
    /// within the handshake timeout) and served on its own task.
    pub async fn serve(self: Arc<Self>, mut acceptor: impl Acceptor) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return,
                accepted = acceptor.accept() => match accepted {
                    Ok((upgrading, peer)) => {
                        let broker = self.clone();
                        tokio::spawn(async move {
                            let timeout = broker.config.handshake_timeout;
                            match tokio::time::timeout(timeout, upgrading).await {
                                Ok(Ok(stream)) => broker.run_connection(stream, peer).await,
                                Ok(Err(e)) => {
                                    broker.counters.rejected.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(peer = %peer, error = %e, "connection setup failed");
                                }
                                Err(_) => {
                                    broker.counters.rejected.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(peer = %peer, "connection setup timed out");
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

    /// Serves one already-accepted stream (TCP, Unix or TLS) on a task of its own.
    pub fn spawn_connection<S>(self: Arc<Self>, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(self.run_connection(Box::new(stream), peer));
    }

    async fn run_connection(self: Arc<Self>, stream: BoxStream, peer: String) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let (read, write) = tokio::io::split(stream);
        let (outbox, rx) = Outbox::new(self.config.max_outbound_bytes);
        let stall = self.config.idle_timeout;
        let writer = tokio::spawn(transport::write_frames(write, rx, stall));
        let Ok(_permit) = self.slots.clone().try_acquire_owned() else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            let e = WireError::new(
                code::TOO_MANY_CONNECTIONS,
                format!(
                    "the broker serves at most {} connections",
                    self.config.max_connections
                ),
            );
            outbox.send(error_frame(0, e)).await;
            drop(outbox);
            let _ = writer.await;
            return;
        };
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        let reader = FramedRead::new(read, transport::codec(self.config.max_hello_frame));
        let reason = Connection::new(self.clone(), outbox, writer)
            .run(reader)
            .await;
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
        match reason {
            Ok(()) => tracing::debug!(peer = %peer, "connection closed"),
            Err(e) => {
                if matches!(e, ConnError::Protocol(code::IDLE_TIMEOUT, _)) {
                    self.counters.idle.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(peer = %peer, error = %e, "connection closed after an error");
            }
        }
    }

    fn remembered(&self, key: &str) -> Remembered {
        let now = match &self.clock {
            Some(clock) => clock.now(),
            None => crate::SystemClock.now(),
        };
        let mut keys = self.idempotency.lock();
        if let Some(cell) = keys.get(key, now) {
            return cell.clone();
        }
        let cell = Remembered::default();
        let end = now.saturating_add(queue_core::clock::millis(self.config.idempotency_window));
        keys.insert(key.into(), cell.clone(), end, now);
        cell
    }
}

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

fn error_frame(id: i64, error: WireError) -> bytes::Bytes {
    protocol::encode(&ServerFrame::Error { id, error }).expect("error frames encode")
}

type Reader = FramedRead<tokio::io::ReadHalf<BoxStream>, tokio_util::codec::LengthDelimitedCodec>;

struct Connection {
    broker: Arc<Broker>,
    out: Outbox,
    writer: Option<tokio::task::JoinHandle<WriteEnd>>,
    subs: Arc<Mutex<HashMap<i64, SubControl>>>,
    leases: Arc<Leases>,
    next_serial: u64,
    /// The spec of the last produce, with its bytes.
    last_spec: Option<(Vec<u8>, Arc<ChannelSpec>)>,
}

/// A subscription's pump task: abort it to close the subscription, or ask it to pause.
struct SubControl {
    serial: u64,
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
    fn new(broker: Arc<Broker>, out: Outbox, writer: tokio::task::JoinHandle<WriteEnd>) -> Self {
        Connection {
            broker,
            out,
            writer: Some(writer),
            subs: Arc::default(),
            leases: Arc::default(),
            next_serial: 0,
            last_spec: None,
        }
    }

    async fn run(mut self, mut reader: Reader) -> Result<(), ConnError> {
        let mut result = self.serve(&mut reader).await;
        if let Err(ConnError::Protocol(code, message)) = &result {
            let frame = error_frame(0, WireError::new(code, message.clone()));
            // A peer that does not read gets no goodbye.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.out.send(frame)).await;
        }
        // Nothing more is queued; what is queued is still written.
        self.out.close();
        for (_, sub) in self.subs.lock().drain() {
            sub.abort.abort();
        }
        let writer = self.writer.take().expect("one run");
        drop(self);
        if let Ok(Ok(WriteEnd::Stalled)) =
            tokio::time::timeout(Duration::from_secs(5), writer).await
            && result.is_ok()
        {
            result = Err(stalled());
        }
        result
    }

    async fn serve(&mut self, reader: &mut Reader) -> Result<(), ConnError> {
        let config = self.broker.config.clone();
        let mut stop = self.broker.shutdown.subscribe();
        let first = tokio::time::timeout(config.handshake_timeout, reader.next())
            .await
            .map_err(|_| {
                ConnError::Protocol(
                    code::HANDSHAKE,
                    format!("no handshake within {:?}", config.handshake_timeout),
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
                    "protocol version {version} is not supported: this broker speaks version {}; \
                     upgrade the client",
                    protocol::VERSION
                ),
            ));
        }
        if let Some(expected) = &config.token {
            let given = token.unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(ConnError::Protocol(
                    code::UNAUTHORIZED,
                    "wrong or missing token".into(),
                ));
            }
        }
        tracing::debug!(client = %client, "client connected");
        reader.decoder_mut().set_max_frame_length(config.max_frame);
        let welcome = ServerFrame::Reply {
            id: hello.id,
            reply: Reply::Welcome {
                version: protocol::VERSION,
                server: format!("queue-broker/{}", env!("CARGO_PKG_VERSION")),
                idle_timeout_ms: ms(config.idle_timeout),
                max_frame: config.max_frame as i64,
            },
        };
        send(&self.out, &welcome).await;
        // Requests run concurrently inside this task: no task switch per request. Each
        // yields the size of its frame when done.
        let mut in_flight: FuturesUnordered<BoxFuture<'static, usize>> = FuturesUnordered::new();
        let mut bytes_in_flight = 0usize;
        let mut heard = Instant::now();
        let mut tick =
            tokio::time::interval((config.idle_timeout / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let room = in_flight.len() < config.max_in_flight
                && bytes_in_flight < config.max_in_flight_bytes;
            let frame = tokio::select! {
                () = stopped(&mut stop) => break Ok(()),
                Some(n) = in_flight.next(), if !in_flight.is_empty() => {
                    bytes_in_flight -= n;
                    continue;
                }
                frame = reader.next(), if room => frame,
                _ = tick.tick() => {
                    if !room {
                        // Not reading: the peer is waiting on us, not idle.
                        heard = Instant::now();
                    } else if heard.elapsed() > config.idle_timeout {
                        break Err(ConnError::Protocol(
                            code::IDLE_TIMEOUT,
                            format!("nothing heard for {:?}", config.idle_timeout),
                        ));
                    }
                    if self.out.is_closed() {
                        break Err(stalled());
                    }
                    continue;
                }
            };
            heard = Instant::now();
            let Some(frame) = frame else { break Ok(()) };
            let taken = frame_bytes(frame).and_then(|bytes| Ok((bytes.len(), self.take(&bytes)?)));
            match taken {
                Ok((_, None)) => {}
                Ok((size, Some(work))) => {
                    bytes_in_flight += size;
                    in_flight.push(work.map(move |()| size).boxed());
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

    /// Starts serving a request frame; `None` when it needs no task.
    fn take(&mut self, bytes: &[u8]) -> Result<Option<BoxFuture<'static, ()>>, ConnError> {
        let bad = |e: QueueError| ConnError::Protocol(code::BAD_FRAME, e.to_string());
        match Incoming::decode(bytes).map_err(bad)? {
            Incoming::Produce(frame) => {
                self.broker
                    .counters
                    .produce_requests
                    .fetch_add(1, Ordering::Relaxed);
                let spec = self.spec_of(&frame).map_err(bad)?;
                Ok(Some(self.produce(
                    frame.id,
                    spec,
                    frame.messages,
                    frame.key,
                )))
            }
            Incoming::Other(frame) => Ok(self.dispatch(frame)),
        }
    }

    /// The spec of a produce: the connection's last one when the bytes are the same, else
    /// read from them. Outer error: the bytes are malformed; inner: the spec is refused.
    fn spec_of(
        &mut self,
        frame: &ProduceFrame<'_>,
    ) -> Result<Result<Arc<ChannelSpec>, QueueError>, QueueError> {
        if let Some((raw, spec)) = &self.last_spec
            && raw.as_slice() == frame.spec
        {
            return Ok(Ok(spec.clone()));
        }
        Ok(frame.wire_spec()?.to_spec().map(|spec| {
            let spec = Arc::new(spec);
            self.last_spec = Some((frame.spec.to_vec(), spec.clone()));
            spec
        }))
    }

    fn produce(
        &self,
        id: i64,
        spec: Result<Arc<ChannelSpec>, QueueError>,
        messages: Vec<WireOutgoing>,
        key: Option<String>,
    ) -> BoxFuture<'static, ()> {
        let broker = self.broker.clone();
        let out = self.out.clone();
        async move {
            let stored = match spec {
                Ok(spec) => produce(&broker, &spec, messages, key).await,
                Err(e) => Err(e),
            };
            let frame = match stored {
                Ok(receipts) => protocol::hot::receipts(id, &receipts),
                Err(e) => {
                    broker.check(&e);
                    error_frame(id, WireError::from(&e))
                }
            };
            out.send(frame).await;
        }
        .boxed()
    }

    fn dispatch(&mut self, frame: ClientFrame) -> Option<BoxFuture<'static, ()>> {
        let id = frame.id;
        let broker = self.broker.clone();
        let out = self.out.clone();
        let refuse = |out: Outbox, e: WireError| -> Option<BoxFuture<'static, ()>> {
            Some(
                async move {
                    out.send(error_frame(id, e)).await;
                }
                .boxed(),
            )
        };
        match frame.request {
            Request::Subscribe {
                sub: sub_id,
                spec,
                max_parallel,
            } => {
                let config = &self.broker.config;
                let subs = self.subs.clone();
                if subs.lock().contains_key(&sub_id) {
                    let e = QueueError::InvalidRequest(format!(
                        "subscription {sub_id} is open already"
                    ));
                    return refuse(out, WireError::from(&e));
                }
                if subs.lock().len() >= config.max_subscriptions {
                    let e = WireError::new(
                        code::LIMIT,
                        format!(
                            "at most {} subscriptions per connection (--max-subscriptions)",
                            config.max_subscriptions
                        ),
                    );
                    return refuse(out, e);
                }
                if max_parallel < 1 || max_parallel > i64::from(config.max_parallel) {
                    let e = WireError::new(
                        code::LIMIT,
                        format!(
                            "max_parallel must be 1 to {} (--max-parallel), not {max_parallel}",
                            config.max_parallel
                        ),
                    );
                    return refuse(out, e);
                }
                let spec = match spec.to_spec() {
                    Ok(spec) => spec,
                    Err(e) => return refuse(out, WireError::from(&e)),
                };
                let max = u32::try_from(max_parallel).unwrap_or(1);
                self.next_serial += 1;
                let serial = self.next_serial;
                let (pause, paused) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
                let leases = self.leases.clone();
                // Held until the task is recorded, so that a task ending at once finds
                // its entry to remove.
                let mut recorded = self.subs.lock();
                let task = tokio::spawn(async move {
                    let ended = pump(&broker, &out, &leases, id, sub_id, spec, max, paused).await;
                    if let Err((e, opened)) = ended {
                        broker.check(&e);
                        tracing::info!(sub = sub_id, error = %e, "subscription ended");
                        {
                            let mut subs = subs.lock();
                            if subs.get(&sub_id).is_some_and(|c| c.serial == serial) {
                                subs.remove(&sub_id);
                            }
                        }
                        // Removed first, so the client may open it again at once.
                        let frame = if opened {
                            ServerFrame::Ended {
                                sub: sub_id,
                                error: WireError::from(&e),
                            }
                        } else {
                            error_reply(id, &e)
                        };
                        send(&out, &frame).await;
                    }
                });
                recorded.insert(
                    sub_id,
                    SubControl {
                        serial,
                        abort: task.abort_handle(),
                        pause,
                    },
                );
                None
            }
            Request::Pause { sub } => {
                let (ack, acked) = oneshot::channel();
                let found = self
                    .subs
                    .lock()
                    .get(&sub)
                    .map(|c| c.pause.send(ack).is_ok())
                    .unwrap_or(false);
                Some(
                    async move {
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
                        .await;
                    }
                    .boxed(),
                )
            }
            Request::Unsubscribe { sub } => {
                if let Some(task) = self.subs.lock().remove(&sub) {
                    task.abort.abort();
                }
                Some(
                    async move {
                        send(
                            &out,
                            &ServerFrame::Reply {
                                id,
                                reply: Reply::Done,
                            },
                        )
                        .await;
                    }
                    .boxed(),
                )
            }
            request => {
                let leases = self.leases.clone();
                Some(
                    async move {
                        let frame = match answer(&broker, &leases, request).await {
                            Ok(reply) => ServerFrame::Reply { id, reply },
                            Err(e) => {
                                broker.check(&e);
                                error_reply(id, &e)
                            }
                        };
                        send(&out, &frame).await;
                    }
                    .boxed(),
                )
            }
        }
    }
}

fn stalled() -> ConnError {
    ConnError::Protocol(
        code::IDLE_TIMEOUT,
        "the peer took no frame within the idle timeout".into(),
    )
}

/// Runs subscription `sub_id`: answers the `subscribe` request `id`, then pushes
/// deliveries until paused (then waits to be aborted) or the subscription fails, returning
/// why and whether it had opened.
#[expect(clippy::too_many_arguments, reason = "the parts of one subscription")]
async fn pump(
    broker: &Broker,
    out: &Outbox,
    leases: &Leases,
    id: i64,
    sub_id: i64,
    spec: queue_core::ChannelSpec,
    max: u32,
    mut paused: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) -> Result<(), (QueueError, bool)> {
    let sub = broker
        .adapter
        .subscribe(&spec, max)
        .await
        .map_err(|e| (e, false))?;
    // Deliveries are pushed as long as the subscription has room, so a settle may refill it.
    sub.take_ahead();
    send(
        out,
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
                // Taking is cancel safe: a message is leased and returned in the same poll,
                // so dropping `next` here loses nothing.
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                std::future::pending::<()>().await;
                return Ok(());
            }
            next = sub.next() => next,
        };
        match next {
            Ok(d) => {
                leases.hand(&d.lease, spec.lease);
                let Some(room) = out.reserve(d.payload.len() + 256).await else {
                    return Ok(());
                };
                let valid = broker.left(d.deadline, spec.lease);
                let frame = protocol::hot::delivery(sub_id, &WireDelivery::new(d, valid));
                if !out.push(frame, room) {
                    return Ok(());
                }
            }
            Err(e) => return Err((e, true)),
        }
    }
}

fn frame_bytes(
    frame: Result<bytes::BytesMut, std::io::Error>,
) -> Result<bytes::BytesMut, ConnError> {
    frame.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            ConnError::Protocol(code::FRAME_TOO_LARGE, e.to_string())
        } else {
            ConnError::Io(e)
        }
    })
}

fn decode_frame(frame: Result<bytes::BytesMut, std::io::Error>) -> Result<ClientFrame, ConnError> {
    let bytes = frame_bytes(frame)?;
    ClientFrame::decode(&bytes).map_err(|e| ConnError::Protocol(code::BAD_FRAME, e.to_string()))
}

fn error_reply(id: i64, e: &QueueError) -> ServerFrame {
    ServerFrame::Error {
        id,
        error: WireError::from(e),
    }
}

async fn send(out: &Outbox, frame: &ServerFrame) -> bool {
    match protocol::encode(frame) {
        Ok(bytes) => out.send(bytes).await,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            false
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn ids(ids: Option<Vec<i64>>) -> Option<Vec<MessageId>> {
    ids.map(|v| v.into_iter().map(|i| MessageId(i as u64)).collect())
}

/// The most entries in one page of a listing.
const PAGE_ENTRIES: usize = 1000;

/// The bytes an entry of a listing takes besides its payload and texts.
const ENTRY_OVERHEAD: usize = 160;

/// One page of a listing: up to `limit` entries starting `offset` into it, cut so their
/// bytes stay within `max_bytes` (the first entry always goes). The adapter lists from the
/// start, so the broker asks it for `offset` plus a window that grows while the page has
/// room. Returns the entries and the offset of the next page, if the caller wants more and
/// there are more.
async fn page<T, F>(
    limit: i64,
    offset: i64,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
    fetch: F,
) -> Result<(Vec<T>, Option<i64>), QueueError>
where
    F: Fn(usize) -> BoxFuture<'static, Result<Vec<T>, QueueError>>,
{
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let offset = usize::try_from(offset.max(0)).unwrap_or(usize::MAX);
    let wanted = limit.min(PAGE_ENTRIES);
    let mut window = wanted.min(16);
    loop {
        let listed = fetch(offset.saturating_add(window)).await?;
        let available = listed.len().saturating_sub(offset);
        let mut bytes = 0;
        let mut entries = Vec::new();
        let mut cut = false;
        for entry in listed.into_iter().skip(offset) {
            let n = size(&entry) + ENTRY_OVERHEAD;
            if !entries.is_empty() && bytes + n > max_bytes {
                cut = true;
                break;
            }
            bytes += n;
            entries.push(entry);
        }
        let exhausted = available < window;
        if cut || exhausted || window >= wanted {
            let taken = entries.len();
            let more = cut || (!exhausted && taken < limit);
            let next = more.then(|| (offset + taken) as i64);
            return Ok((entries, next));
        }
        window = (window * 4).min(wanted);
    }
}

/// Stores a produce request's messages, once per produce key within the idempotency window.
async fn produce(
    broker: &Broker,
    spec: &ChannelSpec,
    messages: Vec<WireOutgoing>,
    key: Option<String>,
) -> Result<Vec<Receipt>, QueueError> {
    let a = &broker.adapter;
    let batch = messages
        .into_iter()
        .map(|m| m.into_outgoing())
        .collect::<Result<Vec<_>, _>>()?;
    queue_core::limits::check_batch(&batch)?;
    let Some(key) = key else {
        return a.produce(spec, batch).await;
    };
    queue_core::limits::check_produce_key(&key)?;
    let cell = broker.remembered(&key);
    let mut ran = false;
    let window = broker.config.idempotency_window;
    let receipts = cell
        .get_or_try_init(|| {
            ran = true;
            match a.keyed() {
                Some(keyed) => keyed.produce_keyed(spec, batch, &key, window),
                None => a.produce(spec, batch),
            }
        })
        .await?
        .clone();
    if !ran {
        broker
            .counters
            .replayed_produces
            .fetch_add(1, Ordering::Relaxed);
    }
    Ok(receipts)
}

async fn answer(broker: &Broker, leases: &Leases, request: Request) -> Result<Reply, QueueError> {
    let a = &broker.adapter;
    let owned = |lease: &Lease| -> Result<(), QueueError> {
        if leases.owns(lease) {
            Ok(())
        } else {
            Err(QueueError::StaleLease { id: lease.id })
        }
    };
    Ok(match request {
        Request::Produce {
            spec,
            messages,
            key,
        } => Reply::Receipts {
            receipts: receipts_to_wire(&produce(broker, &spec.to_spec()?, messages, key).await?),
        },
        Request::Settle { lease, outcome } => {
            let lease: Lease = lease.into();
            owned(&lease)?;
            let settled = a.settle(&lease, outcome.into()).await;
            if matches!(settled, Ok(()) | Err(QueueError::StaleLease { .. })) {
                leases.forget(lease.id, lease.token);
            }
            settled?;
            Reply::Done
        }
        Request::SettleMany { settles } => {
            // Settled together, so that they share the store's group commits.
            let mut results: Vec<Result<(), QueueError>> = Vec::with_capacity(settles.len());
            // Per settle passed on: its place in `results`, its message and token.
            let mut passed = Vec::new();
            let mut batch = Vec::new();
            for s in settles {
                let lease: Lease = s.lease.into();
                match owned(&lease) {
                    Ok(()) => {
                        passed.push((results.len(), lease.id, lease.token));
                        results.push(Ok(()));
                        batch.push((lease, s.outcome.into()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            let settled = a.settle_many(batch).await;
            for ((at, id, token), r) in passed.into_iter().zip(settled) {
                if matches!(r, Ok(()) | Err(QueueError::StaleLease { .. })) {
                    leases.forget(id, token);
                }
                results[at] = r;
            }
            let errors = results
                .into_iter()
                .map(|r| {
                    r.err().map(|e| {
                        broker.check(&e);
                        WireError::from(&e)
                    })
                })
                .collect();
            Reply::Settled { errors }
        }
        Request::Extend { lease, by_ms } => {
            let lease: Lease = lease.into();
            owned(&lease)?;
            let by = Duration::from_millis(by_ms.max(0) as u64);
            let deadline = a.extend(&lease, by).await?;
            let valid = broker.left(deadline, by);
            leases.extended(&lease, valid);
            Reply::Extended {
                lease_ms: ms(valid),
            }
        }
        Request::Stats => Reply::Stats {
            channels: a.stats().await?.into_iter().map(Into::into).collect(),
        },
        Request::Peek {
            channel,
            limit,
            offset,
        } => {
            let adapter = a.clone();
            let (messages, next) = page(
                limit,
                offset,
                broker.page_bytes(),
                |m: &queue_core::StoredMessage| m.payload.len(),
                |n| {
                    let (adapter, channel) = (adapter.clone(), channel.clone());
                    async move { adapter.peek(&channel, n).await }.boxed()
                },
            )
            .await?;
            Reply::Peeked {
                messages: messages.into_iter().map(Into::into).collect(),
                next,
            }
        }
        Request::DeadLetters {
            channel,
            limit,
            offset,
        } => {
            let adapter = a.clone();
            let (messages, next) = page(
                limit,
                offset,
                broker.page_bytes(),
                |d: &queue_core::DeadLetter| d.payload.len() + d.error.len() + d.channel.len(),
                |n| {
                    let (adapter, channel) = (adapter.clone(), channel.clone());
                    async move { adapter.dead_letters(&channel, n).await }.boxed()
                },
            )
            .await
            .or_else(never_seen((Vec::new(), None)))?;
            Reply::DeadLetters {
                messages: messages.into_iter().map(Into::into).collect(),
                next,
            }
        }
        Request::Redrive { channel, ids: i } => {
            let i = ids(i);
            let count = a
                .redrive(&channel, i.as_deref())
                .await
                .or_else(never_seen(0))?;
            Reply::Count {
                count: count as i64,
            }
        }
        Request::Purge { channel, ids: i } => {
            let i = ids(i);
            let count = a
                .purge_dead(&channel, i.as_deref())
                .await
                .or_else(never_seen(0))?;
            Reply::Count {
                count: count as i64,
            }
        }
        Request::PurgePending { channel } => {
            let count = a.purge(&channel).await.or_else(never_seen(0))?;
            Reply::Count {
                count: count as i64,
            }
        }
        Request::Cancel { channel, message } => {
            let was = a.cancel(&channel, MessageId(message.max(0) as u64)).await?;
            Reply::Cancelled { was }
        }
        Request::PauseChannel { channel, paused } => {
            a.set_paused(&channel, paused).await?;
            Reply::Done
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

/// A channel the store has never seen has no dead letters: listing them yields nothing,
/// redriving or purging them counts 0.
fn never_seen<T>(empty: T) -> impl FnOnce(QueueError) -> Result<T, QueueError> {
    move |e| match e {
        QueueError::UnknownChannel(_) => Ok(empty),
        other => Err(other),
    }
}

impl Broker {
    /// The bytes of entries in one page: within the page limit and well within a frame.
    fn page_bytes(&self) -> usize {
        self.config
            .max_page_bytes
            .min(self.config.max_frame.saturating_sub(64 * 1024))
            .max(1)
    }
}
