//! [`Worker`]: runs every `#[consumer]` linked into the binary.
//!
//! ```no_run
//! use queue_runtime::prelude::*;
//! # #[derive(Debug)] struct Mailer;
//! # impl Mailer { fn new() -> Self { Mailer } }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let queue = queue_runtime::connect_default().await?;
//!     Worker::new(queue).provide(Mailer::new()).run().await?;
//!     Ok(())
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use queue_core::consume::{ConsumerHandle, DEFAULT_MAX_PARALLEL, start_consumer};
use queue_core::registry::{self, ConsumerDecl, Deps};
use queue_core::{Handled, Observer, Queue, QueueError};

/// What is wrong with a worker's setup; every problem is reported at once, before any
/// message is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupProblem {
    /// A consumer takes a dependency nobody provided.
    MissingDependency {
        /// `module::function` of the consumer.
        consumer: String,
        /// The type to provide.
        type_name: &'static str,
    },
    /// One channel name is declared on several types.
    DuplicateChannel(registry::NameClash),
    /// `only` named a consumer or channel that does not exist.
    UnknownSelection(String),
    /// Nothing to run.
    NoConsumers,
    /// The dashboard would serve beyond loopback without a token.
    OpenDashboard(std::net::SocketAddr),
}

impl fmt::Display for SetupProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupProblem::MissingDependency {
                consumer,
                type_name,
            } => write!(
                f,
                "consumer `{consumer}` needs `Dep<{type_name}>`, but no `{type_name}` was provided: call `Worker::provide`"
            ),
            SetupProblem::DuplicateChannel(clash) => clash.fmt(f),
            SetupProblem::UnknownSelection(name) => {
                write!(
                    f,
                    "no consumer or channel named `{name}` is linked into this binary"
                )
            }
            SetupProblem::NoConsumers => f.write_str("no `#[consumer]` is linked into this binary"),
            SetupProblem::OpenDashboard(addr) => write!(
                f,
                "the dashboard on {addr} (beyond loopback) needs a token: set one with `Worker::dashboard_auth`"
            ),
        }
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The setup is wrong; nothing was consumed.
    #[error("worker setup failed:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Setup(Vec<SetupProblem>),
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Installing signal handlers failed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs registered consumers against a queue.
pub struct Worker {
    queue: Queue,
    deps: Deps,
    only: Option<Vec<String>>,
    grace: Duration,
    #[cfg(feature = "metrics")]
    metrics: Option<std::net::SocketAddr>,
    dashboard: Option<std::net::SocketAddr>,
    #[cfg(feature = "dashboard")]
    dashboard_auth: crate::dashboard::DashboardAuth,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("only", &self.only)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker for every consumer linked into the binary.
    pub fn new(queue: Queue) -> Self {
        Worker {
            queue,
            deps: Deps::default(),
            only: None,
            grace: Duration::from_secs(30),
            #[cfg(feature = "metrics")]
            metrics: None,
            dashboard: None,
            #[cfg(feature = "dashboard")]
            dashboard_auth: crate::dashboard::DashboardAuth::default(),
        }
    }

    /// Serves the web dashboard on `addr` (`GET /`, and its JSON API under `/api`): the
    /// queue's channels, with this worker's handler latency and the options its channels
    /// declare. Open to anyone who reaches `addr` unless [`Worker::dashboard_auth`] sets
    /// tokens.
    #[cfg(feature = "dashboard")]
    #[must_use]
    pub fn dashboard(mut self, addr: std::net::SocketAddr) -> Self {
        self.dashboard = Some(addr);
        self
    }

    /// The tokens the dashboard asks for.
    #[cfg(feature = "dashboard")]
    #[must_use]
    pub fn dashboard_auth(mut self, auth: crate::dashboard::DashboardAuth) -> Self {
        self.dashboard_auth = auth;
        self
    }

    /// Serves Prometheus metrics on `addr` (`GET /metrics`): what this worker's consumers
    /// handled and how long they took, and the queue's depths and counters.
    #[cfg(feature = "metrics")]
    #[must_use]
    pub fn metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Provides a dependency that consumers take as `Dep<T>`.
    #[must_use]
    pub fn provide<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.deps.insert(value);
        self
    }

    /// Provides a shared dependency.
    #[must_use]
    pub fn provide_arc<T: Send + Sync + 'static>(mut self, value: Arc<T>) -> Self {
        self.deps.insert_arc(value);
        self
    }

    /// Runs only these consumers: each name is a function name, a `module::function` path
    /// or a channel name.
    #[must_use]
    pub fn only<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// How long a shutdown waits for running handlers before giving their messages back
    /// (default 30 s).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The consumers this worker would run, or every setup problem.
    ///
    /// # Errors
    /// [`WorkerError::Setup`] listing missing dependencies, duplicate channel names, unknown
    /// selections and an empty selection together.
    pub fn plan(&self) -> Result<Vec<&'static ConsumerDecl>, WorkerError> {
        let planned = plan(
            registry::consumers(),
            registry::channels(),
            &self.deps,
            self.only.as_deref(),
        );
        let open = self.open_dashboard();
        match (planned, open) {
            (Ok(plan), None) => Ok(plan),
            (Ok(_), Some(p)) => Err(WorkerError::Setup(vec![p])),
            (Err(mut problems), open) => {
                problems.extend(open);
                Err(WorkerError::Setup(problems))
            }
        }
    }

    /// A dashboard beyond loopback without a token would let anyone who reaches it act.
    fn open_dashboard(&self) -> Option<SetupProblem> {
        let addr = self.dashboard?;
        #[cfg(feature = "dashboard")]
        let tokened = self.dashboard_auth.token.is_some();
        #[cfg(not(feature = "dashboard"))]
        let tokened = false;
        (!addr.ip().is_loopback() && !tokened).then_some(SetupProblem::OpenDashboard(addr))
    }

    /// Starts every planned consumer and returns at once.
    ///
    /// # Errors
    /// As [`Worker::plan`]; the queue's error when a subscription cannot be opened.
    pub async fn start(self) -> Result<RunningWorker, WorkerError> {
        let plan = self.plan()?;
        let mut observers: Vec<Arc<dyn Observer>> = Vec::new();
        #[cfg(feature = "metrics")]
        let metrics = self.metrics.map(|addr| {
            let metrics = crate::metrics::Metrics::new();
            observers.push(metrics.clone());
            (addr, metrics)
        });
        #[cfg(feature = "dashboard")]
        let latency = self.dashboard.map(|addr| {
            let latency = crate::dashboard::HandlerLatency::new();
            observers.push(latency.clone());
            (addr, latency)
        });
        let queue = match observers.len() {
            0 => self.queue.clone(),
            1 => self.queue.observed(observers.remove(0)),
            _ => self.queue.observed(Arc::new(Observers(observers))),
        };
        #[cfg_attr(
            not(any(feature = "metrics", feature = "dashboard")),
            expect(unused_variables, reason = "used by the servers")
        )]
        let io = |e| WorkerError::Queue(QueueError::Io(e));
        #[cfg_attr(
            not(any(feature = "metrics", feature = "dashboard")),
            expect(unused_mut, reason = "filled by the servers")
        )]
        let mut servers = Vec::new();
        #[cfg_attr(
            not(feature = "dashboard"),
            expect(unused_mut, reason = "set by the dashboard")
        )]
        let mut dashboard_addr = None;
        #[cfg(feature = "metrics")]
        if let Some((addr, metrics)) = metrics {
            servers.push(metrics.serve(addr, queue.clone()).await.map_err(io)?);
        }
        #[cfg(feature = "dashboard")]
        if let Some((addr, latency)) = latency {
            let specs: crate::dashboard::Specs =
                Arc::new(|| registry::channels().map(|c| (c.spec)()).collect());
            let dashboard =
                crate::dashboard::Dashboard::new(queue.clone(), self.dashboard_auth.clone(), specs)
                    .with_latency(latency);
            let (bound, server) = Arc::new(dashboard).serve(addr).await.map_err(io)?;
            dashboard_addr = Some(bound);
            servers.push(server);
        }
        let mut handles = Vec::with_capacity(plan.len());
        for decl in plan {
            let handler = (decl.build)(&self.deps).ok_or_else(|| {
                WorkerError::Setup(vec![SetupProblem::MissingDependency {
                    consumer: decl.path(),
                    type_name: "unknown",
                }])
            })?;
            let max_parallel = if decl.max_parallel == 0 {
                DEFAULT_MAX_PARALLEL
            } else {
                decl.max_parallel
            };
            let spec = (decl.spec)();
            tracing::info!(consumer = %decl.path(), channel = %spec.name, max_parallel, "starting consumer");
            let handle =
                start_consumer(queue.clone(), spec, handler, max_parallel, decl.path()).await?;
            handles.push(handle);
        }
        Ok(RunningWorker {
            handles,
            grace: self.grace,
            servers,
            dashboard_addr,
        })
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully: stops taking messages,
    /// waits for running handlers up to the grace period, and gives the rest back so other
    /// workers get them at once.
    ///
    /// # Errors
    /// As [`Worker::start`].
    pub async fn run(self) -> Result<(), WorkerError> {
        let signal = shutdown_signal().map_err(WorkerError::Signal)?;
        self.run_until(signal).await
    }

    /// Runs until `stop` completes, then shuts down as [`Worker::run`] does.
    ///
    /// # Errors
    /// As [`Worker::start`].
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let running = self.start().await?;
        stop.await;
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    }
}

/// A started worker.
#[derive(Debug)]
pub struct RunningWorker {
    handles: Vec<ConsumerHandle>,
    grace: Duration,
    /// The metrics and dashboard servers.
    servers: Vec<tokio::task::JoinHandle<()>>,
    dashboard_addr: Option<std::net::SocketAddr>,
}

impl RunningWorker {
    /// Where the dashboard listens (its port, when it was asked for port 0).
    pub fn dashboard_addr(&self) -> Option<std::net::SocketAddr> {
        self.dashboard_addr
    }

    /// Names of the running consumers.
    pub fn consumers(&self) -> Vec<&str> {
        self.handles.iter().map(ConsumerHandle::name).collect()
    }

    /// Stops every consumer, waiting for running handlers up to the grace period.
    pub async fn shutdown(self) {
        for server in &self.servers {
            server.abort();
        }
        let grace = self.grace;
        let stops = self.handles.into_iter().map(|h| h.stop(grace));
        for r in futures_util::future::join_all(stops).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "consumer did not stop cleanly");
            }
        }
    }
}

/// Several observers as one.
struct Observers(Vec<Arc<dyn Observer>>);

impl Observer for Observers {
    fn handled(&self, channel: &str, handled: Handled, elapsed: Duration) {
        for o in &self.0 {
            o.handled(channel, handled, elapsed);
        }
    }
}

fn plan<'a>(
    consumers: impl IntoIterator<Item = &'a ConsumerDecl>,
    channels: impl IntoIterator<Item = &'a registry::ChannelDecl>,
    deps: &Deps,
    only: Option<&[String]>,
) -> Result<Vec<&'a ConsumerDecl>, Vec<SetupProblem>> {
    let mut problems: Vec<SetupProblem> = registry::name_clashes(channels)
        .into_iter()
        .map(SetupProblem::DuplicateChannel)
        .collect();
    let all: Vec<&ConsumerDecl> = consumers.into_iter().collect();
    let selected: Vec<&ConsumerDecl> = match only {
        None => all.clone(),
        Some(names) => {
            for name in names {
                if !all.iter().any(|d| matches(d, name)) {
                    problems.push(SetupProblem::UnknownSelection(name.clone()));
                }
            }
            all.iter()
                .copied()
                .filter(|d| names.iter().any(|n| matches(d, n)))
                .collect()
        }
    };
    if selected.is_empty() && problems.is_empty() {
        problems.push(SetupProblem::NoConsumers);
    }
    for decl in &selected {
        for req in (decl.requirements)() {
            if !deps.satisfies(&req) {
                problems.push(SetupProblem::MissingDependency {
                    consumer: decl.path(),
                    type_name: req.type_name,
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(selected)
    } else {
        Err(problems)
    }
}

fn matches(decl: &ConsumerDecl, name: &str) -> bool {
    decl.name == name || decl.path() == name || (decl.spec)().name == name
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere).
///
/// # Errors
/// When the handlers cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_core::registry::{ChannelDecl, Dep, FromDeps, Requirement};
    use queue_core::{ChannelSpec, ErasedHandler};

    struct Mailer;
    struct Db;

    fn spec_a() -> ChannelSpec {
        ChannelSpec::new("a")
    }
    fn reqs() -> Vec<Requirement> {
        vec![
            <Dep<Mailer> as FromDeps>::requirement(),
            <Dep<Db> as FromDeps>::requirement(),
        ]
    }
    fn none() -> Vec<Requirement> {
        Vec::new()
    }
    fn build(_: &Deps) -> Option<ErasedHandler> {
        None
    }

    fn decl(name: &'static str, requirements: fn() -> Vec<Requirement>) -> ConsumerDecl {
        ConsumerDecl {
            name,
            module_path: "app",
            max_parallel: 0,
            spec: spec_a,
            message_type: || "app::A",
            requirements,
            build,
        }
    }

    #[test]
    fn missing_dependencies_and_duplicate_channels_are_reported_together() {
        let consumers = [decl("send", reqs)];
        let channels = [
            ChannelDecl {
                spec: spec_a,
                message_type: || "app::A",
            },
            ChannelDecl {
                spec: spec_a,
                message_type: || "other::B",
            },
        ];
        let mut deps = Deps::default();
        deps.insert(Db);
        let problems = plan(&consumers, &channels, &deps, None).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("`app::A`, `other::B`"), "{}", text[0]);
        assert!(
            text[1].contains("app::send") && text[1].contains("Mailer"),
            "{}",
            text[1]
        );
        let err = WorkerError::Setup(problems).to_string();
        assert!(err.starts_with("worker setup failed:\n  - "), "{err}");
    }

    #[test]
    fn only_selects_by_function_path_or_channel_and_rejects_unknown_names() {
        let consumers = [decl("one", none), decl("two", none)];
        let deps = Deps::default();
        let picked = plan(&consumers, [], &deps, Some(&["two".into()])).unwrap();
        assert_eq!(
            picked.iter().map(|d| d.name).collect::<Vec<_>>(),
            vec!["two"]
        );
        let by_path = plan(&consumers, [], &deps, Some(&["app::one".into()])).unwrap();
        assert_eq!(by_path.len(), 1);
        let by_channel = plan(&consumers, [], &deps, Some(&["a".into()])).unwrap();
        assert_eq!(by_channel.len(), 2);
        let unknown = plan(&consumers, [], &deps, Some(&["three".into()])).unwrap_err();
        assert_eq!(
            unknown,
            vec![SetupProblem::UnknownSelection("three".into())]
        );
    }

    #[cfg(feature = "dashboard")]
    #[tokio::test]
    async fn a_dashboard_beyond_loopback_needs_a_token() {
        let queue = crate::connect("memory://").await.unwrap();
        let open: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let worker = Worker::new(queue.clone()).dashboard(open);
        assert_eq!(
            worker.open_dashboard(),
            Some(SetupProblem::OpenDashboard(open))
        );
        let tokened = worker.dashboard_auth(crate::dashboard::DashboardAuth {
            token: Some("s3cret".into()),
            read_token: None,
        });
        assert_eq!(tokened.open_dashboard(), None);
        let local = Worker::new(queue).dashboard("127.0.0.1:8080".parse().unwrap());
        assert_eq!(local.open_dashboard(), None);
    }

    #[test]
    fn a_worker_with_no_consumers_is_an_error() {
        let deps = Deps::default();
        assert_eq!(
            plan([], [], &deps, None).unwrap_err(),
            vec![SetupProblem::NoConsumers]
        );
    }
}
