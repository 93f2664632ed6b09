//! The registration example: the seed's `channels.ts`, `worker.ts` and `app.ts` in Rust.
//!
//! - [`channels`] declares the channels every process shares: `user/registered` (exactly
//!   once, deduplicated for 1 s) and `mail/welcome`.
//! - [`services`] holds [`services::Database`], the shared service the worker injects into
//!   its consumers: a stand-in for a real database that appends one JSON line per write.
//! - [`consumers`] holds the `#[consumer]` functions; every binary that links this crate and
//!   runs a [`queue_runtime::Worker`] runs them.
//!
//! The binaries:
//!
//! | command | what it is |
//! |---|---|
//! | `cargo run -p examples --bin quickstart` | producer and worker in one process on a fresh embedded store; prints what happened |
//! | `cargo run -p examples --bin worker` | runs every consumer against `QUEUE_URL`, writing to `EXAMPLE_DB` |
//! | `cargo run -p examples --bin app` | HTTP server on `APP_ADDR`: `POST /users` produces `UserRegistered` |
//!
//! An embedded store (the default `QUEUE_URL`, `file://queue-data`) belongs to one process,
//! so the app and a worker share one queue through the broker:
//!
//! ```text
//! cargo run -p queue-runtime --bin queue-broker -- --listen 127.0.0.1:7878 --data broker-data
//! QUEUE_URL=queue://127.0.0.1:7878 cargo run -p examples --bin worker
//! QUEUE_URL=queue://127.0.0.1:7878 cargo run -p examples --bin app
//! curl -i -X POST localhost:3000/users -H 'content-type: application/json' -d '{"id":1,"username":"Peter"}'
//! ```

pub mod channels;
pub mod consumers;
pub mod services;

use anyhow::Context as _;
use queue_runtime::otlp::Otlp;
use queue_runtime::{DEFAULT_URL, QUEUE_URL_VAR, Queue};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Logs to stderr at `RUST_LOG` (default `info`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, exports spans there over OTLP/HTTP as
/// `service`. Keep the exporter and shut it down on exit, so the last spans are sent.
///
/// # Errors
/// When the exporter cannot be built.
pub fn init_tracing(service: &str) -> anyhow::Result<Option<Otlp>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let wanted = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    let otlp = if wanted {
        Some(Otlp::http(None, service).context("starting the OTLP exporter")?)
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .with(otlp.as_ref().map(Otlp::layer))
        .init();
    Ok(otlp)
}

/// Opens the queue named by `QUEUE_URL` (default `file://queue-data`) with
/// [`queue_runtime::connect_default`], saying which URL failed and, for an embedded store,
/// that it serves one process.
///
/// # Errors
/// When the queue cannot be opened.
pub async fn connect_from_env() -> anyhow::Result<Queue> {
    let (url, source) = match std::env::var(QUEUE_URL_VAR) {
        Ok(url) => (url, "from QUEUE_URL"),
        Err(_) => (
            DEFAULT_URL.to_string(),
            "the default; set QUEUE_URL to change it",
        ),
    };
    queue_runtime::connect_default().await.with_context(|| {
        let embedded = !url.contains("://") || url.starts_with("file://");
        let hint = if embedded {
            "; an embedded store belongs to one process: to share a queue between the app and \
             workers, run `queue-broker` and set QUEUE_URL=queue://127.0.0.1:7878"
        } else {
            ""
        };
        format!("opening the queue {} ({source}){hint}", redacted(&url))
    })
}

/// `url` without its query (a `token=…`) and its user information (a password).
fn redacted(url: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…{}", &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn secrets_in_queue_urls_are_not_shown() {
        assert_eq!(
            redacted("queue://127.0.0.1:7878?token=s3cret"),
            "queue://127.0.0.1:7878"
        );
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/queue"),
            "postgres://…@db:5432/queue"
        );
        assert_eq!(redacted("file://queue-data"), "file://queue-data");
    }
}
