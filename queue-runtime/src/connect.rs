//! Opening a queue from a URL.

use std::sync::Arc;

use queue_core::clock::Clock;
use queue_core::{Queue, QueueError};

use crate::adapters::file::{FileAdapter, FileOptions};
use crate::adapters::memory::MemoryAdapter;
use crate::adapters::remote::{RemoteAdapter, RemoteOptions, Target};
use crate::system::{SystemClock, TokioSpawner};

/// The environment variable naming the default queue URL.
pub const QUEUE_URL_VAR: &str = "QUEUE_URL";

/// The URL used when `QUEUE_URL` is not set: an embedded store in `./queue-data`.
pub const DEFAULT_URL: &str = "file://queue-data";

/// Options for [`connect_with`].
#[derive(Clone)]
pub struct ConnectOptions {
    /// The clock every time rule reads; the system clock by default.
    pub clock: Arc<dyn Clock>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions").finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Options with the given clock, such as a `VirtualClock` in tests.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        ConnectOptions { clock }
    }
}

/// Opens the queue at `url`, choosing the adapter by scheme:
///
/// | URL | adapter |
/// |---|---|
/// | `memory://` or `memory://NAME` | in-process, not durable (tests) |
/// | `file://PATH` or a plain path | embedded durable log |
/// | `queue://HOST:PORT`, `queue+unix://PATH` | client of `queue-broker` |
/// | `postgres://…` | PostgreSQL |
/// | `nats://HOST:PORT[,…][/NAMESPACE]` | NATS JetStream ([`crate::adapters::nats`]) |
///
/// A broker URL takes `?token=…` and timeouts in seconds: `connect_timeout` (10),
/// `handshake_timeout` (5), `request_timeout` (30), `heartbeat` (5), `idle_timeout` (20).
///
/// Must be called inside a tokio runtime: consumers run on it.
///
/// # Errors
/// [`QueueError::InvalidUrl`] for an unknown scheme; the adapter's errors when it cannot open.
pub async fn connect(url: &str) -> Result<Queue, QueueError> {
    connect_with(url, ConnectOptions::default()).await
}

/// Opens the queue named by `QUEUE_URL`, or [`DEFAULT_URL`].
///
/// # Errors
/// As [`connect`].
pub async fn connect_default() -> Result<Queue, QueueError> {
    let url = std::env::var(QUEUE_URL_VAR).unwrap_or_else(|_| DEFAULT_URL.to_string());
    connect(&url).await
}

/// [`connect`] with options.
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Queue, QueueError> {
    let spawner = Arc::new(TokioSpawner::current());
    let clock = options.clock;
    let invalid = |reason: &str| QueueError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None if !url.is_empty() => ("file", url),
        None => return Err(invalid("empty url")),
    };
    match scheme {
        "memory" => {
            let adapter = if rest.is_empty() {
                MemoryAdapter::in_memory(clock.clone())
            } else {
                MemoryAdapter::named(rest, clock.clone())
            };
            Ok(Queue::new(adapter, clock, spawner, url))
        }
        "file" => {
            if rest.is_empty() {
                return Err(invalid("file:// needs a directory"));
            }
            let (dir, options) = file_options(rest).map_err(|r| invalid(&r))?;
            let opened_clock = clock.clone();
            let adapter =
                tokio::task::spawn_blocking(move || FileAdapter::open(&dir, opened_clock, options))
                    .await
                    .map_err(|e| QueueError::backend("opening the store panicked", e))??;
            Ok(Queue::new(adapter, clock, spawner, url))
        }
        "queue" | "queue+unix" | "queue+tls" => {
            let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
            let mut options = RemoteOptions {
                clock: clock.clone(),
                ..RemoteOptions::default()
            };
            let mut ca = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let seconds = |v: &str| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                        .map(std::time::Duration::from_secs_f64)
                        .ok_or_else(|| invalid(&format!("`{pair}` needs a number of seconds")))
                };
                match pair.split_once('=') {
                    Some(("token", t)) => options.token = Some(t.to_string()),
                    Some(("ca", path)) => ca = Some(std::path::PathBuf::from(path)),
                    Some(("connect_timeout", v)) => options.connect_timeout = seconds(v)?,
                    Some(("handshake_timeout", v)) => options.handshake_timeout = seconds(v)?,
                    Some(("request_timeout", v)) => options.request_timeout = seconds(v)?,
                    Some(("heartbeat", v)) => options.heartbeat = seconds(v)?,
                    Some(("idle_timeout", v)) => options.idle_timeout = seconds(v)?,
                    _ => {
                        return Err(invalid(&format!(
                            "unknown option `{pair}`; the broker client takes `token`, \
                             `connect_timeout`, `handshake_timeout`, `request_timeout`, \
                             `heartbeat`, `idle_timeout` (seconds) and, with TLS, `ca`"
                        )));
                    }
                }
            }
            if options.token.is_none() {
                options.token = std::env::var("QUEUE_TOKEN").ok().filter(|t| !t.is_empty());
            }
            if address.is_empty() {
                return Err(invalid("the broker address is missing"));
            }
            let target = match scheme {
                "queue" => Target::Tcp(address.to_string()),
                "queue+unix" => Target::Unix(address.into()),
                #[cfg(feature = "tls")]
                _ => Target::Tls {
                    address: address.to_string(),
                    ca: ca.take().ok_or_else(|| {
                        invalid("queue+tls:// needs `?ca=PATH` naming the trusted certificate")
                    })?,
                },
                #[cfg(not(feature = "tls"))]
                _ => return Err(invalid("this build has no TLS; enable the `tls` feature")),
            };
            if ca.is_some() {
                return Err(invalid("`ca` applies to queue+tls:// only"));
            }
            let adapter = RemoteAdapter::connect(target, options).await?;
            let shown = url.split('?').next().unwrap_or(url).to_string();
            Ok(Queue::new(Arc::new(adapter), clock, spawner, shown))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let adapter =
                crate::adapters::postgres::PostgresAdapter::connect(url, clock.clone()).await?;
            let shown = adapter.description().to_string();
            Ok(Queue::new(adapter, clock, spawner, shown))
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(QueueError::Unsupported(
            "this build has no postgres adapter; enable the `postgres` feature of queue-runtime",
        )),
        #[cfg(feature = "nats")]
        "nats" => {
            let options =
                crate::adapters::nats::NatsOptions::parse(rest).map_err(|r| invalid(&r))?;
            let adapter =
                crate::adapters::nats::NatsAdapter::connect(options, clock.clone()).await?;
            let shown = adapter.description().to_string();
            Ok(Queue::new(adapter, clock, spawner, shown))
        }
        #[cfg(not(feature = "nats"))]
        "nats" => Err(QueueError::Unsupported(
            "this build has no nats adapter; enable the `nats` feature of queue-runtime",
        )),
        other => Err(invalid(&format!(
            "unknown scheme `{other}`; expected memory://, file://, queue://, queue+unix://, postgres:// or nats://"
        ))),
    }
}

/// Splits `PATH?segment_size=BYTES` into the directory and options.
fn file_options(rest: &str) -> Result<(String, FileOptions), String> {
    let mut options = FileOptions::default();
    let (dir, query) = rest.split_once('?').unwrap_or((rest, ""));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("segment_size", v)) => {
                options.segment_size = v
                    .parse()
                    .map_err(|_| format!("`segment_size` must be a number of bytes, not `{v}`"))?;
            }
            _ => {
                return Err(format!(
                    "unknown option `{pair}`; the file adapter takes `segment_size`"
                ));
            }
        }
    }
    Ok((dir.to_string(), options))
}
