//! Quickstart: a producer and a worker in one process on an embedded store, no server.
//! Registers users on the exactly-once `user/registered` channel (one of them twice inside
//! the 1 s dedup window, and once more after it), lets the worker store each user and send a
//! welcome mail, and prints what happened.
//!
//! Run it with `cargo run -p examples --bin quickstart`. It works in a fresh temporary
//! directory, removed at the end, and finishes in about two seconds. `RUST_LOG=info` shows
//! the worker's logs too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use examples::channels::UserRegistered;
use examples::services::{Database, Record};
use queue_runtime::{Queue, Worker};
use tracing_subscriber::EnvFilter;

/// How long the quickstart waits for the worker before it gives up.
const PATIENCE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();

    let dir = tempfile::Builder::new()
        .prefix("quickstart-")
        .tempdir()
        .context("creating a temporary directory")?;
    let store = dir.path().join("queue-data");
    let db_path = dir.path().join("db.jsonl");
    let url = format!("file://{}", store.display());
    let queue = queue_runtime::connect(&url)
        .await
        .with_context(|| format!("opening the embedded store {url}"))?;
    println!("opened an embedded store: {url}");

    let db = Database::open(&db_path)
        .with_context(|| format!("opening the database {}", db_path.display()))?;
    let worker = Worker::new(queue.clone())
        .provide(db)
        .provide(queue.clone())
        .shutdown_grace(Duration::from_secs(5))
        .start()
        .await
        .context("starting the worker")?;
    println!("started a worker running {}", worker.consumers().join(", "));

    println!("\nproducing on `user/registered` (exactly once, dedup window 1 s):");
    let window_start = Instant::now();
    let peter = UserRegistered {
        id: 1,
        username: "Peter".into(),
    };
    let alice = UserRegistered {
        id: 2,
        username: "Alice".into(),
    };
    produce(&queue, &peter, "").await?;
    produce(&queue, &alice, "").await?;
    produce(&queue, &peter, "  (the same user again, inside the window)").await?;
    wait_for_rows(&db_path, 2).await?;

    tokio::time::sleep(
        (window_start + Duration::from_millis(1200)).saturating_duration_since(Instant::now()),
    )
    .await;
    println!(
        "\n{:.1} s later, the window has closed:",
        window_start.elapsed().as_secs_f32()
    );
    produce(&queue, &peter, "  (the same user, after the window)").await?;
    wait_for_rows(&db_path, 3).await?;

    println!(
        "\nthe worker wrote to the database ({}):",
        db_path.display()
    );
    for record in Database::read(&db_path).context("reading the database")? {
        match record {
            Record::User {
                message_id,
                attempt,
                id,
                username,
            } => println!(
                "  save_user          message {message_id}: stored user {id} {username:?} (delivery {attempt})"
            ),
            Record::WelcomeMail {
                message_id,
                user_id,
                text,
            } => println!(
                "  send_welcome_mail  message {message_id}: mailed user {user_id}: {text:?}"
            ),
        }
    }

    println!("\nchannel stats:");
    let mut stats = queue.stats().await.context("reading the channel stats")?;
    stats.sort_by(|a, b| b.channel.cmp(&a.channel));
    for s in stats {
        println!(
            "  {:<16} produced {}, duplicates dropped {}, acked {}, pending {}, dead {}",
            s.channel,
            s.produced,
            s.duplicates,
            s.acked,
            s.ready + s.delayed + s.in_flight,
            s.dead
        );
    }

    worker.shutdown().await;
    queue.close().await.context("closing the store")?;
    println!("\nworker stopped, store closed; done.");
    Ok(())
}

/// Produces `user` and prints the receipt.
async fn produce(queue: &Queue, user: &UserRegistered, note: &str) -> anyhow::Result<()> {
    let receipt = UserRegistered::produce(queue, user.clone())
        .await
        .with_context(|| format!("producing {user:?}"))?;
    let what = if receipt.duplicate {
        format!("duplicate of message {}, dropped", receipt.id)
    } else {
        format!("message {}", receipt.id)
    };
    println!(
        "  produce {{ id: {}, username: {:?} }} -> {what}{note}",
        user.id, user.username
    );
    Ok(())
}

/// Waits until the worker has stored `users` users and sent each a welcome mail.
async fn wait_for_rows(db_path: &Path, users: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let rows = Database::read(db_path).context("reading the database")?;
        let stored = rows
            .iter()
            .filter(|r| matches!(r, Record::User { .. }))
            .count();
        let mailed = rows.len() - stored;
        if stored >= users && mailed >= users {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the worker handled {stored} users and {mailed} mails within {PATIENCE:?}; expected {users} of each"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
