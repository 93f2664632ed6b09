//! A subscription: takes up to its free capacity in one statement, hands the deliveries out
//! one by one, and when nothing is ready waits for a notification, for the queue clock to
//! reach the channel's next due time or lease deadline, or for the safety poll.
//!
//! Taking runs on a spawned task, so a `next()` future dropped mid-way loses nothing: what
//! the statement leased lands in the subscription's buffer and is handed out by the next
//! call, or released when the subscription drops.
//!
//! The batch size adapts: it starts at one and doubles (up to the free capacity) while each
//! take fills it, so a deep backlog is taken in batches and a trickle one at a time. A
//! delivery taken ahead that is not asked for within [`HOLD`] is given back (its attempt does
//! not count), so a subscription that stops asking never sits on work another one could do.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use queue_core::clock::{Timestamp, millis};
use queue_core::{Lease, MessageId, QueueError, RawDelivery, Subscription};
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;

use super::schema::db_error;
use super::{ChannelRow, Inner, i64_of, u64_of};

/// What a subscription's tasks share.
pub(crate) struct SubShared {
    pub consumer: i64,
    channel: ChannelRow,
    name: Arc<str>,
    max_parallel: u32,
    state: Mutex<SubState>,
    /// One take at a time, and the release on drop after the last one.
    taking: tokio::sync::Mutex<()>,
}

/// How long a delivery taken ahead waits in the buffer to be asked for.
pub(crate) const HOLD: Duration = Duration::from_millis(100);

struct SubState {
    /// Leases this subscription holds, handed out or buffered: token to id.
    held: HashMap<u64, MessageId>,
    buffer: VecDeque<RawDelivery>,
    /// How many the next take asks for.
    batch: u32,
    dropped: bool,
}

impl Default for SubState {
    fn default() -> Self {
        SubState {
            held: HashMap::new(),
            buffer: VecDeque::new(),
            batch: 1,
            dropped: false,
        }
    }
}

impl SubShared {
    /// A lease ended (settled, lapsed): its slot is free.
    pub fn forget(&self, token: u64) {
        self.state.lock().held.remove(&token);
    }
}

pub(crate) struct PgSubscription {
    inner: Arc<Inner>,
    shared: Arc<SubShared>,
    notify: Arc<Notify>,
}

enum Took {
    /// Deliveries are in the buffer.
    Some,
    /// Nothing to take; look again at this time (queue clock), if any.
    Nothing(Option<Timestamp>),
    /// Capacity was freed behind our back: look again now.
    Again,
}

impl PgSubscription {
    pub fn new(inner: Arc<Inner>, channel: ChannelRow, consumer: i64, max_parallel: u32) -> Self {
        let name: Arc<str> = Arc::from(channel.spec.name.as_ref());
        let notify = inner.waker(&name);
        let shared = Arc::new(SubShared {
            consumer,
            channel,
            name,
            max_parallel,
            state: Mutex::new(SubState::default()),
            taking: tokio::sync::Mutex::new(()),
        });
        inner.register_subscription(&shared);
        PgSubscription {
            inner,
            shared,
            notify,
        }
    }
}

impl Subscription for PgSubscription {
    fn next(&self) -> BoxFuture<'static, Result<RawDelivery, QueueError>> {
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        let notify = self.notify.clone();
        async move {
            loop {
                inner.check_open()?;
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(d) = shared.state.lock().buffer.pop_front() {
                    return Ok(d);
                }
                let took = inner
                    .runtime
                    .spawn(take(inner.clone(), shared.clone()))
                    .await
                    .map_err(|e| QueueError::backend("postgres: taking messages panicked", e))?;
                let wakeup = match took {
                    Ok(Took::Some | Took::Again) => continue,
                    Ok(Took::Nothing(at)) => at,
                    Err(QueueError::Closed) => return Err(QueueError::Closed),
                    Err(e) => return Err(e),
                };
                let now = inner.clock.now();
                let due = async {
                    match wakeup {
                        Some(at) if at > now => inner.clock.sleep_until(at).await,
                        // Due but taken by a concurrent sweep: look again shortly.
                        Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = notified => {}
                    () = due => {}
                    () = tokio::time::sleep(inner.options.safety_poll) => {}
                }
            }
        }
        .boxed()
    }
}

/// Applies time rules, takes up to the free capacity, and reads the next wake-up time, in
/// one pipelined round trip.
async fn take(inner: Arc<Inner>, shared: Arc<SubShared>) -> Result<Took, QueueError> {
    let _taking = shared.taking.lock().await;
    let (room, limit, held) = {
        let state = shared.state.lock();
        if state.dropped {
            return Err(QueueError::Closed);
        }
        if !state.buffer.is_empty() {
            return Ok(Took::Some);
        }
        let room = shared
            .max_parallel
            .saturating_sub(u32::try_from(state.held.len()).unwrap_or(u32::MAX));
        let held: Vec<(i64, i64)> = if room == 0 {
            state
                .held
                .iter()
                .map(|(t, id)| (i64_of(id.0), i64_of(*t)))
                .collect()
        } else {
            Vec::new()
        };
        (room, room.min(state.batch), held)
    };
    let mut client = inner.connection().await?;
    let sql = &inner.sql;
    let prepare = |text: &str| {
        let client = &client;
        let text = text.to_string();
        async move {
            client
                .prepare_cached(&text)
                .await
                .map_err(|e| db_error("preparing", e))
        }
    };
    let sweep = prepare(&sql.sweep).await?;
    let take = prepare(&sql.take).await?;
    let wakeup = prepare(&sql.wakeup).await?;
    let still_held = prepare(&sql.still_held).await?;
    let channel = &shared.channel;
    // Limits count what is in flight and what left in the window: such takes are serialized.
    let limited = channel.spec.concurrency > 0
        || channel.spec.rate.is_some()
        || channel.spec.rate_per_group.is_some();
    let take_lock = if limited {
        Some(prepare(&sql.take_lock).await?)
    } else {
        None
    };
    // The server decides with its own clock; what it answers in durations is placed on the
    // queue clock from the time the statements were sent (never later than the server's).
    let sent = inner.clock.now();
    let now = inner.pinned(sent);
    let lease_ms = i64_of(millis(channel.spec.lease));
    let consumer = shared.consumer;
    let asked = limit;
    let limit = i64::from(limit);
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let sweep_params: [&(dyn ToSql + Sync); 2] = [&channel.id, &now];
    let take_params: [&(dyn ToSql + Sync); 5] = [&channel.id, &limit, &consumer, &lease_ms, &now];
    let wakeup_params: [&(dyn ToSql + Sync); 2] = [&channel.id, &now];
    let held_params: [&(dyn ToSql + Sync); 2] = [&ids, &tokens];
    let (swept, taken, next, holding) = tokio::try_join!(
        client.query_one(&sweep, &sweep_params),
        async {
            if room == 0 || limited {
                Ok(Vec::new())
            } else {
                client.query(&take, &take_params).await
            }
        },
        client.query_one(&wakeup, &wakeup_params),
        async {
            if room == 0 {
                client.query(&still_held, &held_params).await
            } else {
                Ok(Vec::new())
            }
        },
    )
    .map_err(|e| db_error("taking messages", e))?;
    let taken = match take_lock {
        Some(lock) if room > 0 => {
            // Dropped before the commit, the transaction rolls back.
            let tx = client
                .transaction()
                .await
                .map_err(|e| db_error("taking messages", e))?;
            tx.execute(&lock, &[&channel.id])
                .await
                .map_err(|e| db_error("taking messages", e))?;
            let rows = tx
                .query(&take, &take_params)
                .await
                .map_err(|e| db_error("taking messages", e))?;
            tx.commit()
                .await
                .map_err(|e| db_error("taking messages", e))?;
            rows
        }
        _ => taken,
    };
    drop(client);
    inner.after_sweep(&shared.name, &swept);

    if room == 0 {
        // Full: check that every lease we count still holds (another process may have
        // found one lapsed).
        let alive: std::collections::HashSet<i64> =
            holding.iter().map(|r| r.get::<_, i64>(0)).collect();
        let gone: Vec<u64> = tokens
            .iter()
            .filter(|t| !alive.contains(t))
            .map(|t| u64_of(*t))
            .collect();
        if !gone.is_empty() {
            inner.forget_leases(&gone);
            return Ok(Took::Again);
        }
    }

    let mut deliveries: Vec<RawDelivery> = taken
        .iter()
        .map(|r| RawDelivery {
            lease: Lease {
                channel: shared.name.clone(),
                id: MessageId(u64_of(r.get(0))),
                token: u64_of(r.get(1)),
            },
            attempt: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
            priority: u8::try_from(r.get::<_, i16>(3)).unwrap_or(0),
            produced_at: u64_of(r.get(4)),
            deadline: sent.saturating_add(millis(channel.spec.lease)),
            payload: r.get(6),
        })
        .collect();
    if asked > 0 {
        let mut state = shared.state.lock();
        state.batch = if deliveries.len() as u64 == u64::from(asked) {
            asked.saturating_mul(2).min(shared.max_parallel).max(1)
        } else {
            1
        };
    }
    if deliveries.is_empty() {
        let until: Option<i64> = next.get(0);
        return Ok(Took::Nothing(until.map(|ms| {
            if ms > 0 {
                sent.saturating_add(u64_of(ms))
            } else {
                sent.saturating_sub(1)
            }
        })));
    }
    // Tokens were drawn in delivery order.
    deliveries.sort_unstable_by_key(|d| d.lease.token);
    let tokens: Vec<u64> = deliveries.iter().map(|d| d.lease.token).collect();
    {
        let mut state = shared.state.lock();
        for d in &deliveries {
            state.held.insert(d.lease.token, d.lease.id);
        }
        state.buffer.extend(deliveries);
    }
    inner.remember_leases(&tokens, &shared);
    if tokens.len() > 1 {
        // The caller takes the first; the rest wait to be asked for.
        inner.runtime.spawn(give_back_unasked(
            inner.clone(),
            Arc::downgrade(&shared),
            tokens,
        ));
    }
    Ok(Took::Some)
}

/// Gives back the deliveries of one take still in the buffer after [`HOLD`].
async fn give_back_unasked(
    inner: Arc<Inner>,
    shared: std::sync::Weak<SubShared>,
    tokens: Vec<u64>,
) {
    tokio::time::sleep(HOLD).await;
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let _taking = shared.taking.lock().await;
    let unasked: Vec<RawDelivery> = {
        let mut state = shared.state.lock();
        if state.dropped {
            return;
        }
        let (unasked, keep): (VecDeque<RawDelivery>, VecDeque<RawDelivery>) = state
            .buffer
            .drain(..)
            .partition(|d| tokens.contains(&d.lease.token));
        state.buffer = keep;
        unasked.into()
    };
    for d in unasked {
        if let Err(e) = inner.settle(&d.lease, queue_core::Outcome::Release).await {
            tracing::debug!(message_id = %d.lease.id, error = %e, "giving back an unasked delivery failed");
        }
    }
}

impl Drop for PgSubscription {
    fn drop(&mut self) {
        self.shared.state.lock().dropped = true;
        self.inner.unregister_subscription(self.shared.consumer);
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        self.inner.runtime.spawn(async move {
            // After any take in flight, so that what it leased is released too.
            let _taking = shared.taking.lock().await;
            let (unasked, tokens): (Vec<RawDelivery>, Vec<u64>) = {
                let mut state = shared.state.lock();
                (
                    state.buffer.drain(..).collect(),
                    state.held.drain().map(|(t, _)| t).collect(),
                )
            };
            inner.forget_leases(&tokens);
            // Taken but never handed out: given back without counting the attempt.
            for d in unasked {
                if let Err(e) = inner.settle(&d.lease, queue_core::Outcome::Release).await {
                    tracing::debug!(message_id = %d.lease.id, error = %e, "giving back an unasked delivery failed");
                }
            }
            // Handed out: back at the front with the attempt counted, as for a crash.
            if let Err(e) = release(&inner, &shared).await {
                tracing::debug!(consumer = shared.consumer, error = %e, "releasing a dropped subscription failed");
            }
        });
    }
}

/// Puts every lease of the subscription back at the front of its channel and forgets the
/// subscription.
async fn release(inner: &Inner, shared: &SubShared) -> Result<(), QueueError> {
    let client = inner.connection().await?;
    let release = client
        .prepare_cached(&inner.sql.release_consumer)
        .await
        .map_err(|e| db_error("preparing", e))?;
    let unsubscribe = client
        .prepare_cached(&inner.sql.unsubscribe)
        .await
        .map_err(|e| db_error("preparing", e))?;
    let now = inner.now();
    let release_params: [&(dyn ToSql + Sync); 3] = [&shared.channel.id, &shared.consumer, &now];
    let unsubscribe_params: [&(dyn ToSql + Sync); 1] = [&shared.consumer];
    let (released, _) = tokio::try_join!(
        client.query(&release, &release_params),
        client.execute(&unsubscribe, &unsubscribe_params),
    )
    .map_err(|e| db_error("releasing a subscription", e))?;
    if !released.is_empty() {
        tracing::debug!(
            consumer = shared.consumer,
            released = released.len(),
            "released the leases of a dropped subscription"
        );
        inner.wake(&shared.name);
    }
    Ok(())
}
