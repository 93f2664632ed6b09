//! `queuectl`: operate a queue from the command line.

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
    /// Measure produce and consume throughput and end-to-end latency.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
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
            Command::Bench(args) => bench::run(args).await,
        }
    })
}
