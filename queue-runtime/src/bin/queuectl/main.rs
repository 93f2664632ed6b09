//! `queuectl`: operate a queue from the command line.

mod admin;
mod bench;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Operate a typed durable queue: benchmark it, inspect it, repair it.
#[derive(Debug, Parser)]
#[command(name = "queuectl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per channel: ready, delayed, in flight, dead, and the store's counters.
    Stats(admin::StatsArgs),
    /// A live table of `stats` with rates, refreshed until Ctrl-C.
    Watch(admin::WatchArgs),
    /// Show pending messages of a channel, decoded from BSON to JSON, without taking them.
    Peek(admin::PeekArgs),
    /// Pause a channel, durably: nothing is delivered until it is resumed; producers keep
    /// producing and deliveries in flight finish.
    Pause(admin::PauseArgs),
    /// Resume a paused channel.
    Resume(admin::PauseArgs),
    /// Cancel a pending or in-flight message: it is deleted; a handler running it is told
    /// (best effort) and its settle is refused.
    Cancel(admin::CancelArgs),
    /// Delete a channel's pending messages, ready and delayed (in-flight ones finish).
    Purge(admin::PurgeArgs),
    /// List, redrive or purge a channel's dead letters.
    #[command(subcommand)]
    Dlq(admin::Dlq),
    /// Produce one message from JSON.
    Produce(admin::ProduceArgs),
    /// Apply the PostgreSQL adapter's schema migrations (connecting applies them too).
    #[cfg(feature = "postgres")]
    Migrate {
        /// The database: `postgres://user@host/db?schema=queue`.
        #[arg(long, env = "QUEUE_URL")]
        url: String,
    },
    /// Measure produce and consume throughput and end-to-end latency.
    Bench(bench::BenchArgs),
    /// Scan an embedded store's segments without writing; print each damage with file and
    /// offset and exit non-zero if there is any. A torn tail, which opening cuts, is listed
    /// but is not damage.
    Check {
        /// The store directory (the path of a `file://` URL).
        #[arg(long)]
        data: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Stats(args) => admin::stats(args).await,
            Command::Watch(args) => admin::watch(args).await,
            Command::Peek(args) => admin::peek(args).await,
            Command::Purge(args) => admin::purge(args).await,
            Command::Cancel(args) => admin::cancel(args).await,
            Command::Pause(args) => admin::set_paused(args, true).await,
            Command::Resume(args) => admin::set_paused(args, false).await,
            Command::Dlq(command) => admin::dlq(command).await,
            Command::Produce(args) => admin::produce(args).await,
            #[cfg(feature = "postgres")]
            Command::Migrate { url } => {
                let report = queue_runtime::adapters::postgres::migrate(&url).await?;
                if report.from == report.to {
                    println!("schema is at version {}: nothing to do", report.to);
                } else {
                    println!(
                        "migrated the schema from version {} to {}",
                        report.from, report.to
                    );
                }
                Ok(())
            }
            Command::Bench(args) => bench::run(args).await,
            Command::Check { data } => admin::check(&data),
        }
    })
}
