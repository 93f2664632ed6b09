//! The application process (the seed's `app.ts`): an HTTP server whose `POST /users`
//! registers a user by producing `UserRegistered`; a worker process handles it.
//!
//! Run it with `cargo run -p examples --bin app`, then
//! `curl -i -X POST localhost:3000/users -H 'content-type: application/json' -d '{"id":1,"username":"Peter"}'`.
//! `APP_ADDR` is the address to listen on (default `127.0.0.1:3000`), `QUEUE_URL` the queue
//! (default `file://queue-data`; use `queue://HOST:PORT` to share a `queue-broker` with
//! workers), `RUST_LOG` the log level (default `info`).
//!
//! | route | answers |
//! |---|---|
//! | `POST /users` `{"id": 1, "username": "Peter"}` | 202 `{"message_id": 7, "duplicate": false}`; the same user again within 1 s: 202 with the first `message_id` and `"duplicate": true` |
//! | | 400, 415 or 422 `{"error": …}` for a body that is not such a user; 503 when the queue fails |
//! | `GET /healthz` | 200 `{"status": "ok"}` while the queue answers, else 503 |

use anyhow::Context as _;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use examples::channels::{UserRegistered, UserRegisteredChannel};
use queue_runtime::{Producer, Queue, QueueError, Receipt, shutdown_signal};
use serde_json::json;

/// The environment variable naming the address to listen on.
const ADDR_VAR: &str = "APP_ADDR";
const DEFAULT_ADDR: &str = "127.0.0.1:3000";

/// The seed's `Service`: registers users through the `user/registered` channel.
#[derive(Debug, Clone)]
struct Registrations {
    channel: Producer<UserRegisteredChannel>,
}

impl Registrations {
    async fn register_user(&self, user: UserRegistered) -> Result<Receipt, QueueError> {
        self.channel.produce(user).await
    }
}

#[derive(Debug, Clone)]
struct AppState {
    queue: Queue,
    registrations: Registrations,
}

fn router(queue: Queue) -> Router {
    let state = AppState {
        registrations: Registrations {
            channel: UserRegistered::producer(&queue),
        },
        queue,
    };
    Router::new()
        .route("/users", post(register))
        .route("/healthz", get(healthz))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn register(
    State(state): State<AppState>,
    body: Result<Json<UserRegistered>, JsonRejection>,
) -> Response {
    let user = match body {
        Ok(Json(user)) => user,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if user.username.trim().is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "`username` must not be empty",
        );
    }
    let (user_id, username) = (user.id, user.username.clone());
    match state.registrations.register_user(user).await {
        Ok(receipt) => {
            tracing::info!(
                message_id = %receipt.id,
                duplicate = receipt.duplicate,
                user_id,
                %username,
                "user registered"
            );
            let body = json!({ "message_id": receipt.id.0, "duplicate": receipt.duplicate });
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(user_id, error = %e, "cannot produce UserRegistered");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the queue is unavailable: {e}"),
            )
        }
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.queue.stats().await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the queue is unavailable: {e}"),
        ),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let otlp = examples::init_tracing("example-app")?;

    let stop = shutdown_signal().context("listening for SIGINT and SIGTERM")?;
    let addr = std::env::var(ADDR_VAR).unwrap_or_else(|_| DEFAULT_ADDR.to_string());
    let queue = examples::connect_from_env().await?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr} (set {ADDR_VAR} to change it)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(addr = %local, queue = queue.description(), "app listening");

    axum::serve(listener, router(queue.clone()))
        .with_graceful_shutdown(stop)
        .await
        .context("serving HTTP")?;
    queue.close().await.context("closing the queue")?;
    tracing::info!("stopped");
    if let Some(otlp) = otlp {
        otlp.shutdown().context("sending the last spans")?;
    }
    Ok(())
}
