//! OTLP export of the queue's `produce` and `handle` spans (feature `otlp`): OTLP over HTTP
//! with protobuf bodies, batched on an exporter thread.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt as _;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let otlp = queue_runtime::otlp::Otlp::http(None, "billing-worker")?;
//! tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer()))?;
//! // ... run the worker ...
//! otlp.shutdown()?;
//! # Ok(()) }
//! ```

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// An OTLP span exporter.
#[derive(Debug)]
pub struct Otlp {
    provider: SdkTracerProvider,
}

/// Why the exporter could not be built or flushed.
#[derive(Debug, thiserror::Error)]
#[error("OTLP export: {0}")]
pub struct OtlpError(String);

impl Otlp {
    /// Exports to `endpoint`, the collector's traces URL (`http://collector:4318/v1/traces`),
    /// or, when `None`, to the URL of `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4318`), as service `service`.
    ///
    /// # Errors
    /// [`OtlpError`] when the exporter cannot be built.
    pub fn http(endpoint: Option<&str>, service: &str) -> Result<Otlp, OtlpError> {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let exporter = builder.build().map_err(|e| OtlpError(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Otlp { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans sent by this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("typed-queue"))
    }

    /// Sends the spans ended so far.
    ///
    /// # Errors
    /// [`OtlpError`] when the collector did not take them.
    pub fn flush(&self) -> Result<(), OtlpError> {
        self.provider
            .force_flush()
            .map_err(|e| OtlpError(e.to_string()))
    }

    /// Sends the spans ended so far and stops the exporter.
    ///
    /// # Errors
    /// [`OtlpError`] when the collector did not take them.
    pub fn shutdown(self) -> Result<(), OtlpError> {
        self.provider
            .shutdown()
            .map_err(|e| OtlpError(e.to_string()))
    }
}
