//! Consuming: handler erasure, the consumer loop every consumer runs (from
//! `T::consume`, a [`ConsumerBuilder`] or a worker), and [`ConsumerHandle`].
//!
//! The loop keeps at most `max_parallel` handlers running, extends each lease while its
//! handler runs, turns the handler's result into an ack or a nack (a panic is a failure, a
//! payload that does not decode is dead-lettered at once), and on stop waits for running
//! handlers up to a grace period before giving the rest back with [`Outcome::Release`].

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use foldhash::HashMap;
use futures_channel::oneshot;
use futures_util::future::{BoxFuture, Either, FutureExt, poll_fn, select};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::Instrument;

use crate::adapter::{Lease, Outcome, RawDelivery};
use crate::clock::{Timestamp, millis};
use crate::codec;
use crate::delivery::Delivery;
use crate::error::QueueError;
use crate::queue::{Cancellation, Queue};
use crate::spec::{Channel, ChannelSpec, Message};

/// How many deliveries a consumer holds at once unless told otherwise.
pub const DEFAULT_MAX_PARALLEL: u32 = 8;

/// What a handler may return: `()` or `Result<(), E>` with a displayable error.
#[diagnostic::on_unimplemented(
    message = "a consumer must return `()` or `Result<(), E>`, not `{Self}`",
    label = "this return type",
    note = "the error type `E` must implement `std::fmt::Display`"
)]
pub trait HandlerOutput: Send + 'static {
    /// `Ok` acks; `Err` carries the failure text kept with the message.
    fn into_result(self) -> Result<(), String>;
}

impl HandlerOutput for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: fmt::Display + Send + 'static> HandlerOutput for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// Everything a handler call receives.
#[derive(Debug)]
pub struct HandlerContext {
    /// The delivery, still encoded.
    pub raw: RawDelivery,
    /// The queue it came from.
    pub queue: Queue,
    /// Set once the handler has settled the delivery itself.
    pub settled: Arc<AtomicBool>,
    /// Fired once the message is cancelled while the handler runs.
    pub cancelled: Cancellation,
}

/// The first parameter of a consumer: a channel message type, or [`Delivery`] of one.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a channel message type",
    label = "the first parameter of a consumer must be a `#[channel]` type",
    note = "add `#[channel(\"name\")]` to the declaration of the message type, or take `Delivery<T>` of a channel type"
)]
pub trait ConsumerInput: Sized + Send + 'static {
    /// The message type.
    type Message: Message;
    /// Decodes the delivery.
    ///
    /// # Errors
    /// The decode error, for a payload that is not a `Self::Message`.
    fn from_context(cx: &HandlerContext) -> Result<Self, QueueError>;
}

impl<T: Message> ConsumerInput for T {
    type Message = T;
    fn from_context(cx: &HandlerContext) -> Result<Self, QueueError> {
        codec::decode(&cx.raw.payload)
    }
}

impl<T: Message> ConsumerInput for Delivery<T> {
    type Message = T;
    fn from_context(cx: &HandlerContext) -> Result<Self, QueueError> {
        let message = codec::decode(&cx.raw.payload)?;
        Ok(Delivery::new(
            message,
            &cx.raw,
            cx.queue.clone(),
            cx.settled.clone(),
            cx.cancelled.clone(),
        ))
    }
}

/// Why a handler call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerFailure {
    /// The handler returned an error or panicked: retry.
    Failed(String),
    /// The payload did not decode: dead-letter at once.
    Poison(String),
}

type HandlerFn =
    dyn Fn(&HandlerContext) -> BoxFuture<'static, Result<(), HandlerFailure>> + Send + Sync;

/// A handler with its types erased: decodes, calls the user's function, reports the result.
#[derive(Clone)]
pub struct ErasedHandler {
    f: Arc<HandlerFn>,
    slot: crate::periodic::SlotPayload,
}

impl fmt::Debug for ErasedHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErasedHandler")
    }
}

impl ErasedHandler {
    /// Erases `f`, which takes a [`ConsumerInput`].
    pub fn new<I, F, Fut>(f: F) -> Self
    where
        I: ConsumerInput,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        ErasedHandler {
            f: Arc::new(move |cx: &HandlerContext| match I::from_context(cx) {
                Ok(input) => {
                    let fut = f(input);
                    async move { fut.await.into_result().map_err(HandlerFailure::Failed) }.boxed()
                }
                Err(e) => {
                    let text = e.to_string();
                    async move { Err(HandlerFailure::Poison(text)) }.boxed()
                }
            }),
            slot: crate::periodic::slot_payload::<I::Message>,
        }
    }

    /// Calls the handler; a panic becomes [`HandlerFailure::Failed`].
    pub async fn call(&self, cx: &HandlerContext) -> Result<(), HandlerFailure> {
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(cx))) {
            Ok(fut) => fut,
            Err(panic) => return Err(HandlerFailure::Failed(panic_text(&*panic))),
        };
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => Err(HandlerFailure::Failed(panic_text(&*panic))),
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    format!("handler panicked: {msg}")
}

/// Starts consumers of one channel.
///
/// ```
/// # use queue_core::{channel, Delivery, Queue};
/// # use serde::{Deserialize, Serialize};
/// #[channel("images/resize")]
/// #[derive(Serialize, Deserialize)]
/// struct Resize { path: String }
///
/// # async fn run(queue: Queue) -> Result<(), queue_core::QueueError> {
/// let handle = Resize::consumer(&queue)
///     .max_parallel(4)
///     .deliveries(|d: Delivery<Resize>| async move {
///         if d.attempt() > 3 {
///             return d.dead_letter("giving up").await;
///         }
///         Ok(())
///     })
///     .await?;
/// handle.stop(std::time::Duration::from_secs(5)).await?;
/// # Ok(()) }
/// ```
pub struct ConsumerBuilder<C: Channel> {
    queue: Queue,
    max_parallel: u32,
    name: Option<String>,
    _channel: PhantomData<fn() -> C>,
}

impl<C: Channel> fmt::Debug for ConsumerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("channel", &C::SPEC.name)
            .field("max_parallel", &self.max_parallel)
            .finish()
    }
}

impl<C: Channel> ConsumerBuilder<C> {
    pub(crate) fn new(queue: Queue) -> Self {
        ConsumerBuilder {
            queue,
            max_parallel: DEFAULT_MAX_PARALLEL,
            name: None,
            _channel: PhantomData,
        }
    }

    /// At most `n` deliveries held and handled at once (at least 1).
    #[must_use]
    pub fn max_parallel(mut self, n: u32) -> Self {
        self.max_parallel = n.max(1);
        self
    }

    /// Names the consumer in logs.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Starts consuming with a handler that takes the message.
    ///
    /// # Errors
    /// The adapter's error when the subscription cannot be opened.
    ///
    /// # Cancel safety
    /// Dropped before it completes, no consumer runs: a subscription opened meanwhile is closed.
    pub async fn handle<F, Fut>(self, handler: F) -> Result<ConsumerHandle, QueueError>
    where
        F: Fn(C::Message) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        let erased = ErasedHandler::new::<C::Message, _, _>(handler);
        self.start(erased).await
    }

    /// Starts consuming with a handler that takes the whole [`Delivery`].
    ///
    /// # Errors
    /// The adapter's error when the subscription cannot be opened.
    ///
    /// # Cancel safety
    /// Dropped before it completes, no consumer runs: a subscription opened meanwhile is closed.
    pub async fn deliveries<F, Fut>(self, handler: F) -> Result<ConsumerHandle, QueueError>
    where
        F: Fn(Delivery<C::Message>) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        let erased = ErasedHandler::new::<Delivery<C::Message>, _, _>(handler);
        self.start(erased).await
    }

    /// Starts consuming with an erased handler.
    ///
    /// # Errors
    /// The adapter's error when the subscription cannot be opened.
    ///
    /// # Cancel safety
    /// Dropped before it completes, no consumer runs: a subscription opened meanwhile is closed.
    pub async fn start(self, handler: ErasedHandler) -> Result<ConsumerHandle, QueueError> {
        let name = self.name.unwrap_or_else(|| C::SPEC.name.to_string());
        start_consumer(self.queue, C::SPEC, handler, self.max_parallel, name).await
    }
}

/// Opens a subscription and runs the consumer loop on the queue's spawner.
///
/// # Errors
/// The adapter's error when the subscription cannot be opened.
///
/// # Cancel safety
/// Dropped before it completes, no consumer runs: a subscription opened meanwhile is closed.
pub async fn start_consumer(
    queue: Queue,
    spec: ChannelSpec,
    handler: ErasedHandler,
    max_parallel: u32,
    name: String,
) -> Result<ConsumerHandle, QueueError> {
    let max_parallel = max_parallel.max(1);
    let subscription = queue.adapter().subscribe(&spec, max_parallel).await?;
    subscription.take_ahead();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let spec = Arc::new(spec);
    let slots = crate::periodic::produce_slots(queue.clone(), spec.clone(), handler.slot);
    let looped = ConsumerLoop {
        queue: queue.clone(),
        spec,
        handler,
        max_parallel: max_parallel as usize,
        name: name.clone(),
    };
    queue.spawner().spawn(
        async move {
            // A periodic channel's slots are produced for as long as the loop runs.
            select(Box::pin(looped.run(subscription, stop_rx)), Box::pin(slots)).await;
            let _ = done_tx.send(());
        }
        .boxed(),
    );
    Ok(ConsumerHandle {
        name,
        stop: Some(stop_tx),
        done: Some(done_rx),
    })
}

/// A running consumer. Stops when [`ConsumerHandle::stop`] is called or when dropped; a drop
/// gives every held delivery back at once.
pub struct ConsumerHandle {
    name: String,
    stop: Option<oneshot::Sender<Duration>>,
    done: Option<oneshot::Receiver<()>>,
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ConsumerHandle {
    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops taking messages, waits up to `grace` for running handlers, gives the rest back
    /// unprocessed (their attempt does not count), and returns when the loop has ended.
    ///
    /// # Errors
    /// None today; reserved for adapters that fail to release.
    ///
    /// # Cancel safety
    /// Once polled, the consumer stops whether or not the future is polled again; dropping it
    /// only stops waiting for the end of running handlers.
    pub async fn stop(mut self, grace: Duration) -> Result<(), QueueError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        Ok(())
    }

    /// Waits until the loop ends (after a stop, or when the queue closes).
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn closed(&mut self) {
        if let Some(done) = self.done.as_mut() {
            let _ = done.await;
        }
        self.done = None;
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Duration::ZERO);
        }
    }
}

struct ConsumerLoop {
    queue: Queue,
    spec: Arc<ChannelSpec>,
    handler: ErasedHandler,
    max_parallel: usize,
    name: String,
}

enum Step {
    Stop(Duration),
    Delivery(Result<RawDelivery, QueueError>),
}

type Unsettled = Arc<Mutex<HashMap<u64, Lease>>>;

impl ConsumerLoop {
    async fn run(
        self,
        subscription: Box<dyn crate::adapter::Subscription>,
        mut stop: oneshot::Receiver<Duration>,
    ) {
        let unsettled: Unsettled = Arc::default();
        let mut keeper = Keeper::new(self.queue.clone(), self.spec.lease);
        let mut running = FuturesUnordered::new();
        let mut next: Option<BoxFuture<'static, Result<RawDelivery, QueueError>>> = None;
        let mut failures = 0u32;
        let grace = loop {
            let step = poll_fn(|cx| {
                if let Poll::Ready(g) = stop.poll_unpin(cx) {
                    return Poll::Ready(Step::Stop(g.unwrap_or(Duration::ZERO)));
                }
                while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
                keeper.poll(cx);
                if next.is_none() && running.len() < self.max_parallel {
                    next = Some(subscription.next());
                }
                if let Some(fut) = next.as_mut()
                    && let Poll::Ready(r) = fut.poll_unpin(cx)
                {
                    next = None;
                    return Poll::Ready(Step::Delivery(r));
                }
                Poll::Pending
            })
            .await;
            match step {
                Step::Stop(grace) => break grace,
                Step::Delivery(Ok(raw)) => {
                    failures = 0;
                    unsettled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(raw.lease.token, raw.lease.clone());
                    let cancel = Cancellation::default();
                    keeper.hold(&raw.lease, raw.deadline, cancel.clone());
                    running.push(self.process(raw, cancel, keeper.kept(), unsettled.clone()));
                }
                Step::Delivery(Err(QueueError::Closed)) => {
                    tracing::debug!(consumer = %self.name, "queue closed, consumer ends");
                    break Duration::ZERO;
                }
                Step::Delivery(Err(e)) => {
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(50 << failures.min(6));
                    tracing::warn!(consumer = %self.name, error = %e, ?pause, "receiving failed");
                    let clock = self.queue.clock();
                    let wake = clock.sleep_until(clock.now() + millis(pause));
                    if let Either::Left((g, _)) = select(&mut stop, wake).await {
                        break g.unwrap_or(Duration::ZERO);
                    }
                }
            }
        };
        drop(next);
        subscription.stop().await;
        if !running.is_empty() && !grace.is_zero() {
            let clock = self.queue.clock().clone();
            let deadline = clock.sleep_until(clock.now() + millis(grace));
            // Leases are still extended while the running handlers finish.
            let drain = poll_fn(|cx| {
                while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
                if running.is_empty() {
                    return Poll::Ready(());
                }
                keeper.poll(cx);
                Poll::Pending
            });
            let _ = select(Box::pin(drain), deadline).await;
        }
        drop(running);
        let left: Vec<Lease> = unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        for lease in left {
            if let Err(e) = self.queue.adapter().settle(&lease, Outcome::Release).await {
                tracing::debug!(consumer = %self.name, message_id = %lease.id, error = %e, "release failed");
            }
        }
        drop(subscription);
    }

    fn process(
        &self,
        raw: RawDelivery,
        cancel: Cancellation,
        kept: Arc<Mutex<Kept>>,
        unsettled: Unsettled,
    ) -> BoxFuture<'static, ()> {
        let span = crate::telemetry::handle_span(&self.spec.name, &raw);
        let queue = self.queue.clone();
        let spec = self.spec.clone();
        let handler = self.handler.clone();
        async move {
            let lease = raw.lease.clone();
            queue.running().enter(&lease, cancel.clone());
            let cx = HandlerContext {
                raw,
                queue: queue.clone(),
                settled: Arc::new(AtomicBool::new(false)),
                cancelled: cancel,
            };
            let started = std::time::Instant::now();
            let result = handler.call(&cx).await;
            // The lease is no longer extended once the handler has returned.
            kept.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(lease.token);
            if let Some(observer) = queue.observer() {
                let handled = match &result {
                    Ok(()) => crate::queue::Handled::Acked,
                    Err(HandlerFailure::Failed(_)) => crate::queue::Handled::Failed,
                    Err(HandlerFailure::Poison(_)) => crate::queue::Handled::DeadLettered,
                };
                observer.handled(&spec.name, handled, started.elapsed());
            }
            let outcome = match result {
                Ok(()) => Outcome::Ack,
                Err(HandlerFailure::Failed(error)) => {
                    crate::telemetry::failed(&tracing::Span::current(), &error);
                    tracing::warn!(error = %error, "handler failed");
                    Outcome::Retry { after: None, error }
                }
                Err(HandlerFailure::Poison(error)) => {
                    crate::telemetry::failed(&tracing::Span::current(), &error);
                    tracing::error!(error = %error, "payload does not decode, dead-lettering");
                    Outcome::DeadLetter { error }
                }
            };
            if !cx.settled.swap(true, Ordering::AcqRel)
                && let Err(e) = queue.adapter().settle(&lease, outcome).await
            {
                tracing::warn!(error = %e, "settling the delivery failed");
            }
            queue.running().leave(&lease);
            unsettled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&lease.token);
        }
        .instrument(span)
        .boxed()
    }
}

/// The running handlers' leases and when each is next extended, shared by a consumer loop
/// and its handlers.
#[derive(Default)]
struct Kept {
    held: HashMap<u64, Held>,
    /// `(when, token)` of the leases waiting for their next extension.
    due: BTreeSet<(Timestamp, u64)>,
}

struct Held {
    lease: Lease,
    cancel: Cancellation,
    /// When the next extension is due; `None` while one is being made or once extending
    /// has stopped.
    at: Option<Timestamp>,
}

impl Kept {
    /// Stops extending lease `token`: its handler has returned.
    fn release(&mut self, token: u64) {
        if let Some(Held { at: Some(at), .. }) = self.held.remove(&token) {
            self.due.remove(&(at, token));
        }
    }
}

/// Extends the leases of a consumer's running handlers, each time a third of the lease has
/// passed, with one timer for the consumer rather than one per delivery. A refused
/// extension stops extending that lease (the handler runs on); one refused because the
/// message was cancelled tells its handler.
struct Keeper {
    queue: Queue,
    period: Duration,
    period_ms: u64,
    kept: Arc<Mutex<Kept>>,
    /// Fires at or before the earliest due extension.
    timer: Option<(Timestamp, BoxFuture<'static, ()>)>,
    extending: FuturesUnordered<BoxFuture<'static, (u64, Result<Timestamp, QueueError>)>>,
}

impl Keeper {
    fn new(queue: Queue, period: Duration) -> Self {
        Keeper {
            queue,
            period,
            period_ms: millis(period).max(3),
            kept: Arc::default(),
            timer: None,
            extending: FuturesUnordered::new(),
        }
    }

    fn kept(&self) -> Arc<Mutex<Kept>> {
        self.kept.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn due_at(&self, deadline: Timestamp) -> Timestamp {
        deadline.saturating_sub(self.period_ms * 2 / 3)
    }

    /// Starts extending `lease`, which lapses at `deadline`.
    fn hold(&mut self, lease: &Lease, deadline: Timestamp, cancel: Cancellation) {
        let at = self.due_at(deadline);
        let mut kept = self.lock();
        kept.due.insert((at, lease.token));
        let held = Held {
            lease: lease.clone(),
            cancel,
            at: Some(at),
        };
        kept.held.insert(lease.token, held);
    }

    /// Makes the extensions that are due and takes their answers. The timer is set again
    /// only when an earlier extension comes due, or when it fires: a handler returning does
    /// not move it.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) {
        loop {
            while let Poll::Ready(Some((token, result))) = self.extending.poll_next_unpin(cx) {
                self.extended(token, result);
            }
            let earliest = self.lock().due.first().map(|(at, _)| *at);
            let Some(earliest) = earliest else {
                return;
            };
            if self
                .timer
                .as_ref()
                .is_none_or(|(armed, _)| earliest < *armed)
            {
                let sleep = self.queue.clock().sleep_until(earliest);
                self.timer = Some((earliest, sleep));
            }
            let Some((_, sleep)) = self.timer.as_mut() else {
                return;
            };
            if sleep.poll_unpin(cx).is_pending() {
                return;
            }
            self.timer = None;
            let now = self.queue.clock().now();
            let mut kept = self.lock();
            while let Some(&(at, token)) = kept.due.first()
                && at <= now
            {
                kept.due.pop_first();
                let Some(held) = kept.held.get_mut(&token) else {
                    continue;
                };
                held.at = None;
                let (queue, lease, period) = (self.queue.clone(), held.lease.clone(), self.period);
                self.extending.push(
                    async move { (token, queue.adapter().extend(&lease, period).await) }.boxed(),
                );
            }
        }
    }

    fn extended(&mut self, token: u64, result: Result<Timestamp, QueueError>) {
        let mut kept = self.lock();
        let Some(held) = kept.held.get_mut(&token) else {
            // Its handler returned meanwhile.
            return;
        };
        match result {
            Ok(deadline) => {
                let at = self.due_at(deadline);
                held.at = Some(at);
                kept.due.insert((at, token));
            }
            Err(QueueError::Cancelled { .. }) => {
                tracing::info!(message_id = %held.lease.id, "message cancelled while its handler runs");
                held.cancel.fire();
            }
            Err(e) => {
                tracing::warn!(message_id = %held.lease.id, error = %e, "lease extension refused; the message may go to another consumer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{Adapter, ChannelStats, DeadLetter, Outgoing, Receipt, StoredMessage};
    use crate::clock::{Clock, VirtualClock};
    use crate::queue::Spawn;
    use crate::{Cancelled, MessageId, Subscription};

    /// Answers extensions from the clock and records them; nothing else is called.
    struct Extends {
        clock: VirtualClock,
        made: Mutex<Vec<(u64, Timestamp)>>,
    }

    fn unused<T>() -> BoxFuture<'static, Result<T, QueueError>> {
        unreachable!("the keeper only extends")
    }

    impl Adapter for Extends {
        fn produce<'a>(
            &'a self,
            _: &'a ChannelSpec,
            _: Vec<Outgoing>,
        ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
            unused()
        }
        fn subscribe<'a>(
            &'a self,
            _: &'a ChannelSpec,
            _: u32,
        ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
            unused()
        }
        fn settle<'a>(&'a self, _: &'a Lease, _: Outcome) -> BoxFuture<'a, Result<(), QueueError>> {
            unused()
        }
        fn extend<'a>(
            &'a self,
            lease: &'a Lease,
            by: Duration,
        ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
            let now = self.clock.now();
            self.made.lock().unwrap().push((lease.token, now));
            async move { Ok(now + millis(by)) }.boxed()
        }
        fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
            unused()
        }
        fn peek<'a>(
            &'a self,
            _: &'a str,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
            unused()
        }
        fn dead_letters<'a>(
            &'a self,
            _: &'a str,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
            unused()
        }
        fn redrive<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a [MessageId]>,
        ) -> BoxFuture<'a, Result<u64, QueueError>> {
            unused()
        }
        fn purge_dead<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a [MessageId]>,
        ) -> BoxFuture<'a, Result<u64, QueueError>> {
            unused()
        }
        fn purge<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
            unused()
        }
        fn cancel<'a>(
            &'a self,
            _: &'a str,
            _: MessageId,
        ) -> BoxFuture<'a, Result<Cancelled, QueueError>> {
            unused()
        }
        fn set_paused<'a>(&'a self, _: &'a str, _: bool) -> BoxFuture<'a, Result<(), QueueError>> {
            unused()
        }
        fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
            unused()
        }
    }

    struct NoSpawn;

    impl Spawn for NoSpawn {
        fn spawn(&self, _: BoxFuture<'static, ()>) {
            unreachable!("the keeper spawns nothing")
        }
    }

    fn lease(token: u64) -> Lease {
        Lease {
            channel: "c".into(),
            id: MessageId(token),
            token,
        }
    }

    fn cancel() -> Cancellation {
        Cancellation::default()
    }

    #[test]
    fn a_cancellation_wakes_its_waiter_once_when_fired() {
        use futures_util::task::{ArcWake, waker};
        use std::sync::atomic::AtomicUsize;
        struct Wakes(AtomicUsize);
        impl ArcWake for Wakes {
            fn wake_by_ref(w: &Arc<Self>) {
                w.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = waker(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let cancel = Cancellation::default();
        let handler = cancel.clone();
        let mut waiting = Box::pin(async move { handler.cancelled().await });
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert!(!cancel.is_cancelled());
        cancel.fire();
        cancel.fire();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(waiting.as_mut().poll(&mut cx).is_ready());
        let mut late = Box::pin(async move { cancel.cancelled().await });
        assert!(late.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn each_lease_is_extended_when_a_third_has_passed_even_if_an_earlier_one_arrives_later() {
        let clock = VirtualClock::new(0);
        let adapter = Arc::new(Extends {
            clock: clock.clone(),
            made: Mutex::default(),
        });
        let queue = Queue::new(
            adapter.clone(),
            Arc::new(clock.clone()),
            Arc::new(NoSpawn),
            "test",
        );
        let mut keeper = Keeper::new(queue, Duration::from_secs(9));
        let poll = |keeper: &mut Keeper| {
            futures_executor::block_on(poll_fn(|cx| {
                keeper.poll(cx);
                Poll::Ready(())
            }));
        };
        let made = || adapter.made.lock().unwrap().clone();
        // Token 1 lapses at 9 s: extended at 3 s, then lapses at 12 s, next due at 6 s.
        keeper.hold(&lease(1), 9_000, cancel());
        poll(&mut keeper);
        clock.advance(Duration::from_millis(2_999));
        poll(&mut keeper);
        assert_eq!(made(), vec![]);
        clock.advance(Duration::from_millis(1));
        poll(&mut keeper);
        assert_eq!(made(), vec![(1, 3_000)]);
        // Token 2 was leased earlier (taken ahead) and is due already: the timer moves.
        keeper.hold(&lease(2), 7_000, cancel());
        poll(&mut keeper);
        assert_eq!(made(), vec![(1, 3_000), (2, 3_000)]);
        // A returned handler is extended no more; the others are.
        keeper.kept().lock().unwrap().release(2);
        clock.advance(Duration::from_secs(3));
        poll(&mut keeper);
        assert_eq!(made(), vec![(1, 3_000), (2, 3_000), (1, 6_000)]);
        // Late polls make one extension, from the time they run.
        clock.advance(Duration::from_secs(30));
        poll(&mut keeper);
        assert_eq!(made()[3..], [(1, 36_000)]);
    }
}
