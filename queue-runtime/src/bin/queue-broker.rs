//! `queue-broker`: the embedded durable store behind a socket, for many processes.
//!
//! ```text
//! queue-broker --data ./queue-data                      # 127.0.0.1:7878
//! QUEUE_TOKEN=s3cret queue-broker --listen 0.0.0.0:7878  # a token is required off loopback
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use queue_runtime::SystemClock;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::{Broker, BrokerConfig, protocol};

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
    /// Threads serving connections (the log writer has its own).
    #[arg(long, default_value_t = 1)]
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
    if !args.listen.ip().is_loopback() && args.token.as_deref().is_none_or(str::is_empty) {
        bail!(
            "listening on {} (beyond loopback) needs a token: pass --token or set QUEUE_TOKEN",
            args.listen
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
    let broker = Broker::new(
        adapter.clone(),
        BrokerConfig {
            token: args.token.clone().filter(|t| !t.is_empty()),
            max_frame: args.max_frame,
            max_connections: args.max_connections,
            ..BrokerConfig::default()
        },
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
    let mut metrics_server = None;
    if let Some(addr) = args.metrics {
        // Metrics read the store directly, not through a connection.
        let local = queue_core::Queue::new(
            adapter.clone(),
            Arc::new(SystemClock),
            Arc::new(queue_runtime::TokioSpawner::current()),
            "metrics",
        );
        let metrics = queue_runtime::metrics::Metrics::for_broker(broker.clone());
        let server = metrics
            .serve(addr, local)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        metrics_server = Some(server);
    }
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        tracing::info!(unix = %path.display(), "listening on a Unix socket");
        servers.push(tokio::spawn(broker.clone().serve_unix(unix)));
    }
    queue_runtime::shutdown_signal()?.await;
    tracing::info!("shutting down: closing connections, flushing the store");
    broker.shutdown();
    if let Some(m) = metrics_server {
        m.abort();
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    // Give connection tasks a moment to release their leases before the final flush.
    tokio::time::sleep(Duration::from_millis(50)).await;
    queue_core::Adapter::close(&*adapter)
        .await
        .context("closing the store")?;
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}
