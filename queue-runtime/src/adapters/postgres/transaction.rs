//! Produce and consume inside database transactions.
//!
//! - [`PgTransaction`]: a transaction on a connection of the queue's pool. Run your own SQL
//!   on it (it dereferences to [`tokio_postgres::Client`]), produce with
//!   `T::produce_in(&tx, message)`, then [`PgTransaction::commit`]. Messages produced in it
//!   exist only once it commits; dropping it without committing rolls it back.
//! - [`Within`]: produce inside a transaction of your own `tokio-postgres` client, from
//!   [`Postgres::within`].
//! - [`consume_in_transaction`] and [`TransactionalConsumer`]: a consumer whose handler gets
//!   the message and a [`PgTransaction`]; the ack runs in that transaction before it commits.
//!
//! A pooled connection goes back to the pool only once the server has answered its `COMMIT`
//! or `ROLLBACK`. A transaction dropped at any other point (a cancelled future, `BEGIN`
//! included: the guard exists before `BEGIN` is sent) closes its connection instead, and the
//! server rolls the transaction back; no later statement can run inside it.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use deadpool_postgres::Object;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use queue_core::consume::{
    ConsumerInput, DEFAULT_MAX_PARALLEL, ErasedHandler, HandlerContext, HandlerOutput,
    start_consumer,
};
use queue_core::{
    Channel, ChannelSpec, ConsumerHandle, Lease, MessageId, Outgoing, Queue, QueueError, Receipt,
    TransactionalProduce, codec,
};
use tokio_postgres::Client;

use super::schema::db_error;
use super::{Inner, PostgresAdapter};

/// The PostgreSQL side of a queue opened with a `postgres://` URL: where transactions come
/// from.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.inner.description)
            .field("schema", &self.inner.options.schema)
            .finish()
    }
}

impl Postgres {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Postgres { inner }
    }

    /// The PostgreSQL adapter behind `queue`.
    ///
    /// # Errors
    /// [`QueueError::Unsupported`] when the queue is not a `postgres://` one.
    pub fn of(queue: &Queue) -> Result<Self, QueueError> {
        PostgresAdapter::of(queue.adapter())
            .map(Postgres::new)
            .ok_or(QueueError::Unsupported(
                "transactions need a queue opened with a postgres:// url",
            ))
    }

    /// The schema holding the queue's tables.
    pub fn schema(&self) -> &str {
        &self.inner.options.schema
    }

    /// The connection pool the queue uses; take connections from it for your own queries.
    /// A connection goes back to the pool as you leave it: end any transaction you begin on
    /// it (or use [`Postgres::begin`], which never pools a connection inside a transaction).
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }

    /// Begins a transaction on a connection of the queue's pool.
    ///
    /// # Errors
    /// [`QueueError::Closed`] after the queue closed; database errors.
    ///
    /// # Cancel safety
    /// Dropped before it returns, nothing was begun: the connection is closed, not pooled.
    pub async fn begin(&self) -> Result<PgTransaction, QueueError> {
        let conn = self.inner.connection().await?;
        // The guard first: dropped from here on, the connection is closed.
        let tx = PgTransaction {
            tx: Arc::new(TxInner {
                inner: self.inner.clone(),
                conn: Some(conn),
                state: AtomicU8::new(OPEN),
                produced: Mutex::new(HashSet::new()),
                acked: Mutex::new(Vec::new()),
                delivery: Mutex::new(None),
            }),
        };
        tx.tx
            .conn()
            .batch_execute("BEGIN")
            .await
            .map_err(|e| db_error("beginning a transaction", e))?;
        Ok(tx)
    }

    /// Produces inside `tx`, a transaction of your own `tokio-postgres` client on the same
    /// database: `T::produce_in(&pg.within(&tx), message)`. Waiting consumers are notified
    /// when `tx` commits.
    pub fn within<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'_>) -> Within<'a> {
        Within {
            inner: &self.inner,
            client: tx.client(),
        }
    }
}

/// Begins a transaction on the pool of a `postgres://` queue.
///
/// # Errors
/// [`QueueError::Unsupported`] for a queue of another adapter; as [`Postgres::begin`].
pub async fn begin(queue: &Queue) -> Result<PgTransaction, QueueError> {
    Postgres::of(queue)?.begin().await
}

/// A transaction on a connection of the queue's pool. Clones share it.
///
/// Dereferences to [`tokio_postgres::Client`]: every query run through it is part of the
/// transaction until [`PgTransaction::commit`] or [`PgTransaction::rollback`]. Dropping the
/// last clone without either (or while either is in flight) closes the connection, which
/// rolls the transaction back; the connection is not reused.
#[derive(Clone)]
pub struct PgTransaction {
    tx: Arc<TxInner>,
}

/// [`TxInner::state`]: open; `COMMIT` or `ROLLBACK` sent; answered (the connection is idle).
const OPEN: u8 = 0;
const ENDING: u8 = 1;
const ENDED: u8 = 2;

struct TxInner {
    inner: Arc<Inner>,
    conn: Option<Object>,
    state: AtomicU8,
    /// Channels produced to, woken once the transaction commits.
    produced: Mutex<HashSet<String>>,
    /// Leases acked inside, whose slots free once the transaction commits.
    acked: Mutex<Vec<u64>>,
    /// The delivery a transactional consumer runs this transaction for.
    delivery: Mutex<Option<(MessageId, u32)>>,
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction")
            .field("open", &(self.tx.state.load(Ordering::Relaxed) == OPEN))
            .field("delivery", &*self.tx.delivery.lock())
            .finish_non_exhaustive()
    }
}

impl Deref for PgTransaction {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.tx.conn()
    }
}

impl TxInner {
    fn conn(&self) -> &Object {
        self.conn
            .as_ref()
            .expect("a transaction has its connection until dropped")
    }
}

impl PgTransaction {
    /// The connection, with its statement cache (`prepare_cached`).
    pub fn connection(&self) -> &Object {
        self.tx.conn()
    }

    /// For a transactional consumer's transaction: the message id, stable across
    /// redeliveries, to use as an idempotency key for effects outside the database.
    pub fn message_id(&self) -> Option<MessageId> {
        self.tx.delivery.lock().map(|(id, _)| id)
    }

    /// For a transactional consumer's transaction: 1 for the first delivery, counting every
    /// delivery since.
    pub fn attempt(&self) -> Option<u32> {
        self.tx.delivery.lock().map(|(_, a)| a)
    }

    fn finished() -> QueueError {
        QueueError::InvalidRequest(
            "the transaction has already been committed or rolled back".into(),
        )
    }

    fn check(&self) -> Result<(), QueueError> {
        if self.tx.state.load(Ordering::Acquire) == OPEN {
            Ok(())
        } else {
            Err(Self::finished())
        }
    }

    /// Sends `COMMIT` or `ROLLBACK`; the connection counts as idle once the server answered.
    async fn end(&self, statement: &str, doing: &str) -> Result<(), QueueError> {
        if self
            .tx
            .state
            .compare_exchange(OPEN, ENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Self::finished());
        }
        let answer = self.tx.conn().batch_execute(statement).await;
        self.tx.state.store(ENDED, Ordering::Release);
        answer.map_err(|e| db_error(doing, e))
    }

    /// Commits. Messages produced in the transaction become visible and waiting consumers
    /// are woken.
    ///
    /// # Errors
    /// Database errors (the transaction is then rolled back by the server);
    /// [`QueueError::InvalidRequest`] when it was already finished.
    ///
    /// # Cancel safety
    /// Dropped before the server answered, the connection is closed: the transaction
    /// committed or rolled back as far as the server got, and consumers are not woken.
    pub async fn commit(self) -> Result<(), QueueError> {
        self.end("COMMIT", "committing").await?;
        let inner = &self.tx.inner;
        let acked = std::mem::take(&mut *self.tx.acked.lock());
        inner.forget_leases(&acked);
        let produced = std::mem::take(&mut *self.tx.produced.lock());
        for channel in &produced {
            inner.wake(channel);
        }
        Ok(())
    }

    /// Rolls back: nothing produced or acked in the transaction happened.
    ///
    /// # Errors
    /// Database errors; [`QueueError::InvalidRequest`] when it was already finished.
    ///
    /// # Cancel safety
    /// Dropped before the server answered, the connection is closed, which rolls back too.
    pub async fn rollback(self) -> Result<(), QueueError> {
        self.end("ROLLBACK", "rolling back").await
    }

    async fn ack(&self, lease: &Lease) -> Result<bool, QueueError> {
        self.check()?;
        let acked = self.tx.inner.ack_on(self.tx.conn(), lease).await?;
        if acked {
            self.tx.acked.lock().push(lease.token);
        }
        Ok(acked)
    }
}

impl Drop for TxInner {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.state.load(Ordering::Acquire) == ENDED {
            return;
        }
        // Inside a transaction, or not known to be out of it: the connection never goes
        // back to the pool. Closing it makes the server roll the transaction back.
        tracing::debug!("closing the connection of a transaction dropped before it ended");
        drop(Object::take(conn));
    }
}

impl TransactionalProduce for PgTransaction {
    fn produce_outgoing<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        async move {
            self.check()?;
            let inner = &self.tx.inner;
            check_sizes(&batch)?;
            let channel = inner.channel(spec).await?;
            let conn = self.tx.conn();
            let stmt = conn
                .prepare_cached(&inner.sql.produce)
                .await
                .map_err(|e| db_error("preparing", e))?;
            let (receipts, fresh) = inner.produce_on(conn, &stmt, &channel, &batch).await?;
            if fresh {
                self.tx.produced.lock().insert(spec.name.to_string());
            }
            Ok(receipts)
        }
        .boxed()
    }
}

fn check_sizes(batch: &[Outgoing]) -> Result<(), QueueError> {
    for m in batch {
        if m.payload.len() > codec::MAX_PAYLOAD {
            return Err(QueueError::PayloadTooLarge {
                size: m.payload.len(),
                max: codec::MAX_PAYLOAD,
            });
        }
    }
    Ok(())
}

/// Produces inside a transaction of your own client; see [`Postgres::within`].
pub struct Within<'a> {
    inner: &'a Arc<Inner>,
    client: &'a Client,
}

impl fmt::Debug for Within<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Within").finish_non_exhaustive()
    }
}

impl TransactionalProduce for Within<'_> {
    fn produce_outgoing<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        async move {
            check_sizes(&batch)?;
            let inner = self.inner;
            let channel = inner.channel(spec).await?;
            let stmt = self
                .client
                .prepare(&inner.sql.produce)
                .await
                .map_err(|e| db_error("preparing", e))?;
            let (receipts, fresh) = inner
                .produce_on(self.client, &stmt, &channel, &batch)
                .await?;
            if fresh {
                // Delivered by the server when the caller's transaction commits.
                self.client
                    .execute(
                        "SELECT pg_notify($1, $2)",
                        &[&inner.sql.notify_channel, &spec.name.as_ref()],
                    )
                    .await
                    .map_err(|e| db_error("notifying", e))?;
            }
            Ok(receipts)
        }
        .boxed()
    }
}

/// A delivery as a transactional handler's wrapper sees it.
struct TxDelivery<T> {
    message: T,
    lease: Lease,
    attempt: u32,
    settled: Arc<AtomicBool>,
}

impl<T: queue_core::Message> ConsumerInput for TxDelivery<T> {
    type Message = T;

    fn from_context(cx: &HandlerContext) -> Result<Self, QueueError> {
        Ok(TxDelivery {
            message: codec::decode(&cx.raw.payload)?,
            lease: cx.raw.lease.clone(),
            attempt: cx.raw.attempt,
            settled: cx.settled.clone(),
        })
    }
}

/// Starts a consumer of channel `C` whose handler runs inside a transaction: it gets the
/// message and a [`PgTransaction`]; when it returns `Ok`, the ack runs in that transaction
/// and the transaction commits, so the handler's database effects and the ack are atomic.
/// An `Err` or a panic rolls everything back and the message is retried with backoff, as
/// for any consumer. If the lease was lost meanwhile (the handler outlived it and another
/// consumer has the message), the ack finds a stale token and the transaction is rolled
/// back.
///
/// Each running handler holds one pooled connection: keep `max_parallel` below the pool
/// size (`pool_size` in the URL), so that takes and lease extensions find connections.
///
/// # Errors
/// [`QueueError::Unsupported`] for a queue of another adapter; the adapter's errors when the
/// subscription cannot be opened.
pub async fn consume_in_transaction<C, F, Fut>(
    queue: &Queue,
    handler: F,
) -> Result<ConsumerHandle, QueueError>
where
    C: Channel,
    F: Fn(C::Message, PgTransaction) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: HandlerOutput,
{
    TransactionalConsumer::<C>::new(queue)?
        .handle(handler)
        .await
}

/// Starts transactional consumers of one channel, with options; see
/// [`consume_in_transaction`].
pub struct TransactionalConsumer<C: Channel> {
    queue: Queue,
    pg: Postgres,
    max_parallel: u32,
    name: Option<String>,
    _channel: PhantomData<fn() -> C>,
}

impl<C: Channel> fmt::Debug for TransactionalConsumer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalConsumer")
            .field("channel", &C::SPEC.name)
            .field("max_parallel", &self.max_parallel)
            .finish()
    }
}

impl<C: Channel> TransactionalConsumer<C> {
    /// A builder for `queue`, which must be a `postgres://` queue.
    ///
    /// # Errors
    /// [`QueueError::Unsupported`] for a queue of another adapter.
    pub fn new(queue: &Queue) -> Result<Self, QueueError> {
        let pg = Postgres::of(queue)?;
        let pool = pg.inner.options.pool_size;
        let max_parallel = DEFAULT_MAX_PARALLEL.min(u32::try_from(pool / 2).unwrap_or(1).max(1));
        Ok(TransactionalConsumer {
            queue: queue.clone(),
            pg,
            max_parallel,
            name: None,
            _channel: PhantomData,
        })
    }

    /// At most `n` handlers (and so `n` open transactions) at once.
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

    /// Starts consuming.
    ///
    /// # Errors
    /// The adapter's errors when the subscription cannot be opened.
    pub async fn handle<F, Fut>(self, handler: F) -> Result<ConsumerHandle, QueueError>
    where
        F: Fn(C::Message, PgTransaction) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        let pg = self.pg.clone();
        let handler = Arc::new(handler);
        let erased =
            ErasedHandler::new::<TxDelivery<C::Message>, _, _>(move |d: TxDelivery<C::Message>| {
                let pg = pg.clone();
                let handler = handler.clone();
                async move { run_in_transaction(&pg, d, &*handler).await }
            });
        let name = self.name.unwrap_or_else(|| C::SPEC.name.to_string());
        start_consumer(self.queue, C::SPEC, erased, self.max_parallel, name).await
    }
}

async fn run_in_transaction<M, F, Fut>(
    pg: &Postgres,
    d: TxDelivery<M>,
    handler: &F,
) -> Result<(), String>
where
    F: Fn(M, PgTransaction) -> Fut,
    Fut: Future,
    Fut::Output: HandlerOutput,
{
    let tx = pg.begin().await.map_err(|e| e.to_string())?;
    *tx.tx.delivery.lock() = Some((d.lease.id, d.attempt));
    let result = handler(d.message, tx.clone()).await.into_result();
    if let Err(error) = result {
        if let Err(e) = tx.rollback().await {
            tracing::debug!(error = %e, "rolling back a failed handler's transaction failed");
        }
        return Err(error);
    }
    match tx.ack(&d.lease).await {
        Ok(true) => {
            tx.commit().await.map_err(|e| e.to_string())?;
            d.settled.store(true, Ordering::Release);
            Ok(())
        }
        Ok(false) => {
            let _ = tx.rollback().await;
            d.settled.store(true, Ordering::Release);
            Err(format!(
                "the lease on message {} was lost before the commit; the transaction was rolled back",
                d.lease.id
            ))
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e.to_string())
        }
    }
}
