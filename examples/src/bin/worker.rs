//! The worker process (the seed's `worker.ts`): runs every `#[consumer]` linked into this
//! binary, with the shared `Database` and the queue injected, until SIGINT or SIGTERM.
//!
//! Run it with `cargo run -p examples --bin worker`. `QUEUE_URL` picks the queue (default
//! `file://queue-data`, an embedded store; `queue://127.0.0.1:7878` shares a `queue-broker`
//! with the app), `EXAMPLE_DB` the database file (default `example-db.jsonl`), `RUST_LOG`
//! the log level (default `info`); `OTEL_EXPORTER_OTLP_ENDPOINT` exports its spans over OTLP;
//! `WORKER_DASHBOARD=127.0.0.1:8081` serves the dashboard (`WORKER_DASHBOARD_TOKEN` sets its
//! token).

use anyhow::Context as _;
use examples::services::Database;
use queue_runtime::dashboard::DashboardAuth;
use queue_runtime::{Worker, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let otlp = examples::init_tracing("example-worker")?;

    let stop = shutdown_signal().context("listening for SIGINT and SIGTERM")?;
    let queue = examples::connect_from_env().await?;
    let db_path = Database::default_path();
    let db = Database::open(&db_path)
        .with_context(|| format!("opening the database {}", db_path.display()))?;

    let mut worker = Worker::new(queue.clone())
        .provide(db)
        .provide(queue.clone());
    if let Ok(addr) = std::env::var("WORKER_DASHBOARD") {
        let addr = addr
            .parse()
            .with_context(|| format!("WORKER_DASHBOARD={addr} is not an address"))?;
        worker = worker.dashboard(addr).dashboard_auth(DashboardAuth {
            token: std::env::var("WORKER_DASHBOARD_TOKEN").ok(),
            read_token: None,
        });
    }
    let running = worker.start().await.context("starting the consumers")?;
    tracing::info!(
        queue = queue.description(),
        db = %db_path.display(),
        consumers = ?running.consumers(),
        "worker ready"
    );

    stop.await;
    tracing::info!("stopping: finishing the messages in hand");
    running.shutdown().await;
    queue.close().await.context("closing the queue")?;
    tracing::info!("stopped");
    if let Some(otlp) = otlp {
        otlp.shutdown().context("sending the last spans")?;
    }
    Ok(())
}
