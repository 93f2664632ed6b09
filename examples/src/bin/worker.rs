//! The worker process (the seed's `worker.ts`): runs every `#[consumer]` linked into this
//! binary, with the shared `Database` and the queue injected, until SIGINT or SIGTERM.
//!
//! Run it with `cargo run -p examples --bin worker`. `QUEUE_URL` picks the queue (default
//! `file://queue-data`, an embedded store; `queue://127.0.0.1:7878` shares a `queue-broker`
//! with the app), `EXAMPLE_DB` the database file (default `example-db.jsonl`), `RUST_LOG`
//! the log level (default `info`); `OTEL_EXPORTER_OTLP_ENDPOINT` exports its spans over OTLP.

use anyhow::Context as _;
use examples::services::Database;
use queue_runtime::{Worker, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let otlp = examples::init_tracing("example-worker")?;

    let stop = shutdown_signal().context("listening for SIGINT and SIGTERM")?;
    let queue = examples::connect_from_env().await?;
    let db_path = Database::default_path();
    let db = Database::open(&db_path)
        .with_context(|| format!("opening the database {}", db_path.display()))?;

    let running = Worker::new(queue.clone())
        .provide(db)
        .provide(queue.clone())
        .start()
        .await
        .context("starting the consumers")?;
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
