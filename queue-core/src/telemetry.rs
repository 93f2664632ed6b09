//! Traces: the `produce` and `handle` spans, and the W3C trace context that links them.
//!
//! The spans are `tracing` spans, always made. With `tracing-opentelemetry`'s layer installed
//! they are also OpenTelemetry spans carrying the messaging attributes, and a produce appends
//! its span's context to each payload's envelope ([`codec::add_trace`]); the handling span of
//! every delivery of that message, on any adapter, takes it as its parent.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::adapter::RawDelivery;
use crate::codec;

/// `messaging.system` of every span.
pub const SYSTEM: &str = "typed_queue";

/// The span of one produce call (one message or a batch).
pub(crate) fn produce_span(channel: &str, count: usize) -> Span {
    tracing::info_span!(
        "produce",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = SYSTEM,
        messaging.operation.type = "send",
        messaging.destination.name = channel,
        messaging.batch.message_count = i64::try_from(count).unwrap_or(i64::MAX),
        messaging.message.id = tracing::field::Empty,
    )
}

/// The span of one handler call, the child of the producing span when the payload carries
/// its context.
pub(crate) fn handle_span(channel: &str, raw: &RawDelivery) -> Span {
    let span = tracing::info_span!(
        "handle",
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = SYSTEM,
        messaging.operation.type = "process",
        messaging.destination.name = channel,
        messaging.message.id = %raw.lease.id,
        messaging.typed_queue.attempt = i64::from(raw.attempt),
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(parent) = codec::trace_of(&raw.payload).and_then(|(p, s)| parse(p, s)) {
        let cx = opentelemetry::Context::new().with_remote_span_context(parent);
        // Fails only when no OpenTelemetry layer is installed, where there is nothing to link.
        let _ = span.set_parent(cx);
    }
    span
}

/// Marks a span failed with `error`.
pub(crate) fn failed(span: &Span, error: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error);
}

/// The `(traceparent, tracestate)` of a span, when an OpenTelemetry layer made it a span.
pub(crate) fn context_of(span: &Span) -> Option<(String, String)> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    Some((parent, sc.trace_state().header()))
}

/// Parses a `traceparent` (and its `tracestate`) as the W3C Trace Context spec reads it: a
/// version other than `ff`, a non-zero trace id and span id, the flags; later versions may
/// append fields.
fn parse(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let version = u8::from_str_radix(parts.next().filter(|v| v.len() == 2)?, 16).ok()?;
    let trace_id = parts.next().filter(|t| t.len() == 32)?;
    let span_id = parts.next().filter(|s| s.len() == 16)?;
    let flags = parts.next().filter(|f| f.len() == 2)?;
    if version == 0xff || (version == 0 && parts.next().is_some()) {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        tracestate.parse().unwrap_or_else(|_| TraceState::default()),
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_the_spec_reads_them() {
        let sc = parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "congo=t61rcWkgMzE",
        )
        .unwrap();
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        assert_eq!(sc.trace_state().get("congo"), Some("t61rcWkgMzE"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad, "").is_none(), "{bad:?} parsed");
        }
        assert!(
            parse(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later",
                ""
            )
            .is_some(),
            "a later version may append fields"
        );
    }
}
