//! The `otlp` feature: a produce and its handling reach an OTLP/HTTP collector as one trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry::trace::TraceContextExt as _;
use queue_core::channel;
use queue_runtime::otlp::Otlp;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[channel("otlp/job")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u32,
}

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A collector on its own thread and runtime, recording each export's content type and body.
fn collector() -> (std::net::SocketAddr, Received) {
    let received: Received = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let record = received.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new().route(
                "/v1/traces",
                post(move |headers: HeaderMap, body: Bytes| {
                    let record = record.clone();
                    async move {
                        let kind = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        record.lock().unwrap().push((kind, body.to_vec()));
                        ""
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "current_thread")]
async fn a_produce_and_its_handling_reach_the_collector_as_one_trace() {
    let (addr, received) = collector();
    let otlp = Otlp::http(Some(&format!("http://{addr}/v1/traces")), "otlp-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(otlp.layer());
    let _guard = tracing::subscriber::set_default(subscriber);

    let queue = queue_runtime::connect("memory://").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = Job::consume(&queue, move |job: Job| {
        let tx = tx.clone();
        async move {
            tx.send(job.n).unwrap();
        }
    })
    .await
    .unwrap();
    let request = tracing::info_span!("request");
    let trace_id = request.context().span().span_context().trace_id();
    async { Job::produce(&queue, Job { n: 5 }).await }
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert_eq!(got.unwrap(), Some(5));
    consumer.stop(Duration::from_secs(5)).await.unwrap();
    queue.close().await.unwrap();
    otlp.flush().unwrap();

    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "the collector got no export");
    assert!(
        received
            .iter()
            .all(|(kind, _)| kind == "application/x-protobuf"),
        "{:?}",
        received.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let all: Vec<u8> = received.iter().flat_map(|(_, b)| b.clone()).collect();
    for needle in [
        b"produce".as_slice(),
        b"handle",
        b"otlp/job",
        b"otlp-test",
        b"messaging.system",
        &trace_id.to_bytes(),
    ] {
        assert!(
            contains(&all, needle),
            "no {:?} in the export",
            String::from_utf8_lossy(needle)
        );
    }
    // The trace id appears in the request, produce and handle spans.
    let count = all
        .windows(16)
        .filter(|w| *w == trace_id.to_bytes().as_slice())
        .count();
    assert!(count >= 3, "the trace id appears {count} times");
}
