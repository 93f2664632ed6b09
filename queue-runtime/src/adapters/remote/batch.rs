//! Gathering: the produces of one channel, and the settles, made while a request is being
//! prepared travel together in one request, so the broker's commits stay few and full.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use queue_core::{ChannelSpec, MessageId, Outgoing, QueueError, Receipt};
use tokio::sync::oneshot;

use super::Inner;
use super::conn::{Awaiting, Conn, copy_of, encode_frame};
use crate::broker::protocol::{ClientFrame, Request, WireSettle};

/// A settle waiting for its answer: the message, and where the answer goes.
pub(super) type Settler = (MessageId, oneshot::Sender<Result<(), QueueError>>);

/// A produce request in flight, kept whole so it can be sent again after a reconnect.
pub(super) struct Produce {
    pub(super) inner: std::sync::Weak<Inner>,
    pub(super) request: Request,
    pub(super) waiting: Vec<Waiting>,
    /// Given back when this is dropped, after the waiting produces have their answer.
    pub(super) _slot: Slot,
}

/// Gives each waiting produce its share of the receipts, or the error.
pub(super) fn hand_out(waiting: Vec<Waiting>, result: Result<Vec<Receipt>, QueueError>) {
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

pub(super) type Waiting = (usize, oneshot::Sender<Result<Vec<Receipt>, QueueError>>);

/// Produces of one channel waiting to be sent: the client-side half of group commit.
///
/// A produce spawns a flusher when none is pending and fewer than [`IN_FLIGHT`] requests of
/// the channel are out; produces arriving before the flusher runs join its request. The
/// producers woken together by one reply go back together in one request, and produces
/// that find every slot taken join the request sent when the next reply frees one, so the
/// broker's commits stay few and full.
pub(super) struct ChannelBatch {
    pub(super) spec: ChannelSpec,
    pub(super) messages: Vec<Outgoing>,
    pub(super) waiting: Vec<Waiting>,
    /// A flusher is spawned and has not yet taken the waiting produces.
    pub(super) pending: bool,
    /// Flushers spawned and requests out, each holding a [`Slot`].
    pub(super) in_flight: usize,
    /// The last request carried one produce and was the only one out: a lone producer,
    /// whose next request is sent without waiting for others to join it.
    pub(super) alone: bool,
}

impl ChannelBatch {
    /// Claims a slot for a new flusher if one should start now.
    pub(super) fn claim(&mut self) -> bool {
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
pub(super) struct Slot {
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
pub(super) struct SettleBatch {
    pub(super) waiting: Vec<(WireSettle, Settler)>,
    /// A flusher is spawned and has not yet taken the waiting settles.
    pub(super) pending: bool,
}

/// The most settles one `settle_many` carries.
const BATCH_SETTLES: usize = 4096;

/// The most messages or bytes one produce request carries.
const BATCH_MESSAGES: usize = 1024;
const BATCH_BYTES: usize = 4 << 20;

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

pub(super) fn spawn_settle_flush(inner: Arc<Inner>) {
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
    match encode_frame(&conn, &frame) {
        // A lost connection fails them as stale, from `Awaiting::lost`.
        Ok(bytes) => {
            let _ = conn.send(id, bytes, Awaiting::Settlers(settlers)).await;
        }
        Err(e) => Awaiting::Settlers(settlers).answer(Err(e)),
    }
}

pub(super) fn spawn_flush(inner: Arc<Inner>, channel: String) {
    tokio::spawn(flush(inner, channel));
}

/// Sends the produces of `channel` waiting now as one request.
async fn flush(inner: Arc<Inner>, channel: String) {
    let slot = Slot {
        inner: Arc::downgrade(&inner),
        channel: channel.clone(),
    };
    if !lone(&inner, &channel) {
        gather(|| {
            inner
                .batches
                .lock()
                .get(&channel)
                .map_or(0, |b| b.waiting.len())
        })
        .await;
    }
    let Some((request, waiting)) = take_request(&inner, &channel) else {
        return;
    };
    let conn = match inner.connection().await {
        Ok(conn) => conn,
        Err(e) => return hand_out(waiting, Err(e)),
    };
    let Some((id, bytes, awaiting)) = prepare(&inner, &conn, request, waiting, slot) else {
        return;
    };
    // A lost connection sends the request again on the next one, from `Awaiting::lost`.
    let _ = conn.send(id, bytes, awaiting).await;
}

/// Sends a lone producer's request from the producer's own task, with no flusher task in
/// between: when the connection is up and no other request of the channel is out. False
/// leaves it to a flusher. Nothing in it waits, so a producer that stops waiting for its
/// receipt cannot strand the request.
pub(super) fn flush_now(inner: &Arc<Inner>, channel: &str) -> bool {
    let conn = inner.current.lock().clone();
    let Some(conn) = conn.filter(|c| c.alive.load(Ordering::Acquire)) else {
        return false;
    };
    if !lone(inner, channel) {
        return false;
    }
    let slot = Slot {
        inner: Arc::downgrade(inner),
        channel: channel.to_string(),
    };
    let Some((request, waiting)) = take_request(inner, channel) else {
        return true;
    };
    if let Some((id, bytes, awaiting)) = prepare(inner, &conn, request, waiting, slot) {
        conn.send_now(id, bytes, awaiting);
    }
    true
}

/// Whether the produces waiting on `channel` are a lone producer's: its last request carried
/// one produce and no other request of the channel is out now.
fn lone(inner: &Inner, channel: &str) -> bool {
    inner
        .batches
        .lock()
        .get(channel)
        .is_some_and(|b| b.alone && b.in_flight == 1)
}

/// Takes the produces of `channel` that fit in one request, and hands a later batch to a new
/// flusher if one may start.
fn take_request(inner: &Arc<Inner>, channel: &str) -> Option<(Request, Vec<Waiting>)> {
    let (spec, messages, waiting) = {
        let mut batches = inner.batches.lock();
        let b = batches.get_mut(channel)?;
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
        b.alone = take == 1 && b.in_flight == 1;
        b.pending = false;
        if b.claim() {
            spawn_flush(inner.clone(), channel.to_string());
        }
        (b.spec.clone(), messages, waiting)
    };
    if waiting.is_empty() {
        return None;
    }
    let request = Request::Produce {
        spec: (&spec).into(),
        messages: messages.into_iter().map(Into::into).collect(),
        key: Some(produce_key()),
    };
    Some((request, waiting))
}

/// The frame of a produce request on `conn`, and who awaits its reply; `None` (the waiting
/// produces answered with the error) when it cannot be encoded.
fn prepare(
    inner: &Arc<Inner>,
    conn: &Conn,
    request: Request,
    waiting: Vec<Waiting>,
    slot: Slot,
) -> Option<(i64, bytes::Bytes, Awaiting)> {
    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
    let frame = ClientFrame { id, request };
    let bytes = match encode_frame(conn, &frame) {
        Ok(bytes) => bytes,
        Err(e) => {
            hand_out(waiting, Err(e));
            return None;
        }
    };
    let awaiting = Awaiting::Producers(Box::new(Produce {
        inner: Arc::downgrade(inner),
        request: frame.request,
        waiting,
        _slot: slot,
    }));
    Some((id, bytes, awaiting))
}

/// A fresh produce key: 32 random hex digits.
pub(super) fn produce_key() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..));
    (0..32)
        .rev()
        .map(|i| char::from(HEX[((bits >> (i * 4)) & 0xF) as usize]))
        .collect()
}
