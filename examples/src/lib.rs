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
//! Several processes share one queue through the broker:
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
