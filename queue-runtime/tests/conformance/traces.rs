//! Traces across an adapter: spans exported to memory through `tracing-opentelemetry`. The
//! subscriber is the process's global one, installed by every conformance test before it
//! starts, so that no test records a span's interest without it; only the spans of the
//! trace case's channel are kept.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanId, Status, TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use queue_core::{Delivery, channel};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use super::{Harness, eventually, within};

/// The channel whose spans are kept.
const TRACED: &str = "conf/traced";

/// Keeps the spans of [`TRACED`] and the test's `request` spans.
#[derive(Debug, Clone, Default)]
pub struct Traces {
    kept: Arc<Mutex<Vec<SpanData>>>,
}

impl SpanExporter for Traces {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let ours = batch.into_iter().filter(|s| {
            s.name == "request"
                || attribute(s, "messaging.destination.name") == Some(Value::from(TRACED))
        });
        self.kept.lock().unwrap().extend(ours);
        Ok(())
    }
}

impl Traces {
    /// The finished spans kept.
    pub fn all(&self) -> Vec<SpanData> {
        self.kept.lock().unwrap().clone()
    }

    /// The finished spans named `name` in trace `trace`.
    pub fn named(&self, name: &str, trace: TraceId) -> Vec<SpanData> {
        self.all()
            .into_iter()
            .filter(|s| s.name == name && s.span_context.trace_id() == trace)
            .collect()
    }
}

/// Installs the global subscriber once, and returns what it keeps.
pub fn traces() -> &'static Traces {
    static TRACES: OnceLock<(Traces, SdkTracerProvider)> = OnceLock::new();
    let (traces, _) = TRACES.get_or_init(|| {
        let traces = Traces::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(traces.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("conformance"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("the only global subscriber");
        (traces, provider)
    });
    traces
}

/// The value of attribute `key` of a span.
pub fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| kv.value.clone())
}

#[channel("conf/traced", lease = "10s", max_attempts = 3, backoff = "1s")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Traced {
    pub n: u32,
}

/// One request span produces a message whose first handling fails and second succeeds: the
/// produce span is the request's child, and both handle spans are the produce span's
/// children, in the same trace, with the messaging attributes.
pub async fn a_trace_runs_from_produce_to_handle_through_a_retry(h: &Harness) {
    let traces = traces();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _consumer = Traced::consumer(&h.queue)
        .deliveries(move |d: Delivery<Traced>| {
            let tx = tx.clone();
            async move {
                tx.send(d.attempt()).unwrap();
                if d.attempt() == 1 {
                    return Err("first attempt fails".to_string());
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    let request = tracing::info_span!("request");
    let request_cx = request.context();
    let trace_id: TraceId = request_cx.span().span_context().trace_id();
    let request_id = request_cx.span().span_context().span_id();
    assert_ne!(trace_id, TraceId::INVALID, "the test's layer is installed");
    let receipt = async { Traced::produce(&h.queue, Traced { n: 7 }).await }
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    assert_eq!(within("attempt 1", rx.recv()).await, Some(1));
    eventually("the failure to be recorded", || async {
        h.stats("conf/traced").await.retried == 1
    })
    .await;
    h.advance(Duration::from_secs(2)).await;
    assert_eq!(within("attempt 2", rx.recv()).await, Some(2));
    eventually("the ack", || async {
        h.stats("conf/traced").await.acked == 1
    })
    .await;
    let ended = || {
        traces.named("handle", trace_id).len() == 2 && traces.named("produce", trace_id).len() == 1
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ended() {
        let names: Vec<String> = traces.all().iter().map(|s| s.name.to_string()).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "the produce span and both handle spans did not end; ended: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let produced = traces.named("produce", trace_id);
    let produce = &produced[0];
    assert_eq!(produce.span_context.trace_id(), trace_id);
    assert_eq!(produce.parent_span_id, request_id);
    assert_eq!(produce.span_kind, opentelemetry::trace::SpanKind::Producer);
    assert_eq!(
        attribute(produce, "messaging.destination.name"),
        Some(Value::from("conf/traced"))
    );
    assert_eq!(
        attribute(produce, "messaging.message.id"),
        Some(Value::from(receipt.id.to_string()))
    );

    let mut handled = traces.named("handle", trace_id);
    handled.sort_by_key(|s| s.start_time);
    for (span, attempt) in handled.iter().zip(1_i64..) {
        assert_eq!(span.span_context.trace_id(), trace_id, "attempt {attempt}");
        assert_eq!(span.parent_span_id, produce.span_context.span_id());
        assert_ne!(span.parent_span_id, SpanId::INVALID);
        assert_eq!(span.span_kind, opentelemetry::trace::SpanKind::Consumer);
        assert_eq!(
            attribute(span, "messaging.system"),
            Some(Value::from(queue_core::telemetry::SYSTEM))
        );
        assert_eq!(
            attribute(span, "messaging.destination.name"),
            Some(Value::from("conf/traced"))
        );
        assert_eq!(
            attribute(span, "messaging.message.id"),
            Some(Value::from(receipt.id.to_string()))
        );
        assert_eq!(
            attribute(span, "messaging.typed_queue.attempt"),
            Some(Value::I64(attempt))
        );
    }
    assert!(
        matches!(&handled[0].status, Status::Error { description } if description == "first attempt fails"),
        "{:?}",
        handled[0].status
    );
    assert_eq!(handled[1].status, Status::Unset);
}
