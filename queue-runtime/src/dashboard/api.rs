//! The documents of the dashboard's JSON API (`docs/dashboard.md`), built from a [`Queue`].
//! The dashboard serves them over HTTP and `queuectl --json` prints them: one API, two clients.

use std::collections::BTreeMap;

use queue_core::{
    ChannelSpec, ChannelStats, DeadLetter, MessageId, MessageState, Processing, Queue, QueueError,
    Schedule, StoredMessage, codec,
};
use serde::Serialize;
use serde_json::Value;

/// Per-second rates over each sampling interval, oldest first.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rates {
    /// The sampling interval.
    pub interval_ms: u64,
    /// Messages produced per second.
    pub produced: Vec<f64>,
    /// Messages acked per second.
    pub acked: Vec<f64>,
    /// Deliveries failed (retried or dead-lettered) per second.
    pub failed: Vec<f64>,
}

/// Handler latency percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// The median, in milliseconds.
    pub p50_ms: f64,
    /// The 95th percentile, in milliseconds.
    pub p95_ms: f64,
    /// `handler`: timed around the handlers of this process (a worker); `lease`: from
    /// delivery to settle as the store saw it (the broker, to the millisecond).
    pub measured: &'static str,
}

/// One channel in the overview.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelRow {
    /// Counters and depths.
    #[serde(flatten)]
    pub stats: ChannelStats,
    /// How long the oldest ready message has waited; `None` when none is ready.
    pub oldest_ready_age_ms: Option<u64>,
    /// Recent rates.
    pub rates: Rates,
    /// Recent handler latency, where the server runs handlers.
    pub latency: Option<Latency>,
}

/// `GET /api/overview`.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The server's time.
    pub now: u64,
    /// When the counters started counting (the earliest of the channels').
    pub counted_since: u64,
    /// Every channel.
    pub channels: Vec<ChannelRow>,
}

/// A pending message.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    /// The id, as a decimal string.
    pub id: String,
    /// `ready`, `delayed` or `in_flight`.
    pub state: MessageState,
    /// Deliveries made.
    pub attempts: u32,
    /// Its priority.
    pub priority: u8,
    /// When it was produced.
    pub produced_at: u64,
    /// When it is (or was) due.
    pub due: u64,
    /// How long since it was produced.
    pub age_ms: u64,
    /// The message as JSON.
    pub payload: Value,
}

/// A dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadView {
    /// The id, as a decimal string.
    pub id: String,
    /// Deliveries made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When it was produced.
    pub produced_at: u64,
    /// When it was dead-lettered.
    pub dead_at: u64,
    /// The message as JSON.
    pub payload: Value,
}

/// Dead letters sharing one error text.
#[derive(Debug, Clone, Serialize)]
pub struct DeadGroup {
    /// The error text.
    pub error: String,
    /// How many.
    pub count: usize,
    /// Their ids.
    pub ids: Vec<String>,
    /// The latest `dead_at` among them.
    pub last_dead_at: u64,
}

/// `GET /api/dead`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetters {
    /// The server's time.
    pub now: u64,
    /// Dead letters of the channel (`letters` may list fewer).
    pub total: usize,
    /// By error text, largest group first.
    pub groups: Vec<DeadGroup>,
    /// Each dead letter.
    pub letters: Vec<DeadView>,
}

/// One event of a message's history.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When.
    pub at: u64,
    /// `produced`, then what [`queue_core::Step::event`] names where the store keeps
    /// delivery histories, else `delivered`, `due` and `dead_lettered` as far as the
    /// message's state tells.
    pub event: String,
    /// What else is known.
    pub detail: String,
}

/// `GET /api/message`.
#[derive(Debug, Clone, Serialize)]
pub struct MessageDetail {
    /// The server's time.
    pub now: u64,
    /// The message, when pending.
    pub message: Option<MessageView>,
    /// The message, when dead.
    pub dead: Option<DeadView>,
    /// What the store knows of it, in order.
    pub history: Vec<Event>,
}

/// The message a payload holds, as JSON; a short note when it is not BSON.
pub fn payload_json(payload: &[u8]) -> Value {
    match codec::decode_value(payload) {
        Ok(bson) => bson.into_relaxed_extjson(),
        Err(_) => Value::String(format!("<{} bytes, not a BSON message>", payload.len())),
    }
}

/// A pending message as the API shows it.
pub fn message_view(m: &StoredMessage, now: u64) -> MessageView {
    MessageView {
        id: m.id.to_string(),
        state: m.state,
        attempts: m.attempts,
        priority: m.priority,
        produced_at: m.produced_at,
        // A store may report a message ready since ever as due at 0.
        due: m.due.max(m.produced_at),
        age_ms: now.saturating_sub(m.produced_at),
        payload: payload_json(&m.payload),
    }
}

/// A dead letter as the API shows it.
pub fn dead_view(d: &DeadLetter) -> DeadView {
    DeadView {
        id: d.id.to_string(),
        attempts: d.attempts,
        error: d.error.clone(),
        produced_at: d.produced_at,
        dead_at: d.dead_at,
        payload: payload_json(&d.payload),
    }
}

/// How many pending messages are read to find the oldest ready one.
const AGE_SCAN: usize = 100;

/// The overview: each channel's stats (only channel `only`'s when given) with the age of its
/// oldest ready message (among the next [`AGE_SCAN`] to leave), and what `extra` adds
/// (rates, latency).
///
/// # Errors
/// The queue's errors.
pub async fn overview(
    queue: &Queue,
    only: Option<&str>,
    extra: impl Fn(&str) -> (Rates, Option<Latency>),
) -> Result<Overview, QueueError> {
    let now = queue.clock().now();
    let mut stats = queue.stats().await?;
    stats.retain(|s| only.is_none_or(|name| s.channel == name));
    stats.sort_by(|a, b| a.channel.cmp(&b.channel));
    let mut channels = Vec::with_capacity(stats.len());
    for s in stats {
        let oldest_ready_age_ms = if s.ready == 0 {
            None
        } else {
            queue
                .peek(&s.channel, AGE_SCAN)
                .await?
                .iter()
                .filter(|m| m.state == MessageState::Ready)
                .map(|m| now.saturating_sub(m.produced_at))
                .max()
        };
        let (rates, latency) = extra(&s.channel);
        channels.push(ChannelRow {
            stats: s,
            oldest_ready_age_ms,
            rates,
            latency,
        });
    }
    let counted_since = channels
        .iter()
        .map(|c| c.stats.counted_since)
        .min()
        .unwrap_or(0);
    Ok(Overview {
        now,
        counted_since,
        channels,
    })
}

/// Pending messages of `channel` in delivery order.
///
/// # Errors
/// The queue's errors.
pub async fn messages(
    queue: &Queue,
    channel: &str,
    limit: usize,
) -> Result<Vec<MessageView>, QueueError> {
    let now = queue.clock().now();
    Ok(queue
        .peek(channel, limit)
        .await?
        .iter()
        .map(|m| message_view(m, now))
        .collect())
}

/// The dead letters of `channel`, grouped by error text.
///
/// # Errors
/// The queue's errors.
pub async fn dead_letters(
    queue: &Queue,
    channel: &str,
    limit: usize,
) -> Result<DeadLetters, QueueError> {
    let now = queue.clock().now();
    let dead = queue.dead_letters(channel, limit).await?;
    let total = queue
        .stats()
        .await?
        .iter()
        .find(|s| s.channel == channel)
        .map_or(dead.len(), |s| {
            usize::try_from(s.dead).unwrap_or(usize::MAX)
        });
    let mut groups: BTreeMap<&str, DeadGroup> = BTreeMap::new();
    for d in &dead {
        let g = groups.entry(&d.error).or_insert_with(|| DeadGroup {
            error: d.error.clone(),
            count: 0,
            ids: Vec::new(),
            last_dead_at: 0,
        });
        g.count += 1;
        g.ids.push(d.id.to_string());
        g.last_dead_at = g.last_dead_at.max(d.dead_at);
    }
    let mut groups: Vec<DeadGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.error.cmp(&b.error)));
    Ok(DeadLetters {
        now,
        total,
        groups,
        letters: dead.iter().map(dead_view).collect(),
    })
}

/// How many pending messages and dead letters are searched for one message.
const FIND_SCAN: usize = 10_000;

/// What the store knows of one message: pending or dead, and its history.
///
/// # Errors
/// The queue's errors.
pub async fn message(
    queue: &Queue,
    channel: &str,
    id: MessageId,
) -> Result<MessageDetail, QueueError> {
    let now = queue.clock().now();
    let pending = queue
        .peek(channel, FIND_SCAN)
        .await?
        .into_iter()
        .find(|m| m.id == id);
    let dead = if pending.is_none() {
        queue
            .dead_letters(channel, FIND_SCAN)
            .await?
            .into_iter()
            .find(|d| d.id == id)
    } else {
        None
    };
    let mut history = Vec::new();
    let steps = queue
        .adapter()
        .histories()
        .map(|h| h.history(channel, id))
        .unwrap_or_default();
    if !steps.is_empty() {
        let produced_at = pending.as_ref().map(|m| m.produced_at);
        let produced_at = produced_at.or(dead.as_ref().map(|d| d.produced_at));
        if let Some(at) = produced_at {
            history.push(Event {
                at,
                event: "produced".into(),
                detail: String::new(),
            });
        }
        for s in steps {
            let mut detail = Vec::new();
            if s.attempt > 0 {
                detail.push(format!("attempt {}", s.attempt));
            }
            if s.token > 0 {
                detail.push(format!("token {}", s.token));
            }
            if s.consumer > 0 {
                detail.push(format!("consumer {}", s.consumer));
            }
            if let Some(e) = s.error {
                detail.push(e);
            }
            history.push(Event {
                at: s.at,
                event: s.event,
                detail: detail.join(", "),
            });
        }
    } else if let Some(m) = &pending {
        history.push(Event {
            at: m.produced_at,
            event: "produced".into(),
            detail: format!("priority {}", m.priority),
        });
        if m.attempts > 0 {
            history.push(Event {
                at: m.produced_at.max(m.due.min(now)),
                event: "delivered".into(),
                detail: format!("attempt {}", m.attempts),
            });
        }
        let (event, detail) = match m.state {
            MessageState::InFlight => ("delivered", "in flight now".to_string()),
            MessageState::Delayed => ("due", "waits until its due time".to_string()),
            MessageState::Ready => ("due", "ready".to_string()),
        };
        history.push(Event {
            at: m.due.max(m.produced_at),
            event: event.into(),
            detail,
        });
    }
    if let Some(d) = dead.as_ref().filter(|_| history.is_empty()) {
        history.push(Event {
            at: d.produced_at,
            event: "produced".into(),
            detail: String::new(),
        });
        history.push(Event {
            at: d.dead_at,
            event: "delivered".into(),
            detail: format!("{} attempt(s)", d.attempts),
        });
        history.push(Event {
            at: d.dead_at,
            event: "dead_lettered".into(),
            detail: d.error.clone(),
        });
    }
    Ok(MessageDetail {
        now,
        message: pending.as_ref().map(|m| message_view(m, now)),
        dead: dead.as_ref().map(dead_view),
        history,
    })
}

/// A channel's declared options, as `(option, value)` pairs in `#[channel]`'s words.
pub fn options(spec: &ChannelSpec) -> Vec<(String, String)> {
    let human = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let mut out = Vec::new();
    match spec.processing {
        Processing::ExactlyOnce => {
            out.push(("processing".into(), "exactly_once".into()));
            out.push(("dedup".into(), human(spec.dedup_window)));
        }
        Processing::AtLeastOnce => out.push(("processing".into(), "at_least_once".into())),
    }
    out.push(("lease".into(), human(spec.lease)));
    out.push(("max_attempts".into(), spec.max_attempts.to_string()));
    out.push(("backoff".into(), human(spec.backoff)));
    out.push(("max_backoff".into(), human(spec.max_backoff)));
    if spec.concurrency > 0 {
        out.push(("concurrency".into(), spec.concurrency.to_string()));
    }
    if spec.concurrency_per_group > 1 {
        out.push((
            "concurrency_per_group".into(),
            spec.concurrency_per_group.to_string(),
        ));
    }
    for (name, rate) in [
        ("rate", &spec.rate),
        ("rate_per_group", &spec.rate_per_group),
    ] {
        if let Some(r) = rate {
            out.push((name.into(), format!("{}/{}", r.limit, human(r.per))));
        }
    }
    match &spec.schedule {
        Some(Schedule::Every(d)) => out.push(("every".into(), human(*d))),
        Some(Schedule::Cron(expr)) => out.push(("cron".into(), expr.to_string())),
        None => {}
    }
    out
}
