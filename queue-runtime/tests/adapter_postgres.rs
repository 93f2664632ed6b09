//! The conformance suite against `postgres://`, each test in a fresh schema of the database
//! named by `QUEUE_TEST_POSTGRES_URL`, and the transactional produce and consume tests.
//!
//! `.ci/run` starts a throwaway cluster and sets the variable. Without it these tests fail:
//! they never pass by skipping.

mod conformance;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use conformance::{Harness, next, still_waiting, within};
use futures_util::future::BoxFuture;
use queue_core::clock::{Clock, Timestamp, millis};
use queue_core::{Channel, Outcome, Queue, VirtualClock, channel};
use queue_runtime::adapters::postgres::{self, PgTransaction, Postgres};
use queue_runtime::{ConnectOptions, SystemClock};
use serde::{Deserialize, Serialize};

/// The server every test uses; each test makes its own schema in it.
fn server_url() -> String {
    match std::env::var("QUEUE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "QUEUE_TEST_POSTGRES_URL is not set: the PostgreSQL adapter tests need a server \
             (e.g. postgres://postgres@127.0.0.1:55432/queue_test); `.ci/run` starts a throwaway one"
        ),
    }
}

fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

fn fresh_schema() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// Drops the test's schema when the test ends.
struct SchemaGuard {
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let Ok(url) = std::env::var("QUEUE_TEST_POSTGRES_URL") else {
            return;
        };
        // A runtime of its own: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!(
                        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {schema} CASCADE"
                    ))
                    .await;
            });
        })
        .join();
    }
}

/// A queue whose time rules read `clock` (`clock=queue`), so that tests move time.
async fn open(clock: VirtualClock, schema: &str) -> Queue {
    let url = with_query(
        &server_url(),
        &format!("schema={schema}&pool_size=8&clock=queue"),
    );
    queue_runtime::connect_with(&url, ConnectOptions::with_clock(Arc::new(clock)))
        .await
        .expect("postgres queue")
}

async fn postgres(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let schema = fresh_schema();
    let queue = open(clock, &schema).await;
    (queue, Box::new(SchemaGuard { schema }))
}

conformance_suite!(postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_holds_across_worker_connections() {
    let clock = VirtualClock::default();
    let schema = fresh_schema();
    let _guard = SchemaGuard {
        schema: schema.clone(),
    };
    let mut queues = Vec::new();
    for _ in 0..3 {
        queues.push(open(clock.clone(), &schema).await);
    }
    conformance::flow::concurrency_holds_across_worker_connections(&queues).await;
    for q in queues {
        q.close().await.unwrap();
    }
}

#[channel("pg/signups", lease = "10s", max_attempts = 3, backoff = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signup {
    pub n: i32,
}

const SIGNUPS: &str = "pg/signups";

async fn harness() -> (Harness, String) {
    let clock = VirtualClock::default();
    let schema = fresh_schema();
    let queue = open(clock.clone(), &schema).await;
    let guard = Box::new(SchemaGuard {
        schema: schema.clone(),
    });
    (
        Harness {
            queue,
            clock,
            guard,
        },
        schema,
    )
}

fn job(d: &queue_core::RawDelivery) -> i32 {
    queue_core::codec::decode::<Signup>(&d.payload)
        .expect("decode")
        .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transactional_produce_is_never_delivered() {
    let (h, _schema) = harness().await;
    let rolled_back = postgres::begin(&h.queue).await.unwrap();
    Signup::produce_in(&rolled_back, Signup { n: 1 })
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();

    let dropped = postgres::begin(&h.queue).await.unwrap();
    Signup::produce_in(&dropped, Signup { n: 2 }).await.unwrap();
    drop(dropped);

    let committed = postgres::begin(&h.queue).await.unwrap();
    let receipt = Signup::produce_in(&committed, Signup { n: 3 })
        .await
        .unwrap();
    committed.commit().await.unwrap();

    let sub = h
        .queue
        .adapter()
        .subscribe(&SignupChannel::SPEC, 10)
        .await
        .unwrap();
    let d = next(&*sub).await;
    assert_eq!((d.lease.id, job(&d)), (receipt.id, 3));
    h.queue
        .adapter()
        .settle(&d.lease, Outcome::Ack)
        .await
        .unwrap();
    h.advance(Duration::from_secs(3600)).await;
    drop(still_waiting(sub.next()).await);
    let s = h.stats(SIGNUPS).await;
    assert_eq!(
        (s.produced, s.acked, s.ready, s.delayed),
        (1, 1, 0, 0),
        "nothing of the rolled back transactions is counted or stored"
    );
    let _ = h.queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transactional_produce_wakes_a_waiting_consumer() {
    let (h, _schema) = harness().await;
    let sub = h
        .queue
        .adapter()
        .subscribe(&SignupChannel::SPEC, 1)
        .await
        .unwrap();
    let waiting = still_waiting(sub.next()).await;
    let tx = postgres::begin(&h.queue).await.unwrap();
    Signup::produce_in(&tx, Signup { n: 7 }).await.unwrap();
    let waiting = still_waiting(waiting).await;
    tx.commit().await.unwrap();
    let d = within("the committed message", waiting).await.unwrap();
    assert_eq!(job(&d), 7);
    let _ = h.queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_inside_a_transaction_of_your_own_client_commits_with_it() {
    let (h, schema) = harness().await;
    let pg = Postgres::of(&h.queue).unwrap();
    let (mut client, conn) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE TABLE {schema}.users (id INT PRIMARY KEY)"))
        .await
        .unwrap();
    let sub = h
        .queue
        .adapter()
        .subscribe(&SignupChannel::SPEC, 1)
        .await
        .unwrap();
    let waiting = still_waiting(sub.next()).await;

    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {schema}.users VALUES (1)"), &[])
        .await
        .unwrap();
    Signup::produce_in(&pg.within(&tx), Signup { n: 1 })
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let waiting = still_waiting(waiting).await;

    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {schema}.users VALUES (2)"), &[])
        .await
        .unwrap();
    Signup::produce_in(&pg.within(&tx), Signup { n: 2 })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Woken by the NOTIFY the transaction carried.
    let d = within("the committed message", waiting).await.unwrap();
    assert_eq!(job(&d), 2);
    let users: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.users"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1);
    assert_eq!(h.stats(SIGNUPS).await.produced, 1);
    let _ = h.queue.close().await;
}

async fn effects(h: &Harness, schema: &str) -> Vec<i32> {
    let pg = Postgres::of(&h.queue).unwrap();
    let client = pg.pool().get().await.unwrap();
    client
        .query(&format!("SELECT n FROM {schema}.effects ORDER BY n"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn effects_table(h: &Harness, schema: &str) {
    let pg = Postgres::of(&h.queue).unwrap();
    let client = pg.pool().get().await.unwrap();
    client
        .batch_execute(&format!("CREATE TABLE {schema}.effects (n INT NOT NULL)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_consume_commits_its_effects_with_the_ack() {
    let (h, schema) = harness().await;
    effects_table(&h, &schema).await;
    let insert = format!("INSERT INTO {schema}.effects VALUES ($1)");
    let _consumer = postgres::consume_in_transaction::<SignupChannel, _, _>(
        &h.queue,
        move |s: Signup, tx: PgTransaction| {
            let insert = insert.clone();
            async move {
                assert_eq!(tx.attempt(), Some(1));
                tx.execute(&insert, &[&s.n]).await.map(|_| ())
            }
        },
    )
    .await
    .unwrap();
    Signup::producer(&h.queue)
        .produce_batch((1..=5).map(|n| Signup { n }))
        .await
        .unwrap();
    conformance::eventually("five acks", || async { h.stats(SIGNUPS).await.acked == 5 }).await;
    assert_eq!(effects(&h, &schema).await, vec![1, 2, 3, 4, 5]);
    let s = h.stats(SIGNUPS).await;
    assert_eq!((s.ready, s.in_flight, s.retried), (0, 0, 0));
    let _ = h.queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_transactional_handler_rolls_back_its_effects_and_the_message_is_retried() {
    let (h, schema) = harness().await;
    effects_table(&h, &schema).await;
    let insert = format!("INSERT INTO {schema}.effects VALUES ($1)");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let _consumer = postgres::TransactionalConsumer::<SignupChannel>::new(&h.queue)
        .unwrap()
        .max_parallel(2)
        .handle(move |s: Signup, tx: PgTransaction| {
            let insert = insert.clone();
            let call = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                tx.execute(&insert, &[&s.n])
                    .await
                    .map_err(|e| e.to_string())?;
                match call {
                    0 => Err(format!(
                        "failure after the insert on attempt {:?}",
                        tx.attempt()
                    )),
                    1 => panic!("a panic after the insert"),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    Signup::produce(&h.queue, Signup { n: 42 }).await.unwrap();
    conformance::eventually("the first failure", || async {
        h.stats(SIGNUPS).await.retried == 1
    })
    .await;
    assert!(
        effects(&h, &schema).await.is_empty(),
        "the failed attempt's insert is rolled back"
    );
    h.advance(Duration::from_secs(1)).await;
    conformance::eventually("the panic to become a retry", || async {
        h.stats(SIGNUPS).await.retried == 2
    })
    .await;
    assert!(effects(&h, &schema).await.is_empty());
    h.advance(Duration::from_secs(2)).await;
    conformance::eventually("the ack", || async { h.stats(SIGNUPS).await.acked == 1 }).await;
    assert_eq!(effects(&h, &schema).await, vec![42], "exactly one effect");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let _ = h.queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_need_a_postgres_queue() {
    let queue = queue_runtime::connect("memory://").await.unwrap();
    assert!(matches!(
        postgres::begin(&queue).await.unwrap_err(),
        queue_core::QueueError::Unsupported(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_applied_once_and_recorded() {
    let schema = fresh_schema();
    let _guard = SchemaGuard {
        schema: schema.clone(),
    };
    let url = with_query(&server_url(), &format!("schema={schema}"));
    let first = postgres::migrate(&url).await.unwrap();
    assert_eq!((first.from, first.to), (0, postgres::latest_version()));
    let again = postgres::migrate(&url).await.unwrap();
    assert_eq!(again.from, again.to);
    // A queue that must not migrate opens a migrated schema.
    let queue = queue_runtime::connect(&with_query(&url, "migrate=false"))
        .await
        .unwrap();
    queue.close().await.unwrap();
    let missing = with_query(
        &server_url(),
        &format!("schema={}&migrate=false", fresh_schema()),
    );
    assert!(queue_runtime::connect(&missing).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_calls_on_a_channel_the_store_never_saw_find_nothing() {
    let (h, _schema) = harness().await;
    let never = "pg/never-seen";
    assert_eq!(h.queue.purge_dead(never, None).await.unwrap(), 0);
    assert_eq!(
        h.queue
            .purge_dead(never, Some(&[queue_core::MessageId(1)]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(h.queue.redrive(never, None).await.unwrap(), 0);
    assert!(h.queue.dead_letters(never, 10).await.unwrap().is_empty());
    assert!(
        h.queue
            .stats()
            .await
            .unwrap()
            .iter()
            .all(|s| s.channel != never),
        "asking about a channel does not declare it"
    );
    let _ = h.queue.close().await;
}

/// The host's wall clock moved by a fixed amount, as on a host whose clock is wrong.
#[derive(Debug)]
struct Skewed {
    ahead: Duration,
}

impl Clock for Skewed {
    fn now(&self) -> Timestamp {
        SystemClock.now() + millis(self.ahead)
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        SystemClock.sleep_until(deadline.saturating_sub(millis(self.ahead)))
    }
}

#[channel("pg/skewed", exactly_once, dedup = "10s", lease = "15s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skew {
    pub n: i32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_runs_20s_ahead_neither_lapses_leases_early_nor_accepts_duplicates() {
    let schema = fresh_schema();
    let _guard = SchemaGuard {
        schema: schema.clone(),
    };
    // Both in production mode: the server's clock decides.
    let url = with_query(&server_url(), &format!("schema={schema}&pool_size=4"));
    let on_time =
        queue_runtime::connect_with(&url, ConnectOptions::with_clock(Arc::new(SystemClock)))
            .await
            .unwrap();
    let clock_ahead = Arc::new(Skewed {
        ahead: Duration::from_secs(20),
    });
    let ahead = queue_runtime::connect_with(&url, ConnectOptions::with_clock(clock_ahead.clone()))
        .await
        .unwrap();

    // Dedup windows (10 s) hold across both hosts, in both directions.
    let first = Skew::produce(&on_time, Skew { n: 1 }).await.unwrap();
    let again = Skew::produce(&ahead, Skew { n: 1 }).await.unwrap();
    assert_eq!(
        (again.id, again.duplicate),
        (first.id, true),
        "the host 20 s ahead must not see the 10 s window as over"
    );
    let second = Skew::produce(&ahead, Skew { n: 2 }).await.unwrap();
    let again = Skew::produce(&on_time, Skew { n: 2 }).await.unwrap();
    assert_eq!((again.id, again.duplicate), (second.id, true));

    // The on-time worker holds message 1 under a 15 s lease; the worker ahead takes
    // message 2 and looks for more: message 1's lease must not look lapsed to it.
    let held_sub = on_time
        .adapter()
        .subscribe(&SkewChannel::SPEC, 1)
        .await
        .unwrap();
    let held = next(&*held_sub).await;
    assert_eq!(held.lease.id, first.id);
    let ahead_sub = ahead
        .adapter()
        .subscribe(&SkewChannel::SPEC, 2)
        .await
        .unwrap();
    let taken = next(&*ahead_sub).await;
    assert_eq!(taken.lease.id, second.id);
    drop(still_waiting(ahead_sub.next()).await);
    on_time
        .adapter()
        .settle(&held.lease, Outcome::Ack)
        .await
        .expect("the on-time worker's lease still holds");

    // Deadlines handed to the worker ahead are on its own clock, so that it extends in time.
    let left = taken.deadline.saturating_sub(clock_ahead.now());
    assert!(
        (13_000..=15_000).contains(&left),
        "a 15 s lease is due in {left} ms on the taker's clock"
    );
    let extended = ahead
        .adapter()
        .extend(&taken.lease, Duration::from_secs(15))
        .await
        .unwrap();
    let left = extended.saturating_sub(clock_ahead.now());
    assert!((13_000..=15_000).contains(&left), "extended: {left} ms");
    ahead
        .adapter()
        .settle(&taken.lease, Outcome::Ack)
        .await
        .unwrap();

    let stats = on_time
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.channel == "pg/skewed")
        .unwrap();
    assert_eq!(
        (
            stats.produced,
            stats.duplicates,
            stats.acked,
            stats.lease_expiries
        ),
        (2, 2, 2, 0)
    );
    let _ = ahead.close().await;
    let _ = on_time.close().await;
}

#[channel("pg/after")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct After {
    pub n: i32,
}

/// Polls `fut` until it completes or `after` of real time has passed, then drops it. It
/// polls in a busy loop, so the cut can fall between any two of `fut`'s awaits.
async fn cut_after<F: Future>(fut: F, after: Duration) -> Option<F::Output> {
    let started = Instant::now();
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if started.elapsed() >= after {
            return Poll::Ready(None);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// A connection of its own, outside the queue's pool: it sees only committed rows.
async fn outside_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn committed(client: &tokio_postgres::Client, schema: &str, channel: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.messages m JOIN {schema}.channels c ON c.id = m.channel
                 WHERE c.name = $1"
            ),
            &[&channel],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_at_any_await_never_swallows_a_later_produce() {
    let schema = fresh_schema();
    let _guard = SchemaGuard {
        schema: schema.clone(),
    };
    // One connection: a connection left inside a transaction would serve the next produce.
    let url = with_query(&server_url(), &format!("schema={schema}&pool_size=1"));
    let queue = queue_runtime::connect(&url).await.unwrap();
    let outside = outside_client().await;
    let attempt = || {
        let queue = queue.clone();
        async move {
            let tx = postgres::begin(&queue).await?;
            Signup::produce_in(&tx, Signup { n: 0 }).await?;
            tx.commit().await
        }
    };
    // Declares the channel, which takes a connection of its own.
    Signup::produce(&queue, Signup { n: 0 }).await.unwrap();
    attempt().await.unwrap();
    let mut whole = Duration::ZERO;
    for _ in 0..3 {
        let started = Instant::now();
        attempt().await.unwrap();
        whole = whole.max(started.elapsed());
    }
    const ROUNDS: u32 = 200;
    let mut cut = 0;
    for i in 0..ROUNDS {
        // A whole one first, so the cut one starts on a warm connection (a cut closes it).
        attempt().await.unwrap();
        if cut_after(attempt(), whole * i / ROUNDS).await.is_none() {
            cut += 1;
        }
        After::produce(&queue, After { n: 0 }).await.unwrap();
        assert_eq!(
            committed(&outside, &schema, "pg/after").await,
            i64::from(i) + 1,
            "round {i}: a produce after a transaction cut at {:?} is committed",
            whole * i / ROUNDS
        );
    }
    assert!(
        cut >= ROUNDS / 5,
        "only {cut} of {ROUNDS} transactions were cut"
    );
    queue.close().await.unwrap();
    drop(queue);
    assert_eq!(
        committed(&outside, &schema, "pg/after").await,
        i64::from(ROUNDS),
        "the produces survive the pool's connections closing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_consumer_stopped_at_any_await_never_swallows_a_later_produce() {
    let schema = fresh_schema();
    let _guard = SchemaGuard {
        schema: schema.clone(),
    };
    let url = with_query(&server_url(), &format!("schema={schema}&pool_size=2"));
    let queue = queue_runtime::connect(&url).await.unwrap();
    let outside = outside_client().await;
    const ROUNDS: u32 = 40;
    for i in 0..ROUNDS {
        let consumer = postgres::TransactionalConsumer::<SignupChannel>::new(&queue)
            .unwrap()
            .max_parallel(1)
            .handle(|_: Signup, tx: PgTransaction| async move {
                tx.execute("SELECT 1", &[]).await.map(|_| ())
            })
            .await
            .unwrap();
        Signup::produce(&queue, Signup { n: 0 }).await.unwrap();
        // Stop the consumer somewhere between taking the message and committing its ack.
        let pause = Duration::from_micros(u64::from(i) * 250);
        cut_after(std::future::pending::<()>(), pause).await;
        consumer.stop(Duration::ZERO).await.unwrap();
        // Two produces: one on each pooled connection.
        let (a, b) = tokio::join!(
            After::produce(&queue, After { n: 0 }),
            After::produce(&queue, After { n: 0 })
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(
            committed(&outside, &schema, "pg/after").await,
            2 * (i64::from(i) + 1),
            "round {i}: produces after a consumer stopped at {pause:?} are committed"
        );
    }
    let _ = queue.close().await;
}
