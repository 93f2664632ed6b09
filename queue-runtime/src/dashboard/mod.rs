//! The web dashboard: one page built into the binary and the JSON API it reads
//! (`docs/dashboard.md`), served by `queue-broker --http` and [`Worker::dashboard`].
//!
//! [`Worker::dashboard`]: crate::Worker::dashboard

pub mod api;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use parking_lot::Mutex;
use queue_core::{ChannelSpec, Handled, MessageId, Observer, Outgoing, Queue, QueueError, codec};
use serde::Deserialize;
use serde_json::{Value, json};

use api::{Latency, Rates};

/// The page, with its styles and scripts inline.
const PAGE: &str = include_str!("index.html");

/// How often the rates are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
const SAMPLES: usize = 181;
/// How long one latency histogram collects before it becomes the previous one.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct DashboardAuth {
    /// Reads and acts. With neither token set, the API is open.
    pub token: Option<String>,
    /// Only reads.
    pub read_token: Option<String>,
}

/// Where the dashboard learns the declared options of channels.
pub type Specs = Arc<dyn Fn() -> Vec<ChannelSpec> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// A dashboard over one queue.
pub struct Dashboard {
    queue: Queue,
    auth: DashboardAuth,
    specs: Specs,
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
    latency: Option<Arc<HandlerLatency>>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    produced: u64,
    acked: u64,
    failed: u64,
}

impl Dashboard {
    /// A dashboard over `queue`, showing the options of the channels `specs` lists.
    pub fn new(queue: Queue, auth: DashboardAuth, specs: Specs) -> Dashboard {
        if let Some(histories) = queue.adapter().histories() {
            histories.keep_histories();
        }
        Dashboard {
            queue,
            auth,
            specs,
            samples: Mutex::default(),
            latency: None,
        }
    }

    /// Also shows handler latency, measured by `latency` (observe the queue with it).
    #[must_use]
    pub fn with_latency(mut self, latency: Arc<HandlerLatency>) -> Dashboard {
        self.latency = Some(latency);
        self
    }

    /// Serves the page and the API on `addr` and samples rates, until the task is aborted.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "serving the dashboard");
        let me = self.clone();
        let task = tokio::spawn(async move {
            let sampler = tokio::spawn(me.clone().sample());
            let app = me.router();
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the dashboard stopped");
            }
            sampler.abort();
        });
        Ok((local, task))
    }

    /// The routes, behind the token check.
    pub fn router(self: Arc<Self>) -> Router {
        let api = Router::new()
            .route("/whoami", get(whoami))
            .route("/overview", get(overview))
            .route("/channel", get(channel))
            .route("/messages", get(messages))
            .route("/message", get(message))
            .route("/dead", get(dead))
            .route("/pause", post(pause))
            .route("/resume", post(resume))
            .route("/cancel", post(cancel))
            .route("/redrive", post(redrive))
            .route("/purge_dead", post(purge_dead))
            .route("/produce", post(produce))
            .layer(middleware::from_fn_with_state(self.clone(), authorize));
        Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .nest("/api", api)
            .with_state(self)
    }

    async fn sample(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(stats) = self.queue.stats().await else {
                continue;
            };
            let at = self.queue.clock().now();
            let mut samples = self.samples.lock();
            for s in stats {
                let series = samples.entry(s.channel.clone()).or_default();
                if series.len() == SAMPLES {
                    series.pop_front();
                }
                series.push_back(Sample {
                    at,
                    produced: s.produced,
                    acked: s.acked,
                    failed: s.retried + s.dead_lettered,
                });
            }
        }
    }

    fn rates(&self, channel: &str) -> Rates {
        let samples = self.samples.lock();
        let mut rates = Rates {
            interval_ms: u64::try_from(SAMPLE_EVERY.as_millis()).unwrap_or(u64::MAX),
            ..Rates::default()
        };
        let Some(series) = samples.get(channel) else {
            return rates;
        };
        for (a, b) in series.iter().zip(series.iter().skip(1)) {
            let secs = (b.at.saturating_sub(a.at) as f64 / 1000.0).max(0.001);
            let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            rates.produced.push(per(a.produced, b.produced));
            rates.acked.push(per(a.acked, b.acked));
            rates.failed.push(per(a.failed, b.failed));
        }
        rates
    }

    /// A channel's rates and latency: its handlers' where this process runs them, else how
    /// long the store saw its deliveries held.
    fn extra(&self, channel: &str) -> (Rates, Option<Latency>) {
        let handlers = self.latency.as_ref().and_then(|l| l.percentiles(channel));
        let leases = || {
            let (p50, p95) = self.queue.adapter().histories()?.held(channel)?;
            Some(Latency {
                p50_ms: p50 as f64,
                p95_ms: p95 as f64,
                measured: "lease",
            })
        };
        (self.rates(channel), handlers.or_else(leases))
    }

    fn spec(&self, channel: &str) -> Option<ChannelSpec> {
        (self.specs)().into_iter().find(|s| s.name == channel)
    }

    fn role_of(&self, headers: &HeaderMap) -> Option<Role> {
        let (admin, reader) = (&self.auth.token, &self.auth.read_token);
        if admin.is_none() && reader.is_none() {
            return Some(Role::Admin);
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?;
        if admin.as_deref().is_some_and(|t| same_token(given, t)) {
            Some(Role::Admin)
        } else if reader.as_deref().is_some_and(|t| same_token(given, t)) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Compares a presented token with the expected one in time independent of where they
/// differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn authorize(
    State(dash): State<Arc<Dashboard>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(role) = dash.role_of(request.headers()) else {
        return failure(StatusCode::UNAUTHORIZED, "a valid token is required");
    };
    if request.method() != Method::GET && role != Role::Admin {
        return failure(StatusCode::FORBIDDEN, "the read-only token cannot act");
    }
    request.extensions_mut().insert(role);
    next.run(request).await
}

fn failure(status: StatusCode, text: impl Into<String>) -> Response {
    (status, Json(json!({ "error": text.into() }))).into_response()
}

/// An API error: the queue's, with a status that says whose fault it is.
struct ApiError(QueueError);

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            QueueError::UnknownChannel(_) | QueueError::UnknownMessage { .. } => {
                StatusCode::NOT_FOUND
            }
            QueueError::InvalidRequest(_)
            | QueueError::PayloadTooLarge { .. }
            | QueueError::Encode(_)
            | QueueError::Decode(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        failure(status, self.0.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A JSON request body; a malformed one is answered like every other error.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(e) => Err(failure(e.status(), e.body_text())),
        }
    }
}

/// Query parameters; malformed or missing ones are answered like every other error.
struct Params<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for Params<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Params(value)),
            Err(e) => Err(failure(e.status(), e.body_text())),
        }
    }
}

fn bad(text: impl Into<String>) -> ApiError {
    ApiError(QueueError::InvalidRequest(text.into()))
}

async fn whoami(Extension(role): Extension<Role>) -> Json<Value> {
    Json(json!({ "role": role.as_str() }))
}

async fn overview(State(dash): State<Arc<Dashboard>>) -> ApiResult {
    let doc = api::overview(&dash.queue, None, |ch| dash.extra(ch)).await?;
    Ok(Json(json!(doc)))
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn channel(State(dash): State<Arc<Dashboard>>, Params(q): Params<NameQuery>) -> ApiResult {
    let overview = api::overview(&dash.queue, Some(&q.name), |ch| dash.extra(ch)).await?;
    let stats = overview
        .channels
        .into_iter()
        .find(|c| c.stats.channel == q.name)
        .ok_or_else(|| ApiError(QueueError::UnknownChannel(q.name.clone())))?;
    let options = dash
        .spec(&q.name)
        .map(|s| api::options(&s))
        .unwrap_or_default();
    Ok(Json(json!({
        "now": overview.now,
        "stats": stats,
        "options": options,
    })))
}

#[derive(Deserialize)]
struct ListQuery {
    channel: String,
    limit: Option<usize>,
}

async fn messages(State(dash): State<Arc<Dashboard>>, Params(q): Params<ListQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let now = dash.queue.clock().now();
    let list = api::messages(&dash.queue, &q.channel, limit).await?;
    Ok(Json(json!({ "now": now, "messages": list })))
}

#[derive(Deserialize)]
struct MessageQuery {
    channel: String,
    id: String,
}

fn parse_id(id: &str) -> Result<MessageId, ApiError> {
    id.parse()
        .map(MessageId)
        .map_err(|_| bad(format!("`{id}` is not a message id")))
}

async fn message(State(dash): State<Arc<Dashboard>>, Params(q): Params<MessageQuery>) -> ApiResult {
    let detail = api::message(&dash.queue, &q.channel, parse_id(&q.id)?).await?;
    Ok(Json(json!(detail)))
}

async fn dead(State(dash): State<Arc<Dashboard>>, Params(q): Params<ListQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(500).min(10_000);
    Ok(Json(json!(
        api::dead_letters(&dash.queue, &q.channel, limit).await?
    )))
}

#[derive(Deserialize)]
struct ChannelBody {
    channel: String,
}

async fn pause(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<ChannelBody>,
) -> ApiResult {
    set_paused(&dash, role, &b.channel, true).await
}

async fn resume(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<ChannelBody>,
) -> ApiResult {
    set_paused(&dash, role, &b.channel, false).await
}

async fn set_paused(dash: &Dashboard, role: Role, channel: &str, paused: bool) -> ApiResult {
    let action = if paused {
        dash.queue.pause(channel).await?;
        "pause"
    } else {
        dash.queue.resume(channel).await?;
        "resume"
    };
    tracing::info!(target: "queue_runtime::dashboard", action, channel, role = role.as_str(), "dashboard action");
    Ok(Json(json!({ "paused": paused })))
}

#[derive(Deserialize)]
struct CancelBody {
    channel: String,
    id: String,
}

async fn cancel(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<CancelBody>,
) -> ApiResult {
    let id = parse_id(&b.id)?;
    let was = dash.queue.cancel(&b.channel, id).await?;
    tracing::info!(target: "queue_runtime::dashboard", action = "cancel", channel = %b.channel, message_id = %id, role = role.as_str(), "dashboard action");
    Ok(Json(json!({ "cancelled": was })))
}

#[derive(Deserialize)]
struct IdsBody {
    channel: String,
    ids: Option<Vec<String>>,
}

impl IdsBody {
    fn ids(&self) -> Result<Option<Vec<MessageId>>, ApiError> {
        self.ids
            .as_ref()
            .map(|ids| ids.iter().map(|i| parse_id(i)).collect())
            .transpose()
    }
}

async fn redrive(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<IdsBody>,
) -> ApiResult {
    let ids = b.ids()?;
    let moved = dash.queue.redrive(&b.channel, ids.as_deref()).await?;
    tracing::info!(target: "queue_runtime::dashboard", action = "redrive", channel = %b.channel, ids = ?b.ids, moved, role = role.as_str(), "dashboard action");
    Ok(Json(json!({ "moved": moved })))
}

async fn purge_dead(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<IdsBody>,
) -> ApiResult {
    let ids = b.ids()?;
    let purged = dash.queue.purge_dead(&b.channel, ids.as_deref()).await?;
    tracing::info!(target: "queue_runtime::dashboard", action = "purge_dead", channel = %b.channel, ids = ?b.ids, purged, role = role.as_str(), "dashboard action");
    Ok(Json(json!({ "purged": purged })))
}

#[derive(Deserialize)]
struct ProduceBody {
    channel: String,
    payload: Value,
    delay_ms: Option<u64>,
    priority: Option<u8>,
}

async fn produce(
    State(dash): State<Arc<Dashboard>>,
    Extension(role): Extension<Role>,
    Body(b): Body<ProduceBody>,
) -> ApiResult {
    let bson = bson::Bson::try_from(b.payload)
        .map_err(|e| bad(format!("the payload cannot be stored as BSON: {e}")))?;
    let payload = codec::encode(&bson)?;
    let spec = dash.spec(&b.channel).unwrap_or_else(|| ChannelSpec {
        name: Cow::Owned(b.channel.clone()),
        ..ChannelSpec::new("")
    });
    let out = Outgoing {
        dedup_key: spec.deduplicates().then(|| codec::dedup_key(&payload)),
        payload,
        delay: Duration::from_millis(b.delay_ms.unwrap_or(0)),
        priority: b.priority.unwrap_or(0),
        group: None,
    };
    let receipt = dash
        .queue
        .produce_raw(&spec, vec![out])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError(QueueError::Protocol("no receipt".into())))?;
    tracing::info!(target: "queue_runtime::dashboard", action = "produce", channel = %b.channel, message_id = %receipt.id, role = role.as_str(), "dashboard action");
    Ok(Json(
        json!({ "id": receipt.id.to_string(), "duplicate": receipt.duplicate }),
    ))
}

/// Handler latency per channel over the last one to two minutes, for the dashboard: observe
/// the queue with it.
#[derive(Debug, Default)]
pub struct HandlerLatency {
    windows: Mutex<HashMap<String, Windows>>,
}

#[derive(Debug)]
struct Windows {
    started: std::time::Instant,
    current: hdrhistogram::Histogram<u64>,
    previous: hdrhistogram::Histogram<u64>,
}

fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
}

impl HandlerLatency {
    /// An empty one.
    pub fn new() -> Arc<HandlerLatency> {
        Arc::default()
    }

    fn percentiles(&self, channel: &str) -> Option<Latency> {
        let windows = self.windows.lock();
        let w = windows.get(channel)?;
        let mut all = w.previous.clone();
        all.add(&w.current).ok()?;
        if all.is_empty() {
            return None;
        }
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        Some(Latency {
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            measured: "handler",
        })
    }
}

impl Observer for HandlerLatency {
    fn handled(&self, channel: &str, _handled: Handled, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let mut windows = self.windows.lock();
        let w = windows
            .entry(channel.to_string())
            .or_insert_with(|| Windows {
                started: std::time::Instant::now(),
                current: histogram(),
                previous: histogram(),
            });
        if w.started.elapsed() >= LATENCY_WINDOW {
            w.previous = std::mem::replace(&mut w.current, histogram());
            w.started = std::time::Instant::now();
        }
        w.current.saturating_record(micros.max(1));
    }
}
