//! Consuming: handler erasure, the consumer loop every consumer runs (from
//! `T::consume`, a [`ConsumerBuilder`] or a worker), and [`ConsumerHandle`].
//!
//! The loop keeps at most `max_parallel` handlers running, extends each lease while its
//! handler runs, turns the handler's result into an ack or a nack (a panic is a failure, a
//! payload that does not decode is dead-lettered at once), and on stop waits for running
//! handlers up to a grace period before giving the rest back with [`Outcome::Release`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::future::{BoxFuture, Either, FutureExt, Shared, poll_fn, select};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::Instrument;

use crate::adapter::{Lease, Outcome, RawDelivery};
use crate::clock::{Timestamp, millis};
use crate::codec;
use crate::delivery::Delivery;
use crate::error::QueueError;
use crate::queue::{CancelSender, Queue, fire};
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
    /// Resolves with `Ok` once the store refuses the lease as cancelled; with `Err` when the
    /// delivery ends without that.
    pub cancelled: Shared<oneshot::Receiver<()>>,
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
        let mut running = FuturesUnordered::new();
        let mut next: Option<BoxFuture<'static, Result<RawDelivery, QueueError>>> = None;
        let mut failures = 0u32;
        let grace = loop {
            let step = poll_fn(|cx| {
                if let Poll::Ready(g) = stop.poll_unpin(cx) {
                    return Poll::Ready(Step::Stop(g.unwrap_or(Duration::ZERO)));
                }
                while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
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
                    running.push(self.process(raw, unsettled.clone()));
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
            let drain = async { while running.next().await.is_some() {} };
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

    fn process(&self, raw: RawDelivery, unsettled: Unsettled) -> BoxFuture<'static, ()> {
        let span = crate::telemetry::handle_span(&self.spec.name, &raw);
        let queue = self.queue.clone();
        let spec = self.spec.clone();
        let handler = self.handler.clone();
        async move {
            let lease = raw.lease.clone();
            let deadline = raw.deadline;
            let (cancel, cancelled) = oneshot::channel();
            let cancel: CancelSender = Arc::new(Mutex::new(Some(cancel)));
            queue.running().enter(&lease, cancel.clone());
            let cx = HandlerContext {
                raw,
                queue: queue.clone(),
                settled: Arc::new(AtomicBool::new(false)),
                cancelled: cancelled.shared(),
            };
            let keeper = keep_lease(queue.clone(), lease.clone(), spec.lease, deadline, cancel);
            let started = std::time::Instant::now();
            let result = match select(Box::pin(handler.call(&cx)), Box::pin(keeper)).await {
                Either::Left((r, _)) => r,
                Either::Right(((), handler)) => handler.await,
            };
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

/// Extends a lease while its handler runs: each time a third of the lease has passed. Ends
/// (leaving the handler running) when an extension is refused; fires `cancel` when it is
/// refused because the message was cancelled.
async fn keep_lease(
    queue: Queue,
    lease: Lease,
    period: Duration,
    mut deadline: Timestamp,
    cancel: CancelSender,
) {
    let period_ms = millis(period).max(3);
    loop {
        let at = deadline.saturating_sub(period_ms * 2 / 3);
        queue.clock().sleep_until(at).await;
        match queue.adapter().extend(&lease, period).await {
            Ok(d) => deadline = d,
            Err(QueueError::Cancelled { .. }) => {
                tracing::info!("message cancelled while its handler runs");
                fire(&cancel);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease extension refused; the message may go to another consumer");
                return;
            }
        }
    }
}
