//! [`Queue`], the handle applications hold, and the typed [`Producer`].

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::adapter::{
    Adapter, Cancelled, ChannelStats, DeadLetter, Lease, MessageId, Outgoing, Receipt,
    StoredMessage,
};
use crate::clock::Clock;
use crate::codec;
use crate::consume::ConsumerBuilder;
use crate::error::QueueError;
use crate::spec::{Channel, ChannelSpec};
use crate::telemetry;

/// Runs background futures (consumer loops) on the application's async runtime.
pub trait Spawn: Send + Sync + 'static {
    /// Starts `future` in the background.
    fn spawn(&self, future: BoxFuture<'static, ()>);
}

/// A handle to a queue: an adapter, the clock its time rules read, and a spawner for consumer
/// loops. Cheap to clone; every clone talks to the same store.
///
/// Open one with `queue_runtime::connect(url)`.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    adapter: Arc<dyn Adapter>,
    clock: Arc<dyn Clock>,
    spawner: Arc<dyn Spawn>,
    description: String,
    observer: Option<Arc<dyn Observer>>,
    running: Arc<Running>,
}

/// Where a running handler learns that its message was cancelled: fired at most once, cheap
/// to clone.
#[derive(Debug, Clone, Default)]
pub struct Cancellation(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    fired: std::sync::atomic::AtomicBool,
    waiting: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl Cancellation {
    /// Tells the handler, once.
    pub(crate) fn fire(&self) {
        use std::sync::atomic::Ordering;
        if !self.0.fired.swap(true, Ordering::AcqRel) {
            let waiting = std::mem::take(&mut *self.waiting());
            for waker in waiting {
                waker.wake();
            }
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<std::task::Waker>> {
        self.0.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the message was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.fired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the message is cancelled, and never otherwise.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&self) {
        std::future::poll_fn(|cx| {
            if self.is_cancelled() {
                return std::task::Poll::Ready(());
            }
            let mut waiting = self.waiting();
            // Checked again under the lock `fire` takes to wake, so no wake is missed.
            if self.is_cancelled() {
                return std::task::Poll::Ready(());
            }
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await;
    }
}

/// The handlers running in this process, so that a cancel made through any handle of the
/// same queue tells them at once instead of at their next lease extension.
#[derive(Default)]
pub(crate) struct Running {
    by_lease: std::sync::Mutex<ByLease>,
}

/// Running handlers by `(channel, message, lease token)`.
type ByLease = HashMap<(Arc<str>, MessageId, u64), Cancellation>;

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, ByLease> {
        self.by_lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handler of `lease` starts.
    pub(crate) fn enter(&self, lease: &Lease, cancel: Cancellation) {
        self.lock()
            .insert((lease.channel.clone(), lease.id, lease.token), cancel);
    }

    /// The handler of `lease` ended.
    pub(crate) fn leave(&self, lease: &Lease) {
        self.lock()
            .remove(&(lease.channel.clone(), lease.id, lease.token));
    }

    /// Tells every handler of the message that it was cancelled.
    fn cancel(&self, channel: &str, id: MessageId) {
        let mut told = Vec::new();
        self.lock().retain(|(c, m, _), cancel| {
            let of_it = *m == id && **c == *channel;
            if of_it {
                told.push(cancel.clone());
            }
            !of_it
        });
        for cancel in told {
            cancel.fire();
        }
    }
}

/// How a handled delivery ended, for [`Observer`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handled {
    /// The handler succeeded and the message was acked.
    Acked,
    /// The handler failed or panicked; the message will be retried.
    Failed,
    /// The payload did not decode, or the handler dead-lettered it.
    DeadLettered,
}

impl Handled {
    /// A lowercase name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Acked => "acked",
            Handled::Failed => "failed",
            Handled::DeadLettered => "dead_lettered",
        }
    }
}

/// Sees every delivery a consumer of this queue handles: for metrics.
pub trait Observer: Send + Sync + 'static {
    /// A delivery of `channel` was handled in `elapsed` and ended as `handled`.
    fn handled(&self, channel: &str, handled: Handled, elapsed: Duration);
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("adapter", &self.inner.description)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Wraps an adapter. `description` names it in logs and `Debug` output (a URL without
    /// secrets).
    pub fn new(
        adapter: Arc<dyn Adapter>,
        clock: Arc<dyn Clock>,
        spawner: Arc<dyn Spawn>,
        description: impl Into<String>,
    ) -> Self {
        Queue {
            inner: Arc::new(QueueInner {
                adapter,
                clock,
                spawner,
                description: description.into(),
                observer: None,
                running: Arc::default(),
            }),
        }
    }

    /// A handle to the same queue whose consumers report to `observer`.
    #[must_use]
    pub fn observed(&self, observer: Arc<dyn Observer>) -> Queue {
        Queue {
            inner: Arc::new(QueueInner {
                adapter: self.inner.adapter.clone(),
                clock: self.inner.clock.clone(),
                spawner: self.inner.spawner.clone(),
                description: self.inner.description.clone(),
                observer: Some(observer),
                running: self.inner.running.clone(),
            }),
        }
    }

    /// The handlers running in this process.
    pub(crate) fn running(&self) -> &Running {
        &self.inner.running
    }

    /// The observer consumers report to, if any.
    pub fn observer(&self) -> Option<&Arc<dyn Observer>> {
        self.inner.observer.as_ref()
    }

    /// The adapter behind this handle.
    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.inner.adapter
    }

    /// The clock every time rule of this queue reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The spawner consumer loops run on.
    pub fn spawner(&self) -> &Arc<dyn Spawn> {
        &self.inner.spawner
    }

    /// What this queue is, for logs: the adapter and its address without secrets.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// A producer for channel `C`.
    pub fn producer<C: Channel>(&self) -> Producer<C> {
        Producer {
            queue: self.clone(),
            delay: Duration::ZERO,
            priority: 0,
            dedup_key: None,
            group: None,
            _channel: PhantomData,
        }
    }

    /// Produces one message on its channel with default options.
    ///
    /// # Errors
    /// See [`Producer::produce`].
    ///
    /// # Cancel safety
    /// As [`Producer::produce`].
    pub async fn produce<C: Channel>(&self, message: C::Message) -> Result<Receipt, QueueError> {
        self.producer::<C>().produce(message).await
    }

    /// A consumer builder for channel `C`.
    pub fn consumer<C: Channel>(&self) -> ConsumerBuilder<C> {
        ConsumerBuilder::new(self.clone())
    }

    /// Counters and depths of every channel.
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn stats(&self) -> Result<Vec<ChannelStats>, QueueError> {
        self.inner.adapter.stats().await
    }

    /// Pending messages of a channel, in delivery order.
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn peek(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, QueueError> {
        self.inner.adapter.peek(channel, limit).await
    }

    /// The dead-letter queue of a channel, oldest first.
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn dead_letters(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner.adapter.dead_letters(channel, limit).await
    }

    /// Moves dead letters back to their channel with attempts reset (all when `ids` is `None`).
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn redrive(
        &self,
        channel: &str,
        ids: Option<&[MessageId]>,
    ) -> Result<u64, QueueError> {
        self.inner.adapter.redrive(channel, ids).await
    }

    /// Deletes dead letters (all when `ids` is `None`).
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn purge_dead(
        &self,
        channel: &str,
        ids: Option<&[MessageId]>,
    ) -> Result<u64, QueueError> {
        self.inner.adapter.purge_dead(channel, ids).await
    }

    /// Deletes the pending messages of a channel, ready and delayed; messages in flight
    /// finish as usual. Dead letters stay: [`Queue::purge_dead`] deletes those.
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn purge(&self, channel: &str) -> Result<u64, QueueError> {
        self.inner.adapter.purge(channel).await
    }

    /// Cancels a pending or in-flight message of a channel: it is deleted; a handler running
    /// it learns through [`Delivery::cancelled`](crate::Delivery::cancelled), best effort,
    /// and its settle is refused with [`QueueError::Cancelled`].
    ///
    /// # Errors
    /// [`QueueError::UnknownMessage`] when there is no such pending or in-flight message;
    /// the adapter's errors.
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn cancel(&self, channel: &str, id: MessageId) -> Result<Cancelled, QueueError> {
        let was = self.inner.adapter.cancel(channel, id).await?;
        if was == Cancelled::InFlight {
            self.inner.running.cancel(channel, id);
        }
        Ok(was)
    }

    /// Pauses a channel, durably (across restarts): nothing is delivered until
    /// [`Queue::resume`]; producers keep producing and deliveries in flight finish.
    ///
    /// # Errors
    /// [`QueueError::InvalidRequest`] for a channel the store has never seen; the adapter's
    /// errors.
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn pause(&self, channel: &str) -> Result<(), QueueError> {
        self.inner.adapter.set_paused(channel, true).await
    }

    /// Resumes a paused channel: deliveries start again.
    ///
    /// # Errors
    /// As [`Queue::pause`].
    ///
    /// # Cancel safety
    /// Once polled, the change is made whether or not the future is polled again.
    pub async fn resume(&self, channel: &str) -> Result<(), QueueError> {
        self.inner.adapter.set_paused(channel, false).await
    }

    /// Flushes and closes the store behind this queue, for every clone of the handle.
    ///
    /// # Errors
    /// The adapter's errors.
    ///
    /// # Cancel safety
    /// Once polled, the store closes whether or not the future is polled again.
    pub async fn close(&self) -> Result<(), QueueError> {
        self.inner.adapter.close().await
    }

    /// Produces already-encoded payloads on a channel known only by its spec. Used by tools
    /// and bridges; typed code uses [`Producer`].
    ///
    /// # Errors
    /// The adapter's errors; [`QueueError::PayloadTooLarge`] for an oversized payload;
    /// [`QueueError::InvalidRequest`] for a channel name outside [`crate::limits`].
    ///
    /// # Cancel safety
    /// As [`Producer::produce`].
    pub async fn produce_raw(
        &self,
        spec: &ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<Receipt>, QueueError> {
        spec.check()?;
        crate::limits::check_batch(&batch)?;
        self.inner.adapter.produce(spec, batch).await
    }
}

/// Produces messages of one channel. Accepts only that channel's message type.
///
/// ```
/// # use queue_core::{channel, Queue};
/// # use serde::{Deserialize, Serialize};
/// #[channel("mail/send")]
/// #[derive(Serialize, Deserialize)]
/// struct SendMail { to: String }
///
/// # async fn run(queue: Queue) -> Result<(), queue_core::QueueError> {
/// let receipt = SendMail::producer(&queue)
///     .delay(std::time::Duration::from_secs(60))
///     .priority(5)
///     .produce(SendMail { to: "a@example.com".into() })
///     .await?;
/// # let _ = receipt; Ok(()) }
/// ```
pub struct Producer<C: Channel> {
    queue: Queue,
    delay: Duration,
    priority: u8,
    dedup_key: Option<String>,
    group: Option<u64>,
    _channel: PhantomData<fn() -> C>,
}

impl<C: Channel> Clone for Producer<C> {
    fn clone(&self) -> Self {
        Producer {
            queue: self.queue.clone(),
            delay: self.delay,
            priority: self.priority,
            dedup_key: self.dedup_key.clone(),
            group: self.group,
            _channel: PhantomData,
        }
    }
}

impl<C: Channel> fmt::Debug for Producer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("channel", &C::SPEC.name)
            .field("delay", &self.delay)
            .field("priority", &self.priority)
            .field("dedup_key", &self.dedup_key)
            .field("group", &self.group)
            .finish()
    }
}

impl<C: Channel> Producer<C> {
    /// Holds messages for `delay` before they become ready.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Messages of higher priority leave first (default 0).
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Deduplicates the next single produce on this key instead of the payload's hash. Only
    /// for `exactly_once` channels; [`Producer::produce_batch`] always keys on payloads.
    #[must_use]
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Puts the messages in group `key`, whatever group their channel's `group` field names:
    /// messages of one group leave in produce order, at most the channel's
    /// `concurrency_per_group` in flight at once.
    #[must_use]
    pub fn group(mut self, key: impl crate::GroupKey) -> Self {
        self.group = Some(key.group_hash());
        self
    }

    fn outgoing(
        &self,
        message: &C::Message,
        key: Option<&str>,
        trace: Option<&(String, String)>,
    ) -> Result<Outgoing, QueueError> {
        let mut out = outgoing::<C>(message, key, self.delay, self.priority, trace)?;
        out.group = self.group.or(out.group);
        Ok(out)
    }

    fn check_key(&self) -> Result<(), QueueError> {
        if self.dedup_key.is_some() && !C::SPEC.deduplicates() {
            return Err(QueueError::InvalidRequest(format!(
                "a dedup key was given for `{}`, which is not an `exactly_once` channel",
                C::SPEC.name
            )));
        }
        Ok(())
    }

    /// Produces one message. Returns once it is durable.
    ///
    /// # Errors
    /// [`QueueError::Encode`] or [`QueueError::PayloadTooLarge`] for a message that cannot be
    /// stored; [`QueueError::InvalidRequest`] for a dedup key on an `at_least_once` channel;
    /// the adapter's errors.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the message is either not stored, or stored and
    /// delivered like any other; never stored and invisible. A produce given up on and sent
    /// again may therefore store the message twice: give it a dedup key, or declare the
    /// channel `exactly_once`, where the second produce is answered as a duplicate.
    pub async fn produce(&self, message: C::Message) -> Result<Receipt, QueueError> {
        self.check_key()?;
        let span = telemetry::produce_span(&C::SPEC.name, 1);
        let trace = telemetry::context_of(&span);
        let out = self.outgoing(&message, self.dedup_key.as_deref(), trace.as_ref())?;
        let receipts = self
            .queue
            .adapter()
            .produce(&C::SPEC, vec![out])
            .instrument(span.clone())
            .await
            .inspect_err(|e| telemetry::failed(&span, &e.to_string()))?;
        let receipt = receipts.into_iter().next().ok_or_else(|| {
            QueueError::Protocol("adapter answered a produce with no receipt".into())
        })?;
        span.record("messaging.message.id", receipt.id.to_string());
        Ok(receipt)
    }

    /// Produces many messages in one durable write. Receipts come back in order.
    ///
    /// # Errors
    /// As [`Producer::produce`]; nothing is stored when any message fails to encode.
    ///
    /// # Cancel safety
    /// As [`Producer::produce`], for the whole batch at once.
    pub async fn produce_batch(
        &self,
        messages: impl IntoIterator<Item = C::Message>,
    ) -> Result<Vec<Receipt>, QueueError> {
        let messages: Vec<C::Message> = messages.into_iter().collect();
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let span = telemetry::produce_span(&C::SPEC.name, messages.len());
        let trace = telemetry::context_of(&span);
        let batch = messages
            .iter()
            .map(|m| self.outgoing(m, None, trace.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        self.queue
            .adapter()
            .produce(&C::SPEC, batch)
            .instrument(span.clone())
            .await
            .inspect_err(|e| telemetry::failed(&span, &e.to_string()))
    }
}

/// Encodes a message of channel `C` with its dedup key.
fn outgoing<C: Channel>(
    message: &C::Message,
    key: Option<&str>,
    delay: Duration,
    priority: u8,
    trace: Option<&(String, String)>,
) -> Result<Outgoing, QueueError> {
    let mut payload = codec::encode(message)?;
    let dedup_key = if C::SPEC.deduplicates() {
        Some(key.map_or_else(|| codec::dedup_key(&payload), codec::explicit_dedup_key))
    } else {
        None
    };
    if let Some((parent, state)) = trace {
        codec::add_trace(&mut payload, parent, state);
    }
    Ok(Outgoing {
        payload,
        dedup_key,
        delay,
        priority,
        group: crate::Message::group(message),
    })
}

/// A database transaction that can carry produces: the messages are stored when it commits
/// and never when it rolls back. The PostgreSQL adapter implements it for its transactions.
pub trait TransactionalProduce: Send + Sync {
    /// Stores encoded messages inside the transaction and returns one receipt per message.
    fn produce_outgoing<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>>;
}

/// Produces a message of channel `C` inside a transaction. Generated `T::produce_in` calls
/// this.
///
/// # Errors
/// Encoding errors and the transaction's errors.
///
/// # Cancel safety
/// Dropped before it completes, the message is stored if and only if the transaction commits.
pub async fn produce_in<C: Channel, T: TransactionalProduce + ?Sized>(
    tx: &T,
    message: C::Message,
) -> Result<Receipt, QueueError> {
    let span = telemetry::produce_span(&C::SPEC.name, 1);
    let trace = telemetry::context_of(&span);
    let out = outgoing::<C>(&message, None, Duration::ZERO, 0, trace.as_ref())?;
    let receipts = tx
        .produce_outgoing(&C::SPEC, vec![out])
        .instrument(span.clone())
        .await
        .inspect_err(|e| telemetry::failed(&span, &e.to_string()))?;
    let receipt = receipts.into_iter().next().ok_or_else(|| {
        QueueError::Protocol("a transactional produce answered with no receipt".into())
    })?;
    span.record("messaging.message.id", receipt.id.to_string());
    Ok(receipt)
}
