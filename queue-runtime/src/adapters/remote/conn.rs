//! One connection to the broker: the handshake, the reader that routes replies and pushed
//! deliveries, the heartbeat, and reconnecting.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use queue_core::{QueueError, Receipt};
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

use super::batch::{Produce, Settler, hand_out};
use super::{Inner, Target, lost, unexpected};
use crate::broker::protocol::{
    self, ClientFrame, Reply, Request, ServerFrame, WireError, receipts_from_wire,
};
use crate::broker::transport::{self, BoxStream, Outbox};

/// Who waits for the reply to a request.
pub(super) enum Awaiting {
    /// A caller awaiting the reply.
    Caller(oneshot::Sender<Result<Reply, QueueError>>),
    /// The producers whose messages went in one produce request. The reader hands them
    /// their receipts itself, with no task in between.
    Producers(Box<Produce>),
    /// The settles that went in one `settle_many`, in order.
    Settlers(Vec<Settler>),
    /// Nobody: a heartbeat.
    Nobody,
}

impl Awaiting {
    pub(super) fn answer(self, result: Result<Reply, QueueError>) {
        match self {
            Awaiting::Caller(tx) => {
                let _ = tx.send(result);
            }
            Awaiting::Nobody => {}
            Awaiting::Producers(p) => hand_out(p.waiting, receipts_of(result)),
            Awaiting::Settlers(settlers) => match result {
                Ok(Reply::Settled { errors }) if errors.len() == settlers.len() => {
                    for ((_, tx), error) in settlers.into_iter().zip(errors) {
                        let _ = tx.send(match error {
                            None => Ok(()),
                            Some(e) => Err(e.into_error()),
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
    pub(super) fn lost(self) {
        match self {
            Awaiting::Caller(_) | Awaiting::Nobody => {}
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
                    } = *p;
                    let result = inner.call(request, true).await;
                    hand_out(waiting, receipts_of(result));
                    drop(_slot);
                });
            }
        }
    }
}

pub(super) fn receipts_of(reply: Result<Reply, QueueError>) -> Result<Vec<Receipt>, QueueError> {
    match reply? {
        Reply::Receipts { receipts } => Ok(receipts_from_wire(receipts)),
        other => Err(unexpected(&other)),
    }
}

/// The same error for another caller of one failed request: the same variant and fields.
pub(super) fn copy_of(e: &QueueError) -> QueueError {
    match e {
        QueueError::Io(io) => QueueError::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => WireError::from(other).into_error(),
    }
}

/// One live connection.
pub(super) struct Conn {
    pub(super) out: Outbox,
    pub(super) pending: Mutex<HashMap<i64, Awaiting>>,
    pub(super) next_id: AtomicI64,
    pub(super) alive: AtomicBool,
    pub(super) generation: u64,
    /// Server subscription id to local subscription id.
    pub(super) subs: Mutex<HashMap<i64, u64>>,
    /// Wakes the reader to close the connection.
    closing: tokio::sync::Notify,
    /// When the connection opened, and milliseconds after that when a frame last came and
    /// when one was last sent.
    opened: Instant,
    heard: AtomicU64,
    said: AtomicU64,
    /// The largest frame the broker accepts.
    max_frame: AtomicU64,
}

/// A client frame on the wire, refused if it is larger than the broker accepts.
pub(super) fn encode_frame(conn: &Conn, frame: &ClientFrame) -> Result<bytes::Bytes, QueueError> {
    let bytes = match &frame.request {
        Request::Produce {
            spec,
            messages,
            key,
        } => protocol::hot::produce(frame.id, spec, messages, key.as_deref()),
        _ => protocol::encode(frame)?,
    };
    let max = conn.max_frame.load(Ordering::Relaxed) as usize;
    if bytes.len() > max {
        return Err(QueueError::PayloadTooLarge {
            size: bytes.len(),
            max,
        });
    }
    Ok(bytes)
}

/// Why a request did not get an answer.
pub(super) enum CallError {
    /// The connection dropped before the answer came.
    Lost,
    /// The broker answered with an error.
    Queue(QueueError),
}

impl Conn {
    /// Registers who awaits the reply to request `id` and queues its frame for sending. If
    /// the connection is gone, the awaiting side learns it as from a dropped connection.
    pub(super) async fn send(
        &self,
        id: i64,
        bytes: bytes::Bytes,
        awaiting: Awaiting,
    ) -> Result<(), CallError> {
        self.register(id, awaiting);
        if !self.out.send(bytes).await {
            self.unsent(id);
            return Err(CallError::Lost);
        }
        Ok(())
    }

    /// [`Conn::send`] without waiting: the frame is queued now if the outbox has room, else
    /// by a task of its own.
    pub(super) fn send_now(self: &Arc<Self>, id: i64, bytes: bytes::Bytes, awaiting: Awaiting) {
        self.register(id, awaiting);
        if let Err(bytes) = self.out.try_send(bytes) {
            let conn = self.clone();
            tokio::spawn(async move {
                if !conn.out.send(bytes).await {
                    conn.unsent(id);
                }
            });
        }
    }

    fn register(&self, id: i64, awaiting: Awaiting) {
        self.pending.lock().insert(id, awaiting);
        self.said
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The frame of request `id` was not sent: whoever awaits it learns it as from a
    /// dropped connection.
    fn unsent(&self, id: i64) {
        let awaiting = self.pending.lock().remove(&id);
        if let Some(awaiting) = awaiting {
            awaiting.lost();
        }
    }

    pub(super) async fn call(&self, request: Request) -> Result<Reply, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let bytes = encode_frame(self, &ClientFrame { id, request }).map_err(CallError::Queue)?;
        self.send(id, bytes, Awaiting::Caller(tx)).await?;
        match rx.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(CallError::Queue(e)),
            Err(_) => Err(CallError::Lost),
        }
    }

    /// Marks the connection dead, fails what waits on it and wakes the reader to close.
    pub(super) fn fail_all(&self) {
        self.alive.store(false, Ordering::Release);
        let pending: Vec<Awaiting> = self.pending.lock().drain().map(|(_, a)| a).collect();
        for awaiting in pending {
            awaiting.lost();
        }
        self.out.close();
        self.closing.notify_one();
    }

    fn heard_now(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.heard.store(ms, Ordering::Relaxed);
    }

    /// How long since a frame came from the broker, and since one was sent to it.
    fn quiet_for(&self) -> (Duration, Duration) {
        let at = |t: &AtomicU64| Duration::from_millis(t.load(Ordering::Relaxed));
        let now = self.opened.elapsed();
        (
            now.saturating_sub(at(&self.heard)),
            now.saturating_sub(at(&self.said)),
        )
    }
}

async fn open_stream(target: &Target, keepalive: Duration) -> std::io::Result<BoxStream> {
    match target {
        Target::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            transport::keepalive(&s, keepalive);
            Ok(Box::new(s))
        }
        Target::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        #[cfg(feature = "tls")]
        Target::Tls { address, ca } => {
            let connector = crate::broker::tls::connector(ca).map_err(std::io::Error::other)?;
            let name = crate::broker::tls::server_name(address).map_err(std::io::Error::other)?;
            let s = tokio::net::TcpStream::connect(address).await?;
            transport::keepalive(&s, keepalive);
            Ok(Box::new(connector.connect(name, s).await?))
        }
    }
}

impl Inner {
    /// The live connection, connecting (with backoff, up to the connect timeout) if needed.
    pub(super) async fn connection(self: &Arc<Self>) -> Result<Arc<Conn>, QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let timeout = self.options.connect_timeout;
        let connecting = async {
            let mut slot = self.conn.lock().await;
            if let Some(c) = slot.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
                return Ok(c.clone());
            }
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
                    Err(e @ (QueueError::Unauthorized(_) | QueueError::Protocol(_))) => {
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, ?pause, "broker unreachable, retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
                if self.closed.load(Ordering::Acquire) {
                    return Err(QueueError::Closed);
                }
            }
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout(timeout)),
        }
    }

    async fn handshake(self: &Arc<Self>) -> Result<Arc<Conn>, QueueError> {
        let timeout = self.options.handshake_timeout;
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout(timeout)),
        }
    }

    async fn open(self: &Arc<Self>) -> Result<Arc<Conn>, QueueError> {
        let stream = open_stream(&self.target, self.options.keepalive).await?;
        let (read, write) = tokio::io::split(stream);
        let frames = FramedRead::new(read, transport::codec(self.options.max_frame));
        let (out, rx) = Outbox::new(self.options.max_outbound_bytes);
        let stall = self.options.idle_timeout;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let conn = Arc::new(Conn {
            out,
            pending: Mutex::new(HashMap::default()),
            next_id: AtomicI64::new(1),
            alive: AtomicBool::new(true),
            generation,
            subs: Mutex::new(HashMap::default()),
            closing: tokio::sync::Notify::new(),
            opened: Instant::now(),
            heard: AtomicU64::new(0),
            said: AtomicU64::new(0),
            max_frame: AtomicU64::new(protocol::DEFAULT_MAX_HELLO_FRAME as u64),
        });
        let writer_conn = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let end = transport::write_frames(write, rx, stall).await;
            if !matches!(end, transport::WriteEnd::Drained) {
                tracing::warn!(end = ?end, "writing to the broker failed; reconnecting");
            }
            if let Some(conn) = writer_conn.upgrade() {
                conn.fail_all();
            }
        });
        tokio::spawn(read_frames(conn.clone(), frames, Arc::downgrade(self)));
        let hello = Request::Hello {
            version: protocol::VERSION,
            token: self.options.token.clone(),
            client: format!("queue-runtime/{}", env!("CARGO_PKG_VERSION")),
        };
        let welcome = conn.call(hello).await;
        let (idle_ms, max_frame) = match welcome {
            Ok(Reply::Welcome {
                idle_timeout_ms,
                max_frame,
                ..
            }) => (idle_timeout_ms, max_frame),
            Ok(other) => {
                conn.fail_all();
                return Err(QueueError::Protocol(format!(
                    "unexpected handshake reply {other:?}"
                )));
            }
            Err(CallError::Queue(e)) => return Err(e),
            Err(CallError::Lost) => return Err(lost()),
        };
        conn.max_frame.store(
            u64::try_from(max_frame.max(1))
                .unwrap_or(1)
                .min(self.options.max_frame as u64),
            Ordering::Relaxed,
        );
        // Ping often enough for the broker's idle timeout and for ours.
        let broker_idle = Duration::from_millis(idle_ms.max(0) as u64);
        let every = self
            .options
            .heartbeat
            .min(broker_idle / 3)
            .max(Duration::from_millis(10));
        tokio::spawn(heartbeat(conn.clone(), every, self.options.idle_timeout));
        Ok(conn)
    }

    /// Sends a dead-letter operation (not retried: it is not idempotent) and reads its count.
    pub(super) async fn count(self: &Arc<Self>, request: Request) -> Result<u64, QueueError> {
        match self.call(request, false).await? {
            Reply::Count { count } => Ok(count.max(0) as u64),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request, reconnecting and retrying it when `retry` says the request is safe
    /// to send again. Fails with [`QueueError::Timeout`] after the request timeout.
    pub(super) async fn call(
        self: &Arc<Self>,
        request: Request,
        retry: bool,
    ) -> Result<Reply, QueueError> {
        let timeout = self.options.request_timeout;
        let calling = async {
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
        };
        match tokio::time::timeout(timeout, calling).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout(timeout)),
        }
    }
}

/// Pings the broker when nothing came from it, or nothing was sent to it, for `every`
/// (so the broker always hears from a live client), and drops the connection when nothing
/// came from the broker for `idle`: the broker answers every ping, so a live broker is
/// never quiet that long.
async fn heartbeat(conn: Arc<Conn>, every: Duration, idle: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while conn.alive.load(Ordering::Acquire) {
        tick.tick().await;
        let (quiet, silent) = conn.quiet_for();
        if quiet >= idle {
            tracing::warn!(
                ?quiet,
                "nothing from the broker within the idle timeout; reconnecting"
            );
            conn.fail_all();
            return;
        }
        if quiet >= every || silent >= every {
            let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(bytes) = protocol::encode(&ClientFrame {
                id,
                request: Request::Ping,
            }) {
                let _ = conn.send(id, bytes, Awaiting::Nobody).await;
            }
        }
    }
}

/// Routes the broker's frames until the connection ends, then fails what waits on it and
/// reconnects if subscriptions wait for deliveries.
async fn read_frames(
    conn: Arc<Conn>,
    mut frames: FramedRead<tokio::io::ReadHalf<BoxStream>, tokio_util::codec::LengthDelimitedCodec>,
    weak: std::sync::Weak<Inner>,
) {
    loop {
        let frame = tokio::select! {
            () = conn.closing.notified() => break,
            frame = frames.next() => frame,
        };
        let Some(Ok(bytes)) = frame else { break };
        conn.heard_now();
        let Ok(frame) = ServerFrame::decode(&bytes) else {
            tracing::warn!("malformed frame from the broker; reconnecting");
            break;
        };
        match frame {
            ServerFrame::Reply { id, reply } => {
                let awaiting = conn.pending.lock().remove(&id);
                if let Some(awaiting) = awaiting {
                    awaiting.answer(Ok(reply));
                }
            }
            ServerFrame::Error { id: 0, error } => {
                tracing::warn!(code = %error.code, message = %error.message, "the broker closed the connection");
                let err = error.into_error();
                let pending: Vec<Awaiting> = conn.pending.lock().drain().map(|(_, a)| a).collect();
                for awaiting in pending {
                    awaiting.answer(Err(copy_of(&err)));
                }
                break;
            }
            ServerFrame::Error { id, error } => {
                let awaiting = conn.pending.lock().remove(&id);
                if let Some(awaiting) = awaiting {
                    awaiting.answer(Err(error.into_error()));
                }
            }
            ServerFrame::Delivery { sub, delivery } => {
                let Some(inner) = weak.upgrade() else { break };
                let local = conn.subs.lock().get(&sub).copied();
                if let Some(local) = local
                    && let Some(s) = inner.subs.lock().get(&local)
                {
                    let d = delivery.into_raw(inner.options.clock.now());
                    let _ = s.tx.send((conn.generation, Ok(d)));
                }
            }
            ServerFrame::Ended { sub, error } => {
                let Some(inner) = weak.upgrade() else { break };
                inner.ended(&conn, sub, error.into_error());
            }
        }
    }
    conn.fail_all();
    // Reconnect at once if subscriptions are waiting for deliveries.
    if let Some(inner) = weak.upgrade()
        && !inner.closed.load(Ordering::Acquire)
        && !inner.subs.lock().is_empty()
    {
        inner.reconnect.notify_one();
    }
}
