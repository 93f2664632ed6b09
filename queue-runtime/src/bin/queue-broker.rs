//! `queue-broker`: the embedded durable store behind a socket, for many processes.
//!
//! ```text
//! queue-broker --data ./queue-data                      # 127.0.0.1:7878
//! QUEUE_TOKEN=s3cret queue-broker --listen 0.0.0.0:7878  # a token is required off loopback
//! ```
//!
//! When the store reports itself poisoned (a failed write or fsync), the broker logs the
//! cause, closes its connections and the store, and exits with status 1, so a supervisor
//! restarts it on the same data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use queue_runtime::SystemClock;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::{Broker, BrokerConfig, protocol};
use queue_runtime::dashboard::{Dashboard, DashboardAuth};

/// Serve a durable queue to producer and worker processes.
#[derive(Debug, Parser)]
#[command(name = "queue-broker", version, about)]
struct Args {
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// The store directory.
    #[arg(long, default_value = "queue-data")]
    data: PathBuf,
    /// Clients must present this token; required when listening beyond loopback.
    #[arg(long, env = "QUEUE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The largest frame accepted, in bytes.
    #[arg(long, default_value_t = protocol::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// The largest frame accepted before the handshake, in bytes.
    #[arg(long, default_value_t = protocol::DEFAULT_MAX_HELLO_FRAME)]
    max_hello_frame: usize,
    /// Requests of one connection served at once; at the cap the broker stops reading it.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Bytes of request frames of one connection served at once.
    #[arg(long, default_value_t = 64 << 20)]
    max_in_flight_bytes: usize,
    /// Bytes queued for one connection and not yet written.
    #[arg(long, default_value_t = 32 << 20)]
    max_outbound_bytes: usize,
    /// Subscriptions open on one connection.
    #[arg(long, default_value_t = 256)]
    max_subscriptions: usize,
    /// The largest `max_parallel` of a subscription.
    #[arg(long, default_value_t = 4096)]
    max_parallel: u32,
    /// The most bytes of messages in one page of a `peek` or dead-letter listing.
    #[arg(long, default_value_t = 4 << 20)]
    max_page_bytes: usize,
    /// Seconds a client has to complete the handshake.
    #[arg(long, default_value_t = 5.0)]
    handshake_timeout: f64,
    /// Seconds of silence (or of not reading) after which a connection is dropped.
    #[arg(long, default_value_t = 20.0)]
    idle_timeout: f64,
    /// Seconds a TCP connection is quiet before keepalive probes start.
    #[arg(long, default_value_t = 10.0)]
    keepalive: f64,
    /// Segment size of the store, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    segment_size: u64,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Metrics answer only `Authorization: Bearer TOKEN` with the broker's token.
    #[arg(long, requires = "metrics")]
    metrics_token: bool,
    /// Serve the web dashboard and its JSON API on this address.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The dashboard's token: reads and acts. Required when --http is beyond loopback.
    #[arg(
        long,
        env = "QUEUE_HTTP_TOKEN",
        hide_env_values = true,
        requires = "http"
    )]
    http_token: Option<String>,
    /// The dashboard's read-only token.
    #[arg(
        long,
        env = "QUEUE_HTTP_READ_TOKEN",
        hide_env_values = true,
        requires = "http"
    )]
    http_read_token: Option<String>,
    /// Threads serving connections, 0 for one per core (the log writer has its own).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.metrics_token && args.token.as_deref().is_none_or(str::is_empty) {
        bail!("--metrics-token needs a token: pass --token or set QUEUE_TOKEN");
    }
    if !args.listen.ip().is_loopback() && args.token.as_deref().is_none_or(str::is_empty) {
        bail!(
            "listening on {} (beyond loopback) needs a token: pass --token or set QUEUE_TOKEN",
            args.listen
        );
    }
    if let Some(http) = args.http
        && !http.ip().is_loopback()
        && args.http_token.as_deref().is_none_or(str::is_empty)
    {
        bail!(
            "serving the dashboard on {http} (beyond loopback) needs a token: pass --http-token or set QUEUE_HTTP_TOKEN"
        );
    }
    let rt = match args.threads {
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let options = FileOptions {
        segment_size: args.segment_size,
        ..FileOptions::default()
    };
    let data = args.data.clone();
    let adapter = tokio::task::spawn_blocking(move || {
        FileAdapter::open(&data, Arc::new(SystemClock), options)
    })
    .await?
    .with_context(|| format!("opening the store at {}", args.data.display()))?;
    let report = adapter.open_report();
    let broker = Broker::with_clock(
        adapter.clone(),
        BrokerConfig {
            token: args.token.clone().filter(|t| !t.is_empty()),
            max_frame: args.max_frame,
            max_hello_frame: args.max_hello_frame,
            max_connections: args.max_connections,
            max_in_flight: args.max_in_flight.max(1),
            max_in_flight_bytes: args.max_in_flight_bytes.max(1),
            max_outbound_bytes: args.max_outbound_bytes.max(1),
            max_subscriptions: args.max_subscriptions,
            max_parallel: args.max_parallel.max(1),
            max_page_bytes: args.max_page_bytes.max(1),
            handshake_timeout: seconds(args.handshake_timeout, "--handshake-timeout")?,
            idle_timeout: seconds(args.idle_timeout, "--idle-timeout")?,
            keepalive: seconds(args.keepalive, "--keepalive")?,
            ..BrokerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        data = %args.data.display(),
        messages = report.messages,
        token = args.token.is_some(),
        tls = args.tls_cert.is_some(),
        "queue-broker ready"
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            queue_runtime::broker::tls::acceptor(cert, key)
                .context("loading the TLS certificate")?,
        ),
        _ => None,
    };
    let mut servers = vec![match tls {
        Some(acceptor) => tokio::spawn(broker.clone().serve_tls(listener, acceptor)),
        None => tokio::spawn(broker.clone().serve_tcp(listener)),
    }];
    // The metrics and dashboard servers.
    let mut http_servers = Vec::new();
    if let Some(addr) = args.metrics {
        // Metrics read the store directly, not through a connection.
        let local = queue_core::Queue::new(
            adapter.clone(),
            Arc::new(SystemClock),
            Arc::new(queue_runtime::TokioSpawner::current()),
            "metrics",
        );
        let metrics = queue_runtime::metrics::Metrics::for_broker(broker.clone());
        let token = args.metrics_token.then(|| args.token.clone()).flatten();
        let server = metrics
            .serve_with_token(addr, local, token)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        http_servers.push(server);
    }
    if let Some(addr) = args.http {
        // The dashboard reads the store directly, not through a connection.
        let local = queue_core::Queue::new(
            adapter.clone(),
            Arc::new(SystemClock),
            Arc::new(queue_runtime::TokioSpawner::current()),
            "dashboard",
        );
        let store = adapter.clone();
        let auth = DashboardAuth {
            token: args.http_token.clone().filter(|t| !t.is_empty()),
            read_token: args.http_read_token.clone().filter(|t| !t.is_empty()),
        };
        let dashboard = Dashboard::new(local, auth, Arc::new(move || store.channel_specs()));
        let (bound, server) = Arc::new(dashboard)
            .serve(addr)
            .await
            .with_context(|| format!("binding the dashboard on {addr}"))?;
        tracing::info!(http = %bound, "dashboard ready");
        http_servers.push(server);
    }
    if let Some(path) = &args.unix {
        remove_stale_socket(path)?;
        let unix = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        tracing::info!(unix = %path.display(), "listening on a Unix socket");
        servers.push(tokio::spawn(broker.clone().serve_unix(unix)));
    }
    let signal = queue_runtime::shutdown_signal()?;
    tokio::select! {
        () = signal => {}
        () = broker.stopped() => {}
    }
    tracing::info!("shutting down: closing connections, flushing the store");
    broker.shutdown();
    for server in http_servers {
        server.abort();
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    // Give connection tasks a moment to release their leases before the final flush.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let closed = queue_core::Adapter::close(&*adapter).await;
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
    }
    if let Some(cause) = broker.failure() {
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing the poisoned store");
        }
        bail!("the store is poisoned, restart the broker on the same data: {cause}");
    }
    closed.context("closing the store")?;
    tracing::info!("stopped");
    Ok(())
}

fn seconds(s: f64, flag: &str) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s < 1e9) {
        bail!("{flag} takes a positive number of seconds, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

/// Makes way for a Unix socket at `path`: a stale socket (nobody accepts on it) is removed;
/// anything else there, or a socket another process serves, is refused.
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!("refusing to replace {}: it is not a socket", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("another process serves the socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(unix = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking the socket {}", path.display())),
    }
}
