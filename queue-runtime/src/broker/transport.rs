//! What the broker and its client share below the protocol: the frame codec, a writer task
//! fed by an outbox bounded in bytes, TCP keepalive, the one accept loop of every listener
//! (TCP, TLS, Unix), and the leases a connection holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashMap;
use futures_util::SinkExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use queue_core::{Lease, MessageId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// A byte stream a connection runs over: TCP, TLS or a Unix socket.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// The length-delimited codec with a limit on the frames it reads.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// TCP keepalive: the kernel probes a quiet peer after `idle` and drops it after three
/// unanswered probes `idle / 3` apart.
pub fn keepalive(stream: &tokio::net::TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let interval = (idle / 3).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle.max(Duration::from_secs(1)))
        .with_interval(interval);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let ka = ka.with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set tcp keepalive");
    }
}

/// Frames waiting to be written, bounded in bytes: a sender waits while the frames queued
/// and not yet written hold `max` bytes. A frame larger than `max` waits for the queue to
/// empty and then goes alone.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    max: u32,
    stop: CancellationToken,
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct Queued {
    rx: mpsc::UnboundedReceiver<(Bytes, OwnedSemaphorePermit)>,
    stop: CancellationToken,
}

/// Room reserved in an [`Outbox`] for one frame.
#[derive(Debug)]
pub struct Room(OwnedSemaphorePermit);

impl Outbox {
    /// An outbox of `max` bytes and the receiving end for its writer.
    pub fn new(max: usize) -> (Outbox, Queued) {
        let max = u32::try_from(max.clamp(1, u32::MAX as usize >> 1)).unwrap_or(u32::MAX >> 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(max as usize));
        let stop = CancellationToken::new();
        let queued = Queued {
            rx,
            stop: stop.clone(),
        };
        let outbox = Outbox {
            tx,
            budget,
            max,
            stop,
        };
        (outbox, queued)
    }

    /// Waits for room for a frame of about `size` bytes. `None` once the writer is gone.
    pub async fn reserve(&self, size: usize) -> Option<Room> {
        self.budget
            .clone()
            .acquire_many_owned(self.units(size))
            .await
            .ok()
            .map(Room)
    }

    /// The room a frame of `size` bytes takes: a frame larger than the outbox takes all of it.
    fn units(&self, size: usize) -> u32 {
        u32::try_from(size).unwrap_or(u32::MAX).clamp(1, self.max)
    }

    /// Queues a frame in reserved room. False once the writer is gone.
    pub fn push(&self, frame: Bytes, room: Room) -> bool {
        self.tx.send((frame, room.0)).is_ok()
    }

    /// Queues a frame if there is room for it now; gives it back otherwise (no room, or the
    /// writer is gone).
    ///
    /// # Errors
    /// The frame, not queued.
    pub fn try_send(&self, frame: Bytes) -> Result<(), Bytes> {
        match self
            .budget
            .clone()
            .try_acquire_many_owned(self.units(frame.len()))
        {
            Ok(room) => self.tx.send((frame, room)).map_err(|e| e.0.0),
            Err(_) => Err(frame),
        }
    }

    /// Queues a frame once there is room for it. False once the writer is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        match self.reserve(frame.len()).await {
            Some(room) => self.push(frame, room),
            None => false,
        }
    }

    /// Takes no more frames: the writer writes what is queued and closes the stream.
    pub fn close(&self) {
        self.budget.close();
        self.stop.cancel();
    }

    /// True once no writer takes frames.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.budget.is_closed()
    }
}

/// Why the writer stopped.
#[derive(Debug)]
pub enum WriteEnd {
    /// Every sender is gone and everything queued was written.
    Drained,
    /// The peer did not take a frame within the stall timeout.
    Stalled,
    /// The socket failed.
    Failed(std::io::Error),
}

/// Writes the frames of an outbox until it is closed or every sender is gone, flushing
/// after each run of frames queued together. A write that makes no progress for `stall`
/// ends it: a peer that stopped reading is dropped instead of holding the outbox full.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    writer: W,
    queued: Queued,
    stall: Duration,
) -> WriteEnd {
    let Queued { mut rx, stop } = queued;
    let mut sink = FramedWrite::new(writer, codec(u32::MAX as usize));
    let mut written = Vec::new();
    let end = loop {
        let next = tokio::select! {
            biased;
            next = rx.recv() => next,
            () = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some((first, room)) = next else {
            break WriteEnd::Drained;
        };
        let batch = async {
            sink.feed(first).await?;
            written.push(room);
            while let Ok((more, room)) = rx.try_recv() {
                sink.feed(more).await?;
                written.push(room);
            }
            SinkExt::<Bytes>::flush(&mut sink).await
        };
        match tokio::time::timeout(stall, batch).await {
            Ok(Ok(())) => written.clear(),
            Ok(Err(e)) => break WriteEnd::Failed(e),
            Err(_) => break WriteEnd::Stalled,
        }
    };
    if matches!(end, WriteEnd::Drained) {
        let _ = tokio::time::timeout(stall, SinkExt::<Bytes>::close(&mut sink)).await;
    }
    rx.close();
    end
}

/// A connection being set up: TCP is ready at once, TLS after its handshake.
pub type Upgrading = BoxFuture<'static, std::io::Result<BoxStream>>;

/// A source of connections: one listener.
pub trait Acceptor: Send + 'static {
    /// The next connection and a name for its peer.
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Upgrading, String)>>;
}

/// A TCP listener; accepted sockets get keepalive.
#[derive(Debug)]
pub struct TcpAcceptor {
    pub listener: tokio::net::TcpListener,
    pub keepalive: Duration,
}

impl Acceptor for TcpAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Upgrading, String)>> {
        Box::pin(async move {
            let (stream, peer) = self.listener.accept().await?;
            keepalive(&stream, self.keepalive);
            let ready: Upgrading = Box::pin(async move { Ok(Box::new(stream) as BoxStream) });
            Ok((ready, peer.to_string()))
        })
    }
}

/// A TCP listener speaking TLS.
#[cfg(feature = "tls")]
#[expect(
    missing_debug_implementations,
    reason = "the rustls acceptor has no Debug"
)]
pub struct TlsAcceptor {
    pub listener: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub keepalive: Duration,
}

#[cfg(feature = "tls")]
impl Acceptor for TlsAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Upgrading, String)>> {
        Box::pin(async move {
            let (stream, peer) = self.listener.accept().await?;
            keepalive(&stream, self.keepalive);
            let acceptor = self.acceptor.clone();
            let tls: Upgrading =
                Box::pin(async move { Ok(Box::new(acceptor.accept(stream).await?) as BoxStream) });
            Ok((tls, peer.to_string()))
        })
    }
}

/// A Unix socket listener.
#[cfg(unix)]
#[derive(Debug)]
pub struct UnixAcceptor(pub tokio::net::UnixListener);

#[cfg(unix)]
impl Acceptor for UnixAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Upgrading, String)>> {
        Box::pin(async move {
            let (stream, _) = self.0.accept().await?;
            let ready: Upgrading = Box::pin(async move { Ok(Box::new(stream) as BoxStream) });
            Ok((ready, "unix".to_string()))
        })
    }
}

fn channel_hash(channel: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(channel)
}

/// How long a lease is kept in [`Leases`] after its deadline passed unsettled, before it
/// may be forgotten.
const LAPSED_GRACE: Duration = Duration::from_secs(60);

/// The leases handed to one connection: it may settle or extend these and no others. When
/// the connection closes its subscriptions are dropped, which releases every lease they
/// hold; this map only answers "is this lease ours".
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// (message id, fencing token) to (a hash of the channel, when the lease lapses).
    leases: HashMap<(u64, u64), (u64, Instant)>,
    /// Forget lapsed leases when the map grows past this.
    prune_at: usize,
}

impl Leases {
    /// Records a lease handed out on this connection, valid for `valid`.
    pub fn hand(&self, lease: &Lease, valid: Duration) {
        let now = Instant::now();
        let mut held = self.held.lock();
        held.leases.insert(
            (lease.id.0, lease.token),
            (channel_hash(&lease.channel), now + valid),
        );
        if held.leases.len() > held.prune_at.max(1024) {
            held.leases
                .retain(|_, (_, until)| *until + LAPSED_GRACE > now);
            held.prune_at = held.leases.len() * 2;
        }
    }

    /// True if `lease` was handed to this connection and not settled since.
    pub fn owns(&self, lease: &Lease) -> bool {
        self.held
            .lock()
            .leases
            .get(&(lease.id.0, lease.token))
            .is_some_and(|(channel, _)| *channel == channel_hash(&lease.channel))
    }

    /// The lease now lapses `valid` from now.
    pub fn extended(&self, lease: &Lease, valid: Duration) {
        if let Some((_, until)) = self.held.lock().leases.get_mut(&(lease.id.0, lease.token)) {
            *until = Instant::now() + valid;
        }
    }

    /// The lease of `id` with `token` is settled or gone.
    pub fn forget(&self, id: MessageId, token: u64) {
        self.held.lock().leases.remove(&(id.0, token));
    }

    /// How many leases are recorded.
    pub fn len(&self) -> usize {
        self.held.lock().leases.len()
    }

    /// True if none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
