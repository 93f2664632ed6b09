//! `nats://`: the queue on NATS JetStream, for many machines sharing one replicated log.
//!
//! Each channel is one JetStream stream of commands (`produce`, `take`, `settle`, …, see
//! [`command`]). A client appends a command and waits for JetStream's acknowledgement, which
//! means the command is stored on the stream's replicas; every client reads the stream in
//! order and applies each command to its own copy of the channel's state, the embedded
//! store's engine rules ([`replica`]). A command's answer (receipts, deliveries, a stale
//! lease) is what applying it gives, the same on every client, so the rules hold across
//! processes without a lock: two workers that take at once are ordered by the stream, and
//! the second finds the message taken.
//!
//! Time is the clients' clock: each command carries its sender's time, and a replica applies
//! it at that time or the latest earlier one, whichever is later. Leases, backoff, delays,
//! dedup windows and rates run on it, as they do on PostgreSQL. Every client keeps the
//! pending payloads of the channels it uses in memory.
//!
//! The URL: `nats://HOST:PORT[,HOST:PORT…][/NAMESPACE][?options]`, with options `replicas`
//! (the streams' replica count, 1 by default), `creds` (a credentials file), `user` and
//! `password`, `token`, `tls=true`, `ca` (a PEM file of trusted roots, implies TLS) and
//! `connect_timeout` (seconds). The namespace (`typed_queue` by default) prefixes every
//! stream and bucket, so several queues can share one server.

pub mod command;
pub mod replica;
mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use parking_lot::Mutex;
use queue_core::clock::{Clock, Timestamp};
use queue_core::{
    Adapter, Cancelled, ChannelSpec, ChannelStats, DeadLetter, Lease, MessageId, Outcome, Outgoing,
    QueueError, Receipt, StoredMessage, Subscription, limits,
};
use tokio::sync::{Notify, oneshot};

use crate::broker::protocol::{WireLease, WireOutcome, WireOutgoing, WireSpec};
use crate::engine::{by_channel, copy_error};
use command::{Command, Op};
use replica::{Answer, Replica};
use subscription::{Inbox, NatsSubscription};

/// The namespace of a URL without one.
pub const DEFAULT_NAMESPACE: &str = "typed_queue";

/// How long a command's publish waits for JetStream's acknowledgement, per try.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a request to NATS is tried again while it fails (a cluster electing a leader
/// after losing a node, a server restarting). A command published again carries the same
/// `Nats-Msg-Id`, so JetStream stores it once: this stays well inside [`DUPLICATE_WINDOW`].
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs `f` until it succeeds or [`RETRY_FOR`] has passed, pausing between tries.
///
/// # Errors
/// [`QueueError::Backend`] with `what` and the last failure.
async fn retry<T, E, F, Fut>(what: &str, mut f: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "{what}: trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(QueueError::backend(what.to_string(), e)),
        }
    }
}

/// The window in which JetStream drops a command published again under the same id.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long a caller waits for its stored command to be read back, with the reader making no
/// progress, before it tells the reader to start again (its consumer may have lived on a
/// server that died).
const STALLED: Duration = Duration::from_secs(1);

/// Commands between two snapshots of a channel, by default.
pub const COMPACT_EVERY: u64 = 10_000;

/// Room kept in a command for everything but payloads.
const COMMAND_OVERHEAD: usize = 16 << 10;

/// Options of a `nats://` URL.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `host:port` of each seed server.
    pub servers: Vec<String>,
    /// Prefix of the streams and buckets.
    pub namespace: String,
    /// Replicas of each stream (1, 3 or 5).
    pub replicas: usize,
    /// A credentials file.
    pub creds: Option<std::path::PathBuf>,
    /// User and password.
    pub user: Option<(String, String)>,
    /// A token.
    pub token: Option<String>,
    /// Require TLS.
    pub tls: bool,
    /// Trusted roots for TLS (PEM).
    pub ca: Option<std::path::PathBuf>,
    /// How long to try to connect.
    pub connect_timeout: Duration,
    /// Commands between two snapshots of a channel; the stream keeps about twice as many.
    pub compact_every: u64,
}

impl NatsOptions {
    /// Parses the part of a `nats://` URL after the scheme.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, namespace) = address.split_once('/').unwrap_or((address, ""));
        let namespace = namespace.trim_end_matches('/');
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE.to_string()
        } else {
            namespace.to_string()
        };
        if namespace.len() > 32
            || !namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "the namespace `{namespace}` must be 1 to 32 letters, digits, `_` or `-`"
            ));
        }
        let servers: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if servers.is_empty() {
            return Err("no server address".into());
        }
        let mut options = NatsOptions {
            servers,
            namespace,
            replicas: 1,
            creds: None,
            user: None,
            token: None,
            tls: false,
            ca: None,
            connect_timeout: Duration::from_secs(10),
            compact_every: COMPACT_EVERY,
        };
        let mut user = None;
        let mut password = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("replicas", v)) => {
                    options.replicas = match v.parse() {
                        Ok(n @ (1 | 3 | 5)) => n,
                        _ => return Err(format!("`replicas` must be 1, 3 or 5, not `{v}`")),
                    }
                }
                Some(("compact_every", v)) => {
                    options.compact_every =
                        v.parse().ok().filter(|n| *n >= 16).ok_or_else(|| {
                            format!("`compact_every` must be a count of at least 16, not `{v}`")
                        })?;
                }
                Some(("creds", v)) => options.creds = Some(v.into()),
                Some(("user", v)) => user = Some(v.to_string()),
                Some(("password", v)) => password = Some(v.to_string()),
                Some(("token", v)) => options.token = Some(v.to_string()),
                Some(("tls", "true")) => options.tls = true,
                Some(("tls", "false")) => options.tls = false,
                Some(("ca", v)) => {
                    options.ca = Some(v.into());
                    options.tls = true;
                }
                Some(("connect_timeout", v)) => {
                    options.connect_timeout = v
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
                        .map(Duration::from_secs_f64)
                        .ok_or_else(|| format!("`{pair}` needs a number of seconds"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown option `{pair}`; nats:// takes `replicas`, `creds`, `user`, \
                         `password`, `token`, `tls`, `ca`, `connect_timeout` and `compact_every`"
                    ));
                }
            }
        }
        match (user, password) {
            (Some(u), Some(p)) => options.user = Some((u, p)),
            (None, None) => {}
            _ => return Err("`user` and `password` go together".into()),
        }
        Ok(options)
    }
}

/// The `nats://` adapter.
pub struct NatsAdapter {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    options: NatsOptions,
    registry: kv::Store,
    /// Snapshots of channels, `<hash>-<seq>`.
    snapshots: object_store::ObjectStore,
    /// This client's id in the commands it sends.
    me: i64,
    nonce: AtomicI64,
    clock: Arc<dyn Clock>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Serializes opening links, so a channel is opened once.
    opening: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    max_payload: usize,
    runtime: tokio::runtime::Handle,
    description: String,
}

/// This client's view of one channel: its stream and its replica.
pub(crate) struct Link {
    name: Arc<str>,
    /// The name's hash: the stream's, the snapshots' and the registry's key.
    hash: u64,
    /// The channel's stream, for purging what a snapshot covers.
    stream: stream::Stream,
    /// A snapshot is being stored.
    compacting: AtomicBool,
    subject: String,
    replica: Mutex<Replica>,
    /// Woken when the replica changes.
    notify: Notify,
    /// Callers waiting for their commands' answers, by nonce.
    waiters: Mutex<HashMap<i64, Waiter>>,
    /// This client's subscriptions, by consumer.
    inboxes: Mutex<HashMap<u64, Weak<Mutex<Inbox>>>>,
    /// The stream sequence of the last command applied.
    applied: AtomicU64,
    /// Tells the reader to start again: a command was stored and has not come back.
    reread: Notify,
    /// Why the stream can no longer be read.
    failed: Mutex<Option<String>>,
    applier: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for NatsAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAdapter")
            .field("url", &self.inner.description)
            .finish_non_exhaustive()
    }
}

impl NatsAdapter {
    /// Connects to the servers of `options`.
    ///
    /// # Errors
    /// [`QueueError::Backend`] when no server answers or JetStream is not enabled.
    pub async fn connect(
        options: NatsOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, QueueError> {
        let mut connect = async_nats::ConnectOptions::new()
            .name("typed_queue")
            .connection_timeout(options.connect_timeout)
            .max_reconnects(None);
        if let Some(path) = &options.creds {
            connect = connect.credentials_file(path).await.map_err(|e| {
                QueueError::backend(format!("reading credentials {}", path.display()), e)
            })?;
        }
        if let Some((user, password)) = &options.user {
            connect = connect.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &options.token {
            connect = connect.token(token.clone());
        }
        if options.tls {
            connect = connect.require_tls(true);
        }
        if let Some(ca) = &options.ca {
            connect = connect.add_root_certificates(ca.clone());
        }
        let addresses: Vec<async_nats::ServerAddr> = options
            .servers
            .iter()
            .map(|s| {
                let url = if s.contains("://") {
                    s.clone()
                } else if options.tls {
                    format!("tls://{s}")
                } else {
                    format!("nats://{s}")
                };
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| QueueError::InvalidUrl {
                        url: s.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let client = tokio::time::timeout(options.connect_timeout, connect.connect(addresses))
            .await
            .map_err(|_| QueueError::Timeout(options.connect_timeout))?
            .map_err(|e| QueueError::backend("connecting to NATS", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(PUBLISH_TIMEOUT);
        let bucket = format!("{}_channels", options.namespace);
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "typed_queue channels: name and number".into(),
            history: 1,
            num_replicas: options.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let registry = retry(
            "opening the channel registry (is JetStream on?)",
            || async {
                match js.get_key_value(&bucket).await {
                    Ok(store) => Ok(store),
                    // Created meanwhile by another client, or not yet.
                    Err(_) => match js.create_key_value(config.clone()).await {
                        Ok(store) => Ok(store),
                        Err(e) => js.get_key_value(&bucket).await.map_err(|_| e),
                    },
                }
            },
        )
        .await?;
        let bucket = format!("{}_snapshots", options.namespace);
        let config = object_store::Config {
            bucket: bucket.clone(),
            description: Some("typed_queue channel snapshots".into()),
            num_replicas: options.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let snapshots = retry("opening the snapshot store", || async {
            match js.get_object_store(&bucket).await {
                Ok(store) => Ok(store),
                Err(_) => match js.create_object_store(config.clone()).await {
                    Ok(store) => Ok(store),
                    Err(e) => js.get_object_store(&bucket).await.map_err(|_| e),
                },
            }
        })
        .await?;
        let max_payload = client.server_info().max_payload;
        let description = format!("nats://{}/{}", options.servers.join(","), options.namespace);
        Ok(Arc::new(NatsAdapter {
            inner: Arc::new(Inner {
                client,
                js,
                options,
                registry,
                snapshots,
                me: (fastrand::u64(..) >> 1) as i64,
                nonce: AtomicI64::new(1),
                clock,
                links: Mutex::new(HashMap::new()),
                opening: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
                max_payload,
                runtime: tokio::runtime::Handle::current(),
                description,
            }),
        }))
    }

    /// The URL this adapter was opened with, without credentials.
    pub fn description(&self) -> &str {
        &self.inner.description
    }
}

/// The registry key pointing at a channel's latest snapshot.
fn pointer_key(hash: u64) -> String {
    format!("s{hash:016x}")
}

/// The object holding a channel's snapshot at `seq`.
fn object_name(hash: u64, seq: u64) -> String {
    format!("{hash:016x}-{seq}")
}

/// The sequence a snapshot pointer names.
fn pointed(entry: &kv::Entry) -> Option<u64> {
    (entry.operation == kv::Operation::Put)
        .then(|| std::str::from_utf8(&entry.value).ok()?.parse().ok())
        .flatten()
}

/// The settings a replica starts with before its stream's commands bring the channel's own.
fn default_spec(name: &str) -> ChannelSpec {
    ChannelSpec {
        name: std::borrow::Cow::Owned(name.to_string()),
        ..ChannelSpec::new("")
    }
}

/// The stream of channel `name` in `namespace`: readable, unique by the name's hash.
fn stream_name(namespace: &str, name: &str, hash: u64) -> String {
    let readable: String = name
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{namespace}_{readable}_{hash:016x}")
}

impl Inner {
    fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Acquire) {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }

    /// The link of channel `name`, opened on first use: registered and its stream created
    /// when `create`; `None` for a channel the store has never seen otherwise.
    async fn link(
        self: &Arc<Self>,
        name: &str,
        create: bool,
    ) -> Result<Option<Arc<Link>>, QueueError> {
        self.check_open()?;
        if let Some(link) = self.links.lock().get(name) {
            return Ok(Some(link.clone()));
        }
        let _opening = self.opening.lock().await;
        if let Some(link) = self.links.lock().get(name) {
            return Ok(Some(link.clone()));
        }
        let hash = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
        let key = format!("c{hash:016x}");
        let registered = |entry: Option<kv::Entry>| -> Result<Option<u64>, QueueError> {
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    if e.value.as_ref() != name.as_bytes() {
                        return Err(QueueError::InvalidRequest(format!(
                            "channel `{name}` hashes like channel `{}`; rename one",
                            String::from_utf8_lossy(&e.value)
                        )));
                    }
                    Ok(Some(e.revision))
                }
                _ => Ok(None),
            }
        };
        let read = || {
            retry("reading the channel registry", || {
                self.registry.entry(key.as_str())
            })
        };
        let number = match registered(read().await?)? {
            Some(n) => n,
            None if !create => return Ok(None),
            None => {
                let value = bytes::Bytes::copy_from_slice(name.as_bytes());
                let created = retry("registering a channel", || async {
                    match self.registry.create(key.as_str(), value.clone()).await {
                        Ok(revision) => Ok(Some(revision)),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await?;
                match created {
                    Some(revision) => revision,
                    None => registered(read().await?)?.ok_or_else(|| {
                        QueueError::Poisoned(format!(
                            "channel `{name}` is registered and deleted at once"
                        ))
                    })?,
                }
            }
        };
        if number >= 1 << (63 - replica::ID_BITS) {
            return Err(QueueError::InvalidRequest(
                "the channel registry has used every channel number".into(),
            ));
        }
        let subject = format!("{}.c.{hash:016x}", self.options.namespace);
        let config = stream::Config {
            name: stream_name(&self.options.namespace, name, hash),
            description: Some(format!("typed_queue channel {name}")),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.options.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            max_message_size: -1,
            allow_direct: true,
            metadata: HashMap::from([("typed_queue.channel".to_string(), name.to_string())]),
            ..Default::default()
        };
        let what = format!("opening the stream of channel `{name}`");
        let stream = retry(&what, || self.js.get_or_create_stream(config.clone())).await?;
        let replicas = stream.cached_info().config.num_replicas;
        if replicas != self.options.replicas {
            tracing::warn!(
                channel = name,
                replicas,
                wanted = self.options.replicas,
                "the channel's stream keeps a different number of replicas than the URL asks for"
            );
        }
        let (applied, replica) = match self.load_snapshot(hash).await? {
            Some((seq, replica)) => (seq, replica),
            None => (0, Replica::new(default_spec(name), number)),
        };
        let link = Arc::new(Link {
            name: Arc::from(name),
            hash,
            stream: stream.clone(),
            compacting: AtomicBool::new(false),
            subject,
            replica: Mutex::new(replica),
            notify: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            applied: AtomicU64::new(applied),
            reread: Notify::new(),
            failed: Mutex::new(None),
            applier: Mutex::new(None),
        });
        let task = self
            .runtime
            .spawn(follow(Arc::downgrade(&link), Arc::downgrade(self)));
        *link.applier.lock() = Some(task);
        self.links.lock().insert(name.to_string(), link.clone());
        Ok(Some(link))
    }

    /// Appends a command to `link`'s stream and waits until this client has applied it.
    ///
    /// # Errors
    /// [`QueueError::Closed`]; [`QueueError::PayloadTooLarge`] for a command past the
    /// server's message size; [`QueueError::Backend`] when JetStream does not store it (it
    /// may have, if its acknowledgement was lost) or the stream cannot be read.
    async fn submit(&self, link: &Arc<Link>, op: Op) -> Result<Answer, QueueError> {
        self.check_open()?;
        link.check()?;
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let command = Command {
            from: self.me,
            nonce,
            at: i64::try_from(self.clock.now()).unwrap_or(i64::MAX),
            op,
        };
        let bytes = command::encode(&command)?;
        if bytes.len() > self.max_payload {
            return Err(QueueError::PayloadTooLarge {
                size: bytes.len(),
                max: self.max_payload.saturating_sub(COMMAND_OVERHEAD),
            });
        }
        let (tx, rx) = oneshot::channel();
        link.waiters.lock().insert(nonce, Waiter { seq: None, tx });
        let forget = Forget { link, nonce };
        let seq = self
            .publish(&link.subject, nonce, bytes::Bytes::from(bytes))
            .await?;
        if let Some(waiter) = link.waiters.lock().get_mut(&nonce) {
            waiter.seq = Some(seq);
        }
        let mut rx = rx;
        let mut seen = link.applied.load(Ordering::Acquire);
        let waiting = tokio::time::Instant::now();
        let answer = loop {
            match tokio::time::timeout(STALLED, &mut rx).await {
                Ok(answer) => break answer,
                Err(_) => {
                    let applied = link.applied.load(Ordering::Acquire);
                    // Stored, and not read back for as long as requests are retried: the
                    // caller learns it; the command is applied whenever the reader gets to it.
                    if applied < seq && waiting.elapsed() > RETRY_FOR {
                        return Err(QueueError::Timeout(RETRY_FOR));
                    }
                    // Applied long ago and not answered: it was inside a snapshot the
                    // client caught up from.
                    if applied >= seq && seen >= seq {
                        break Ok(Answer::Lost);
                    }
                    // Stored, and the reader has not moved since: its server may be gone.
                    if applied < seq && applied == seen {
                        link.reread.notify_one();
                    }
                    seen = applied;
                }
            }
        };
        drop(forget);
        match answer {
            Ok(Answer::Lost) => Err(QueueError::backend(
                "the answer was lost: the client fell behind the channel's stream and caught up from a snapshot; the command may have been applied",
                "caught up from a snapshot",
            )),
            Ok(answer) => Ok(answer),
            Err(_) => {
                link.check()?;
                Err(QueueError::Closed)
            }
        }
    }

    /// Publishes a command until JetStream acknowledges it.
    async fn publish(
        &self,
        subject: &str,
        nonce: i64,
        bytes: bytes::Bytes,
    ) -> Result<u64, QueueError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{:x}-{nonce:x}", self.me).as_str(),
        );
        retry("storing a command in JetStream", || async {
            self.check_open().map_err(|e| e.to_string())?;
            let ack = self
                .js
                .publish_with_headers(subject.to_string(), headers.clone(), bytes.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|a| a.sequence).map_err(|e| e.to_string())
        })
        .await
    }

    /// Every channel in the registry, by name.
    async fn channel_names(&self) -> Result<Vec<String>, QueueError> {
        let keys: Vec<String> = retry("listing the channel registry", || async {
            let keys = self.registry.keys().await.map_err(|e| e.to_string())?;
            keys.collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<String>, _>>()
                .map_err(|e| e.to_string())
        })
        .await?;
        let mut names = Vec::new();
        for key in keys.into_iter().filter(|k| k.starts_with('c')) {
            let value = retry("reading the channel registry", || {
                self.registry.get(key.as_str())
            })
            .await?;
            if let Some(value) = value {
                names.push(String::from_utf8_lossy(&value).into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The latest snapshot of the channel whose name hashes to `hash`: the stream sequence
    /// it covers, and the replica.
    async fn load_snapshot(&self, hash: u64) -> Result<Option<(u64, Replica)>, QueueError> {
        use tokio::io::AsyncReadExt;
        let key = pointer_key(hash);
        for _ in 0..10 {
            let entry = retry("reading a snapshot pointer", || {
                self.registry.entry(key.as_str())
            })
            .await?;
            let Some(seq) = entry.and_then(|e| pointed(&e)) else {
                return Ok(None);
            };
            let name = object_name(hash, seq);
            let mut object = match self.snapshots.get(name.as_str()).await {
                Ok(object) => object,
                // Replaced by a newer one meanwhile.
                Err(e) if e.kind() == object_store::GetErrorKind::NotFound => continue,
                Err(e) => return Err(QueueError::backend("reading a channel snapshot", e)),
            };
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| QueueError::backend("reading a channel snapshot", e))?;
            return Ok(Some((seq, Replica::from_snapshot(&bytes)?)));
        }
        Err(QueueError::Poisoned(
            "the channel's snapshots kept changing while being read".into(),
        ))
    }

    /// Stores the snapshot `bytes` of `link` at `seq`, points the channel at it, and purges
    /// the stream up to the snapshot it replaces, so the stream keeps one snapshot interval
    /// more than the snapshot needs (for clients reading it from the previous snapshot).
    async fn compact(&self, link: &Link, seq: u64, bytes: Vec<u8>) -> Result<(), QueueError> {
        let name = object_name(link.hash, seq);
        retry("storing a channel snapshot", || async {
            self.snapshots
                .put(name.as_str(), &mut bytes.as_slice())
                .await
        })
        .await?;
        let key = pointer_key(link.hash);
        let value = bytes::Bytes::from(seq.to_string());
        let mut replaced = None;
        for _ in 0..10 {
            let entry = retry("reading a snapshot pointer", || {
                self.registry.entry(key.as_str())
            })
            .await?;
            let (old, moved) = match entry.as_ref().and_then(|e| pointed(e).map(|old| (e, old))) {
                Some((_, old)) if old >= seq => {
                    let _ = self.snapshots.delete(name.as_str()).await;
                    return Ok(());
                }
                Some((e, old)) => (
                    old,
                    self.registry
                        .update(key.as_str(), value.clone(), e.revision)
                        .await
                        .is_ok(),
                ),
                None => (
                    0,
                    self.registry
                        .create(key.as_str(), value.clone())
                        .await
                        .is_ok(),
                ),
            };
            if moved {
                replaced = Some(old);
                break;
            }
        }
        let Some(old) = replaced else {
            return Err(QueueError::Poisoned(
                "the snapshot pointer kept changing".into(),
            ));
        };
        if old > 0 {
            retry("purging a channel's stream", || {
                link.stream.purge().sequence(old + 1).into_future()
            })
            .await?;
            let _ = self
                .snapshots
                .delete(object_name(link.hash, old).as_str())
                .await;
        }
        Ok(())
    }

    /// Replaces `link`'s replica with the latest snapshot when it covers the commands before
    /// `seq` that the stream no longer has. Callers waiting for commands the snapshot covers
    /// get [`Answer::Lost`]: applied, with an answer nobody computed here.
    async fn reload(&self, link: &Link, seq: u64) -> bool {
        match self.load_snapshot(link.hash).await {
            Ok(Some((covered, replica))) if covered + 1 >= seq => {
                *link.replica.lock() = replica;
                link.applied.store(covered, Ordering::Release);
                let mut waiters = link.waiters.lock();
                let lost: Vec<i64> = waiters
                    .iter()
                    .filter(|(_, w)| w.seq.is_some_and(|s| s <= covered))
                    .map(|(nonce, _)| *nonce)
                    .collect();
                for nonce in lost {
                    if let Some(w) = waiters.remove(&nonce) {
                        let _ = w.tx.send(Answer::Lost);
                    }
                }
                drop(waiters);
                link.notify.notify_waiters();
                tracing::info!(channel = %link.name, covered, "caught up from a snapshot after falling behind the stream");
                true
            }
            _ => false,
        }
    }

    /// Fires a command nobody waits for (a dropped subscription's release).
    fn send_later(self: &Arc<Self>, link: Arc<Link>, op: Op) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let inner = self.clone();
        self.runtime.spawn(async move {
            if let Err(e) = inner.submit(&link, op).await {
                tracing::warn!(channel = %link.name, error = %e, "a release did not reach the stream; its leases lapse instead");
            }
        });
    }
}

/// A caller waiting for its command's answer.
struct Waiter {
    /// The command's stream sequence, once JetStream has acknowledged it.
    seq: Option<u64>,
    tx: oneshot::Sender<Answer>,
}

/// What applying a stream message did.
enum Applied {
    Done,
    /// Commands before it are missing.
    Gap,
}

/// Removes a waiter whose caller went away.
struct Forget<'a> {
    link: &'a Link,
    nonce: i64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.link.waiters.lock().remove(&self.nonce);
    }
}

impl Link {
    fn check(&self) -> Result<(), QueueError> {
        match &*self.failed.lock() {
            Some(why) => Err(QueueError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Applies the command at `seq` of the stream; says [`Applied::Gap`] when commands before
    /// it are missing (purged after a snapshot this replica has not caught up with).
    fn apply(self: &Arc<Self>, inner: &Arc<Inner>, bytes: &[u8], seq: u64) -> Applied {
        let applied = self.applied.load(Ordering::Acquire);
        if seq <= applied {
            return Applied::Done;
        }
        if seq != applied + 1 {
            return Applied::Gap;
        }
        self.applied.store(seq, Ordering::Release);
        let command = match command::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(channel = %self.name, seq, error = %e, "skipping a stream message that is no command");
                return Applied::Done;
            }
        };
        let mine = command.from == inner.me;
        let nonce = command.nonce;
        // The sender of every `compact_every`-th command stores a snapshot.
        let snapshot = mine
            && seq.is_multiple_of(inner.options.compact_every)
            && !self.compacting.swap(true, Ordering::AcqRel);
        let (answer, handed, snapshot) = {
            let mut replica = self.replica.lock();
            let (answer, handed) = replica.apply(command);
            (answer, handed, snapshot.then(|| replica.to_snapshot()))
        };
        match snapshot {
            Some(Ok(bytes)) => {
                let (inner, link) = (inner.clone(), self.clone());
                inner.runtime.clone().spawn(async move {
                    if let Err(e) = inner.compact(&link, seq, bytes).await {
                        tracing::warn!(channel = %link.name, seq, error = %e, "storing a snapshot failed; the stream keeps its commands until the next");
                    }
                    link.compacting.store(false, Ordering::Release);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(channel = %self.name, seq, error = %e, "encoding a snapshot failed");
                self.compacting.store(false, Ordering::Release);
            }
            None => {}
        }
        if let Some((consumer, taken)) = handed
            && mine
        {
            let inbox = self.inboxes.lock().get(&consumer).and_then(Weak::upgrade);
            let back = match inbox {
                Some(inbox) => inbox.lock().hand(taken),
                // Dropped meanwhile: its unsubscribe gives them back.
                None => Vec::new(),
            };
            if !back.is_empty() {
                inner.send_later(self.clone(), subscription::release_op(&self.name, &back));
            }
        }
        if mine && let Some(waiter) = self.waiters.lock().remove(&nonce) {
            let _ = waiter.tx.send(answer);
        }
        self.notify.notify_waiters();
        Applied::Done
    }

    /// Marks the stream unreadable and fails every waiter.
    fn fail(&self, why: String) {
        tracing::error!(channel = %self.name, error = %why, "the channel's stream can no longer be read");
        *self.failed.lock() = Some(why);
        self.waiters.lock().clear();
        self.notify.notify_waiters();
    }
}

/// Reads a channel's stream from its start and applies every command, for as long as the
/// link lives. A read that fails (a server restarting, a cluster electing a leader) starts
/// again after the last command applied.
async fn follow(link: Weak<Link>, inner: Weak<Inner>) {
    use jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let Some(stream) = link.upgrade().map(|l| l.stream.clone()) else {
        return;
    };
    let mut pause = Duration::from_millis(20);
    loop {
        let Some(start) = link
            .upgrade()
            .map(|l| l.applied.load(Ordering::Acquire) + 1)
        else {
            return;
        };
        let messages = match stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
        {
            Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(mut messages) => loop {
                let Some(reread) = link.upgrade() else {
                    return;
                };
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = reread.reread.notified() => {
                        tracing::debug!(channel = %reread.name, "the stream's reader is behind a stored command; reading again");
                        break;
                    }
                };
                drop(reread);
                let Some(next) = next else {
                    break;
                };
                let (Some(link), Some(inner)) = (link.upgrade(), inner.upgrade()) else {
                    return;
                };
                match next {
                    Ok(message) => {
                        pause = Duration::from_millis(20);
                        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                        if let Applied::Gap = link.apply(&inner, &message.payload, seq) {
                            if !inner.reload(&link, seq).await {
                                let applied = link.applied.load(Ordering::Acquire);
                                link.fail(format!(
                                    "the channel's stream lost commands {} to {} and no snapshot covers them",
                                    applied + 1,
                                    seq - 1
                                ));
                                return;
                            }
                            let _ = link.apply(&inner, &message.payload, seq);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(channel = %link.name, error = %e, "reading the channel's stream; reading again");
                        break;
                    }
                }
            },
            Err(e) => {
                if let Some(link) = link.upgrade() {
                    tracing::debug!(channel = %link.name, error = %e, "opening a reader of the channel's stream; trying again");
                }
            }
        }
        if inner
            .upgrade()
            .is_none_or(|i| i.closed.load(Ordering::Acquire))
        {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for link in self.links.lock().values() {
            if let Some(task) = link.applier.lock().take() {
                task.abort();
            }
        }
    }
}

/// An answer of the wrong kind: a bug, reported rather than panicking a worker.
fn unexpected(answer: &Answer) -> QueueError {
    QueueError::Poisoned(format!("a command was answered with {answer:?}"))
}

/// Splits a batch into commands that fit the server's message size.
fn chunks(batch: Vec<Outgoing>, room: usize) -> Result<Vec<Vec<WireOutgoing>>, QueueError> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for message in batch {
        let len = message.payload.len() + 64;
        if len > room {
            return Err(QueueError::PayloadTooLarge {
                size: message.payload.len(),
                max: room.saturating_sub(64),
            });
        }
        if size + len > room && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(WireOutgoing::from(message));
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

impl NatsAdapter {
    async fn put(
        &self,
        spec: &ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<Receipt>, QueueError> {
        let inner = &self.inner;
        inner.check_open()?;
        spec.check()?;
        limits::check_batch(&batch)?;
        let room = inner.max_payload.saturating_sub(COMMAND_OVERHEAD);
        let commands = chunks(batch, room)?;
        let link = inner
            .link(&spec.name, true)
            .await?
            .ok_or(QueueError::Closed)?;
        let wire = WireSpec::from(spec);
        let mut receipts = Vec::new();
        for batch in commands {
            let op = Op::Produce {
                spec: wire.clone(),
                batch,
            };
            match inner.submit(&link, op).await? {
                Answer::Receipts(r) => receipts.extend(r?),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(receipts)
    }

    async fn open_subscription(
        &self,
        spec: &ChannelSpec,
        max_parallel: u32,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        let inner = &self.inner;
        inner.check_open()?;
        spec.check()?;
        let link = inner
            .link(&spec.name, true)
            .await?
            .ok_or(QueueError::Closed)?;
        let consumer = fastrand::u64(..) >> 1;
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        link.inboxes.lock().insert(consumer, Arc::downgrade(&inbox));
        let subscription = NatsSubscription {
            inner: inner.clone(),
            link: link.clone(),
            consumer,
            inbox,
        };
        // Dropped on failure: its unsubscribe follows the subscribe, if that was stored.
        let op = Op::Subscribe {
            spec: WireSpec::from(spec),
            consumer: consumer as i64,
            max_parallel: i64::from(max_parallel),
        };
        inner.submit(&link, op).await?;
        Ok(Box::new(subscription))
    }

    async fn settle_batch(&self, settles: Vec<(Lease, Outcome)>) -> Vec<Result<(), QueueError>> {
        let mut results: Vec<Result<(), QueueError>> = settles.iter().map(|_| Ok(())).collect();
        for (channel, members) in by_channel(settles.iter().map(|(lease, _)| lease)) {
            let link = match self.inner.link(channel, false).await {
                Ok(Some(link)) => link,
                Ok(None) => {
                    for &i in &members {
                        results[i] = Err(QueueError::StaleLease {
                            id: settles[i].0.id,
                        });
                    }
                    continue;
                }
                Err(e) => {
                    for &i in &members {
                        results[i] = Err(copy_error(&e));
                    }
                    continue;
                }
            };
            let items = members
                .iter()
                .map(|&i| {
                    (
                        WireLease::from(&settles[i].0),
                        WireOutcome::from(settles[i].1.clone()),
                    )
                })
                .collect();
            let op = Op::Settle {
                items,
                unit: fastrand::f64(),
            };
            match self.inner.submit(&link, op).await {
                Ok(Answer::Settled(each)) => {
                    for (&i, r) in members.iter().zip(each) {
                        results[i] = r;
                    }
                }
                Ok(other) => {
                    for &i in &members {
                        results[i] = Err(unexpected(&other));
                    }
                }
                Err(e) => {
                    for &i in &members {
                        results[i] = Err(copy_error(&e));
                    }
                }
            }
        }
        results
    }

    async fn extend_lease(&self, lease: &Lease, by: Duration) -> Result<Timestamp, QueueError> {
        let link = self
            .inner
            .link(&lease.channel, false)
            .await?
            .ok_or(QueueError::StaleLease { id: lease.id })?;
        let op = Op::Extend {
            lease: WireLease::from(lease),
            by_ms: i64::try_from(by.as_millis()).unwrap_or(i64::MAX),
        };
        match self.inner.submit(&link, op).await? {
            Answer::Extended(r) => r,
            other => Err(unexpected(&other)),
        }
    }

    /// The link of a known channel, brought up to date with every command stored so far.
    async fn synced(&self, channel: &str) -> Result<Option<Arc<Link>>, QueueError> {
        let Some(link) = self.inner.link(channel, false).await? else {
            return Ok(None);
        };
        self.inner.submit(&link, Op::Sync).await?;
        Ok(Some(link))
    }

    async fn channel_stats(&self) -> Result<Vec<ChannelStats>, QueueError> {
        self.inner.check_open()?;
        let mut all = Vec::new();
        for name in self.inner.channel_names().await? {
            if let Some(link) = self.synced(&name).await? {
                all.push(ChannelStats {
                    counted_since: 0,
                    ..link.replica.lock().state.stats()
                });
            }
        }
        Ok(all)
    }

    async fn pending(&self, channel: &str, limit: usize) -> Result<Vec<StoredMessage>, QueueError> {
        let link = self
            .synced(channel)
            .await?
            .ok_or_else(|| QueueError::UnknownChannel(channel.to_string()))?;
        let replica = link.replica.lock();
        Ok(replica
            .state
            .peek(limit, replica.now())
            .into_iter()
            .map(|(e, state, due)| StoredMessage {
                id: e.id,
                payload: e.payload.to_vec(),
                state,
                attempts: e.attempts,
                priority: e.priority,
                produced_at: e.produced_at,
                due,
            })
            .collect())
    }

    async fn dead_list(&self, channel: &str, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let Some(link) = self.synced(channel).await? else {
            return Ok(Vec::new());
        };
        let replica = link.replica.lock();
        Ok(replica
            .state
            .dead_letters(limit)
            .map(|d| DeadLetter {
                id: d.entry.id,
                channel: channel.to_string(),
                payload: d.entry.payload.to_vec(),
                attempts: d.entry.attempts,
                error: d.error.clone(),
                produced_at: d.entry.produced_at,
                dead_at: d.dead_at,
            })
            .collect())
    }

    /// Applies a command that changes stored messages; 0 for a channel never seen.
    async fn count(&self, channel: &str, op: Op) -> Result<u64, QueueError> {
        let Some(link) = self.inner.link(channel, false).await? else {
            return Ok(0);
        };
        match self.inner.submit(&link, op).await? {
            Answer::Count(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn cancel_now(&self, channel: &str, id: MessageId) -> Result<Cancelled, QueueError> {
        let unknown = || QueueError::UnknownMessage {
            channel: channel.to_string(),
            id,
        };
        let link = self.inner.link(channel, false).await?.ok_or_else(unknown)?;
        match self
            .inner
            .submit(&link, Op::Cancel { id: id.0 as i64 })
            .await?
        {
            Answer::Cancelled(r) => r,
            other => Err(unexpected(&other)),
        }
    }

    async fn pause(&self, channel: &str, paused: bool) -> Result<(), QueueError> {
        let link = self.inner.link(channel, false).await?.ok_or_else(|| {
            QueueError::InvalidRequest(format!("no channel `{channel}` in this store"))
        })?;
        self.inner.submit(&link, Op::Pause { paused }).await?;
        Ok(())
    }

    async fn shut_down(&self) -> Result<(), QueueError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let links: Vec<Arc<Link>> = self.inner.links.lock().values().cloned().collect();
        for link in links {
            if let Some(task) = link.applier.lock().take() {
                task.abort();
            }
            link.waiters.lock().clear();
            link.notify.notify_waiters();
        }
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| QueueError::backend("flushing the NATS connection", e))
    }
}

impl Adapter for NatsAdapter {
    fn produce<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        batch: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>, QueueError>> {
        self.put(spec, batch).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        spec: &'a ChannelSpec,
        max_parallel: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, QueueError>> {
        self.open_subscription(spec, max_parallel).boxed()
    }

    fn settle<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            self.settle_batch(vec![(lease.clone(), outcome)])
                .await
                .pop()
                .unwrap_or(Err(QueueError::Closed))
        }
        .boxed()
    }

    fn settle_many(
        &self,
        settles: Vec<(Lease, Outcome)>,
    ) -> BoxFuture<'_, Vec<Result<(), QueueError>>> {
        self.settle_batch(settles).boxed()
    }

    fn extend<'a>(
        &'a self,
        lease: &'a Lease,
        by: Duration,
    ) -> BoxFuture<'a, Result<Timestamp, QueueError>> {
        self.extend_lease(lease, by).boxed()
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<ChannelStats>, QueueError>> {
        self.channel_stats().boxed()
    }

    fn peek<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, QueueError>> {
        self.pending(channel, limit).boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, QueueError>> {
        self.dead_list(channel, limit).boxed()
    }

    fn redrive<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        let ids = ids.map(|ids| ids.iter().map(|id| id.0 as i64).collect());
        self.count(channel, Op::Redrive { ids }).boxed()
    }

    fn purge_dead<'a>(
        &'a self,
        channel: &'a str,
        ids: Option<&'a [MessageId]>,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        let ids = ids.map(|ids| ids.iter().map(|id| id.0 as i64).collect());
        self.count(channel, Op::PurgeDead { ids }).boxed()
    }

    fn purge<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<u64, QueueError>> {
        self.count(channel, Op::Purge).boxed()
    }

    fn cancel<'a>(
        &'a self,
        channel: &'a str,
        id: MessageId,
    ) -> BoxFuture<'a, Result<Cancelled, QueueError>> {
        self.cancel_now(channel, id).boxed()
    }

    fn set_paused<'a>(
        &'a self,
        channel: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.pause(channel, paused).boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        self.shut_down().boxed()
    }
}
