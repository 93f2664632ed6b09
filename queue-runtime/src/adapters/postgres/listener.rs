//! Background work of the adapter: the `LISTEN` connection that wakes waiting subscriptions
//! and sends this process's `NOTIFY`s, and housekeeping (vacuum, expired dedup keys,
//! subscriptions of processes that are gone).
//!
//! Notifications are sent after the change they announce has committed, in their own
//! statement on the listening connection (whose `synchronous_commit` is off: a notification
//! need not wait for a disk flush). Sending them inside the producing transaction would
//! serialize every producer's commit on PostgreSQL's notification lock. Marks made while a
//! `NOTIFY` is in flight are sent together in the next one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Inner;
use super::schema::Sql;

/// Channels with news for other processes, sent by the listener task.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    dirty: Mutex<HashSet<String>>,
    kick: Notify,
}

impl Notifier {
    /// Announces news on `channel` to other processes.
    pub fn mark(&self, channel: &str) {
        let fresh = {
            let mut dirty = self.dirty.lock();
            if dirty.contains(channel) {
                false
            } else {
                dirty.insert(channel.to_string())
            }
        };
        if fresh {
            self.kick.notify_one();
        }
    }

    fn take(&self) -> Vec<String> {
        self.dirty.lock().drain().collect()
    }
}

/// Opens a connection whose notifications arrive on the returned receiver; the receiver
/// ends when the connection does.
pub(crate) async fn open(
    config: &Config,
    tls: &MakeRustlsConnect,
) -> Result<(Client, mpsc::UnboundedReceiver<String>), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(notice = %notice.message(), "postgres notice");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the postgres notification connection failed");
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Starts listening and returns the connection's backend, which marks this process's
/// subscriptions as alive.
pub(crate) async fn listen(
    client: &Client,
    sql: &Sql,
) -> Result<(i32, Option<SystemTime>), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SET synchronous_commit = off; LISTEN \"{}\"",
            sql.notify_channel
        ))
        .await?;
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The wake-ups of this process's waiting subscriptions, by channel.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    map: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    pub fn get(&self, channel: &str) -> Arc<Notify> {
        self.map
            .lock()
            .entry(channel.to_string())
            .or_default()
            .clone()
    }

    pub fn wake(&self, channel: &str) {
        let waker = self.map.lock().get(channel).cloned();
        if let Some(w) = waker {
            w.notify_waiters();
        }
    }

    pub fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self.map.lock().values().cloned().collect();
        for w in all {
            w.notify_waiters();
        }
    }
}

/// Dispatches notifications to waiters and sends this process's notifications; reconnects
/// when the connection drops, waking every waiter so that nothing missed meanwhile is lost.
/// Holds the adapter only weakly, so that it ends when the adapter is dropped.
pub(crate) async fn run(
    inner: Weak<Inner>,
    config: Config,
    tls: MakeRustlsConnect,
    mut client: Client,
    mut notifications: mpsc::UnboundedReceiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let wakers = strong.wakers.clone();
    let notifier = strong.notifier.clone();
    let channel = strong.sql.notify_channel.clone();
    let sql_update = format!(
        "UPDATE {}.subscriptions SET backend_pid = $1, backend_start = $2 WHERE id = ANY($3::int8[])",
        strong.sql.schema
    );
    drop(strong);
    loop {
        // Serve one connection until it fails.
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                message = notifications.recv() => match message {
                    Some(name) => wakers.wake(&name),
                    None => break,
                },
                () = notifier.kick.notified() => {
                    let dirty = notifier.take();
                    if dirty.is_empty() {
                        continue;
                    }
                    let sent = client
                        .execute("SELECT pg_notify($1, c) FROM unnest($2::text[]) AS c", &[&channel, &dirty])
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "sending notifications failed");
                        break;
                    }
                }
            }
        }
        // Reconnect, waking everyone: notifications may have been missed.
        loop {
            wakers.wake_all();
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if strong.check_open().is_err() {
                return;
            }
            let opened = async {
                let (c, n) = open(&config, &tls).await?;
                let backend = listen(&c, &strong.sql).await?;
                c.execute(
                    &sql_update,
                    &[&backend.0, &backend.1, &strong.subscription_ids()],
                )
                .await?;
                Ok::<_, tokio_postgres::Error>((c, n, backend))
            }
            .await;
            match opened {
                Ok((c, n, backend)) => {
                    client = c;
                    notifications = n;
                    strong.set_backend(backend);
                    wakers.wake_all();
                    tracing::info!("the postgres notification connection is back");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconnecting the postgres notification connection failed");
                }
            }
        }
    }
}

/// Dead rows in `messages` above which the adapter vacuums it: the larger of this and a
/// tenth of the live rows.
const VACUUM_MIN_DEAD: i64 = 20_000;

/// Every second: vacuums `messages` when dead rows pile up (one process at a time, under an
/// advisory lock); every ten seconds: deletes expired dedup keys and the subscriptions of
/// processes that are gone.
pub(crate) async fn housekeeping(inner: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut vacuum_allowed = true;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.check_open().is_err() {
            return;
        }
        if inner.options.vacuum && vacuum_allowed {
            match vacuum_if_needed(&inner).await {
                Ok(_) => {}
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
                {
                    tracing::warn!(error = %e, "cannot vacuum the messages table; leaving it to autovacuum");
                    vacuum_allowed = false;
                }
                Err(e) => tracing::debug!(error = %e, "vacuum check failed"),
            }
        }
        if n.is_multiple_of(10)
            && let Err(e) = tidy(&inner).await
        {
            tracing::debug!(error = %e, "housekeeping failed");
        }
    }
}

async fn vacuum_if_needed(inner: &Arc<Inner>) -> Result<bool, tokio_postgres::Error> {
    let Ok(client) = inner.connection().await else {
        return Ok(false);
    };
    let Some(row) = client.query_opt(&inner.sql.dead_tuples, &[]).await? else {
        return Ok(false);
    };
    let (dead, live): (i64, i64) = (row.get(0), row.get(1));
    if dead < VACUUM_MIN_DEAD.max(live / 10) {
        return Ok(false);
    }
    let key = format!("queue-vacuum:{}", inner.sql.schema);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await?
        .get(0);
    if !locked {
        return Ok(false);
    }
    let started = std::time::Instant::now();
    let result = client.batch_execute(&inner.sql.vacuum).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
        .await;
    result?;
    tracing::debug!(dead, live, took = ?started.elapsed(), "vacuumed the messages table");
    Ok(true)
}

async fn tidy(inner: &Arc<Inner>) -> Result<(), tokio_postgres::Error> {
    let Ok(client) = inner.connection().await else {
        return Ok(());
    };
    client
        .execute(&inner.sql.expire_dedup, &[&inner.now()])
        .await?;
    client.execute(&inner.sql.forget_subscriptions, &[]).await?;
    Ok(())
}
