//! `postgres://`: the queue in PostgreSQL, for many processes on many machines, with produce
//! and ack inside your own transactions.
//!
//! ```text
//! postgres://user:password@host:5432/database?schema=queue&pool_size=16
//! ```
//!
//! Options in the URL query (the rest is passed to `tokio-postgres` as it is):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `schema` | `queue` | the schema holding the queue's tables; one queue per schema |
//! | `pool_size` | `16` | connections in the pool |
//! | `migrate` | `true` | apply schema migrations on connect; with `false`, connecting fails when the schema is behind (run [`migrate`] or `queuectl migrate`) |
//! | `safety_poll_ms` | `5000` | how often an idle subscription looks for work when no notification came |
//! | `vacuum` | `true` | vacuum the messages table when dead rows pile up (see `docs/design.md`) |
//! | `sslmode` | `prefer` | TLS (rustls), as libpq: `disable`, `prefer`, `require`, `verify-ca`, `verify-full` (see [`SslMode`]) |
//! | `sslrootcert` | | the PEM file of the certificate authorities that may sign the server's certificate; needed by `verify-ca` and `verify-full` |
//! | `clock` | `server` | the time every rule reads: `server`, the database server's clock; `queue`, the queue's [`Clock`] (a `VirtualClock` in tests; never for processes on several hosts) |
//!
//! The queue rules are those of the engine (`crate::engine::state`), written as SQL: each
//! operation is one statement (or one pipelined round trip), every time rule compares with
//! the server's clock read in that statement (so hosts whose clocks disagree still agree on
//! leases, delays and dedup windows), leases are taken with
//! `FOR UPDATE SKIP LOCKED` and carry a fencing token from a sequence, and waiting
//! subscriptions wake on `LISTEN`/`NOTIFY`, on the clock reaching the next due time or lease
//! deadline, and otherwise only on a slow safety poll.
//!
//! # Transactions
//!
//! Produce inside a transaction with [`PgTransaction`] (from [`begin`]) or, for a transaction
//! of your own `tokio-postgres` client, with [`Postgres::within`]; the message is stored when
//! the transaction commits and never when it rolls back:
//!
//! ```no_run
//! # use queue_runtime::prelude::*;
//! # use serde::{Deserialize, Serialize};
//! # #[channel("user/registered", exactly_once, dedup = "1s")]
//! # #[derive(Debug, Clone, Serialize, Deserialize)]
//! # pub struct UserRegistered { pub id: u64, pub username: String }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use queue_runtime::adapters::postgres;
//!
//! let queue = queue_runtime::connect("postgres://postgres@127.0.0.1/app").await?;
//! let tx = postgres::begin(&queue).await?;
//! tx.execute("INSERT INTO users (id, name) VALUES ($1, $2)", &[&1i64, &"Peter"]).await?;
//! UserRegistered::produce_in(&tx, UserRegistered { id: 1, username: "Peter".into() }).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! Consume inside a transaction with [`consume_in_transaction`]: the handler gets the message
//! and the transaction; when it returns `Ok`, the ack runs in the same transaction, which then
//! commits, so the handler's database effects and the ack happen together or not at all. An
//! `Err` or a panic rolls the transaction back and the message is retried. This is the
//! strongest form of `exactly_once`: effects inside the database happen once per message.
//!
//! ```no_run
//! # use queue_runtime::prelude::*;
//! # use serde::{Deserialize, Serialize};
//! # #[channel("user/registered", exactly_once, dedup = "1s")]
//! # #[derive(Debug, Clone, Serialize, Deserialize)]
//! # pub struct UserRegistered { pub id: u64, pub username: String }
//! # async fn run(queue: Queue) -> Result<(), Box<dyn std::error::Error>> {
//! use queue_runtime::adapters::postgres::{self, PgTransaction};
//!
//! let consumer = postgres::consume_in_transaction::<UserRegisteredChannel, _, _>(
//!     &queue,
//!     |user: UserRegistered, tx: PgTransaction| async move {
//!         tx.execute("INSERT INTO welcome_mails (user_id) VALUES ($1)", &[&(user.id as i64)])
//!             .await?;
//!         Ok::<(), tokio_postgres::Error>(())
//!     },
//! )
//! .await?;
//! # Ok(()) }
//! ```

mod listener;
pub mod schema;
mod subscription;
mod tls;
mod transaction;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use queue_core::clock::{Clock, Timestamp, millis};
use queue_core::{
    Adapter, Cancelled, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, MessageState,
    Outcome, Outgoing, Processing, QueueError, Receipt, StoredMessage, Subscription,
};
use tokio::sync::{Notify, oneshot, watch};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

pub use self::schema::{MIGRATIONS, MigrationReport, latest_version};
use self::schema::{Sql, check_schema_name, db_error};
use self::subscription::{PgSubscription, SubShared};
pub use self::tls::{SslMode, TlsOptions};
pub use self::transaction::{
    PgTransaction, Postgres, TransactionalConsumer, Within, begin, consume_in_transaction,
};

/// Settings of the PostgreSQL adapter, read from the URL query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The schema holding the queue's tables.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Apply migrations on connect.
    pub migrate: bool,
    /// How often an idle subscription looks for work without a notification.
    pub safety_poll: Duration,
    /// Vacuum the messages table when dead rows pile up.
    pub vacuum: bool,
    /// The clock every time rule reads.
    pub clock: TimeSource,
    /// TLS to the server.
    pub tls: TlsOptions,
}

/// The clock the PostgreSQL adapter's time rules read (`clock=` in the URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSource {
    /// The database server's clock, read in each statement: one clock for every process.
    #[default]
    Server,
    /// The queue's own [`Clock`], passed into each statement: for tests that drive time with
    /// a `VirtualClock`. Processes on several hosts would each bring their own clock.
    Queue,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "queue".into(),
            pool_size: 16,
            migrate: true,
            safety_poll: Duration::from_secs(5),
            vacuum: true,
            clock: TimeSource::Server,
            tls: TlsOptions::default(),
        }
    }
}

impl PostgresOptions {
    /// Splits a `postgres://` URL into the driver's configuration and the adapter's options.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Self), String> {
        let mut options = PostgresOptions::default();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "schema" => options.schema = v.to_string(),
                "pool_size" => {
                    options.pool_size = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("`pool_size` must be a positive number, not `{v}`")
                    })?;
                }
                "migrate" => options.migrate = parse_bool("migrate", v)?,
                "vacuum" => options.vacuum = parse_bool("vacuum", v)?,
                "sslmode" => options.tls.mode = SslMode::parse(v)?,
                "sslrootcert" => options.tls.root_cert = Some(v.into()),
                "clock" => {
                    options.clock = match v {
                        "server" => TimeSource::Server,
                        "queue" => TimeSource::Queue,
                        _ => return Err(format!("`clock` must be server or queue, not `{v}`")),
                    };
                }
                "safety_poll_ms" => {
                    let ms: u64 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("`safety_poll_ms` must be a positive number, not `{v}`")
                    })?;
                    options.safety_poll = Duration::from_millis(ms);
                }
                _ => passed.push(pair),
            }
        }
        check_schema_name(&options.schema)?;
        options.tls.check()?;
        let driver_url = if passed.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let mut config =
            tokio_postgres::Config::from_str(&driver_url).map_err(|e| e.to_string())?;
        config.ssl_mode(options.tls.mode.driver());
        Ok((config, options))
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(format!("`{name}` must be true or false, not `{v}`")),
    }
}

/// The URL with its password replaced by `***`, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Applies the schema migrations of `url`'s schema and reports the versions; what
/// `queuectl migrate` runs.
///
/// # Errors
/// [`QueueError::InvalidUrl`] for a bad URL; database errors.
pub async fn migrate(url: &str) -> Result<MigrationReport, QueueError> {
    let (config, options) =
        PostgresOptions::parse(url).map_err(|reason| QueueError::InvalidUrl {
            url: redact(url),
            reason,
        })?;
    let tls = options
        .tls
        .connector()
        .map_err(|reason| QueueError::InvalidUrl {
            url: redact(url),
            reason,
        })?;
    let (mut client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| db_error("connecting", e))?;
    let driver = tokio::spawn(connection);
    let report = schema::migrate(&mut client, &options.schema).await;
    drop(client);
    let _ = driver.await;
    report
}

/// A channel as the database knows it.
#[derive(Debug, Clone)]
pub(crate) struct ChannelRow {
    pub id: i32,
    pub spec: ChannelSpec,
}

/// The PostgreSQL adapter. Open it with `queue_runtime::connect("postgres://…")`.
pub struct PostgresAdapter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresAdapter")
            .field("url", &self.inner.description)
            .field("schema", &self.inner.options.schema)
            .finish_non_exhaustive()
    }
}

/// Everything the adapter, its subscriptions, transactions and background tasks share.
pub(crate) struct Inner {
    pub pool: Pool,
    pub sql: Sql,
    pub clock: Arc<dyn Clock>,
    pub options: PostgresOptions,
    pub description: String,
    pub runtime: tokio::runtime::Handle,
    closed: AtomicBool,
    channels: RwLock<HashMap<String, ChannelRow>>,
    wakers: Arc<listener::Wakers>,
    /// Leases handed to this process's subscriptions, by token.
    leases: Mutex<HashMap<u64, Weak<SubShared>>>,
    /// This process's open subscriptions, by consumer id.
    subscriptions: Mutex<HashMap<i64, Weak<SubShared>>>,
    /// The backend of the listening connection: subscriptions are alive while it is.
    backend: Mutex<(i32, Option<SystemTime>)>,
    pub notifier: Arc<listener::Notifier>,
    acks: tokio::sync::mpsc::UnboundedSender<AckJob>,
    shutdown: watch::Sender<bool>,
}

struct AckJob {
    id: i64,
    token: i64,
    reply: oneshot::Sender<Result<bool, QueueError>>,
}

impl PostgresAdapter {
    /// Connects, applies migrations (unless `migrate=false`), starts listening for
    /// notifications, and returns the adapter.
    ///
    /// # Errors
    /// [`QueueError::InvalidUrl`] for a bad URL; database errors when the server cannot be
    /// reached or the schema cannot be used.
    pub async fn connect(url: &str, clock: Arc<dyn Clock>) -> Result<Arc<Self>, QueueError> {
        let description = redact(url);
        let (config, options) =
            PostgresOptions::parse(url).map_err(|reason| QueueError::InvalidUrl {
                url: description.clone(),
                reason,
            })?;
        let sql = Sql::new(&options.schema);
        let tls = options
            .tls
            .connector()
            .map_err(|reason| QueueError::InvalidUrl {
                url: description.clone(),
                reason,
            })?;
        let (mut client, notifications) = listener::open(&config, &tls)
            .await
            .map_err(|e| db_error(&format!("connecting to {description}"), e))?;
        if options.migrate {
            schema::migrate(&mut client, &options.schema).await?;
        } else {
            let found = schema::version(&client, &options.schema).await?;
            if found < latest_version() {
                return Err(QueueError::InvalidRequest(format!(
                    "the queue schema `{}` is at version {found}, this build needs {}; run `queuectl migrate` or connect with migrate=true",
                    options.schema,
                    latest_version()
                )));
            }
        }
        let backend = listener::listen(&client, &sql)
            .await
            .map_err(|e| db_error("listening for notifications", e))?;

        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| QueueError::backend("postgres: building the connection pool", e))?;

        let (acks, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            pool,
            sql,
            clock,
            options,
            description,
            runtime: tokio::runtime::Handle::current(),
            closed: AtomicBool::new(false),
            channels: RwLock::new(HashMap::new()),
            wakers: Arc::default(),
            leases: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            backend: Mutex::new(backend),
            notifier: Arc::default(),
            acks,
            shutdown,
        });
        let ack_rx = Arc::new(tokio::sync::Mutex::new(ack_rx));
        for _ in 0..ACK_WORKERS {
            tokio::spawn(ack_worker(Arc::downgrade(&inner), ack_rx.clone()));
        }
        tokio::spawn(listener::run(
            Arc::downgrade(&inner),
            config,
            tls,
            client,
            notifications,
            shutdown_rx.clone(),
        ));
        tokio::spawn(listener::housekeeping(Arc::downgrade(&inner), shutdown_rx));
        let adapter = Arc::new(PostgresAdapter { inner });
        tracing::info!(url = %adapter.inner.description, schema = %adapter.inner.options.schema, "opened postgres queue");
        Ok(adapter)
    }

    /// The URL without its password.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// The adapter's handle for transactions.
    pub fn handle(&self) -> Postgres {
        Postgres::new(self.inner.clone())
    }

    /// The adapter behind a queue opened with a `postgres://` URL.
    pub(crate) fn of(adapter: &Arc<dyn Adapter>) -> Option<Arc<Inner>> {
        adapter
            .as_any()?
            .downcast_ref::<PostgresAdapter>()
            .map(|pg| pg.inner.clone())
    }
}

const ACK_WORKERS: usize = 4;
const ACK_BATCH: usize = 1024;

/// Acks in batches: every ack waiting while a batch commits goes into the next one, so many
/// acks share one commit (one WAL flush) without a timer holding any of them back.
async fn ack_worker(
    inner: Weak<Inner>,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<AckJob>>>,
) {
    let mut carried: Vec<AckJob> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < ACK_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        // One job per message in a batch; a second ack of the same message goes next.
        let mut seen = HashSet::with_capacity(batch.len());
        let (batch, later): (Vec<AckJob>, Vec<AckJob>) =
            batch.into_iter().partition(|j| seen.insert(j.id));
        carried = later;
        let Some(inner) = inner.upgrade() else {
            for job in batch {
                let _ = job.reply.send(Err(QueueError::Closed));
            }
            return;
        };
        let ids: Vec<i64> = batch.iter().map(|j| j.id).collect();
        let tokens: Vec<i64> = batch.iter().map(|j| j.token).collect();
        let result = inner.ack_many(&ids, &tokens).await;
        drop(inner);
        match result {
            Ok(acked) => {
                for job in batch {
                    let _ = job.reply.send(Ok(acked.contains(&job.id)));
                }
            }
            Err(e) => {
                let text = e.to_string();
                for job in batch {
                    let _ = job
                        .reply
                        .send(Err(QueueError::backend("postgres: acking", text.clone())));
                }
            }
        }
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i32_of(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn u32_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn spec_from_row(name: &str, row: &tokio_postgres::Row) -> ChannelSpec {
    let ms = |i: usize| Duration::from_millis(u64_of(row.get::<_, i64>(i)));
    ChannelSpec {
        name: Cow::Owned(name.to_string()),
        processing: if row.get::<_, &str>(1) == "exactly_once" {
            Processing::ExactlyOnce
        } else {
            Processing::AtLeastOnce
        },
        dedup_window: ms(2),
        lease: ms(3),
        max_attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
        backoff: ms(5),
        max_backoff: ms(6),
        concurrency: u32_of(row.get(7)),
        concurrency_per_group: u32_of(row.get(8)),
        rate: rate_of(row.get(9), row.get(10)),
        rate_per_group: rate_of(row.get(11), row.get(12)),
        // Schedules live in the declarations of the workers that produce them.
        schedule: None,
    }
}

fn rate_of(limit: Option<i32>, per_ms: Option<i64>) -> Option<queue_core::Rate> {
    Some(queue_core::Rate {
        limit: u32_of(limit?),
        per: Duration::from_millis(u64_of(per_ms?)),
    })
}

/// What a produce sends for one message of the batch.
enum Slot {
    /// Sent as the `n`th row.
    Sent(usize),
    /// A duplicate of the `n`th row of the same batch.
    Alias(usize),
}

impl Inner {
    pub fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Acquire) {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }

    /// What a statement's `$now` gets: `None`, so that the server's clock decides, or the
    /// queue clock's time with `clock=queue`.
    pub fn now(&self) -> Option<i64> {
        self.pinned(self.clock.now())
    }

    /// `$now` for a statement sent at `local` (the queue clock's time).
    pub fn pinned(&self, local: Timestamp) -> Option<i64> {
        match self.options.clock {
            TimeSource::Server => None,
            TimeSource::Queue => Some(i64_of(local)),
        }
    }

    pub async fn connection(&self) -> Result<Object, QueueError> {
        self.check_open()?;
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Closed => QueueError::Closed,
            e => QueueError::backend("postgres: getting a connection", e),
        })
    }

    /// The waiters' wake-up of a channel.
    pub fn waker(&self, channel: &str) -> Arc<Notify> {
        self.wakers.get(channel)
    }

    /// Wakes this process's waiters of a channel.
    pub fn wake_local(&self, channel: &str) {
        self.wakers.wake(channel);
    }

    /// Wakes every waiter in this process.
    pub fn wake_all_local(&self) {
        self.wakers.wake_all();
    }

    /// Wakes waiters here at once and in other processes through `NOTIFY`.
    pub fn wake(&self, channel: &str) {
        self.wake_local(channel);
        self.notifier.mark(channel);
    }

    /// Records leases granted to a subscription of this process.
    pub fn remember_leases(&self, tokens: &[u64], sub: &Arc<SubShared>) {
        let mut leases = self.leases.lock();
        for t in tokens {
            leases.insert(*t, Arc::downgrade(sub));
        }
    }

    /// Frees the capacity that ended leases held in their subscriptions.
    pub fn forget_leases(&self, tokens: &[u64]) {
        if tokens.is_empty() {
            return;
        }
        let subs: Vec<(u64, Arc<SubShared>)> = {
            let mut leases = self.leases.lock();
            tokens
                .iter()
                .filter_map(|t| leases.remove(t).and_then(|w| w.upgrade()).map(|s| (*t, s)))
                .collect()
        };
        for (token, sub) in subs {
            sub.forget(token);
        }
    }

    pub fn register_subscription(&self, sub: &Arc<SubShared>) {
        self.subscriptions
            .lock()
            .insert(sub.consumer, Arc::downgrade(sub));
    }

    pub fn unregister_subscription(&self, consumer: i64) {
        self.subscriptions.lock().remove(&consumer);
    }

    pub fn subscription_ids(&self) -> Vec<i64> {
        let mut subs = self.subscriptions.lock();
        subs.retain(|_, w| w.strong_count() > 0);
        subs.keys().copied().collect()
    }

    pub fn set_backend(&self, backend: (i32, Option<SystemTime>)) {
        *self.backend.lock() = backend;
    }

    /// The channel of `spec`, created or updated to these settings.
    pub async fn channel(&self, spec: &ChannelSpec) -> Result<ChannelRow, QueueError> {
        spec.check()?;
        if let Some(row) = self.channels.read().get(spec.name.as_ref())
            && &row.spec == spec
        {
            return Ok(row.clone());
        }
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.upsert_channel)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let processing = match spec.processing {
            Processing::ExactlyOnce => "exactly_once",
            Processing::AtLeastOnce => "at_least_once",
        };
        let row = client
            .query_one(
                &stmt,
                &[
                    &spec.name.as_ref(),
                    &processing,
                    &i64_of(millis(spec.dedup_window)),
                    &i64_of(millis(spec.lease)),
                    &i32::try_from(spec.max_attempts).unwrap_or(i32::MAX),
                    &i64_of(millis(spec.backoff)),
                    &i64_of(millis(spec.max_backoff)),
                    &i32_of(spec.concurrency),
                    &i32_of(spec.concurrency_per_group),
                    &spec.rate.map(|r| i32_of(r.limit)),
                    &spec.rate.map(|r| i64_of(millis(r.per))),
                    &spec.rate_per_group.map(|r| i32_of(r.limit)),
                    &spec.rate_per_group.map(|r| i64_of(millis(r.per))),
                ],
            )
            .await
            .map_err(|e| db_error("declaring the channel", e))?;
        let row = ChannelRow {
            id: row.get(0),
            spec: spec.clone(),
        };
        self.channels
            .write()
            .insert(spec.name.to_string(), row.clone());
        Ok(row)
    }

    /// A channel known to the database by name.
    pub async fn channel_named(&self, name: &str) -> Result<ChannelRow, QueueError> {
        if let Some(row) = self.channels.read().get(name) {
            return Ok(row.clone());
        }
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.channel_by_name)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let row = client
            .query_opt(&stmt, &[&name])
            .await
            .map_err(|e| db_error("looking up the channel", e))?
            .ok_or_else(|| QueueError::UnknownChannel(name.to_string()))?;
        let row = ChannelRow {
            id: row.get(0),
            spec: spec_from_row(name, &row),
        };
        self.channels.write().insert(name.to_string(), row.clone());
        Ok(row)
    }

    /// Stores a batch on `client` (a pooled connection, or a transaction's). Returns the
    /// receipts and whether any message was new.
    pub async fn produce_on(
        &self,
        client: &Client,
        stmt: &tokio_postgres::Statement,
        channel: &ChannelRow,
        batch: &[Outgoing],
    ) -> Result<(Vec<Receipt>, bool), QueueError> {
        queue_core::limits::check_batch(batch)?;
        let dedupe = channel.spec.deduplicates();
        let mut first: HashMap<u64, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(batch.len());
        let mut sent = Vec::with_capacity(batch.len());
        let mut in_batch_duplicates = 0i64;
        for out in batch {
            let key = out.dedup_key.filter(|_| dedupe);
            if let Some(k) = key {
                if let Some(&pos) = first.get(&k) {
                    slots.push(Slot::Alias(pos));
                    in_batch_duplicates += 1;
                    continue;
                }
                first.insert(k, sent.len());
            }
            slots.push(Slot::Sent(sent.len()));
            sent.push((out, key));
        }
        let payloads: Vec<&[u8]> = sent.iter().map(|(o, _)| o.payload.as_slice()).collect();
        let priorities: Vec<i16> = sent.iter().map(|(o, _)| i16::from(o.priority)).collect();
        let delays: Vec<i64> = sent.iter().map(|(o, _)| i64_of(millis(o.delay))).collect();
        let keys: Vec<Option<i64>> = sent
            .iter()
            .map(|(_, k)| k.map(|k| i64::from_ne_bytes(k.to_ne_bytes())))
            .collect();
        let groups: Vec<Option<i64>> = sent
            .iter()
            .map(|(o, _)| o.group.map(|g| i64::from_ne_bytes(g.to_ne_bytes())))
            .collect();
        let now = self.now();
        let window = i64_of(millis(channel.spec.dedup_window));
        let rows = client
            .query(
                stmt,
                &[
                    &channel.id,
                    &payloads,
                    &priorities,
                    &delays,
                    &keys,
                    &groups,
                    &now,
                    &window,
                    &in_batch_duplicates,
                ],
            )
            .await
            .map_err(|e| db_error("producing", e))?;
        if rows.len() != sent.len() {
            return Err(QueueError::Protocol(format!(
                "the database answered {} receipts for {} messages",
                rows.len(),
                sent.len()
            )));
        }
        let answered: Vec<Receipt> = rows
            .iter()
            .map(|r| Receipt {
                id: MessageId(u64_of(r.get(1))),
                duplicate: r.get(2),
            })
            .collect();
        let fresh = answered.iter().any(|r| !r.duplicate);
        let receipts = slots
            .into_iter()
            .map(|s| match s {
                Slot::Sent(n) => answered[n],
                Slot::Alias(n) => Receipt {
                    id: answered[n].id,
                    duplicate: true,
                },
            })
            .collect();
        Ok((receipts, fresh))
    }

    /// Applies time rules to a channel: due delayed messages become ready, lapsed leases go
    /// back to the front or to the dead letters. Wakes waiters when something changed.
    pub async fn sweep(&self, client: &Object, channel: &ChannelRow) -> Result<(), QueueError> {
        let stmt = client
            .prepare_cached(&self.sql.sweep)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let row = client
            .query_one(&stmt, &[&channel.id, &self.now()])
            .await
            .map_err(|e| db_error("applying time rules", e))?;
        self.after_sweep(&channel.spec.name, &row);
        Ok(())
    }

    pub fn after_sweep(&self, channel: &str, row: &tokio_postgres::Row) {
        let due: i64 = row.get(0);
        let lapsed: Vec<i64> = row.get(1);
        if !lapsed.is_empty() {
            let tokens: Vec<u64> = lapsed.into_iter().map(u64_of).collect();
            self.forget_leases(&tokens);
            tracing::debug!(channel, leases = tokens.len(), "leases lapsed");
            self.wake(channel);
        } else if due > 0 {
            self.wake(channel);
        }
    }

    async fn ack_many(&self, ids: &[i64], tokens: &[i64]) -> Result<HashSet<i64>, QueueError> {
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.ack_batch)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let rows = client
            .query(&stmt, &[&ids, &tokens, &self.now()])
            .await
            .map_err(|e| db_error("acking", e))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// Acks a lease on `client` (a transaction's): true when the lease held.
    pub async fn ack_on(&self, client: &Object, lease: &Lease) -> Result<bool, QueueError> {
        let stmt = client
            .prepare_cached(&self.sql.ack)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let row = client
            .query_one(
                &stmt,
                &[&i64_of(lease.id.0), &i64_of(lease.token), &self.now()],
            )
            .await
            .map_err(|e| db_error("acking", e))?;
        Ok(row.get::<_, i64>(0) == 1)
    }

    async fn settle(&self, lease: &Lease, outcome: Outcome) -> Result<(), QueueError> {
        self.check_open()?;
        let outcome = queue_core::limits::limit_outcome(outcome);
        let stale = || QueueError::StaleLease { id: lease.id };
        let id = i64_of(lease.id.0);
        let token = i64_of(lease.token);
        let notify = match outcome {
            Outcome::Ack => {
                // A lease of a channel the database does not know holds nothing.
                if !self.channels.read().contains_key(&*lease.channel) {
                    self.channel_named(&lease.channel)
                        .await
                        .map_err(|e| match e {
                            QueueError::UnknownChannel(_) => stale(),
                            e => e,
                        })?;
                }
                let (reply, answer) = oneshot::channel();
                self.acks
                    .send(AckJob { id, token, reply })
                    .map_err(|_| QueueError::Closed)?;
                let acked = answer.await.map_err(|_| QueueError::Closed)??;
                self.forget_leases(&[lease.token]);
                if !acked {
                    return Err(stale());
                }
                self.wake_local(&lease.channel);
                return Ok(());
            }
            Outcome::Retry { after, error } => {
                let channel = self
                    .channel_named(&lease.channel)
                    .await
                    .map_err(|e| match e {
                        QueueError::UnknownChannel(_) => stale(),
                        e => e,
                    })?;
                let spec = &channel.spec;
                let unit = fastrand::f64();
                let delays: Vec<i64> = (1..=spec.max_attempts.clamp(1, 33))
                    .map(|a| i64_of(millis(spec.retry_delay(a, unit))))
                    .collect();
                let after: Option<i64> = after.map(|d| i64_of(millis(d)));
                let max_attempts = i32::try_from(spec.max_attempts).unwrap_or(i32::MAX);
                let client = self.connection().await?;
                let stmt = client
                    .prepare_cached(&self.sql.retry)
                    .await
                    .map_err(|e| db_error("preparing", e))?;
                let params: [&(dyn ToSql + Sync); 7] = [
                    &id,
                    &token,
                    &max_attempts,
                    &after,
                    &delays,
                    &error,
                    &self.now(),
                ];
                client
                    .query_opt(&stmt, &params)
                    .await
                    .map_err(|e| db_error("retrying", e))?
                    .ok_or_else(stale)?;
                true
            }
            Outcome::DeadLetter { error } => {
                let client = self.connection().await?;
                let stmt = client
                    .prepare_cached(&self.sql.dead_letter)
                    .await
                    .map_err(|e| db_error("preparing", e))?;
                client
                    .query_opt(&stmt, &[&id, &token, &error, &self.now()])
                    .await
                    .map_err(|e| db_error("dead-lettering", e))?
                    .ok_or_else(stale)?;
                false
            }
            Outcome::Snooze { after } => {
                let client = self.connection().await?;
                let stmt = client
                    .prepare_cached(&self.sql.snooze)
                    .await
                    .map_err(|e| db_error("preparing", e))?;
                client
                    .query_opt(&stmt, &[&id, &token, &i64_of(millis(after)), &self.now()])
                    .await
                    .map_err(|e| db_error("snoozing", e))?
                    .ok_or_else(stale)?;
                true
            }
            Outcome::Release => {
                let client = self.connection().await?;
                let stmt = client
                    .prepare_cached(&self.sql.release)
                    .await
                    .map_err(|e| db_error("preparing", e))?;
                client
                    .query_opt(&stmt, &[&id, &token, &self.now()])
                    .await
                    .map_err(|e| db_error("releasing", e))?
                    .ok_or_else(stale)?;
                true
            }
        };
        self.forget_leases(&[lease.token]);
        if notify {
            self.wake(&lease.channel);
        } else {
            self.wake_local(&lease.channel);
        }
        Ok(())
    }

    /// The new deadline is on the queue clock's base: the time the statement was sent plus
    /// `by` (the server's deadline is `by` after it ran the statement, so never earlier).
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<Timestamp, QueueError> {
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.extend)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let sent = self.clock.now();
        client
            .query_opt(
                &stmt,
                &[
                    &i64_of(lease.id.0),
                    &i64_of(lease.token),
                    &i64_of(millis(by)),
                    &self.pinned(sent),
                ],
            )
            .await
            .map_err(|e| db_error("extending a lease", e))?
            .ok_or(QueueError::StaleLease { id: lease.id })?;
        Ok(sent.saturating_add(millis(by)))
    }

    async fn subscribe(
        self: &Arc<Self>,
        spec: &ChannelSpec,
        max_parallel: u32,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        let channel = self.channel(spec).await?;
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.subscribe)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let (pid, start) = *self.backend.lock();
        let consumer: i64 = client
            .query_one(&stmt, &[&channel.id, &pid, &start, &self.now()])
            .await
            .map_err(|e| db_error("subscribing", e))?
            .get(0);
        Ok(Box::new(PgSubscription::new(
            self.clone(),
            channel,
            consumer,
            max_parallel.max(1),
        )))
    }

    async fn stats(&self) -> Result<Vec<ChannelStats>, QueueError> {
        let client = self.connection().await?;
        let ids: Vec<(i32, String)> = client
            .query(&self.sql.sweep_all, &[])
            .await
            .map_err(|e| db_error("listing channels", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (id, name) in ids {
            let row = ChannelRow {
                id,
                spec: ChannelSpec {
                    name: Cow::Owned(name),
                    ..ChannelSpec::new("")
                },
            };
            self.sweep(&client, &row).await?;
        }
        let stmt = client
            .prepare_cached(&self.sql.stats)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let rows = client
            .query(&stmt, &[])
            .await
            .map_err(|e| db_error("reading stats", e))?;
        let n = |r: &tokio_postgres::Row, i: usize| u64_of(r.get::<_, i64>(i));
        Ok(rows
            .iter()
            .map(|r| ChannelStats {
                channel: r.get(0),
                ready: n(r, 1),
                delayed: n(r, 2),
                in_flight: n(r, 3),
                dead: n(r, 4),
                produced: n(r, 5),
                duplicates: n(r, 6),
                acked: n(r, 7),
                retried: n(r, 8),
                dead_lettered: n(r, 9),
                lease_expiries: n(r, 10),
                consumers: n(r, 11),
                paused: r.get(12),
                counted_since: 0,
                next_due: r.get::<_, Option<i64>>(13).map(u64_of),
            })
            .collect())
    }

    async fn peek(&self, channel: &str, limit: usize) -> Result<Vec<StoredMessage>, QueueError> {
        let channel = self.channel_named(channel).await?;
        let client = self.connection().await?;
        self.sweep(&client, &channel).await?;
        let mut out = Vec::new();
        for (sql, state) in [
            (&self.sql.peek_ready, MessageState::Ready),
            (&self.sql.peek_delayed, MessageState::Delayed),
            (&self.sql.peek_leased, MessageState::InFlight),
        ] {
            let left = i64_of((limit.saturating_sub(out.len())) as u64);
            if left == 0 {
                break;
            }
            let stmt = client
                .prepare_cached(sql)
                .await
                .map_err(|e| db_error("preparing", e))?;
            let rows = client
                .query(&stmt, &[&channel.id, &left])
                .await
                .map_err(|e| db_error("peeking", e))?;
            out.extend(rows.iter().map(|r| StoredMessage {
                id: MessageId(u64_of(r.get(0))),
                payload: r.get(1),
                state,
                attempts: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                priority: u8::try_from(r.get::<_, i16>(3)).unwrap_or(0),
                produced_at: u64_of(r.get(4)),
                due: u64_of(r.get(5)),
            }));
        }
        Ok(out)
    }

    /// A channel known to the database by name, or `None` for a name it has never seen.
    async fn existing_channel(&self, name: &str) -> Result<Option<ChannelRow>, QueueError> {
        match self.channel_named(name).await {
            Ok(channel) => Ok(Some(channel)),
            Err(QueueError::UnknownChannel(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn dead_letters(&self, name: &str, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let Some(channel) = self.existing_channel(name).await? else {
            return Ok(Vec::new());
        };
        let client = self.connection().await?;
        self.sweep(&client, &channel).await?;
        let stmt = client
            .prepare_cached(&self.sql.dead_letters)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let rows = client
            .query(&stmt, &[&channel.id, &i64_of(limit as u64)])
            .await
            .map_err(|e| db_error("listing dead letters", e))?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: MessageId(u64_of(r.get(0))),
                channel: name.to_string(),
                payload: r.get(1),
                attempts: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                error: r.get(3),
                produced_at: u64_of(r.get(4)),
                dead_at: u64_of(r.get(5)),
            })
            .collect())
    }

    async fn redrive(&self, name: &str, ids: Option<&[MessageId]>) -> Result<u64, QueueError> {
        self.check_open()?;
        let Some(channel) = self.existing_channel(name).await? else {
            return Ok(0);
        };
        let ids: Option<Vec<i64>> = ids.map(|ids| ids.iter().map(|i| i64_of(i.0)).collect());
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.redrive)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let moved: i64 = client
            .query_one(&stmt, &[&channel.id, &ids, &self.now()])
            .await
            .map_err(|e| db_error("redriving", e))?
            .get(0);
        if moved > 0 {
            self.wake(name);
        }
        Ok(u64_of(moved))
    }

    async fn purge_dead(&self, name: &str, ids: Option<&[MessageId]>) -> Result<u64, QueueError> {
        self.check_open()?;
        let Some(channel) = self.existing_channel(name).await? else {
            return Ok(0);
        };
        let ids: Option<Vec<i64>> = ids.map(|ids| ids.iter().map(|i| i64_of(i.0)).collect());
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.purge)
            .await
            .map_err(|e| db_error("preparing", e))?;
        client
            .execute(&stmt, &[&channel.id, &ids])
            .await
            .map_err(|e| db_error("purging dead letters", e))
    }

    /// Why a lease no longer holds: [`QueueError::Cancelled`] when its message was
    /// cancelled while it held it, else [`QueueError::StaleLease`].
    async fn stale(&self, lease: &Lease) -> QueueError {
        let stale = QueueError::StaleLease { id: lease.id };
        let Ok(client) = self.connection().await else {
            return stale;
        };
        let Ok(stmt) = client.prepare_cached(&self.sql.was_cancelled).await else {
            return stale;
        };
        match client
            .query_opt(&stmt, &[&i64_of(lease.id.0), &i64_of(lease.token)])
            .await
        {
            Ok(Some(_)) => QueueError::Cancelled { id: lease.id },
            _ => stale,
        }
    }

    async fn cancel(&self, name: &str, id: MessageId) -> Result<Cancelled, QueueError> {
        self.check_open()?;
        let unknown = || QueueError::UnknownMessage {
            channel: name.to_string(),
            id,
        };
        let Some(channel) = self.existing_channel(name).await? else {
            return Err(unknown());
        };
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.cancel)
            .await
            .map_err(|e| db_error("preparing", e))?;
        let row = client
            .query_opt(&stmt, &[&channel.id, &i64_of(id.0), &self.now()])
            .await
            .map_err(|e| db_error("cancelling a message", e))?
            .ok_or_else(unknown)?;
        let state: i16 = row.get(0);
        if state == 2 {
            self.wake(name);
            Ok(Cancelled::InFlight)
        } else {
            Ok(Cancelled::Pending)
        }
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), QueueError> {
        self.check_open()?;
        let Some(channel) = self.existing_channel(name).await? else {
            return Err(QueueError::InvalidRequest(format!(
                "no channel `{name}` in this store"
            )));
        };
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.set_paused)
            .await
            .map_err(|e| db_error("preparing", e))?;
        client
            .execute(&stmt, &[&channel.id, &paused])
            .await
            .map_err(|e| db_error("pausing a channel", e))?;
        if !paused {
            self.wake(name);
        }
        Ok(())
    }

    async fn purge(&self, name: &str) -> Result<u64, QueueError> {
        self.check_open()?;
        let Some(channel) = self.existing_channel(name).await? else {
            return Ok(0);
        };
        let client = self.connection().await?;
        let stmt = client
            .prepare_cached(&self.sql.purge_pending)
            .await
            .map_err(|e| db_error("preparing", e))?;
        client
            .execute(&stmt, &[&channel.id])
            .await
            .map_err(|e| db_error("purging pending messages", e))
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.shutdown.send(true);
        self.wake_all_local();
        self.pool.close();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl Adapter for PostgresAdapter {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        async move {
            let inner = &self.inner;
            let channel = inner.channel(spec).await?;
            let client = inner.connection().await?;
            let stmt = client
                .prepare_cached(&inner.sql.produce)
                .await
                .map_err(|e| db_error("preparing", e))?;
            let (receipts, fresh) = inner.produce_on(&client, &stmt, &channel, &batch).await?;
            if fresh {
                inner.wake(&spec.name);
            }
            Ok(receipts)
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        self.inner.subscribe(spec, max_parallel).boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            match self.inner.settle(lease, outcome).await {
                Err(QueueError::StaleLease { .. }) => Err(self.inner.stale(lease).await),
                other => other,
            }
        }
        .boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        async move {
            match self.inner.extend(lease, by).await {
                Err(QueueError::StaleLease { .. }) => Err(self.inner.stale(lease).await),
                other => other,
            }
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        self.inner.stats().boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        self.inner.peek(channel, limit).boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        self.inner.dead_letters(channel, limit).boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.redrive(channel, ids).boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.purge_dead(channel, ids).boxed()
    }

    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.inner.purge(channel).boxed()
    }

    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.set_paused(channel, paused).boxed()
    }

    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: MessageId,
    ) -> BoxFuture<'a, Result<Cancelled, QueueError>> {
        self.inner.cancel(channel, id).boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            self.inner.close();
            Ok(())
        }
        .boxed()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_options_are_taken_out_of_the_url() {
        let (config, options) = PostgresOptions::parse(
            "postgres://u:p@localhost:5433/db?schema=jobs&pool_size=4&application_name=w&migrate=false&clock=queue",
        )
        .unwrap();
        assert_eq!(options.clock, TimeSource::Queue);
        assert_eq!(options.schema, "jobs");
        assert_eq!(options.pool_size, 4);
        assert!(!options.migrate);
        assert_eq!(config.get_application_name(), Some("w"));
        assert_eq!(config.get_dbname(), Some("db"));
    }

    #[test]
    fn tls_options_are_read_as_libpq_reads_them() {
        let (config, options) =
            PostgresOptions::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem")
                .unwrap();
        assert_eq!(options.tls.mode, SslMode::VerifyFull);
        assert_eq!(options.tls.root_cert, Some("/etc/ca.pem".into()));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let (config, options) = PostgresOptions::parse("postgres://h/db").unwrap();
        assert_eq!(options.tls.mode, SslMode::Prefer);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let (config, _) = PostgresOptions::parse("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(PostgresOptions::parse("postgres://h/db?schema=Bad-Name").is_err());
        assert!(PostgresOptions::parse("postgres://h/db?pool_size=0").is_err());
        assert!(PostgresOptions::parse("postgres://h/db?migrate=maybe").is_err());
        assert!(PostgresOptions::parse("postgres://h/db?clock=client").is_err());
        assert!(PostgresOptions::parse("postgres://h/db?sslmode=verify-full").is_err());
        assert!(PostgresOptions::parse("postgres://h/db?sslmode=sometimes").is_err());
        assert_eq!(
            PostgresOptions::parse("postgres://h/db").unwrap().1.clock,
            TimeSource::Server
        );
    }

    #[test]
    fn passwords_are_hidden_in_descriptions() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?schema=q"),
            "postgres://u:***@h:5432/db?schema=q"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
