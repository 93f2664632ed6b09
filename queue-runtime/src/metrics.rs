//! Prometheus metrics: what this process's consumers handled, the store's depths and
//! counters, and (for `queue-broker`) its connections. Served as OpenMetrics text on
//! `GET /metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `queue_handled` | counter | `channel`, `outcome` (`acked`, `failed`, `dead_lettered`) |
//! | `queue_handler_seconds` | histogram | `channel` |
//! | `queue_messages` | gauge | `channel`, `state` (`ready`, `delayed`, `in_flight`, `dead`) |
//! | `queue_consumers` | gauge | `channel` |
//! | `queue_produced`, `queue_duplicates`, `queue_acked`, `queue_retried`, `queue_dead_lettered`, `queue_lease_expiries` | counter | `channel` |
//! | `queue_broker_connections`, `queue_broker_rejected`, `queue_broker_replayed_produces`, `queue_broker_produce_requests` | counter | |
//! | `queue_broker_open_connections` | gauge | |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use queue_core::{ChannelStats, Handled, Observer, Queue, QueueError};

use crate::broker::Broker;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    channel: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    channel: String,
    state: &'static str,
}

type Totals = [(&'static str, fn(&ChannelStats) -> u64); 6];

const TOTALS: Totals = [
    ("produced", |s| s.produced),
    ("duplicates", |s| s.duplicates),
    ("acked", |s| s.acked),
    ("retried", |s| s.retried),
    ("dead_lettered", |s| s.dead_lettered),
    ("lease_expiries", |s| s.lease_expiries),
];

/// The metrics of one process.
pub struct Metrics {
    registry: Registry,
    handled: Family<HandledLabels, Counter>,
    latency: Family<ChannelLabels, Histogram>,
    messages: Family<StateLabels, Gauge>,
    consumers: Family<ChannelLabels, Gauge>,
    totals: Vec<Family<ChannelLabels, Counter>>,
    seen: Mutex<HashMap<(usize, String), u64>>,
    broker: Option<(Arc<Broker>, [Counter; 4], Gauge)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for a worker or an application.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::build(None))
    }

    /// Metrics for a broker, including its connection counters.
    pub fn for_broker(broker: Arc<Broker>) -> Arc<Self> {
        Arc::new(Self::build(Some(broker)))
    }

    fn build(broker: Option<Arc<Broker>>) -> Self {
        let mut registry = Registry::default();
        let handled = Family::<HandledLabels, Counter>::default();
        registry.register(
            "queue_handled",
            "Deliveries handled by this process",
            handled.clone(),
        );
        let latency = Family::<ChannelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 17))
        });
        registry.register("queue_handler_seconds", "Handler run time", latency.clone());
        let messages = Family::<StateLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages stored, by state",
            messages.clone(),
        );
        let consumers = Family::<ChannelLabels, Gauge>::default();
        registry.register("queue_consumers", "Open subscriptions", consumers.clone());
        let totals: Vec<Family<ChannelLabels, Counter>> = TOTALS
            .iter()
            .map(|(name, _)| {
                let f = Family::<ChannelLabels, Counter>::default();
                registry.register(
                    format!("queue_{name}"),
                    format!("Messages {name}, store-wide"),
                    f.clone(),
                );
                f
            })
            .collect();
        let broker = broker.map(|b| {
            let counters: [Counter; 4] = Default::default();
            registry.register(
                "queue_broker_connections",
                "Connections accepted",
                counters[0].clone(),
            );
            registry.register(
                "queue_broker_rejected",
                "Connections closed for bad input",
                counters[1].clone(),
            );
            registry.register(
                "queue_broker_replayed_produces",
                "Produce retries answered from the idempotency cache",
                counters[2].clone(),
            );
            registry.register(
                "queue_broker_produce_requests",
                "Produce requests received (each carries one or more messages)",
                counters[3].clone(),
            );
            let open = Gauge::default();
            registry.register(
                "queue_broker_open_connections",
                "Connections open",
                open.clone(),
            );
            (b, counters, open)
        });
        Metrics {
            registry,
            handled,
            latency,
            messages,
            consumers,
            totals,
            seen: Mutex::new(HashMap::new()),
            broker,
        }
    }

    fn catch_up(counter: &Counter, seen: &mut u64, now: u64) {
        if now >= *seen {
            counter.inc_by(now - *seen);
        }
        *seen = now;
    }

    /// Updates the store-side values from `stats`.
    pub fn observe_stats(&self, stats: &[ChannelStats]) {
        let mut seen = self.seen.lock();
        for s in stats {
            let ch = ChannelLabels {
                channel: s.channel.clone(),
            };
            for (state, v) in [
                ("ready", s.ready),
                ("delayed", s.delayed),
                ("in_flight", s.in_flight),
                ("dead", s.dead),
            ] {
                self.messages
                    .get_or_create(&StateLabels {
                        channel: s.channel.clone(),
                        state,
                    })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            self.consumers
                .get_or_create(&ch)
                .set(i64::try_from(s.consumers).unwrap_or(i64::MAX));
            for (i, (_, get)) in TOTALS.iter().enumerate() {
                let last = seen.entry((i, s.channel.clone())).or_insert(0);
                Self::catch_up(&self.totals[i].get_or_create(&ch), last, get(s));
            }
        }
        if let Some((b, counters, open)) = &self.broker {
            let c = &b.counters;
            for (i, v) in [
                c.connections.load(Ordering::Relaxed),
                c.rejected.load(Ordering::Relaxed),
                c.replayed_produces.load(Ordering::Relaxed),
                c.produce_requests.load(Ordering::Relaxed),
            ]
            .into_iter()
            .enumerate()
            {
                let last = seen.entry((100 + i, String::new())).or_insert(0);
                Self::catch_up(&counters[i], last, v);
            }
            open.set(c.open.load(Ordering::Relaxed));
        }
    }

    /// The OpenMetrics text of everything, after reading `queue`'s stats.
    ///
    /// # Errors
    /// The queue's error when its stats cannot be read.
    pub async fn render(&self, queue: &Queue) -> Result<String, QueueError> {
        let stats = queue.stats().await?;
        self.observe_stats(&stats);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| QueueError::backend("encoding metrics", e))?;
        Ok(out)
    }

    /// Serves `GET /metrics` on `addr` until the task is dropped.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        queue: Queue,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        self.serve_with_token(addr, queue, None).await
    }

    /// [`Metrics::serve`], answering only requests with `Authorization: Bearer TOKEN` when
    /// `token` is given.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve_with_token(
        self: Arc<Self>,
        addr: SocketAddr,
        queue: Queue,
        token: Option<String>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving metrics on /metrics");
        let token: Option<Arc<str>> = token.map(Into::into);
        let app = axum::Router::new().route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let metrics = self.clone();
                let queue = queue.clone();
                let token = token.clone();
                async move {
                    if let Some(token) = token {
                        let given = headers
                            .get(header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or_default();
                        let same = given.len() == token.len()
                            && given
                                .bytes()
                                .zip(token.bytes())
                                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                                == 0;
                        if !same {
                            return (
                                StatusCode::UNAUTHORIZED,
                                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                                "a bearer token is required\n".to_string(),
                            );
                        }
                    }
                    match metrics.render(&queue).await {
                        Ok(body) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        ),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            format!("queue unavailable: {e}\n"),
                        ),
                    }
                }
            }),
        );
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "metrics server stopped");
            }
        }))
    }
}

impl Observer for Metrics {
    fn handled(&self, channel: &str, handled: Handled, elapsed: Duration) {
        self.handled
            .get_or_create(&HandledLabels {
                channel: channel.to_string(),
                outcome: handled.as_str(),
            })
            .inc();
        self.latency
            .get_or_create(&ChannelLabels {
                channel: channel.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handled_deliveries_and_store_counters_show_up_in_the_text() {
        let queue = crate::connect("memory://").await.unwrap();
        let metrics = Metrics::new();
        metrics.handled("a/b", Handled::Acked, Duration::from_millis(3));
        metrics.handled("a/b", Handled::Failed, Duration::from_millis(700));
        let spec = queue_core::ChannelSpec::new("a/b");
        let out = queue_core::Outgoing {
            payload: queue_core::codec::encode(&1u32).unwrap(),
            dedup_key: None,
            delay: Duration::ZERO,
            priority: 0,
            group: None,
        };
        queue
            .produce_raw(&spec, vec![out.clone(), out])
            .await
            .unwrap();
        let text = metrics.render(&queue).await.unwrap();
        assert!(
            text.contains(r#"queue_handled_total{channel="a/b",outcome="acked"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"queue_handled_total{channel="a/b",outcome="failed"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"queue_handler_seconds_count{channel="a/b"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"queue_messages{channel="a/b",state="ready"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"queue_produced_total{channel="a/b"} 2"#),
            "{text}"
        );
        // Counters follow the store without double counting.
        let text = metrics.render(&queue).await.unwrap();
        assert!(
            text.contains(r#"queue_produced_total{channel="a/b"} 2"#),
            "{text}"
        );
    }
}
